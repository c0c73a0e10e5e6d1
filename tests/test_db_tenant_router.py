"TenantRouter on real PostgreSQL: budget and eviction, thread safety, invalidation within and across processes."

import threading

import pytest
import sqlalchemy as sa
from fasthtml.common import FastHTML
from starlette.testclient import TestClient

from fh_saas.audit import audit
from fh_saas.beforeware import AuthResolver, ReleasePins, saas_beforeware
from fh_saas.db_host import GlobalUser, Membership, get_db_uri
from fh_saas.db_tenant import (
    TenantNotFound,
    TenantUnavailable,
    add_db_server,
    deprovision_tenant,
    provision_tenant,
    resume_tenant,
    suspend_tenant,
)
from fh_saas.sessions import SessionManager
from fh_saas.tenant_router import TenantPoolExhausted, TenantRouter, check_connection_budget, tenant_scope
from pgserver import free_port, wait_for
from tenant_helpers import listening, new_id, prepare, run_elsewhere, tenant_connections
from tenant_helpers import pg_tenant_host, secret_key, sqlite_tenant_host  # noqa: F401 (fixtures)


@pytest.fixture
def tenants(pg_tenant_host):
    "Three active tenants on the test cluster: one more than the routers below may cache."
    return [provision_tenant(pg_tenant_host, new_id(), prepare=prepare).id for _ in range(3)]


@pytest.fixture
def router(pg_tenant_host):
    r = TenantRouter(pg_tenant_host, budget=2, pool_size=2, ttl=60, timeout=5)
    listening(r)  # its first LISTEN empties the cache: let that happen before the tests count catalog reads
    yield r
    r.close()


def count_host_queries(host_db):
    "A list that grows by one per statement the host engine runs."
    seen = []
    sa.event.listen(host_db.engine, 'before_cursor_execute', lambda *a: seen.append(1))
    return seen


@pytest.mark.postgres
def test_routes_each_tenant_to_its_own_database(pg_tenant_host, tenants, router):
    for tid in tenants[:2]:
        with router.connect(tid) as c:
            c.exec_driver_sql("INSERT INTO notes (body) VALUES (%s)", (tid,))
    for tid in tenants[:2]:
        with router.connect(tid) as c:
            assert c.exec_driver_sql("SELECT current_user, current_database()").one() == (
                f'tenant_{tid}',
                f'tenant_{tid}',
            )
            assert [r[0] for r in c.exec_driver_sql("SELECT body FROM notes")] == [tid]
    db = router.tenant_db(tenants[0])
    db['notes'].insert(dict(body='via fastsql'))
    with db.transaction():
        db['notes'].insert(dict(body='in a transaction'))
        assert len(db['notes']()) == 3
    assert sa.make_url(get_db_uri(router.engine(tenants[0]))).password


@pytest.mark.postgres
def test_rollback_on_error(tenants, router):
    with pytest.raises(ZeroDivisionError), router.connect(tenants[0]) as c:
        c.exec_driver_sql("INSERT INTO notes (body) VALUES ('lost')")
        1 / 0  # noqa: B018 (the ZeroDivisionError inside the block is the point)
    with router.connect(tenants[0]) as c:
        assert c.exec_driver_sql("SELECT count(*) FROM notes").scalar() == 0


@pytest.mark.postgres
def test_one_catalog_read_per_miss_none_per_hit(pg_tenant_host, tenants, router):
    seen = count_host_queries(pg_tenant_host)
    for _ in range(50):
        with router.connect(tenants[0]):
            pass
    assert len(seen) == 1
    router.forget(tenants[0])
    with router.connect(tenants[0]):
        pass
    assert len(seen) == 2


@pytest.mark.postgres
def test_budget_holds_and_cold_tenants_are_evicted(pg_server, tenants, router):
    for tid in tenants:  # (an evicted connection's backend is listed until it has exited: hence the waits)
        with router.connect(tid) as c:
            c.exec_driver_sql("SELECT 1")
        assert wait_for(lambda: tenant_connections(pg_server) <= router.budget)
    assert router.cached == tenants[-2:] and router.held == 2


class OpenConnections:
    """Tenant connections open in this process, counted as the pools open and close them (the server lists a closed
    connection's backend a little longer, until it has exited), and the most open at once."""

    def __init__(self):
        self.open = self.peak = 0
        self.lock = threading.Lock()

    def opened(self, dbapi_conn, record):
        if dbapi_conn.info.user.startswith('tenant_'):
            with self.lock:
                self.open += 1
                self.peak = max(self.peak, self.open)

    def closed(self, dbapi_conn, record):
        if dbapi_conn.info.user.startswith('tenant_'):
            with self.lock:
                self.open -= 1


