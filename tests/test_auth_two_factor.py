"""Two-factor sign-in through a real FastHTML app over HTTP: setup on the account page, the second step at login
(codes, recovery codes, replays, throttling, expiry, `next`), password reset, a tenant's rule, and the audit trail."""

import re
from concurrent.futures import ThreadPoolExecutor

import pyotp
import pytest
from argon2 import PasswordHasher
from fasthtml.common import FastHTML
from starlette.testclient import TestClient

from fh_saas import passwords, ui
from fh_saas.audit import audit_events
from fh_saas.beforeware import AuthResolver, saas_beforeware
from fh_saas.db_host import GlobalUser, HostDatabase
from fh_saas.mail import MemoryOutbox
from fh_saas.api_keys import create_api_key
from fh_saas.db_host import Membership
from fh_saas.db_tenant import provision_tenant
from fh_saas.pages_auth import AccountPages, AuthPages
from fh_saas.pages_tenants import TeamPages, TenantPages
from fh_saas.passwords import hash_password
from fh_saas.rate_limits import RateLimit
from fh_saas.saas_context import Saas
from fh_saas.sessions import SessionManager, sessions_t, start_impersonation
from fh_saas.tenant_router import TenantRouter
from fh_saas.two_factor import PENDING_COOKIE, two_factor_enabled
from auth_helpers import Clock

FAST = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
SECRET = 'two-factor-pages-secret-' + 'q' * 40
PW = 'correct horse battery'


class Site:
    "The app, its parts, and helpers that act as Ann in a browser."

    def __init__(self, host_db, sessions, clock, outbox, app):
        self.host_db, self.sessions, self.clock, self.outbox, self.app = host_db, sessions, clock, outbox, app

    def client(self) -> TestClient:
        return TestClient(self.app, follow_redirects=False, base_url='https://app.test')

    def user(self, uid='ann', password=PW, **kw):
        self.host_db.global_users.insert(
            GlobalUser(id=uid, email=f'{uid}@example.com', password_hash=hash_password(password, FAST), **kw)
        )

    def login(self, c, uid='ann', password=PW, next=''):
        return c.post('/login', data=dict(email=f'{uid}@example.com', password=password, next=next))

    def enable(self, uid='ann') -> tuple[TestClient, pyotp.TOTP, list[str]]:
        "Sign `uid` in and turn two-factor sign-in on from the account page: the browser, the app, the codes."
        c = self.client()
        assert self.login(c, uid).headers['location'] == '/'
        token = csrf(c.get('/account').text)
        assert (
            c.post('/account/two-factor/setup', data=dict(csrf=token)).headers['location']
            == '/account?done=two_factor_setup'
        )
        page = c.get('/account?done=two_factor_setup').text
        app = pyotp.TOTP(re.search(r'id="two-factor-secret">([A-Z2-7 ]+)<', page).group(1).replace(' ', ''))
        r = c.post('/account/two-factor/confirm', data=dict(code=app.at(self.clock()), csrf=token))
        assert r.headers['location'] == '/account?done=two_factor_enabled'
        codes = re.findall(r'<code>([A-Z2-7]{4}(?:-[A-Z2-7]{4}){3})</code>', c.get(r.headers['location']).text)
        assert len(codes) == 10
        self.clock.advance(seconds=30)  # the code used to confirm is spent; the next step's is fresh
        return c, app, codes

    def code(self, app: pyotp.TOTP) -> str:
        return app.at(self.clock())

    def sessions_of(self, uid='ann') -> int:
        return len(self.host_db.q(f"select * from {sessions_t.name} where user_id = :u and revoked_at is null", u=uid))


