"Audit log queries, the append-only guard and archival on both backends."

import threading
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from fh_saas.audit import archive_audit_logs, archive_t, audit, audit_cursor, audit_events
from fh_saas.db_host import timestamp

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _at(minutes):
    return timestamp(T0 + timedelta(minutes=minutes))


def _counts(host_db):
    live = host_db.audit_logs.count
    with host_db.transaction() as conn:
        archived = conn.execute(sa.select(sa.func.count()).select_from(archive_t)).scalar()
    return live, archived


def test_filters_select_and_order_newest_first(host_db):
    for i in range(12):
        audit(
            host_db,
            'billing.plan_changed' if i % 2 else 'auth.login',
            target_id=str(i),
            created_at=_at(i),
            tenant_id='acme' if i % 3 else 'globex',
            actor_user_id=f'u{i % 4}',
        )
    rows = audit_events(host_db)
    assert [r.target_id for r in rows] == [str(i) for i in reversed(range(12))]
    assert {r.target_id for r in audit_events(host_db, tenant_id='globex')} == {'0', '3', '6', '9'}
    assert {r.target_id for r in audit_events(host_db, actor='u1', event_type='billing.')} == {'1', '5', '9'}
    assert {r.target_id for r in audit_events(host_db, event_type='auth.login', since=_at(4), until=_at(8))} == {
        '4',
        '6',
    }
    assert audit_events(host_db, event_type='billing') == [], "a type without a trailing dot matches exactly"
    assert audit_events(host_db, event_type='auth_login') == [], "'_' is not a wildcard"


