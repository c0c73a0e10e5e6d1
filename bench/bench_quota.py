"""Quota consumption on PostgreSQL: `consume_quota` against the bare atomic counter it is built on.

The floor is one autocommitted `UPDATE core_quota_usage SET used = used + 1 WHERE <key> AND
used + 1 <= :limit RETURNING used` per unit: no entitlement read, no period-row insert. A
`consume_quota` call reads the tenant's entitlements (tenant, subscriptions, plan, overrides),
ensures the month's row exists and runs that update, all in one transaction. Both are measured
with the same threads, on one hot row (every thread on one tenant) and on one row per thread.

    python bench/bench_quota.py [units_per_thread] [threads]
    # FH_SAAS_BENCH_PG_URL=<superuser url> to use a running server
"""
import os, sys, threading, time
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).parents[1] / 'tests'))
from pgserver import PgServer, start_cluster

from fh_saas.billing import consume_quota, override_quota, month_start, seed_plans, usage_t
from fh_saas.db_host import HostDatabase, Subscription, TenantCatalog

FLOOR = (usage_t.update().where(usage_t.c.tenant_id == sa.bindparam('t'), usage_t.c.quota == 'api_calls',
                                usage_t.c.period_start == sa.bindparam('p'), usage_t.c.used + 1 <= sa.bindparam('lim'))
         .values(used=usage_t.c.used + 1).returning(usage_t.c.used))


def run_threads(n_threads, work):
    "Seconds for `work(i)` to finish in `n_threads` threads released together."
    gate = threading.Barrier(n_threads + 1)
    def run(i): gate.wait(); work(i)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
    for t in threads: t.start()
    gate.wait()
    t0 = time.perf_counter()
    for t in threads: t.join()
    return time.perf_counter() - t0


def measure(host_db, tenants, units, n_threads, limit):
    "Units per second for the bare counter and for `consume_quota`, each thread on `tenants[i]`."
    period = month_start()
    def floor(i):
        with host_db.engine.connect().execution_options(isolation_level='AUTOCOMMIT') as c:
            for _ in range(units): assert c.execute(FLOOR, dict(t=tenants[i], p=period, lim=limit)).scalar() is not None
    def full(i):
        for _ in range(units): consume_quota(host_db, tenants[i], 'api_calls')
    with host_db.transaction() as c:
        c.execute(usage_t.delete())
        c.execute(usage_t.insert(), [dict(tenant_id=t, quota='api_calls', period_start=period, used=0)
                                     for t in set(tenants)])
    floor_s = run_threads(n_threads, floor)
    with host_db.transaction() as c: c.execute(usage_t.delete())
    full_s = run_threads(n_threads, full)
    total = units * n_threads
    assert sum(r['used'] for r in host_db.q('select used from core_quota_usage')) == total
    return total / floor_s, total / full_s


def main(units=250, n_threads=8):
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
        print(f"{n_threads} threads x {units} units, "
              f"PostgreSQL {host_db.q('show server_version')[0]['server_version']}")
        for label, tenants in (('hot row (one tenant)', ['t0'] * n_threads),
                               ('row per thread', [f't{i}' for i in range(n_threads)])):
            floor, full = measure(host_db, tenants, units, n_threads, limit)
            print(f"{label:22} bare counter {floor:8.0f}/s   consume_quota {full:8.0f}/s   ratio {full / floor:.2f}")
    finally:
        host_db.close(); HostDatabase.reset_instance()
        server.drop_database(db_url); server.stop()


if __name__ == '__main__': main(*map(int, sys.argv[1:3]))