def csrf(page: str) -> str:
    return re.search(r'value="([0-9a-f]{64})" name="csrf"', page).group(1)


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.setenv('FH_SAAS_SECRET_KEY', SECRET)
    monkeypatch.setenv('FH_SAAS_TENANT_DIR', str(tmp_path / 'tenants'))
    host_db, clock = HostDatabase(f"sqlite:///{tmp_path / 'host.db'}"), Clock()
    sessions, router, outbox = SessionManager(host_db, SECRET, clock=clock), TenantRouter(host_db), MemoryOutbox()
    saas = Saas(host_db, sessions, router, outbox, base_url='https://app.test', home='/', brand='Acme Cloud')
    resolver = AuthResolver(host_db, sessions, router.tenant_db)
    app = FastHTML(before=saas_beforeware(resolver), hdrs=ui.static_headers(), default_hdrs=False, secret_key=SECRET)
    AuthPages(saas, hasher=FAST, two_factor_limit=RateLimit(3, 300)).mount(app)
    AccountPages(saas, hasher=FAST, two_factor_limit=RateLimit(3, 300)).mount(app)
    TenantPages(saas).mount(app)
    TeamPages(saas).mount(app)
    app.get('/')(lambda auth: f'home of {auth.user.email} in {auth.tenant_id}')
    app.get('/api/whoami')(lambda auth: dict(user=auth.user.id, tenant=auth.tenant_id))
    s = Site(host_db, sessions, clock, outbox, app)
    s.user()
    yield s
    router.close()
    host_db.close()
    HostDatabase.reset_instance()


def events(site, prefix: str) -> list[str]:
    "The types of the audit events starting with `prefix`, oldest first."
    return [e.event_type for e in audit_events(site.host_db, limit=1000) if e.event_type.startswith(prefix)][::-1]


def test_the_account_page_sets_it_up_with_a_qr_code_of_the_brand_and_shows_the_codes_once(site):
    c, app, codes = site.enable()
    assert two_factor_enabled(site.host_db, 'ann')
    page = c.get('/account').text
    assert '10 recovery codes left' in page and not any(code in page for code in codes)
    c2 = site.client()
    site.login(c2)
    assert not any(code in c2.get('/login/two-factor').text for code in codes)
    assert events(site, 'two_factor.') == ['two_factor.enabled']


def test_the_setup_page_shows_a_qr_code_naming_the_brand(site):
    c = site.client()
    site.login(c)
    c.post('/account/two-factor/setup', data=dict(csrf=csrf(c.get('/account').text)))
    page = c.get('/account').text
    assert '<svg' in page and 'Two-factor setup QR code' in page and 'id="two-factor-secret"' in page
    assert not two_factor_enabled(site.host_db, 'ann')


def test_a_wrong_first_code_leaves_it_off(site):
    c = site.client()
    site.login(c)
    token = csrf(c.get('/account').text)
    c.post('/account/two-factor/setup', data=dict(csrf=token))
    r = c.post('/account/two-factor/confirm', data=dict(code='000000', csrf=token))
    assert r.headers['location'] == '/account?done=two_factor_wrong' and not two_factor_enabled(site.host_db, 'ann')
    assert 'That code is wrong' in c.get(r.headers['location']).text


def test_the_password_alone_opens_no_session_and_the_code_keeps_next(site):
    _, app, _ = site.enable()
    before = site.sessions_of()
    c = site.client()
    r = site.login(c, next='/account')
    assert (r.status_code, r.headers['location']) == (303, '/login/two-factor?next=/account')
    cookie = r.headers['set-cookie']
    assert f'{PENDING_COOKIE}=' in cookie and 'HttpOnly' in cookie and 'Path=/login/two-factor' in cookie
    assert 'Max-Age=300' in cookie and 'fh_saas_session' not in cookie
    assert site.sessions_of() == before and c.get('/account').status_code == 303
    page = c.get(r.headers['location']).text
    assert 'authenticator app' in page and 'value="/account" name="next"' in page
    r = c.post('/login/two-factor', data=dict(code=site.code(app), next='/account'))
    assert (r.status_code, r.headers['location']) == (303, '/account')
    assert f'{PENDING_COOKIE}=""' in r.headers['set-cookie'] and site.sessions_of() == before + 1
    assert c.get('/account').status_code == 200
    assert events(site, 'auth.two_factor_') == ['auth.two_factor_passed']


