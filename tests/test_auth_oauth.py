"""OpenID Connect end to end: a real FastHTML app, authlib's Starlette client and a local OIDC provider, redirects
followed by hand."""

import json
from functools import partial
from urllib.parse import urlsplit, parse_qs, urlencode

import httpx
import pyotp
import pytest
from oidc_provider_mock import run_server_in_thread, User

from fh_saas.api_keys import create_api_key
from fh_saas.db_host import timestamp
from fh_saas.oauth import add_oauth_routes, oidc_provider, oauth_identities_t
from fh_saas.passwords import LoginFailed, second_step
from fh_saas.two_factor import PENDING_COOKIE, begin_setup, confirm_setup
from auth_helpers import make_world, SECRET

# the provider mock itself uses authlib APIs that warn about their own deprecation
pytestmark = pytest.mark.filterwarnings(
    'ignore:get_jwt_config:DeprecationWarning', 'ignore:authlib.jose:DeprecationWarning'
)

USERS = [
    User(sub='alice-sub', claims=dict(email='alice@example.com', email_verified=True, name='Alice')),
    User(sub='mallory-sub', claims=dict(email='ann@example.com', email_verified=False)),
    User(sub='ann-sub', claims=dict(email='ANN@example.com', email_verified=True)),
    User(sub='sam-sub', claims=dict(email='Sam@example.com', email_verified=True, name='Sam')),
    User(sub='lax-sam-sub', claims=dict(email='sam@example.com', email_verified=False)),
    User(sub='lax-new-sub', claims=dict(email='nobody@example.com', email_verified=False)),
]


@pytest.fixture(scope='module')
def provider():
    with run_server_in_thread(user_claims=USERS) as server:
        yield f'http://localhost:{server.server_port}'


@pytest.fixture
def world(sqlite_host_db, tmp_path, provider):
    w = make_world(sqlite_host_db, tmp_path)
    w.user('ann', email_verified_at=timestamp())
    w.tenant('acme')
    w.member('ann', 'acme', 'owner')
    add_oauth_routes(w.app, w.sessions, [oidc_provider('mock', 'client-1', 'secret-1', provider)], after_login='/notes')
    yield w
    w.tenant_dbs.close()


def sign_in(c, sub, tamper_state=False):
    "Start at the app, consent at the provider as `sub`, come back to the callback: the app's final response."
    start = c.get('/auth/oauth/mock/login')
    assert start.status_code == 302
    authorize = start.headers['location']
    assert authorize.startswith('http://localhost') and 'nonce=' in authorize and 'state=' in authorize
    consent = httpx.post(authorize, data=dict(sub=sub), follow_redirects=False)
    assert consent.status_code == 302, consent.text
    back = urlsplit(consent.headers['location'])
    assert back.path == '/auth/oauth/mock/callback'
    query = parse_qs(back.query)
    if tamper_state:
        query['state'] = ['forged' + query['state'][0][6:]]
    return c.get(f'{back.path}?{urlencode({k: v[0] for k, v in query.items()})}')


@pytest.mark.oidc
def test_new_user_is_created_and_logged_in(world):
    c = world.client()
    r = sign_in(c, 'alice-sub')
    assert (r.status_code, r.headers['location']) == (303, '/notes')
    alice = world.host_db.global_users(where="email = 'alice@example.com'")[0]
    assert alice.name == 'Alice' and alice.email_verified_at
    assert c.get('/tenants').text == f'choose a tenant, {alice.id}'
    assert [e.event_type for e in world.host_db.audit_logs(order_by='created_at')][-3:] == [
        'auth.user_created',
        'auth.oauth_linked',
        'auth.login',
    ]
    assert sign_in(world.client(), 'alice-sub').status_code == 303
    assert world.host_db.global_users.count == 2


