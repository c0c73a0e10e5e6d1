"""The beforeware through a real FastHTML app: every refusal, on the very next request, for browsers, htmx and API
clients.

SQLite host: resolution is backend-neutral; the concurrency tests run on PostgreSQL."""

from datetime import datetime, timezone

import pytest

from fh_saas import rate_limits
from fh_saas.api_keys import create_api_key, revoke_api_key
from fh_saas.memberships import remove_member
from auth_helpers import make_world


@pytest.fixture
def world(sqlite_host_db, tmp_path):
    w = make_world(sqlite_host_db, tmp_path)
    w.user('ann')
    w.user('bob')
    w.tenant('acme')
    w.tenant('globex')
    w.member('ann', 'acme', 'owner')
    w.member('bob', 'acme', 'member')
    w.member('bob', 'globex', 'admin')
    yield w
    w.tenant_dbs.close()


def test_anonymous_is_sent_to_login_htmx_redirected_and_api_gets_401(world):
    c = world.client()
    r = c.get('/notes')
    assert (r.status_code, r.headers['location']) == (303, '/login?next=/notes')
    r = c.get('/notes', headers={'HX-Request': 'true'})
    assert r.headers['hx-redirect'] == '/login?next=/notes' and 'location' not in r.headers
    r = c.get('/api/notes')
    assert (r.status_code, r.json()['error']['code'], r.headers['www-authenticate']) == (
        401,
        'unauthenticated',
        'Bearer',
    )
    assert world.tenant_dbs.opened == []


def test_skip_paths_bypass_auth(world):
    assert world.client().get('/stripe/webhook').text == 'webhook reached without auth'


def test_tampered_cookie_is_anonymous_not_an_error(world):
    good = world.login_client('ann').cookies[world.sessions.cookie_name]
    flip = lambda s, i: s[:i] + ('A' if s[i] != 'A' else 'B') + s[i + 1 :]
    sid, sig = good.rsplit('.', 1)
    # (the last base64 character of a signature carries padding bits, so tampering targets the middle)
    for bad in (f'{sid}.{flip(sig, 10)}', f'{flip(sid, 5)}.{sig}', 'x', sid, '', 'a.b.c' * 50, f'{sid}.{sig}.{sig}'):
        r = world.client().get('/notes', headers={'Cookie': f'{world.sessions.cookie_name}={bad}'})
        assert (r.status_code, r.headers['location']) == (303, '/login?next=/notes')


def test_request_reaches_own_tenant_db_and_audit_carries_request_facts(world):
    c = world.login_client('ann')
    assert c.get('/notes').json()['tenant'] == 'acme'
    headers = {'X-Request-ID': 'req-12345678', 'User-Agent': 'pytest-ua'}
    assert c.post('/notes', data=dict(body='hi'), headers=headers).text == 'ok'
    row = world.host_db.audit_logs(where="event_type = 'note.created'")[0]
    assert (row.actor_user_id, row.tenant_id, row.request_id, row.user_agent, row.ip_address) == (
        'ann',
        'acme',
        'req-12345678',
        'pytest-ua',
        'testclient',
    )


def test_revoked_membership_refused_on_next_request(world):
    c = world.login_client('bob')
    assert c.get('/notes').json()['tenant'] == 'acme'
    remove_member(world.host_db, 'acme', 'bob')
    r = c.get('/notes')
    assert (r.status_code, r.headers['location']) == (303, '/tenants')
    assert c.get('/tenants').text == 'choose a tenant, bob'


def test_suspended_tenant_and_blocked_subscription_refused_on_next_request(world):
    c = world.login_client('ann')
    assert c.get('/notes').status_code == 200
    world.host_db.q("update core_subscriptions set status = 'unpaid' where tenant_id = 'acme'")
    r = c.get('/notes')
    assert (r.status_code, r.headers['location']) == (303, '/billing')
    assert c.get('/billing').text.startswith('billing for acme')
    world.host_db.q("update core_subscriptions set status = 'active' where tenant_id = 'acme'")
    assert c.get('/notes').status_code == 200
    world.host_db.tenants.update(dict(id='acme', status='suspended'))
    assert c.get('/notes').headers['location'] == '/tenants'


def test_deactivated_user_is_logged_out(world):
    c = world.login_client('ann')
    world.host_db.global_users.update(dict(id='ann', is_active=False))
    assert c.get('/notes').headers['location'] == '/login?next=/notes'


def test_switching_tenant_only_with_active_membership(world):
    c = world.login_client('bob')
    assert c.post('/tenants/switch', data=dict(tenant_id='globex')).status_code == 303
    assert c.get('/notes').json() == dict(tenant='globex', user='bob', role='admin', impersonator=None, notes=[])
    assert c.post('/tenants/switch', data=dict(tenant_id='initech')).status_code == 403
    ann = world.login_client('ann')
    assert ann.post('/tenants/switch', data=dict(tenant_id='globex')).status_code == 403
    assert ann.get('/notes').json()['tenant'] == 'acme'


def test_api_keys_by_both_headers_modes_and_revocation(world):
    live, rec = create_api_key(world.host_db, 'acme', 'ann', 'ci')
    test, _ = create_api_key(world.host_db, 'acme', 'ann', 'ci', mode='test')
    c = world.client()
    assert c.get('/api/notes', headers={'Authorization': f'Bearer {live}'}).json() == dict(
        tenant='acme', mode='live', key=rec.key_id
    )
    assert c.get('/api/notes', headers={'X-API-Key': test}).json()['mode'] == 'test'
    assert c.get('/api/notes', headers={'X-API-Key': live[:-2] + 'zz'}).status_code == 401
    revoke_api_key(world.host_db, 'acme', rec.key_id)
    assert c.get('/api/notes', headers={'X-API-Key': live}).status_code == 401


