"""Two-factor storage on SQLite and PostgreSQL: setup, codes spent once (also when raced), pending logins finished once,
the schema, and the tenant rule in the beforeware."""

from datetime import datetime, timedelta, timezone
from functools import partial

import pyotp
import pytest
import sqlalchemy as sa
from fasthtml.common import FastHTML
from starlette.testclient import TestClient

from fh_saas.audit import audit_events
from fh_saas.beforeware import AuthResolver, saas_beforeware
from fh_saas.db_host import GlobalUser, HostDatabase, Membership, TenantCatalog
from fh_saas.db_upgrade import schema_version
from fh_saas.passwords import LoginFailed, PendingLoginExpired, second_step
from fh_saas.rate_limits import RateLimit
from fh_saas.sessions import SessionManager
from fh_saas.two_factor import (
    TwoFactorError,
    begin_setup,
    confirm_setup,
    finish_pending_login,
    issue_pending_login,
    lacks_required_two_factor,
    read_pending_login,
    recovery_codes_left,
    require_two_factor,
    two_factor_component,
    two_factor_enabled,
    verify_code,
)

SECRET = 'two-factor-test-secret-' + 'z' * 40
T0 = datetime(2026, 3, 1, 12, tzinfo=timezone.utc)


@pytest.fixture(autouse=True)
def master_key(monkeypatch):
    monkeypatch.setenv('FH_SAAS_SECRET_KEY', SECRET)


def enabled(host_db, uid='ann') -> tuple[pyotp.TOTP, list[str]]:
    "User `uid`, with two-factor sign-in switched on at T0: their app, and their recovery codes."
    host_db.global_users.insert(GlobalUser(id=uid, email=f'{uid}@example.com', password_hash='argon2-hash'))
    totp = pyotp.TOTP(begin_setup(host_db, uid))
    return totp, confirm_setup(host_db, uid, totp.at(T0), now=T0)


def test_the_tables_come_with_the_host_database_and_are_recorded(host_url, host_db):
    names = set(sa.inspect(host_db.engine).get_table_names())
    assert {'auth_two_factor', 'auth_recovery_codes', 'auth_tenant_two_factor'} <= names
    with host_db.transaction() as c:
        assert schema_version(c, 'two_factor') == two_factor_component.version
    enabled(host_db)
    host_db.close()
    HostDatabase.reset_instance()
    again = HostDatabase(host_url)  # a second start upgrades nothing and keeps the rows
    with again.transaction() as c:
        assert schema_version(c, 'two_factor') == two_factor_component.version
    assert two_factor_enabled(again, 'ann')


def test_setup_is_on_only_after_a_code_from_the_pending_secret(host_db):
    host_db.global_users.insert(GlobalUser(id='ann', email='ann@example.com'))
    totp = pyotp.TOTP(begin_setup(host_db, 'ann'))
    with pytest.raises(TwoFactorError):
        confirm_setup(host_db, 'ann', pyotp.TOTP(pyotp.random_base32()).at(T0), T0)
    assert not two_factor_enabled(host_db, 'ann')
    codes = confirm_setup(host_db, 'ann', totp.at(T0), now=T0)
    assert two_factor_enabled(host_db, 'ann') and len(set(codes)) == 10 and recovery_codes_left(host_db, 'ann') == 10
    stored = str(host_db.q("select * from auth_two_factor")) + str(host_db.q("select * from auth_recovery_codes"))
    assert totp.secret not in stored and not any(c in stored for c in codes)
    assert totp.secret not in str([e.details for e in audit_events(host_db)])


def test_a_totp_code_is_refused_when_replayed_in_its_time_step(host_db):
    totp, _ = enabled(host_db)
    t = T0 + timedelta(minutes=2)
    assert verify_code(host_db, 'ann', totp.at(t), t) == 'totp'
    assert verify_code(host_db, 'ann', totp.at(t), t + timedelta(seconds=10)) is None
    assert verify_code(host_db, 'ann', totp.at(t + timedelta(seconds=30)), t + timedelta(seconds=30)) == 'totp'


@pytest.mark.postgres
def test_one_recovery_code_used_at_once_succeeds_once(pg_host_db, race):
    _, codes = enabled(pg_host_db)
    results = race([partial(verify_code, pg_host_db, 'ann', codes[0], T0) for _ in range(8)])
    assert results.count('recovery') == 1 and results.count(None) == 7
    assert recovery_codes_left(pg_host_db, 'ann') == 9


