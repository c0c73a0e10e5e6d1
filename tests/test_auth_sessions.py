"Sessions through a real FastHTML app: cookie flags, server-side logout and revocation, idle and absolute timeouts."

import pytest
import sqlalchemy as sa

from auth_helpers import make_world
from fh_saas.db_host import GlobalUser, HostDatabase
from fh_saas.sessions import SessionManager


@pytest.fixture
def world(sqlite_host_db, tmp_path):
    w = make_world(sqlite_host_db, tmp_path)
    w.user('ann')
    w.tenant('acme')
    w.member('ann', 'acme', 'owner')
    yield w
    w.tenant_dbs.close()


def _set_cookie(r):
    return r.headers['set-cookie'].lower()


def test_cookie_flags_http_and_https(world):
    r = world.client().post('/login', data=dict(email='ann@example.com', password='correct horse battery'))
    assert 'httponly' in _set_cookie(r) and 'samesite=lax' in _set_cookie(r) and 'secure' not in _set_cookie(r)
    r = world.client(base_url='https://app.example').post(
        '/login', data=dict(email='ann@example.com', password='correct horse battery')
    )
    assert 'secure' in _set_cookie(r) and 'httponly' in _set_cookie(r)


def test_only_a_hash_of_the_session_id_is_stored(world):
    cookie = world.login_client('ann').cookies[world.sessions.cookie_name]
    raw = cookie.rsplit('.', 1)[0]
    stored = world.host_db.q("select id_hash from auth_sessions")
    assert len(stored) == 1 and raw not in stored[0]['id_hash'] and len(stored[0]['id_hash']) == 64


def test_logout_ends_the_session_server_side(world):
    c = world.login_client('ann')
    stolen = c.cookies[world.sessions.cookie_name]
    assert c.post('/logout').headers['location'] == '/login'
    r = world.client().get('/notes', headers={'Cookie': f'{world.sessions.cookie_name}={stolen}'})
    assert r.headers['location'] == '/login?next=/notes'
    assert [r.event_type for r in world.host_db.audit_logs(order_by='created_at')][-1] == 'auth.logout'


def test_password_change_ends_other_sessions_and_keeps_this_one(world):
    laptop, phone = world.login_client('ann'), world.login_client('ann')
    assert (
        laptop.post('/account/password', data=dict(old='correct horse battery', new='new horse battery')).text
        == 'changed'
    )
    assert laptop.get('/notes').status_code == 200
    assert phone.get('/notes').status_code == 303
    assert (
        world.client().post('/login', data=dict(email='ann@example.com', password='correct horse battery')).status_code
        == 401
    )
    world.login_client('ann', 'new horse battery')


def test_admin_revocation_is_immediate(world):
    c = world.login_client('ann')
    assert c.get('/notes').status_code == 200
    assert world.sessions.revoke_user('ann') == 1
    assert c.get('/notes').status_code == 303


def test_idle_timeout(world):
    c = world.login_client('ann')
    for _ in range(5):
        world.clock.advance(minutes=29)
        assert c.get('/notes').status_code == 200
    world.clock.advance(minutes=31)
    assert c.get('/notes').headers['location'] == '/login?next=/notes'


def test_absolute_timeout_despite_activity(world):
    c = world.login_client('ann')
    statuses = []
    for _ in range(26):
        world.clock.advance(minutes=20)
        statuses.append(c.get('/notes').status_code)
    assert statuses[:23] == [200] * 23 and set(statuses[23:]) == {303}


def test_last_seen_written_at_most_once_a_minute(world):
    c = world.login_client('ann')
    seen = lambda: world.host_db.q("select last_seen_at from auth_sessions")[0]['last_seen_at']
    first = seen()
    world.clock.advance(seconds=30)
    c.get('/notes')
    assert seen() == first
    world.clock.advance(seconds=31)
    c.get('/notes')
    assert seen() > first


def test_revoking_an_admin_also_ends_the_sessions_in_which_they_impersonate(world):
    from fh_saas.sessions import start_impersonation

    world.user('bob')
    world.host_db.global_users.update(dict(id='ann', is_sys_admin=True))
    cookie = world.sessions.create('ann')
    start_impersonation(world.sessions, world.sessions.load(cookie), 'bob')
    assert world.sessions.load(cookie).impersonator_user_id == 'ann'
    world.sessions.revoke_user('ann')  # e.g. the admin's password was reset after the cookie was stolen
    assert world.sessions.load(cookie) is None


def test_the_sessions_upgrade_adds_the_impersonators_tenant_and_keeps_live_sessions(tmp_path):
    "A host database from before (sessions v1, no return_tenant_id): upgraded in place, its sessions still load."
    url = f"sqlite:///{tmp_path / 'host.db'}"
    db = HostDatabase(url)
    db.global_users.insert(GlobalUser(id='ann', email='ann@example.com'))
    cookie = SessionManager(db, 'sessions-upgrade-' + '0123456789abcdefghij').create('ann', 'acme')
    with db.engine.begin() as c:
        c.exec_driver_sql('ALTER TABLE auth_sessions DROP COLUMN return_tenant_id')
        c.exec_driver_sql("UPDATE sys_schema_versions SET version = 1 WHERE component = 'sessions'")
    db.close()
    HostDatabase.reset_instance()
    db = HostDatabase(url)
    try:
        assert 'return_tenant_id' in {c['name'] for c in sa.inspect(db.engine).get_columns('auth_sessions')}
        record = SessionManager(db, 'sessions-upgrade-' + '0123456789abcdefghij').load(cookie)
        assert (record.tenant_id, record.return_tenant_id) == ('acme', None)
    finally:
        db.close()
        HostDatabase.reset_instance()