def test_a_wrong_code_is_refused_with_a_notice_and_audited(site):
    _, app, _ = site.enable()
    c = site.client()
    site.login(c)
    r = c.post('/login/two-factor', data=dict(code='123456'))
    assert r.headers['location'] == '/login/two-factor?done=wrong'
    assert 'That code is wrong' in c.get(r.headers['location']).text
    assert c.get('/account').status_code == 303
    assert events(site, 'auth.two_factor_') == ['auth.two_factor_failed']
    assert c.post('/login/two-factor', data=dict(code=site.code(app))).headers['location'] == '/'


def test_a_code_once_accepted_is_refused_in_its_time_step(site):
    _, app, _ = site.enable()
    first, second = site.client(), site.client()
    site.login(first)
    code = site.code(app)
    assert first.post('/login/two-factor', data=dict(code=code)).headers['location'] == '/'
    site.login(second)
    assert second.post('/login/two-factor', data=dict(code=code)).headers['location'] == '/login/two-factor?done=wrong'


def test_wrong_codes_are_throttled_per_user(site):
    _, app, _ = site.enable()
    c = site.client()
    site.login(c)
    for _ in range(3):
        c.post('/login/two-factor', data=dict(code='000000'))
    r = c.post('/login/two-factor', data=dict(code=site.code(app)))
    assert r.headers['location'] == '/login/two-factor?done=throttled'
    assert 'Too many wrong codes' in c.get(r.headers['location']).text
    failed = audit_events(site.host_db, event_type='auth.two_factor_failed')
    assert [e.details for e in failed][0] == '{"reason": "throttled"}' and len(failed) == 4
    site.clock.advance(minutes=5)
    site.login(c)
    assert c.post('/login/two-factor', data=dict(code=site.code(app))).headers['location'] == '/'


def test_a_recovery_code_signs_in_once_and_is_audited(site):
    _, _, codes = site.enable()
    c = site.client()
    site.login(c)
    assert c.post('/login/two-factor', data=dict(code=codes[0].lower())).headers['location'] == '/'
    used = audit_events(site.host_db, event_type='two_factor.recovery_code_used')
    assert len(used) == 1 and used[0].details == '{"left": 9}'
    again = site.client()
    site.login(again)
    assert (
        again.post('/login/two-factor', data=dict(code=codes[0])).headers['location'] == '/login/two-factor?done=wrong'
    )


def test_a_pending_login_expires_after_five_minutes(site):
    _, app, _ = site.enable()
    c = site.client()
    site.login(c)
    site.clock.advance(minutes=5, seconds=1)
    r = c.post('/login/two-factor', data=dict(code=site.code(app), next='/account'))
    assert r.headers['location'] == '/login/two-factor?next=/account'
    page = c.get(r.headers['location']).text
    assert 'Your sign-in has expired' in page and 'href="/login?next=/account"' in page
    assert c.get('/account').status_code == 303


def test_a_pending_login_works_once(site):
    _, app, codes = site.enable()
    c = site.client()
    site.login(c)
    pending = c.cookies.get(PENDING_COOKIE)
    assert c.post('/login/two-factor', data=dict(code=codes[0])).headers['location'] == '/'
    replay = site.client()
    replay.cookies.set(PENDING_COOKIE, pending)
    assert replay.post('/login/two-factor', data=dict(code=codes[1])).headers['location'] == '/login/two-factor'
    assert site.sessions_of() == 2


def test_a_second_step_posted_from_another_site_is_refused(site):
    _, app, _ = site.enable()
    c = site.client()
    site.login(c)
    r = c.post('/login/two-factor', data=dict(code=site.code(app)), headers={'Origin': 'https://evil.example'})
    assert r.status_code == 403 and c.get('/account').status_code == 303


