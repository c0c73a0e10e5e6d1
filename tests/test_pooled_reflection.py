"""A table's first use reflects it once, on the scope's connection: no second connection, no lock wait, no
half-reflected table."""

import sys

import pytest

from fh_saas.db_tenant import provision_tenant
from fh_saas.tenant_router import TenantRouter
from tenant_helpers import new_id, pg_tenant_host, prepare, secret_key, sqlite_tenant_host  # noqa: F401


def first_touch_in_a_transaction(tdb, body):
    "Use `notes` for the first time inside a scope; the tenant's pool must never lend a second connection."
    with tdb.transaction():
        tdb['notes'].insert(dict(body=body))
        assert 'notes' in tdb.table_names()  # listed in the same scope (other tables depend on the shared template)
        assert tdb._engine.pool.checkedout() == 1
    assert tdb._engine.pool.checkedout() == 0


def test_sqlite_first_touch_inside_a_transaction_takes_no_second_connection(sqlite_tenant_host):
    "A second SQLite connection would wait behind the scope's write lock (busy_timeout) and then fail."
    provision_tenant(sqlite_tenant_host, 'acme', prepare=unversioned)
    r = TenantRouter(sqlite_tenant_host, budget=2, pool_size=2)
    try:
        first_touch_in_a_transaction(r.tenant_db('acme'), 'before eviction')
        r.forget('acme')  # a new entry with an empty table cache reflects again
        tdb = r.tenant_db('acme')
        first_touch_in_a_transaction(tdb, 'after eviction')
        assert [n['body'] for n in tdb['notes']()] == ['before eviction', 'after eviction']
    finally:
        r.close()


@pytest.mark.postgres
def test_postgres_first_touch_needs_only_the_one_routed_connection(pg_tenant_host):
    "With one connection per tenant, reflecting on another would time out in the pool instead of working."
    tid = provision_tenant(pg_tenant_host, new_id(), prepare=unversioned).id
    r = TenantRouter(pg_tenant_host, budget=1, pool_size=1, timeout=2)
    try:
        tdb = r.tenant_db(tid)
        first_touch_in_a_transaction(tdb, 'in a transaction')
        r.forget(tid)
        tdb = r.tenant_db(tid)
        assert [n['body'] for n in tdb['notes']()] == ['in a transaction']  # outside a scope: reflects in a routed one
        assert tdb._engine.pool.checkedout() == 0
    finally:
        r.close()


WIDE = {name: [f'{name}_c{i}' for i in range(24)] for name in ('projects', 'tasks', 'labels')}


def add_wide_tables(router, tid):
    """Three tables of 25 columns with one row each, made outside the router's tenant database (so nothing is reflected
    yet)."""
    with router.connect(tid) as c:
        for name, cols in WIDE.items():
            c.exec_driver_sql(
                f"CREATE TABLE {name} (id INTEGER PRIMARY KEY, {', '.join(f'{col} TEXT' for col in cols)})"
            )
            c.exec_driver_sql(f"INSERT INTO {name} VALUES (1, {', '.join(repr(col) for col in cols)})")


def unversioned(engine) -> int:
    "The tests' schema, recorded as no version: each new entry then reflects its tables itself (none are shared)."
    prepare(engine)
    return 0


def first_touch_race(router, tid, race, rounds=8, threads=16):
    "Threads released at one barrier read the tables of a freshly routed tenant; again after each eviction."
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns every few bytecodes, so a reflection is interrupted midway
    try:
        _first_touch_rounds(router, tid, race, rounds, threads)
    finally:
        sys.setswitchinterval(switch)


def _first_touch_rounds(router, tid, race, rounds, threads):
    for _ in range(rounds):
        router.forget(tid)  # a new entry: its database object has reflected nothing
        tdb = router.tenant_db(tid)
        reads = [lambda name=name, tdb=tdb: tdb[name]() for name in list(WIDE) * (threads // len(WIDE) + 1)][:threads]
        outcomes = race(reads, catch=Exception)
        # the names in the order of `reads`; that list is the longer one, so zip stops with the outcomes
        for name, rows in zip(list(WIDE) * threads, outcomes, strict=False):
            assert not isinstance(rows, Exception), rows
            assert rows == [dict(id=1, **{col: col for col in WIDE[name]})]


def test_sqlite_threads_first_touching_one_table_all_see_every_column(sqlite_tenant_host, race):
    "SQLite's scopes each hold the write lock (BEGIN IMMEDIATE), so they reflect one at a time; this keeps it so."
    provision_tenant(sqlite_tenant_host, 'acme', prepare=unversioned)
    r = TenantRouter(sqlite_tenant_host, budget=4, pool_size=4)
    try:
        add_wide_tables(r, 'acme')
        first_touch_race(r, 'acme', race)
    finally:
        r.close()


@pytest.mark.postgres
def test_postgres_threads_first_touching_one_table_all_see_every_column(pg_tenant_host, race):
    "Unlocked, a thread took the table another was still reflecting, and read rows with some or none of its columns."
    tid = provision_tenant(pg_tenant_host, new_id(), prepare=unversioned).id
    r = TenantRouter(pg_tenant_host, budget=4, pool_size=4)
    try:
        add_wide_tables(r, tid)
        first_touch_race(r, tid, race)
    finally:
        r.close()