@pytest.mark.postgres
def test_threads_never_exceed_the_budget(pg_server, tenants, router):
    errors, counted = [], OpenConnections()

    def work(i):
        try:
            for n in range(40):
                with router.connect(tenants[(i + n) % len(tenants)]) as c:
                    assert (
                        c.exec_driver_sql("SELECT current_user").scalar() == f'tenant_{tenants[(i + n) % len(tenants)]}'
                    )
        except Exception as e:
            errors.append(e)

    sa.event.listen(sa.pool.Pool, 'connect', counted.opened)
    sa.event.listen(sa.pool.Pool, 'close', counted.closed)
    try:
        workers = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(120)
    finally:
        sa.event.remove(sa.pool.Pool, 'connect', counted.opened)
        sa.event.remove(sa.pool.Pool, 'close', counted.closed)
    assert errors == [] and 0 < counted.peak <= router.budget
    assert wait_for(lambda: tenant_connections(pg_server) <= router.budget)


@pytest.mark.postgres
def test_waits_then_fails_clearly_when_everything_is_busy(pg_tenant_host, tenants):
    r = TenantRouter(pg_tenant_host, budget=2, pool_size=2, timeout=0.2)
    listening(r)
    try:
        with r.connect(tenants[0]), r.connect(tenants[0]):
            with pytest.raises(TenantPoolExhausted, match='all 2 tenant connections'):
                r.engine(tenants[1])
            with pytest.raises(TenantPoolExhausted, match='has all 2 connections in use'):
                r.engine(tenants[0])
        with r.connect(tenants[1]) as c:
            assert c.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        r.close()


@pytest.mark.postgres
def test_lifecycle_changes_stop_routing_at_once_in_this_process(pg_tenant_host, pg_server, tenants, router):
    tid = tenants[0]
    with router.connect(tid):
        pass
    suspend_tenant(pg_tenant_host, tid)
    assert tenant_connections(pg_server, f'tenant_{tid}') == 0
    with pytest.raises(TenantUnavailable, match='suspended') as e:
        router.engine(tid)
    assert e.value.status == 'suspended'
    resume_tenant(pg_tenant_host, tid)
    with pytest.raises(sa.exc.OperationalError), router.connect(tid) as c:
        deprovision_tenant(pg_tenant_host, tid)
        c.exec_driver_sql("SELECT 1")
    with pytest.raises(TenantUnavailable, match='deleted'):
        router.engine(tid)
    with pytest.raises(TenantNotFound):
        router.engine('nobody_here')


@pytest.mark.postgres
def test_provisioning_tenant_is_not_routed(pg_tenant_host, router, monkeypatch):
    from fh_saas import db_tenant

    tid = new_id()

    def crash(a, s):
        if (a, s) == ('provision', 'role'):
            raise RuntimeError('crash')

    monkeypatch.setattr(db_tenant, '_after_step', crash)
    with pytest.raises(RuntimeError):
        provision_tenant(pg_tenant_host, tid, prepare=prepare)
    with pytest.raises(TenantUnavailable, match='provisioning'):
        router.engine(tid)


@pytest.mark.postgres
def test_changes_in_another_process_stop_routing_within_the_ttl(pg_tenant_host, pg_url, tenants):
    tid, ttl = tenants[0], 0.3
    r = TenantRouter(pg_tenant_host, budget=4, pool_size=2, ttl=ttl)
    try:
        with r.connect(tid):
            pass
        change = (
            "from fh_saas.db_host import HostDatabase; from fh_saas import db_tenant; "
            f"h = HostDatabase({pg_url!r}); db_tenant.{{}}(h, {tid!r}); h.close()"
        )
        run_elsewhere(change.format('suspend_tenant'))

        def refused():
            try:
                with r.connect(tid):
                    return False
            except TenantUnavailable:
                return True

        assert wait_for(refused, timeout=ttl + 5)
        run_elsewhere(change.format('resume_tenant'))
        with r.connect(tid) as c:
            assert c.exec_driver_sql("SELECT current_user").scalar() == f'tenant_{tid}'
    finally:
        r.close()