@pytest.mark.oidc
def test_verified_email_links_to_existing_user(world):
    c = world.client()
    assert sign_in(c, 'ann-sub').status_code == 303
    assert c.get('/notes').json()['user'] == 'ann'
    assert world.host_db.q("select user_id from auth_oauth_identities")[0]['user_id'] == 'ann'


@pytest.mark.oidc
def test_unverified_email_never_links(world):
    c = world.client()
    r = sign_in(c, 'mallory-sub')
    assert (r.status_code, r.headers['location']) == (303, '/login?error=email_not_verified')
    assert world.host_db.q("select count(*) n from auth_oauth_identities")[0]['n'] == 0
    assert c.get('/notes').status_code == 303 and c.get('/notes').headers['location'].startswith('/login')


@pytest.mark.oidc
def test_unverified_email_never_creates_a_user(world):
    r = sign_in(world.client(), 'lax-new-sub')
    assert r.headers['location'] == '/login?error=email_not_verified'
    assert world.host_db.global_users.count == 1
    assert world.host_db.q("select count(*) n from auth_oauth_identities")[0]['n'] == 0


def squatter(world):
    """An attacker's password account on Sam's address, never confirmed: a live session, an API key and an identity at
    a lax provider."""
    world.user('sam')
    world.member('sam', 'acme')
    attacker = world.login_client('sam')
    assert attacker.get('/tenants').text == 'choose a tenant, sam'
    key, _ = create_api_key(world.host_db, 'acme', 'sam', 'attacker ci')
    assert world.client().get('/api/notes', headers={'Authorization': f'Bearer {key}'}).status_code == 200
    with world.host_db.transaction() as conn:
        conn.execute(
            oauth_identities_t.insert().values(provider='lax', subject='squat', user_id='sam', email='sam@example.com')
        )
    return attacker, key


@pytest.mark.oidc
def test_unverified_email_does_not_claim_an_unverified_account(world):
    attacker, key = squatter(world)
    assert sign_in(world.client(), 'lax-sam-sub').headers['location'] == '/login?error=email_not_verified'
    assert attacker.get('/tenants').text == 'choose a tenant, sam'
    assert world.host_db.global_users['sam'].email_verified_at is None


@pytest.mark.oidc
def test_verified_owner_claims_a_squatted_account(world):
    attacker, key = squatter(world)
    victim = world.client()
    r = sign_in(victim, 'sam-sub')
    assert (r.status_code, r.headers['location']) == (303, '/notes')
    assert victim.get('/tenants').text == 'choose a tenant, sam'
    assert attacker.get('/tenants').headers['location'].startswith('/login')
    assert world.client().get('/api/notes', headers={'Authorization': f'Bearer {key}'}).status_code == 401
    assert (
        world.client().post('/login', data=dict(email='sam@example.com', password='correct horse battery')).status_code
        == 401
    )
    sam = world.host_db.global_users['sam']
    assert sam.email_verified_at and sam.password_hash is None
    assert world.host_db.q("select provider, subject from auth_oauth_identities where user_id = 'sam'") == [
        dict(provider='mock', subject='sam-sub')
    ]
    claim = world.host_db.audit_logs(where="event_type = 'auth.unverified_account_claimed'")
    assert [(a.target_id, json.loads(a.details)) for a in claim] == [
        ('sam', dict(provider='mock', logins_ended=1, keys_revoked=1, identities_removed=1))
    ]
    assert world.host_db.memberships(where="user_id = 'sam'")[0].is_active
    assert sign_in(world.client(), 'sam-sub').status_code == 303
    assert len(world.host_db.audit_logs(where="event_type = 'auth.unverified_account_claimed'")) == 1


@pytest.mark.oidc
def test_forged_state_is_refused(world):
    c = world.client()
    r = sign_in(c, 'alice-sub', tamper_state=True)
    assert (r.status_code, r.headers['location']) == (303, '/login?error=provider_refused')
    assert world.host_db.global_users.count == 1


