"""Quota consumption on PostgreSQL: `consume_quota` against the bare atomic counter it is built on.

The floor is one autocommitted `UPDATE core_quota_usage SET used = used + 1 WHERE <key> AND
used + 1 <= :limit RETURNING used` per unit on a connection held for the whole loop.
`consume_quota` is called as `require_quota` calls it: with the tenant's `Entitlements` in hand
(the guard has the request's), so the count is one autocommitted `INSERT ... ON CONFLICT DO
UPDATE SET used = used + :n WHERE used + :n <= :limit RETURNING used` on a pooled connection.
Both are measured with the same threads, on one hot row (every thread on one tenant) and on one
row per thread; then threads race for the last units under a limit. The run exits non-zero
if the units counted differ from the units granted or the limit was passed.

Where the time went (cProfile, one thread, 2000 calls): before, each call was one transaction
with five round trips (the pool's pre-ping, `BEGIN`, the billing query for tenant, subscriptions
and plan, the overrides query, the counter `UPDATE`) plus `COMMIT`, and SQLAlchemy compiling a
fresh `UPDATE` (its cache key) every call: 0.10x the floor. Now the entitlements come from the
caller and the statement is built once per backend: one round trip, autocommitted
(`HostDatabase.one_statement`, whose autocommit switch is the driver's own: SQLAlchemy's
`isolation_level` switch costs psycopg2 round trips of `SET`s once a level was set explicitly,
which the floor's own connections do to the shared pool), plus the pre-ping while `make_engine`
still pings at checkout (`DB_POOL_PRE_PING=true`; the default here is off, as the free liveness
check makes it). What is left over the floor is about 2x its client CPU per unit (the pool
checkout, SQLAlchemy's execution of the cached statement, the month's start), which the 8
threads share under one GIL. The variants are interleaved over rounds; the machine is shared
and figures vary from run to run.

    python bench/bench_quota.py [units_per_thread] [threads] [rounds]
    # FH_SAAS_BENCH_PG_URL=<superuser url> to use a running server
"""

import os, sys, threading, time
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).parents[1] / 'tests'))
from pgserver import PgServer, start_cluster

os.environ.setdefault('DB_POOL_PRE_PING', 'false')  # what make_engine's free liveness check gives

from fh_saas.billing import QuotaExceeded, consume_quota, entitlements, override_quota, month_start, quota_used
from fh_saas.billing import seed_plans, usage_t
from fh_saas.db_host import HostDatabase, Subscription, TenantCatalog

FLOOR = (
    usage_t.update()
    .where(
        usage_t.c.tenant_id == sa.bindparam('t'),
        usage_t.c.quota == 'api_calls',
        usage_t.c.period_start == sa.bindparam('p'),
        usage_t.c.used + 1 <= sa.bindparam('lim'),
    )
    .values(used=usage_t.c.used + 1)
    .returning(usage_t.c.used)
)


def run_threads(n_threads, work):
    "Seconds for `work(i)` to finish in `n_threads` threads released together."
    gate = threading.Barrier(n_threads + 1)

    def run(i):
        gate.wait()
        work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def measure(host_db, tenants, units, n_threads, limit):
    "Units per second for the bare counter and for `consume_quota`, each thread on `tenants[i]`."
    period = month_start()

    def floor(i):
        with host_db.engine.connect().execution_options(isolation_level='AUTOCOMMIT') as c:
            for _ in range(units):
                assert c.execute(FLOOR, dict(t=tenants[i], p=period, lim=limit)).scalar() is not None

    ents = {t: entitlements(host_db, t) for t in set(tenants)}  # what a guard has from the request's auth

    def full(i):
        for _ in range(units):
            consume_quota(host_db, tenants[i], 'api_calls', entitlements=ents[tenants[i]])

    with host_db.transaction() as c:
        c.execute(usage_t.delete())
        c.execute(
            usage_t.insert(), [dict(tenant_id=t, quota='api_calls', period_start=period, used=0) for t in set(tenants)]
        )
    floor_s = run_threads(n_threads, floor)
    with host_db.transaction() as c:
        c.execute(usage_t.delete())
    full_s = run_threads(n_threads, full)
    total = units * n_threads
    counted = sum(r['used'] for r in host_db.q('select used from core_quota_usage'))
    if counted != total:
        sys.exit(f"guarantee broken: {counted} units counted for {total} granted")
    return total / floor_s, total / full_s


def last_units(host_db, n_threads, spare=10):
    "`n_threads` threads race for the hot row's last `spare` units: exactly `spare` are granted, the limit holds."
    used = quota_used(host_db, 't0', 'api_calls')
    override_quota(host_db, 't0', 'api_calls', used + spare)
    ents, granted = entitlements(host_db, 't0'), []

    def race(i):
        for _ in range(spare):
            try:
                granted.append(consume_quota(host_db, 't0', 'api_calls', entitlements=ents))
            except QuotaExceeded:
                pass

    run_threads(n_threads, race)
    final = quota_used(host_db, 't0', 'api_calls')
    if sorted(granted) != list(range(spare)) or final != used + spare:
        sys.exit(f"guarantee broken: {len(granted)} of the last {spare} units granted, {final - used} counted")
    print(f"last {spare} units raced by {n_threads} threads: {len(granted)} granted, the limit held")


def main(units=250, n_threads=8, rounds=3):
    server = PgServer(url) if (url := os.environ.get('FH_SAAS_BENCH_PG_URL')) else start_cluster()
    db_url = server.create_database('bench_quota')
    host_db = HostDatabase(db_url)
    try:
        seed_plans(host_db, [dict(id='pro', name='Pro', quotas={'api_calls': 10**9})])
        limit = 10**9
        for i in range(n_threads):
            host_db.tenants.insert(TenantCatalog(id=f't{i}', name=f'T{i}'))
            host_db.subscriptions.insert(Subscription(tenant_id=f't{i}', status='active', plan_tier='pro'))
            override_quota(host_db, f't{i}', 'api_calls', limit)
        print(
            f"{rounds} interleaved rounds of {n_threads} threads x {units} units, "
            f"PostgreSQL {host_db.q('show server_version')[0]['server_version']}, "
            f"DB_POOL_PRE_PING={os.environ['DB_POOL_PRE_PING']}"
        )
        for label, tenants in (
            ('hot row (one tenant)', ['t0'] * n_threads),
            ('row per thread', [f't{i}' for i in range(n_threads)]),
        ):
            rates = [measure(host_db, tenants, units, n_threads, limit) for _ in range(rounds)]  # interleaved
            floor, full = (len(rates) / sum(1 / r[k] for r in rates) for k in (0, 1))
            print(f"{label:22} bare counter {floor:8.0f}/s   consume_quota {full:8.0f}/s   ratio {full / floor:.2f}")
        last_units(host_db, n_threads)
    finally:
        host_db.close()
        HostDatabase.reset_instance()
        server.drop_database(db_url)
        server.stop()


if __name__ == '__main__':
    main(*map(int, sys.argv[1:4]))
