"Routing changes reach routers in other processes through PostgreSQL LISTEN/NOTIFY, with the TTL as the safety net."

import logging, os, select, threading
from contextlib import closing

import psycopg2
import pytest
import sqlalchemy as sa

from fh_saas.db_tenant import (
    ROUTING_CHANNEL,
    TenantUnavailable,
    deprovision_tenant,
    provision_tenant,
    resume_tenant,
    rotate_secret_key,
    suspend_tenant,
    tenant_row,
    tenants_t,
)
from fh_saas.db_host import HostDatabase
from fh_saas.tenant_router import LISTENER_NAME, TenantRouter, _listeners
from pgserver import start_cluster, wait_for
from tenant_helpers import clean_up, listening, new_id, prepare, register, run_elsewhere
from tenant_helpers import pg_tenant_host, secret_key, sqlite_tenant_host  # noqa: F401 (fixtures)


@pytest.fixture
def tenants(pg_tenant_host):
    return [provision_tenant(pg_tenant_host, new_id(), prepare=prepare).id for _ in range(2)]


@pytest.fixture
def router(pg_tenant_host):
    "A router that, by its TTL alone, would not notice a change for a minute."
    r = TenantRouter(pg_tenant_host, budget=4, pool_size=2, ttl=60, timeout=5)
    yield r
    r.close()


def elsewhere(pg_url, action: str, tid: str):
    "Run `db_tenant.<action>(host, tid)` in another process."
    run_elsewhere(
        "from fh_saas.db_host import HostDatabase; from fh_saas import db_tenant; "
        f"h = HostDatabase({pg_url!r}); db_tenant.{action}(h, {tid!r}); h.close()"
    )


def refused(router, tid) -> bool:
    try:
        with router.connect(tid):
            return False
    except TenantUnavailable:
        return True


def listener_backends(pg_server, pg_url) -> list[int]:
    "Pids of the listener connections on the host database."
    with pg_server.engine.connect() as c:
        return [
            r[0]
            for r in c.exec_driver_sql(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = %s",
                (LISTENER_NAME, sa.make_url(pg_url).database),
            )
        ]


def listener_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == LISTENER_NAME]


@pytest.mark.postgres
def test_a_change_committed_in_another_process_stops_routing_at_once(pg_url, tenants, router):
    tid = tenants[0]
    listening(router)
    with router.connect(tid):
        pass
    elsewhere(pg_url, 'suspend_tenant', tid)
    assert wait_for(lambda: refused(router, tid), timeout=2)
    elsewhere(pg_url, 'resume_tenant', tid)
    with router.connect(tid) as c:
        assert c.exec_driver_sql("SELECT current_user").scalar() == f'tenant_{tid}'


class Notifications:
    "A connection of the test's own listening on the routing channel."

    def __init__(self, url):
        self.conn = psycopg2.connect(
            sa.make_url(url).set(drivername='postgresql').render_as_string(hide_password=False)
        )
        self.conn.autocommit = True
        with self.conn.cursor() as cur:
            cur.execute(f'LISTEN {ROUTING_CHANNEL}')
        self.heard = []

    def until(self, payload) -> list[str]:
        "Every payload heard up to and including `payload` (notifications arrive in commit order)."

        def arrived():
            if select.select([self.conn], [], [], 0.05)[0]:
                self.conn.poll()
            while self.conn.notifies:
                self.heard.append(self.conn.notifies.pop(0).payload)
            return payload in self.heard

        assert wait_for(arrived, timeout=5)
        return self.heard

    def close(self):
        self.conn.close()


@pytest.mark.postgres
def test_a_rolled_back_change_sends_nothing(pg_tenant_host, pg_url, tenants):
    with closing(Notifications(pg_url)) as heard:
        with pytest.raises(RuntimeError, match='changed my mind'), pg_tenant_host.transaction():
            suspend_tenant(pg_tenant_host, tenants[0])
            raise RuntimeError('changed my mind')
        assert tenant_row(pg_tenant_host, tenants[0]).status == 'active'
        # committed after the rollback: its notification comes after any from it
        suspend_tenant(pg_tenant_host, tenants[1])
        assert heard.until(tenants[1]) == [tenants[1]]


@pytest.mark.postgres
def test_every_routing_version_bump_notifies_once(pg_tenant_host, pg_url, tenants):
    tid = new_id()
    with closing(Notifications(pg_url)) as heard:
        provision_tenant(pg_tenant_host, tid, prepare=prepare)
        suspend_tenant(pg_tenant_host, tid)
        suspend_tenant(pg_tenant_host, tid)  # already suspended: nothing changes, nothing is sent
        resume_tenant(pg_tenant_host, tid)
        assert rotate_secret_key(pg_tenant_host).ok
        deprovision_tenant(pg_tenant_host, tid)
        suspend_tenant(pg_tenant_host, tenants[0])  # the end marker
        bumps = tenant_row(pg_tenant_host, tid).routing_version - 1  # registering starts at 1 without a bump
        assert bumps == 6 and heard.until(tenants[0]).count(tid) == bumps


