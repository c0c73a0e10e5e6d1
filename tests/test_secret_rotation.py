"""Rotating the master key on real PostgreSQL: old secrets keep working mid-rotation, `rotate_secret_key` re-keys them,
the old key can then go."""

import psycopg2
import pytest
import sqlalchemy as sa

from fh_saas import db_tenant, master_key
from fh_saas.cli import main
from fh_saas.db_host import GlobalUser
from fh_saas.db_tenant import (
    TenantConfigError,
    db_server,
    db_servers_t,
    provision_tenant,
    resume_tenant,
    rotate_secret_key,
    server_admin_url,
    suspend_tenant,
    tenant_engine,
    tenant_row,
)
from fh_saas.sessions import SessionManager
from fh_saas.tenant_router import TenantRouter
from tenant_helpers import SECRET, new_id, pg_tenant_host, prepare, secret_key  # noqa: F401

KEY_A, KEY_B = SECRET, 'rotated-master-key-' + 'fedcba9876543210' * 2


class Crash(Exception):
    "A failure injected while re-keying one tenant."


def use_keys(monkeypatch, current, *previous):
    monkeypatch.setenv('FH_SAAS_SECRET_KEY', current)
    if previous:
        monkeypatch.setenv('FH_SAAS_PREVIOUS_SECRET_KEYS', ','.join(previous))
    else:
        monkeypatch.delenv('FH_SAAS_PREVIOUS_SECRET_KEYS', raising=False)


def whoami(host_db, tid) -> str:
    "Log in as `tid`'s role with a fresh engine (so with today's keys) and return the user the server sees."
    eng = tenant_engine(host_db, tid, poolclass=sa.pool.NullPool)
    try:
        with eng.connect() as c:
            return c.exec_driver_sql("SELECT current_user").scalar()
    finally:
        eng.dispose()


def refused(host_db, tid) -> bool:
    "True when `tid`'s role cannot log in with today's keys because the server refuses the password."
    try:
        whoami(host_db, tid)
    except sa.exc.OperationalError as e:
        if 'password authentication failed' not in str(e):
            raise
        return True
    return False


def admin_password(host_db) -> str:
    with host_db.engine.connect() as c:
        server_id = c.execute(sa.select(db_servers_t.c.id)).scalar_one()
    return server_admin_url(db_server(host_db, server_id)).password


def routing_versions(host_db, ids) -> list[int]:
    return [tenant_row(host_db, tid).routing_version for tid in ids]


@pytest.fixture
def fleet(pg_tenant_host):
    "Three tenants provisioned under key A, the last one suspended."
    ids = sorted(provision_tenant(pg_tenant_host, new_id(), prepare=prepare).id for _ in range(3))
    suspend_tenant(pg_tenant_host, ids[2])
    return ids


@pytest.mark.postgres
def test_rotation_from_key_a_to_key_b(pg_tenant_host, pg_server, fleet, monkeypatch):
    router = TenantRouter(pg_tenant_host, budget=4, pool_size=2, ttl=60, timeout=5)
    try:
        with router.connect(fleet[0]) as c:
            c.exec_driver_sql("INSERT INTO notes (body) VALUES ('under A')")
        use_keys(monkeypatch, KEY_B)  # the new key alone, too early: nothing made under A opens
        assert refused(pg_tenant_host, fleet[0])
        with pytest.raises(TenantConfigError, match='none of the master keys'):
            admin_password(pg_tenant_host)

        use_keys(monkeypatch, KEY_B, KEY_A)  # step 1: new key, old one still accepted
        assert whoami(pg_tenant_host, fleet[1]) == f'tenant_{fleet[1]}'
        assert admin_password(pg_tenant_host) == pg_server.admin_url.password
        router.forget(fleet[0])  # a new pooled engine, built mid-rotation
        with router.connect(fleet[0]) as c:
            assert c.exec_driver_sql("SELECT body FROM notes").scalars().all() == ['under A']

        before = routing_versions(pg_tenant_host, fleet)
        report = rotate_secret_key(pg_tenant_host)  # step 2
        assert (report.servers, report.rotated, report.failed, report.ok) == (1, fleet, [], True)
        assert routing_versions(pg_tenant_host, fleet) == [v + 1 for v in before]
        assert fleet[0] not in router.cached  # this process's routers drop engines built before the re-keying

        use_keys(monkeypatch, KEY_B)  # step 3: the old key is gone
        resume_tenant(pg_tenant_host, fleet[2])
        assert [whoami(pg_tenant_host, tid) for tid in fleet] == [f'tenant_{tid}' for tid in fleet]
        with router.connect(fleet[0]) as c:
            assert c.exec_driver_sql("SELECT count(*) FROM notes").scalar() == 1
        assert admin_password(pg_tenant_host) == pg_server.admin_url.password

        use_keys(monkeypatch, KEY_A)  # the old key alone opens nothing any more
        assert all(refused(pg_tenant_host, tid) for tid in fleet)
        with pytest.raises(TenantConfigError, match='none of the master keys'):
            admin_password(pg_tenant_host)

        use_keys(monkeypatch, KEY_B)  # running it again changes nothing that matters
        again = rotate_secret_key(pg_tenant_host)
        assert (again.servers, again.rotated, again.ok) == (1, fleet, True)
        assert [whoami(pg_tenant_host, tid) for tid in fleet] == [f'tenant_{tid}' for tid in fleet]
        assert admin_password(pg_tenant_host) == pg_server.admin_url.password
    finally:
        router.close()