@pytest.mark.oidc
def test_callback_without_a_started_login_is_refused(world):
    r = world.client().get('/auth/oauth/mock/callback?code=abc&state=xyz')
    assert r.headers['location'] == '/login?error=provider_refused'
    assert world.client().get('/auth/oauth/nope/login').headers['location'] == '/login?error=unknown_provider'


@pytest.mark.postgres
def test_concurrent_first_sign_ins_make_one_user_and_one_identity(pg_url, race):
    from fh_saas.db_host import HostDatabase
    from fh_saas.oauth import ExternalIdentity, link_or_create_user
    from fh_saas.sessions import SessionManager

    db = HostDatabase(pg_url)
    sessions = SessionManager(db, SECRET)
    try:
        ident = ExternalIdentity('google', 'g-77', 'new@example.com', True, 'New')
        ids = set(race([lambda: link_or_create_user(sessions, ident).id] * 6))
        assert len(ids) == 1
        assert db.q("select count(*) n from core_users")[0]['n'] == 1
        assert db.q("select count(*) n from auth_oauth_identities")[0]['n'] == 1
        assert db.q("select count(*) n from sys_audit_logs where event_type = 'auth.user_created'")[0]['n'] == 1
    finally:
        db.close()
        HostDatabase.reset_instance()


@pytest.mark.postgres
def test_concurrent_claims_by_several_providers_claim_once_and_keep_every_link(pg_url, race):
    """Six providers vouch for the owner of an unverified account at once: one claim; no claim deletes another's fresh
    link."""
    from fh_saas.db_host import HostDatabase, GlobalUser
    from fh_saas.oauth import ExternalIdentity, link_or_create_user
    from fh_saas.sessions import SessionManager

    db = HostDatabase(pg_url)
    sessions = SessionManager(db, SECRET)
    try:
        db.global_users.insert(GlobalUser(id='sam', email='sam@example.com', password_hash='attacker-chosen'))

        def sign_in(n):
            return link_or_create_user(sessions, ExternalIdentity(f'p{n}', 'sub', 'sam@example.com', True)).id

        assert set(race([partial(sign_in, n) for n in range(6)])) == {'sam'}
        assert db.q("select count(*) n from auth_oauth_identities where user_id = 'sam'")[0]['n'] == 6
        assert (
            db.q("select count(*) n from sys_audit_logs where event_type = 'auth.unverified_account_claimed'")[0]['n']
            == 1
        )
        assert db.global_users['sam'].password_hash is None
    finally:
        db.close()
        HostDatabase.reset_instance()


@pytest.mark.oidc
def test_a_user_with_two_factor_signs_in_with_the_provider_then_a_code(world, monkeypatch):
    monkeypatch.setenv('FH_SAAS_SECRET_KEY', SECRET)
    app = pyotp.TOTP(begin_setup(world.host_db, 'ann'))
    confirm_setup(world.host_db, 'ann', app.at(world.clock()), world.clock())
    before = world.host_db.q("select count(*) n from auth_sessions")[0]['n']
    c = world.client()
    r = sign_in(c, 'ann-sub')
    assert (r.status_code, r.headers['location']) == (303, '/login/two-factor?next=/notes')
    assert world.sessions.cookie_name not in r.headers['set-cookie'] and c.get('/notes').status_code == 303
    assert world.host_db.q("select count(*) n from auth_sessions")[0]['n'] == before
    pending = c.cookies.get(PENDING_COOKIE)
    with pytest.raises(LoginFailed):
        second_step(world.sessions, pending, '000000')
    world.clock.advance(seconds=30)
    _, cookie = second_step(world.sessions, pending, app.at(world.clock()))
    c.cookies.set(world.sessions.cookie_name, cookie)
    assert c.get('/notes').json()['user'] == 'ann'
    assert 'auth.login' not in [e.event_type for e in world.host_db.audit_logs() if e.details == '{"provider": "mock"}']