@pytest.mark.postgres
def test_the_listener_reconnects_after_its_connection_is_killed(pg_server, pg_url, tenants, router, caplog):
    listener = listening(router)
    [pid] = listener_backends(pg_server, pg_url)
    with router.connect(tenants[1]):
        pass
    with caplog.at_level(logging.WARNING, logger='fh_saas.tenant_router'):
        with pg_server.engine.connect() as c:
            c.exec_driver_sql("SELECT pg_terminate_backend(%s)", (pid,))
        assert wait_for(lambda: listener.listens == 2)
    assert 'reconnecting' in caplog.text and pg_server.admin_url.password not in caplog.text
    assert len(backends := listener_backends(pg_server, pg_url)) == 1 and backends != [pid]
    assert router.cached == []  # what changed while nobody listened is unknown: everything was forgotten
    tid = tenants[0]
    with router.connect(tid):
        pass
    elsewhere(pg_url, 'suspend_tenant', tid)
    assert wait_for(lambda: refused(router, tid), timeout=2)
    assert listener_threads() == [listener.thread]


@pytest.mark.postgres
def test_the_listener_comes_back_after_a_server_restart(caplog):
    server = start_cluster()
    try:
        url = server.create_database('restart')
        host_db = HostDatabase(url)
        try:
            register(host_db, server)
            tid = provision_tenant(host_db, new_id(), prepare=prepare).id
            router = TenantRouter(host_db, ttl=60)
            listener = listening(router)
            with caplog.at_level(logging.WARNING, logger='fh_saas.tenant_router'):
                server.restart()
                assert wait_for(lambda: listener.listens == 2)
            assert 'reconnecting' in caplog.text and listener_threads() == [listener.thread]
            with router.connect(tid):
                pass
            elsewhere(url, 'suspend_tenant', tid)
            assert wait_for(lambda: refused(router, tid), timeout=2)
            router.close()
            assert listener_threads() == []
        finally:
            clean_up(host_db)
    finally:
        server.stop()


@pytest.mark.postgres
def test_one_listener_per_host_database_until_the_last_router_closes(pg_tenant_host, pg_server, pg_url):
    first, second = TenantRouter(pg_tenant_host), TenantRouter(pg_tenant_host)
    listener = listening(first)
    assert set(listener.routers) == {first, second} and listener_threads() == [listener.thread]
    assert len(listener_backends(pg_server, pg_url)) == 1
    first.close()
    assert listener.thread.is_alive() and len(listener_backends(pg_server, pg_url)) == 1
    second.close()
    assert not listener.thread.is_alive() and pg_tenant_host.engine not in _listeners and listener_threads() == []
    assert wait_for(lambda: listener_backends(pg_server, pg_url) == [])


@pytest.mark.postgres
def test_closing_the_host_database_stops_the_listener(pg_tenant_host, pg_server, pg_url):
    router = TenantRouter(pg_tenant_host)
    listener = listening(router)
    pg_tenant_host.close()
    assert not listener.thread.is_alive() and pg_tenant_host.engine not in _listeners
    assert wait_for(lambda: listener_backends(pg_server, pg_url) == [])
    router.close()


@pytest.mark.postgres
def test_a_missed_notification_is_caught_by_the_ttl(pg_tenant_host, pg_server, pg_url, tenants):
    tid, r = tenants[0], TenantRouter(pg_tenant_host, ttl=0.3)
    try:
        listening(r)
        with r.connect(tid):
            pass
        t = tenants_t
        # no pg_notify
        with sa.create_engine(pg_server.url(sa.make_url(pg_url).database), poolclass=sa.pool.NullPool).begin() as c:
            c.execute(
                t.update().where(t.c.id == tid).values(status='suspended', routing_version=t.c.routing_version + 1)
            )
        assert wait_for(lambda: refused(r, tid), timeout=5)
    finally:
        r.close()


def test_a_sqlite_host_has_no_listener(sqlite_tenant_host):
    r = TenantRouter(sqlite_tenant_host)
    try:
        assert _listeners == {} and listener_threads() == []
    finally:
        r.close()


@pytest.mark.postgres
def test_a_forked_child_closing_its_copy_leaves_the_parents_listener_alone(pg_url, tenants, router):
    "The child's close/dispose must not stop (or wake) the parent's listener through the inherited pipe."
    tid, listener = tenants[0], listening(router)
    before = listener.listens
    if (pid := os.fork()) == 0:
        try:
            router.close()
            router.host_db.engine.dispose(close=False)
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    with router.connect(tid):
        pass
    elsewhere(pg_url, 'suspend_tenant', tid)
    assert wait_for(lambda: refused(router, tid), timeout=2)
    assert listener.thread.is_alive() and listener.listens == before and len(listener_threads()) == 1