@pytest.mark.postgres
def test_a_refusal_worded_in_another_language_still_falls_back_to_the_previous_key(pg_tenant_host, fleet, monkeypatch):
    "No locale but C is installed here, so the server's refusal is reworded as with `lc_messages = 'de_DE'`."
    connect, refusals = psycopg2.connect, []

    def in_german(*args, **kwargs):
        try:
            return connect(*args, **kwargs)
        except psycopg2.OperationalError as e:
            refusals.append(
                str(e).replace('password authentication failed for user', 'Passwort-Authentifizierung für Benutzer')
            )
            raise psycopg2.OperationalError(refusals[-1]) from None

    monkeypatch.setattr(psycopg2, 'connect', in_german)
    use_keys(monkeypatch, KEY_B, KEY_A)
    assert whoami(pg_tenant_host, fleet[0]) == f'tenant_{fleet[0]}'
    assert (
        len(refusals) == 1
        and 'Passwort-Authentifizierung' in refusals[0]
        and 'password authentication' not in refusals[0]
    )
    # no key works: the current key's error, no password in it
    use_keys(monkeypatch, KEY_B, 'unrelated-key-' + '0' * 32)
    with pytest.raises(sa.exc.OperationalError, match='Passwort-Authentifizierung') as e:
        whoami(pg_tenant_host, fleet[0])
    assert len(refusals) == 3 and not any(p in str(e.value) for p in master_key.role_passwords(f'tenant_{fleet[0]}'))


@pytest.mark.postgres
def test_rotation_stores_no_secret_in_the_catalog(pg_tenant_host, pg_server, fleet, monkeypatch):
    use_keys(monkeypatch, KEY_B, KEY_A)
    rotate_secret_key(pg_tenant_host)
    with pg_tenant_host.engine.connect() as c:
        dump = ' '.join(str(v) for t in (db_servers_t, db_tenant.tenants_t) for r in c.execute(sa.select(t)) for v in r)
    assert pg_server.admin_url.password not in dump and KEY_A not in dump and KEY_B not in dump
    assert not any(master_key.role_password(f'tenant_{tid}', k) in dump for tid in fleet for k in (KEY_A, KEY_B))