@pytest.mark.postgres
def test_one_totp_code_used_at_once_succeeds_once(pg_host_db, race):
    totp, _ = enabled(pg_host_db)
    t = T0 + timedelta(minutes=1)
    results = race([partial(verify_code, pg_host_db, 'ann', totp.at(t), t) for _ in range(8)])
    assert results.count('totp') == 1 and results.count(None) == 7


@pytest.mark.postgres
def test_one_pending_login_finished_at_once_finishes_once(pg_host_db, race):
    enabled(pg_host_db)
    pending = read_pending_login(pg_host_db, issue_pending_login(pg_host_db, 'ann', T0), T0)

    def finish():
        with pg_host_db.transaction() as conn:
            return finish_pending_login(conn, pending)

    assert race([finish] * 6).count(True) == 1


@pytest.mark.postgres
def test_one_pending_login_raced_with_several_codes_opens_one_session_and_spends_one_code(pg_host_db, race):
    _, codes = enabled(pg_host_db)
    sessions = SessionManager(pg_host_db, SECRET, clock=lambda: T0)
    token = issue_pending_login(pg_host_db, 'ann', T0)
    results = race(
        [partial(second_step, sessions, token, codes[i], limit=RateLimit(100, 300)) for i in range(6)],
        catch=LoginFailed,
    )
    assert sum(not isinstance(r, Exception) for r in results) == 1
    assert all(isinstance(r, PendingLoginExpired) for r in results if isinstance(r, Exception))
    assert recovery_codes_left(pg_host_db, 'ann') == 9  # the losers' codes were given back with their rollback
    assert len(pg_host_db.q("select * from auth_sessions where user_id = 'ann'")) == 1


def test_a_pending_login_expires_and_dies_with_a_password_change(host_db):
    enabled(host_db)
    token = issue_pending_login(host_db, 'ann', T0)
    assert read_pending_login(host_db, token, T0 + timedelta(minutes=5)).user_id == 'ann'
    assert read_pending_login(host_db, token, T0 + timedelta(minutes=5, seconds=1)) is None
    assert read_pending_login(host_db, token, T0 - timedelta(seconds=1)) is None
    host_db.q("update core_users set password_hash = 'another' where id = 'ann'")
    assert read_pending_login(host_db, token, T0) is None
    assert read_pending_login(host_db, 'not-a-token', T0) is None


def test_a_tenant_rule_applies_to_members_without_two_factor(host_db):
    enabled(host_db, 'ann')
    host_db.global_users.insert(GlobalUser(id='bob', email='bob@example.com'))
    host_db.tenants.insert(TenantCatalog(id='acme', name='Acme'))
    assert require_two_factor(host_db, 'acme', True, 'ann')
    assert (lacks_required_two_factor(host_db, 'acme', 'ann'), lacks_required_two_factor(host_db, 'acme', 'bob')) == (
        False,
        True,
    )
    assert [e.event_type for e in audit_events(host_db, tenant_id='acme')] == ['tenant.two_factor_required']


def test_the_beforeware_applies_the_tenant_rule_in_its_one_identity_query(host_db):
    "On each backend: a session member without two-factor sign-in is refused the tenant; with it, let in."
    enabled(host_db, 'ann')
    host_db.global_users.insert(GlobalUser(id='bob', email='bob@example.com'))
    host_db.tenants.insert(TenantCatalog(id='acme', name='Acme'))
    for uid in ('ann', 'bob'):
        host_db.memberships.insert(Membership(user_id=uid, tenant_id='acme'))
    require_two_factor(host_db, 'acme', True, 'ann')
    sessions = SessionManager(host_db, SECRET)
    app = FastHTML(before=saas_beforeware(AuthResolver(host_db, sessions)), secret_key=SECRET)
    app.get('/')(lambda auth: f'in {auth.tenant_id} as {auth.user.id}')

    def get(uid):
        c = TestClient(app, follow_redirects=False)
        c.cookies.set(sessions.cookie_name, sessions.create(uid, 'acme'))
        return c.get('/')

    assert get('ann').text == 'in acme as ann'
    assert get('bob').headers['location'] == '/account?done=two_factor_required'
