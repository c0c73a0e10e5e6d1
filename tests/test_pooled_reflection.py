"A table's first use inside a transaction reflects it on the scope's connection: no second connection, no lock wait."
import pytest

from fh_saas.db_tenant import provision_tenant
from fh_saas.tenant_router import TenantRouter
from tenant_helpers import new_id, pg_host, prepare, secret_key, sqlite_host  # noqa: F401


def first_touch_in_a_transaction(tdb, body):
    "Use `notes` for the first time inside a scope; the tenant's pool must never lend a second connection."
    with tdb.transaction():
        tdb['notes'].insert(dict(body=body))
        assert 'notes' in tdb.table_names()   # listed in the same scope (other tables depend on the shared template)
        assert tdb._engine.pool.checkedout() == 1
    assert tdb._engine.pool.checkedout() == 0


def test_sqlite_first_touch_inside_a_transaction_takes_no_second_connection(sqlite_host):
    "A second SQLite connection would wait behind the scope's write lock (busy_timeout) and then fail."
    provision_tenant(sqlite_host, 'acme', prepare=prepare)
    r = TenantRouter(sqlite_host, budget=2, pool_size=2)
    try:
        first_touch_in_a_transaction(r.tenant_db('acme'), 'before eviction')
        r.forget('acme')   # a new entry with an empty table cache reflects again
        tdb = r.tenant_db('acme')
        first_touch_in_a_transaction(tdb, 'after eviction')
        assert [n['body'] for n in tdb['notes']()] == ['before eviction', 'after eviction']
    finally: r.close()


@pytest.mark.postgres
def test_postgres_first_touch_needs_only_the_one_routed_connection(pg_host):
    "With one connection per tenant, reflecting on another would time out in the pool instead of working."
    tid = provision_tenant(pg_host, new_id(), prepare=prepare).id
    r = TenantRouter(pg_host, budget=1, pool_size=1, timeout=2)
    try:
        tdb = r.tenant_db(tid)
        first_touch_in_a_transaction(tdb, 'in a transaction')
        r.forget(tid)
        tdb = r.tenant_db(tid)
        assert [n['body'] for n in tdb['notes']()] == ['in a transaction']   # outside a scope: reflects in a routed one
        assert tdb._engine.pool.checkedout() == 0
    finally: r.close()