def test_a_password_reset_does_not_skip_the_second_step(site, monkeypatch):
    c, app, _ = site.enable()
    pool = ThreadPoolExecutor(1)
    monkeypatch.setattr(passwords, 'reset_mail_executor', pool)
    c.post('/password-reset', data=dict(email='ann@example.com'))
    pool.shutdown(wait=True)  # the mail went out
    link = re.search(r'https://app\.test(/\S+)', site.outbox.last_text('ann@example.com')).group(1)
    assert c.post(link, data=dict(password='a brand new one', confirm='a brand new one')).status_code == 200
    assert site.sessions_of() == 0 and c.get('/account').status_code == 303
    r = site.login(c, password='a brand new one')
    assert r.headers['location'] == '/login/two-factor' and site.sessions_of() == 0
    assert c.post('/login/two-factor', data=dict(code=site.code(app))).headers['location'] == '/'


def test_turning_it_off_and_new_codes_need_a_current_code(site):
    c, app, codes = site.enable()
    token = csrf(c.get('/account').text)
    assert (
        c.post('/account/two-factor/disable', data=dict(code='000000', csrf=token)).headers['location']
        == '/account?done=two_factor_wrong'
    )
    r = c.post('/account/two-factor/recovery-codes', data=dict(code=site.code(app), csrf=token))
    assert r.headers['location'] == '/account?done=two_factor_codes'
    fresh = re.findall(r'<code>([A-Z2-7]{4}(?:-[A-Z2-7]{4}){3})</code>', c.get(r.headers['location']).text)
    assert len(fresh) == 10 and not set(fresh) & set(codes)
    assert (
        c.post('/account/two-factor/disable', data=dict(code=codes[1], csrf=token)).headers['location']
        == '/account?done=two_factor_wrong'
    )  # the old codes are gone
    r = c.post('/account/two-factor/disable', data=dict(code=fresh[0], csrf=token))
    assert r.headers['location'] == '/account?done=two_factor_disabled' and not two_factor_enabled(site.host_db, 'ann')
    assert events(site, 'two_factor.') == [
        'two_factor.enabled',
        'two_factor.recovery_codes_regenerated',
        'two_factor.disabled',
    ]
    assert site.login(site.client()).headers['location'] == '/'


def test_the_account_forms_need_the_form_token_and_count_wrong_codes(site):
    c, app, _ = site.enable()
    assert c.post('/account/two-factor/disable', data=dict(code=site.code(app))).status_code == 403
    token = csrf(c.get('/account').text)
    for _ in range(3):
        c.post('/account/two-factor/disable', data=dict(code='000000', csrf=token))
    r = c.post('/account/two-factor/disable', data=dict(code=site.code(app), csrf=token))
    assert r.headers['location'] == '/account?done=two_factor_throttled' and two_factor_enabled(site.host_db, 'ann')


def test_an_admin_impersonating_cannot_change_it(site):
    site.user('root', is_sys_admin=True)
    c = site.client()
    site.login(c, 'root')
    start_impersonation(site.sessions, site.sessions.load(c.cookies.get(site.sessions.cookie_name)), 'ann')
    r = c.post('/account/two-factor/setup', data=dict(csrf=csrf(c.get('/account').text)))
    assert r.headers['location'] == '/account?done=two_factor_impersonating'
    assert not two_factor_enabled(site.host_db, 'ann') and site.host_db.q("select * from auth_two_factor") == []


def test_a_bad_code_field_is_a_notice_not_an_error(site):
    _, app, _ = site.enable()
    c = site.client()
    site.login(c)
    for code in ('', 'x' * 5000, '١٢٣٤٥٦'):
        assert c.post('/login/two-factor', data=dict(code=code)).headers['location'] == '/login/two-factor?done=wrong'
    page = c.get('/login/two-factor?done=nonsense')
    assert page.status_code == 200 and 'That code is wrong' not in page.text