@pytest.mark.postgres
@pytest.mark.parametrize('step', ['locked', 'role'])
def test_an_interrupted_rotation_reports_the_tenant_and_a_second_run_completes(
    pg_tenant_host, fleet, monkeypatch, step
):
    use_keys(monkeypatch, KEY_B, KEY_A)
    calls = []

    def fail_first(action, s):
        if (action, s) == ('rotate', step):
            calls.append(s)
            if len(calls) == 1:
                raise Crash(f"injected after {s}")

    monkeypatch.setattr(db_tenant, '_after_step', fail_first)
    before = routing_versions(pg_tenant_host, fleet)
    report = rotate_secret_key(pg_tenant_host)
    assert (report.rotated, report.failed, report.ok) == (fleet[1:], [(fleet[0], f'injected after {step}')], False)
    assert routing_versions(pg_tenant_host, fleet) == [before[0], before[1] + 1, before[2] + 1]
    assert whoami(pg_tenant_host, fleet[0]) == f'tenant_{fleet[0]}'  # still reachable mid-rotation
    use_keys(monkeypatch, KEY_B)
    assert refused(pg_tenant_host, fleet[0]) == (step == 'locked')  # re-keyed only if it failed after the ALTER ROLE
    assert not refused(pg_tenant_host, fleet[1])

    use_keys(monkeypatch, KEY_B, KEY_A)
    monkeypatch.setattr(db_tenant, '_after_step', lambda a, s: None)
    assert rotate_secret_key(pg_tenant_host).rotated == fleet
    use_keys(monkeypatch, KEY_B)
    resume_tenant(pg_tenant_host, fleet[2])
    assert [whoami(pg_tenant_host, tid) for tid in fleet] == [f'tenant_{tid}' for tid in fleet]


@pytest.mark.postgres
def test_a_server_password_under_an_unknown_key_stops_the_rotation_before_any_change(
    pg_tenant_host, fleet, monkeypatch
):
    use_keys(monkeypatch, KEY_B)
    before = routing_versions(pg_tenant_host, fleet)
    with pytest.raises(TenantConfigError, match=r"database server 'main': .*none of the master keys"):
        rotate_secret_key(pg_tenant_host)
    assert routing_versions(pg_tenant_host, fleet) == before
    use_keys(monkeypatch, KEY_A)
    assert whoami(pg_tenant_host, fleet[0]) == f'tenant_{fleet[0]}'


@pytest.mark.postgres
def test_cli_rotates_and_says_when_the_old_key_can_go(pg_tenant_host, fleet, monkeypatch, capsys):
    use_keys(monkeypatch, KEY_B, KEY_A)

    def server_down(action, step):
        if (action, step) == ('rotate', 'locked'):
            raise Crash('server down')

    monkeypatch.setattr(db_tenant, '_after_step', server_down)
    assert main(['secret', 'rotate']) == 1
    assert capsys.readouterr().out.splitlines() == [f'FAILED {tid}: server down' for tid in fleet] + [
        're-encrypted 1 server admin password(s), re-keyed 0 tenant role(s), 3 failed',
        'keep FH_SAAS_PREVIOUS_SECRET_KEYS and run `fh-saas secret rotate` again',
    ]
    monkeypatch.setattr(db_tenant, '_after_step', lambda a, s: None)
    assert main(['secret', 'rotate']) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith('now remove FH_SAAS_PREVIOUS_SECRET_KEYS')


@pytest.fixture
def sessions_host(sqlite_host_db):
    sqlite_host_db.global_users.insert(GlobalUser(id='u1', email='ann@example.com'))
    return sqlite_host_db


def test_sessions_signed_under_the_previous_key_still_load(sessions_host, monkeypatch):
    use_keys(monkeypatch, KEY_A)
    under_a = SessionManager.from_env(sessions_host).create('u1')
    use_keys(monkeypatch, 'unrelated-key-' + '0' * 32)
    foreign = SessionManager.from_env(sessions_host).create('u1')

    use_keys(monkeypatch, KEY_B, KEY_A)
    rotating = SessionManager.from_env(sessions_host)
    assert rotating.load(under_a).user_id == 'u1'
    assert rotating.load(foreign) is None
    under_b = rotating.create('u1')

    use_keys(monkeypatch, KEY_B)
    after = SessionManager.from_env(sessions_host)
    assert after.load(under_b).user_id == 'u1' and after.load(under_a) is None
    use_keys(monkeypatch, KEY_A)
    assert SessionManager.from_env(sessions_host).load(under_b) is None


def test_a_malformed_previous_key_is_refused_without_echoing_it(sessions_host, monkeypatch):
    use_keys(monkeypatch, KEY_B, KEY_A, 'tiny-secret')
    with pytest.raises(ValueError, match='key 2 of 2 in FH_SAAS_PREVIOUS_SECRET_KEYS') as e:
        SessionManager.from_env(sessions_host)
    assert 'tiny-secret' not in str(e.value) and KEY_A not in str(e.value)