def test_sqlite_tenants_within_budget(sqlite_tenant_host):
    ids = [f'acme{i}' for i in range(5)]
    for tid in ids:
        provision_tenant(sqlite_tenant_host, tid, prepare=prepare)
    r = TenantRouter(sqlite_tenant_host, budget=2, pool_size=2)
    try:
        for tid in ids:
            with r.connect(tid) as c:
                c.exec_driver_sql("INSERT INTO notes (body) VALUES (?)", (tid,))
        assert r.cached == ids[-2:]
        for tid in ids:
            with r.connect(tid) as c:
                assert [x[0] for x in c.exec_driver_sql("SELECT body FROM notes")] == [tid]
    finally:
        r.close()


def test_a_change_racing_with_a_catalog_read_is_not_missed(sqlite_tenant_host, monkeypatch):
    provision_tenant(sqlite_tenant_host, 'acme', prepare=prepare)
    r = TenantRouter(sqlite_tenant_host, budget=4, pool_size=2)
    read = r._lookup

    def read_then_suspend(tid):
        row = read(tid)  # the catalog still says active...
        monkeypatch.setattr(r, '_lookup', read)
        suspend_tenant(sqlite_tenant_host, tid)  # ...and the tenant is suspended before the router caches it
        return row

    monkeypatch.setattr(r, '_lookup', read_then_suspend)
    try:
        with pytest.raises(TenantUnavailable, match='suspended'), r.connect('acme'):
            pass
        assert r.cached == []
    finally:
        r.close()


@pytest.mark.postgres
def test_suspensions_during_concurrent_routing_leak_nothing(pg_tenant_host, pg_server, tenants, router):
    errors, done = [], threading.Event()

    def work(i):
        n = 0
        while not done.is_set() or n < 20:
            tid = tenants[(i + n) % len(tenants)]
            n += 1
            try:
                with router.connect(tid) as c:
                    c.exec_driver_sql("SELECT 1")
            except TenantUnavailable as e:
                if tid != tenants[0]:
                    errors.append(e)
            except Exception as e:
                errors.append(e)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in workers:
        t.start()
    for _ in range(5):
        suspend_tenant(pg_tenant_host, tenants[0])
        resume_tenant(pg_tenant_host, tenants[0])
    done.set()
    for t in workers:
        t.join(120)
    assert errors == [] and not router._retiring
    assert all(e.leases == 0 for e in router._entries.values())
    assert tenant_connections(pg_server) <= router.budget


def statements_on(engine) -> list:
    "A list that grows by the text of each statement `engine` runs."
    seen = []
    sa.event.listen(engine, 'before_cursor_execute', lambda conn, cur, sql, *a: seen.append(sql))
    return seen


@pytest.mark.postgres
def test_a_schema_version_is_reflected_once_for_all_its_tenants(pg_tenant_host, tenants, router):
    a, b, c = tenants
    router.tenant_db(a)['notes'].insert(dict(body='first'))  # reflects `notes`, once
    for tid in (b, c, a):  # c evicts a: routing a again reflects nothing
        db = router.tenant_db(tid)
        seen = statements_on(router.engine(tid))
        db['notes'].insert(dict(body=tid))
        assert [r['body'] for r in db['notes']()][-1] == tid
        assert not [s for s in seen if 'pg_catalog' in s or 'information_schema' in s], seen
        assert len(seen) == 2  # the insert and the select, nothing else
    assert router.tenant_db(a).meta is router.tenant_db(b).meta
    assert [r['body'] for r in router.tenant_db(b)['notes']()] == [b]  # shared tables, each tenant's own rows


def test_a_request_keeps_its_tenant_routed_until_its_response_is_sent(sqlite_tenant_host):
    host = sqlite_tenant_host
    for tid in ('acme', 'beta', 'gamma'):
        provision_tenant(host, tid, prepare=prepare)
    host.global_users.insert(GlobalUser(id='ann', email='ann@example.com'))
    host.memberships.insert(Membership(user_id='ann', tenant_id='acme', role='owner'))
    router, sessions = TenantRouter(host, budget=2, pool_size=2), SessionManager(host, 's' * 40)  # two tenants fit
    app = FastHTML(before=saas_beforeware(AuthResolver(host, sessions, router.tenant_db, pin=router.pin)))
    app.add_middleware(ReleasePins)

    @app.get('/')
    def home(auth):
        for tid in ('beta', 'gamma'):  # the handler's other work routes two more tenants meanwhile
            with router.connect(tid):
                pass
        return dict(cached=router.cached, notes=len(auth.db['notes']()))

    cli = TestClient(app)
    cli.cookies.set(sessions.cookie_name, sessions.create('ann', 'acme'))
    try:
        assert cli.get('/').json() == dict(cached=['acme', 'gamma'], notes=0)  # beta went, not the pinned acme
        with router.connect('beta'), router.connect('gamma'):
            pass  # released: acme may go now
        assert router.cached == ['beta', 'gamma']
    finally:
        router.close()