@pytest.fixture
def team(site):
    "Tenant acme: ann owns it and has two-factor sign-in; bob is a member without it (both signed in)."
    provision_tenant(site.host_db, 'acme', 'Acme')
    site.user('bob')
    for uid, role in (('ann', 'owner'), ('bob', 'member')):
        site.host_db.memberships.insert(Membership(user_id=uid, tenant_id='acme', role=role))
    ann, app, _ = site.enable('ann')
    bob = site.client()
    assert site.login(bob, 'bob').headers['location'] == '/' and bob.get('/').text == 'home of bob@example.com in acme'
    return ann, bob, app


def test_a_tenant_rule_sends_members_without_two_factor_to_set_it_up(site, team):
    ann, bob, _ = team
    page = ann.get('/team').text
    assert 'Two-factor sign-in is up to each member.' in page and 'API keys are not affected' in page
    r = ann.post('/team/two-factor', data=dict(required='on', csrf=csrf(page)))
    assert (r.status_code, r.headers['location']) == (303, '/team?done=two_factor_required')
    assert 'Members must now use two-factor sign-in.' in ann.get(r.headers['location']).text
    assert ann.get('/').text == 'home of ann@example.com in acme'
    r = bob.get('/')
    assert (r.status_code, r.headers['location']) == (303, '/account?done=two_factor_required')
    assert 'requires two-factor sign-in' in bob.get(r.headers['location']).text
    assert bob.get('/', headers={'HX-Request': 'true'}).headers['hx-redirect'] == '/account?done=two_factor_required'
    assert bob.get('/team').headers['location'] == '/account?done=two_factor_required'
    assert bob.get('/api/whoami').json()['error']['code'] == 'two_factor_required'
    switch = bob.post('/tenants/switch', data=dict(tenant_id='acme', csrf=csrf(bob.get('/account').text)))
    assert switch.headers['location'] == '/account?done=two_factor_required'
    rule = audit_events(site.host_db, event_type='tenant.two_factor_required')
    assert [(e.actor_user_id, e.tenant_id) for e in rule] == [('ann', 'acme')]
    r = ann.post('/team/two-factor', data=dict(required='off', csrf=csrf(ann.get('/team').text)))
    assert r.headers['location'] == '/team?done=two_factor_optional' and bob.get('/').status_code == 200


def test_a_member_who_turns_it_on_may_use_the_tenant_again(site, team):
    ann, bob, _ = team
    ann.post('/team/two-factor', data=dict(required='on', csrf=csrf(ann.get('/team').text)))
    bob2, _, _ = site.enable('bob')
    assert bob2.get('/').text == 'home of bob@example.com in acme'
    assert (
        bob2.post('/tenants/switch', data=dict(tenant_id='acme', csrf=csrf(bob2.get('/account').text))).headers[
            'location'
        ]
        == '/'
    )


def test_api_keys_are_not_affected_by_the_rule(site, team):
    ann, bob, _ = team
    ann.post('/team/two-factor', data=dict(required='on', csrf=csrf(ann.get('/team').text)))
    key, _ = create_api_key(site.host_db, 'acme', 'bob', 'ci')
    r = site.client().get('/api/whoami', headers={'Authorization': f'Bearer {key}'})
    assert r.json() == dict(user='bob', tenant='acme')


def test_only_an_admin_with_two_factor_may_require_it(site, team):
    ann, bob, app = team
    assert (
        bob.post('/team/two-factor', data=dict(required='on', csrf=csrf(bob.get('/account').text))).status_code == 403
    )
    token = csrf(ann.get('/account').text)
    ann.post('/account/two-factor/disable', data=dict(code=site.code(app), csrf=token))
    r = ann.post('/team/two-factor', data=dict(required='on', csrf=token))
    assert r.headers['location'] == '/team?done=two_factor_yours_first'
    assert 'Turn on two-factor sign-in for your own account first' in ann.get(r.headers['location']).text
    assert bob.get('/').status_code == 200