def test_keyset_pages_cover_every_row_once_even_with_equal_timestamps(host_db):
    for i in range(25):
        audit(host_db, 'auth.login', target_id=str(i), created_at=_at(i // 4))  # runs of 4 equal times
    seen, cursor = [], None
    while page := audit_events(host_db, limit=7, before=cursor):
        seen += [r.id for r in page]
        audit(host_db, 'auth.login', target_id='new')  # rows added while paging do not shift the pages
        cursor = audit_cursor(page[-1])
    expected = [r.id for r in audit_events(host_db, until=_at(7), limit=1000)]
    assert seen == expected and len(set(seen)) == 25


def test_bad_queries_are_refused(host_db):
    for cursor in ['', 'yesterday', '2026-01-01T00:00:00|', '2026-01-01T00:00:00+00:00|x;--', 'nonsense|abc']:
        with pytest.raises(ValueError, match='bad audit cursor'):
            audit_events(host_db, before=cursor)
    for limit in (0, 1001):
        with pytest.raises(ValueError, match='limit'):
            audit_events(host_db, limit=limit)
    with pytest.raises(ValueError, match='no time zone'):
        audit_events(host_db, since='2026-01-01T00:00:00')


def test_archival_moves_old_rows_in_one_transaction(host_db):
    for i in range(10):
        audit(host_db, 'auth.login', target_id=str(i), created_at=_at(i))
    recent = audit(host_db, 'auth.login', target_id='recent')
    before = {r.id: r for r in audit_events(host_db, limit=1000)}
    assert archive_audit_logs(host_db, _at(6)) == 6
    assert _counts(host_db) == (5, 6)
    assert [r.target_id for r in audit_events(host_db, archived=True)] == ['5', '4', '3', '2', '1', '0']
    assert all(r == before[r.id] for r in audit_events(host_db, archived=True)), "rows are archived unchanged"
    assert archive_audit_logs(host_db, _at(6)) == 0
    assert archive_audit_logs(host_db, timedelta(days=1)) == 4 and audit_events(host_db)[0].id == recent.id
    with pytest.raises(sa.exc.DBAPIError, match='append-only'):
        host_db.q("delete from sys_audit_logs")
    for sql in ["update sys_audit_logs_archive set target_id = 'x'", "delete from sys_audit_logs_archive"]:
        with pytest.raises(sa.exc.DBAPIError, match=r'sys_audit_logs_archive is append-only'):
            host_db.q(sql)
    assert _counts(host_db) == (1, 10)


def test_failed_archival_loses_nothing_and_keeps_the_guard(host_db):
    for i in range(4):
        audit(host_db, 'auth.login', target_id=str(i), created_at=_at(i))
    clash = audit_events(host_db, limit=1)[0]
    with host_db.transaction() as conn:
        conn.execute(archive_t.insert().values(id=clash.id, event_type='x.y', created_at=_at(0), archived_at=_at(0)))
    with pytest.raises(sa.exc.IntegrityError):
        archive_audit_logs(host_db, _at(10))
    assert _counts(host_db) == (4, 1)
    with pytest.raises(sa.exc.DBAPIError, match='append-only'):
        host_db.q("delete from sys_audit_logs")


def test_archival_inside_a_larger_transaction_rearms_the_guard(host_db):
    audit(host_db, 'auth.login', created_at=_at(0))
    audit(host_db, 'auth.login', created_at=_at(100))
    with pytest.raises(sa.exc.DBAPIError, match='append-only'):
        with host_db.transaction():
            assert archive_audit_logs(host_db, _at(50)) == 1
            host_db.q("delete from sys_audit_logs")
    assert _counts(host_db) == (2, 0), "the whole transaction rolled back"


@pytest.mark.postgres
def test_postgres_refuses_rewrites_outside_archival(pg_url):
    from fh_saas.db_host import HostDatabase

    host_db = HostDatabase(pg_url)
    try:
        audit(host_db, 'auth.login', target_id='a', created_at=_at(0))
        for sql in [
            "update sys_audit_logs set target_id = 'b'",
            "delete from sys_audit_logs",
            "set local fh_saas.audit_archive = 'off'; delete from sys_audit_logs",
        ]:
            with pytest.raises(sa.exc.DBAPIError, match=r'append-only \((UPDATE|DELETE) refused\)') as e:
                host_db.q(sql)
            assert e.value.orig.pgcode == '42501'  # insufficient_privilege
        with pytest.raises(sa.exc.DBAPIError, match=r'append-only \(UPDATE refused\)'):
            host_db.q("set local fh_saas.audit_archive = 'on'; update sys_audit_logs set target_id = 'b'")
        archive_audit_logs(host_db, _at(1))
        with host_db.transaction() as conn:
            assert conn.execute(sa.text("select current_setting('fh_saas.audit_archive', true)")).scalar() in (None, '')
        audit(host_db, 'auth.login', created_at=_at(0))
        with pytest.raises(sa.exc.DBAPIError, match='append-only'):
            host_db.q("delete from sys_audit_logs")
        assert _counts(host_db) == (1, 1)
    finally:
        host_db.close()
        HostDatabase.reset_instance()


@pytest.mark.postgres
def test_postgres_archival_during_concurrent_writes_loses_no_row(pg_url):
    "Rows older than the cut-off keep arriving while archival runs: each ends in exactly one table."
    from fh_saas.db_host import HostDatabase

    host_db = HostDatabase(pg_url)
    try:
        stop, written = threading.Event(), []

        def writer(k):
            while not stop.is_set():
                written.append(audit(host_db, 'auth.login', target_id=f'{k}', created_at=_at(0)).id)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        moved = sum(archive_audit_logs(host_db, _at(1)) for _ in range(20))
        stop.set()
        for t in threads:
            t.join()
        moved += archive_audit_logs(host_db, _at(1))
        assert moved == len(written) > 0 and _counts(host_db) == (0, len(written))
    finally:
        host_db.close()
        HostDatabase.reset_instance()


def test_a_host_database_at_audit_v1_gains_the_guarded_archive(sqlite_url):
    from fh_saas import audit as audit_mod
    from fh_saas.db_host import (
        HOST_SCHEMA_STEPS,
        HOST_SCHEMA_VERSION,
        HostDatabase,
        host_metadata,
        make_engine,
        upgrade_schema,
    )

    eng = make_engine(sqlite_url)
    upgrade_schema(eng, 'core', host_metadata, HOST_SCHEMA_VERSION, HOST_SCHEMA_STEPS)
    upgrade_schema(eng, 'audit', sa.MetaData(), 1, {1: audit_mod._install_guard('sys_audit_logs')}, [])
    assert not sa.inspect(eng).has_table('sys_audit_logs_archive')
    assert 'ix_sys_audit_logs_created' not in {i['name'] for i in sa.inspect(eng).get_indexes('sys_audit_logs')}
    eng.dispose()
    host_db = HostDatabase(sqlite_url)
    try:
        assert 'ix_sys_audit_logs_created' in {
            i['name'] for i in sa.inspect(host_db.engine).get_indexes('sys_audit_logs')
        }
        audit(host_db, 'auth.login', created_at=_at(0))
        assert archive_audit_logs(host_db, _at(1)) == 1
        with pytest.raises(sa.exc.DBAPIError, match='sys_audit_logs_archive is append-only'):
            host_db.q("delete from sys_audit_logs_archive")
    finally:
        host_db.close()
        HostDatabase.reset_instance()