def test_api_key_dies_with_its_creators_membership(world):
    key, _ = create_api_key(world.host_db, 'acme', 'bob', 'bob key')
    c = world.client()
    assert c.get('/api/notes', headers={'X-API-Key': key}).status_code == 200
    m = world.host_db.memberships(where="user_id = 'bob' and tenant_id = 'acme'")[0]
    world.host_db.memberships.update(dict(id=m.id, is_active=False))  # the membership ends, the key itself is live
    r = c.get('/api/notes', headers={'X-API-Key': key})
    assert (r.status_code, r.json()['error']['code']) == (403, 'forbidden')
    world.host_db.memberships.update(dict(id=m.id, is_active=True))
    remove_member(world.host_db, 'acme', 'bob')  # revokes the key as well
    world.host_db.memberships.update(dict(id=m.id, is_active=True))
    r = c.get('/api/notes', headers={'X-API-Key': key})
    assert (r.status_code, r.json()['error']['code']) == (401, 'unauthenticated')


def test_publishable_keys_only_on_publishable_paths(world):
    pk, _ = create_api_key(world.host_db, 'acme', 'ann', 'web', kind='publishable')
    assert pk.startswith('pk_live_')
    c = world.client()
    assert c.get('/api/public/ping', headers={'X-API-Key': pk}).json() == dict(tenant='acme')
    assert c.get('/api/notes', headers={'X-API-Key': pk}).status_code == 403


def test_rate_limit_per_tenant_429_with_retry_after(world, monkeypatch):
    at = datetime(2026, 1, 1, 12, 0, 10, tzinfo=timezone.utc)  # ten seconds into a window, so all six fall in it
    monkeypatch.setattr(rate_limits, 'utcnow', lambda: at)
    a1, _ = create_api_key(world.host_db, 'acme', 'ann', 'a1')
    a2, _ = create_api_key(world.host_db, 'acme', 'bob', 'a2')
    g, _ = create_api_key(world.host_db, 'globex', 'bob', 'g')
    c = world.client()
    codes = [c.get('/api/notes', headers={'X-API-Key': k}).status_code for k in (a1, a2, a1, a2, a1)]
    assert codes == [200] * 5
    r = c.get('/api/notes', headers={'X-API-Key': a2})
    assert r.status_code == 429 and r.headers['retry-after'] == '50' and r.json()['error']['code'] == 'rate_limited'
    assert c.get('/api/notes', headers={'X-API-Key': g}).status_code == 200


def test_blocked_subscription_api_gets_402_json(world):
    key, _ = create_api_key(world.host_db, 'acme', 'ann', 'k')
    world.host_db.q("update core_subscriptions set status = 'canceled' where tenant_id = 'acme'")
    r = world.client().get('/api/notes', headers={'X-API-Key': key})
    refusal = dict(error=dict(code='payment_required', message='subscription is canceled'))
    assert (r.status_code, r.json()) == (402, refusal)


def test_unreachable_tenant_db_is_503(world):
    c = world.login_client('ann')
    world.tenant_dbs.dbs.pop('acme').close()
    r = c.get('/notes')
    assert r.status_code == 503 and 'unavailable' in r.text


def test_impersonation_is_visible_and_audited_with_both_identities(world):
    world.user('root', is_sys_admin=True)
    admin = world.login_client('root')
    assert admin.post('/admin/impersonate/bob').text == 'ok'
    assert admin.post('/tenants/switch', data=dict(tenant_id='globex')).status_code == 303
    assert admin.get('/notes').json()['impersonator'] == 'root'
    admin.post('/notes', data=dict(body='as bob'))
    row = world.host_db.audit_logs(where="event_type = 'note.created'")[0]
    assert (row.actor_user_id, row.impersonator_user_id, row.tenant_id) == ('bob', 'root', 'globex')
    assert admin.post('/admin/impersonate/stop').text == 'ok'
    assert admin.get('/tenants').text == 'choose a tenant, root'
    types = [r.event_type for r in world.host_db.audit_logs(order_by='created_at')]
    assert types.index('impersonation.started') < types.index('note.created') < types.index('impersonation.stopped')
    assert types.count('impersonation.started') == 1


def test_non_admin_cannot_impersonate(world):
    from fh_saas.sessions import start_impersonation, ImpersonationRefused

    bob = world.login_client('bob')
    rec = world.sessions.load(bob.cookies[world.sessions.cookie_name])
    with pytest.raises(ImpersonationRefused):
        start_impersonation(world.sessions, rec, 'ann')
    assert bob.get('/notes').json()['impersonator'] is None


def test_a_double_slash_path_never_becomes_an_external_login_target():
    "An app's catch-all route could see '//evil.example/x'; the login redirect must keep it a local path."
    from starlette.requests import Request
    from fh_saas.beforeware import Refusal, refusal_response

    req = Request(
        dict(
            type='http',
            method='GET',
            path='//evil.example/notes',
            raw_path=b'//evil.example/notes',
            query_string=b'',
            headers=[],
            scheme='http',
            server=('testserver', 80),
        )
    )
    r = refusal_response(Refusal('unauthenticated', 'not logged in'), req, api=False)
    assert r.status_code == 303 and r.headers['location'] == '/login?next=/evil.example/notes'
