"""Fleet migration throughput against the raw cost of the same work, measured in the same run.

    python bench/bench_fleet_migrate.py [--tenants 1000] [--pg-tenants 50] [--concurrency 4]

For each backend: N tenant databases in the host catalog at version 0, then
- `migrate_fleet` 0 -> latest (the core tables) and 3 -> 4 (one `ALTER TABLE ... ADD COLUMN`);
- the same DDL sent straight through the driver to each database, one after the other (connect,
  BEGIN, DDL + version rows, COMMIT): the physical cost of the work, without fh_saas;
- an empty write transaction per database (connect, BEGIN, COMMIT): the floor of touching a tenant;
- a re-run with nothing behind (what a resumed run pays for the tenants already done).
Ratios are fleet time / (N x raw per-tenant cost). PostgreSQL uses a throwaway cluster from
tests/pgserver.py (or FH_SAAS_TEST_PG_URL); its databases are created before timing starts, and the
raw runs reuse them once their tables are dropped again.
"""
import argparse, sqlite3, sys, tempfile, time
from pathlib import Path

import psycopg2
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / 'tests'))

from fh_saas.db_host import HostDatabase, TenantCatalog, make_engine, timestamp
from fh_saas.tenant_migrations import (TenantMigration, TenantSchema, _history_t, core_migrations, migrate_fleet,
                                       tenant_metadata)

SCHEMA = TenantSchema([*core_migrations,
                       TenantMigration(4, 'user_locale', 'ALTER TABLE tenant_users ADD COLUMN locale VARCHAR(16)')])


def raw_ddl(dialect) -> list[str]:
    "The statements migrations 1-3 amount to, compiled for `dialect`, plus the version bookkeeping."
    ddl = [str(sa.schema.CreateTable(t).compile(dialect=dialect)) for t in [_history_t, *tenant_metadata.sorted_tables]]
    ts = timestamp()
    return ddl + [f"INSERT INTO _fh_saas_schema (version, name, applied_at) VALUES ({m.version}, '{m.name}', '{ts}')"
                  for m in core_migrations]


def timed(f) -> float:
    t = time.perf_counter(); f(); return time.perf_counter() - t


def fleet_runs(host_db, engine_for, n, concurrency):
    "Fleet 0 -> 3, 3 -> 4 and a re-run with nothing behind; returns their times."
    def run(target, expect):
        report = migrate_fleet(host_db, engine_for, target=target, concurrency=concurrency, schema=SCHEMA)
        assert report.ok and len(report.migrated) == expect, report
    return timed(lambda: run(3, n)), timed(lambda: run(4, n)), timed(lambda: run(4, 0))


def report(name, n, concurrency, fleet, raw_create, raw_alter, raw_empty):
    t_core, t_alter, t_rerun = fleet
    print(f"\n{name}: {n} tenants, concurrency {concurrency}")
    print(f"  fleet 0 -> 3 (3 tables + version rows): {t_core:7.2f} s  {n / t_core:7.0f} tenants/s   "
          f"raw DDL x N: {raw_create:6.2f} s (ratio {t_core / raw_create:4.2f})   "
          f"empty txn x N: {raw_empty:6.2f} s (ratio {t_core / raw_empty:4.2f})")
    print(f"  fleet 3 -> 4 (one ADD COLUMN):          {t_alter:7.2f} s  {n / t_alter:7.0f} tenants/s   "
          f"raw DDL x N: {raw_alter:6.2f} s (ratio {t_alter / raw_alter:4.2f})   "
          f"empty txn x N: {raw_empty:6.2f} s (ratio {t_alter / raw_empty:4.2f})")
    print(f"  re-run, nothing behind:                 {t_rerun:7.3f} s")


def catalog(host_db, ids):
    with host_db.transaction():
        for tid in ids: host_db.tenants.insert(TenantCatalog(id=tid, name=tid, status='active', schema_version=0))


def bench_sqlite(n, concurrency):
    tmp = Path(tempfile.mkdtemp(prefix='fh_saas_bench_'))
    ids = [f"t{i:05d}" for i in range(n)]
    host_db = HostDatabase(f"sqlite:///{tmp/'host.db'}")
    catalog(host_db, ids)
    fleet = fleet_runs(host_db, lambda tid: make_engine(f"sqlite:///{tmp/tid}.db", poolclass=sa.pool.NullPool), n,
                       concurrency)
    host_db.close(); HostDatabase.reset_instance()

    ddl = raw_ddl(sqlite.dialect())
    def raw(paths, statements):
        for p in paths:
            c = sqlite3.connect(p, isolation_level=None)
            c.execute('PRAGMA journal_mode=WAL'); c.execute('PRAGMA synchronous=NORMAL')
            c.execute('BEGIN IMMEDIATE')
            for s in statements: c.execute(s)
            c.execute('COMMIT'); c.close()
    raw_paths = [tmp / f"raw_{tid}.db" for tid in ids]
    raw_create = timed(lambda: raw(raw_paths, ddl))
    raw_alter = timed(lambda: raw(raw_paths, [SCHEMA.get(4).up,
                                              "INSERT INTO _fh_saas_schema VALUES (4, 'user_locale', '')"]))
    raw_empty = timed(lambda: raw(raw_paths, []))
    report('SQLite files', n, concurrency, fleet, raw_create, raw_alter, raw_empty)


def bench_postgres(n, concurrency):
    from pgserver import start_server
    server = start_server()
    try:
        t = time.perf_counter()
        fleet_urls = {f"t{i:05d}": server.create_database('bench') for i in range(n)}
        print(f"\n(PostgreSQL: created {n} databases in {time.perf_counter() - t:.1f} s, not timed below)")
        host_url = server.create_database('bench_host')
        host_db = HostDatabase(host_url)
        catalog(host_db, fleet_urls)
        fleet = fleet_runs(host_db, lambda tid: sa.create_engine(fleet_urls[tid], poolclass=sa.pool.NullPool), n,
                           concurrency)
        host_db.close(); HostDatabase.reset_instance()

        ddl = raw_ddl(postgresql.dialect())
        dsns = [sa.make_url(u).set(drivername='postgresql').render_as_string(hide_password=False)
                for u in fleet_urls.values()]
        def raw(statements):
            for dsn in dsns:
                c = psycopg2.connect(dsn)
                with c, c.cursor() as cur:
                    for s in statements: cur.execute(s)
                c.close()
        raw([f"DROP TABLE {t.name}" for t in [_history_t, *tenant_metadata.sorted_tables]])  # untimed: empty them again
        raw_create = timed(lambda: raw(ddl))
        raw_alter = timed(lambda: raw([SCHEMA.get(4).up,
                                       "INSERT INTO _fh_saas_schema VALUES (4, 'user_locale', now())"]))
        raw_empty = timed(lambda: raw(['SELECT 1']))
        report('PostgreSQL databases', n, concurrency, fleet, raw_create, raw_alter, raw_empty)
    finally: server.stop()


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--tenants', type=int, default=1000, help='SQLite tenants (0 to skip)')
    p.add_argument('--pg-tenants', type=int, default=50, help='PostgreSQL tenants (0 to skip)')
    p.add_argument('--concurrency', type=int, default=4)
    args = p.parse_args()
    if args.tenants: bench_sqlite(args.tenants, args.concurrency)
    if args.pg_tenants: bench_postgres(args.pg_tenants, args.concurrency)