@pytest.mark.postgres
def test_a_budget_the_servers_cannot_hold_for_every_worker_is_named_with_the_fix(
    pg_tenant_host, pg_server, monkeypatch
):
    with pg_server.engine.connect() as c:
        limit = c.exec_driver_sql(
            "SELECT current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int"
        ).scalar()
    assert check_connection_budget(pg_tenant_host, budget=limit // 4, workers=4) == []
    [problem] = check_connection_budget(pg_tenant_host, budget=limit // 4 + 1, workers=4)
    assert f"allows {limit} connections" in problem and f"at most {limit // 4}" in problem
    monkeypatch.setenv('WEB_CONCURRENCY', '2')  # what uvicorn and gunicorn read for their worker count
    assert check_connection_budget(pg_tenant_host, budget=limit // 2) == []
    assert check_connection_budget(pg_tenant_host, budget=limit // 2 + 1) != []
    add_db_server(pg_tenant_host, 'gone', '127.0.0.1', 'S3cret-admin-pw', port=free_port())
    problems = check_connection_budget(pg_tenant_host, budget=1)
    assert len(problems) == 1 and "'gone'" in problems[0] and 'cannot check it' in problems[0]
    assert 'S3cret-admin-pw' not in problems[0]


@pytest.mark.postgres
def test_quiet_tenants_cost_one_connection_each_and_a_busy_one_more_while_busy(pg_server, pg_tenant_host):
    ids = [provision_tenant(pg_tenant_host, new_id(), prepare=prepare).id for _ in range(4)]
    r = TenantRouter(pg_tenant_host, budget=4, pool_size=2, timeout=5)
    listening(r)
    try:
        for tid in ids:
            with r.connect(tid):
                pass
        assert (r.cached, r.held) == (ids, 4) and tenant_connections(pg_server) == 4  # all four stay connected
        with r.connect(ids[1]), r.connect(ids[1]):  # a second connection at once evicts the least recent idle one
            assert (r.cached, r.held) == ([ids[2], ids[3], ids[1]], 4)
            assert tenant_connections(pg_server) <= 4
        assert r.held == 3 and wait_for(lambda: tenant_connections(pg_server) == 3)  # the extra one is closed
    finally:
        r.close()


@pytest.mark.postgres
def test_an_evicted_tenant_routed_again_reuses_its_engine_unless_its_routing_changed(pg_tenant_host, tenants, router):
    a, b, c = tenants
    first = router.engine(a)
    for tid in (b, c):
        router.engine(tid)  # a is evicted: its connection closed
    assert a not in router.cached and first.pool.checkedin() == 0
    with router.connect(a) as conn:
        assert conn.exec_driver_sql("SELECT current_user").scalar() == f'tenant_{a}'
    assert router.engine(a) is first  # its dialect knew the server: no first-connect queries
    suspend_tenant(pg_tenant_host, a)
    resume_tenant(pg_tenant_host, a)  # a routing change: a new engine
    assert router.engine(a) is not first


@pytest.mark.postgres
def test_a_tenant_scope_in_each_thread_writes_and_audits_only_its_own_tenant(pg_tenant_host, tenants):
    "Jobs on three tenants at once, in threads: each block sees its own database and its own audit context."
    # room beside the three pins: a routing change (the listener's first LISTEN, or another test's) retires pinned
    # entries, which keep their connection until released while their tenants' new entries open one each
    router, barrier, errors = TenantRouter(pg_tenant_host, budget=6, timeout=5), threading.Barrier(3), []
    listening(router)

    def job(tid):
        try:
            with tenant_scope(router, tid, request_id=f'job:{tid}') as db:
                barrier.wait(10)
                db['notes'].insert(dict(body=tid))
                audit(pg_tenant_host, 'test.scoped', target_id=tid)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=job, args=(tid,)) for tid in tenants]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        for tid in tenants:
            with router.connect(tid) as c:
                assert [r[0] for r in c.exec_driver_sql("SELECT body FROM notes")] == [tid]
        logged = {
            (e.target_id, e.tenant_id, e.request_id)
            for e in pg_tenant_host.audit_logs(where="event_type = 'test.scoped'")
        }
        assert logged == {(tid, tid, f'job:{tid}') for tid in tenants}
        suspend_tenant(pg_tenant_host, tenants[0])
        with pytest.raises(TenantUnavailable), tenant_scope(router, tenants[0]):
            pass
    finally:
        router.close()
