"""Tenant routing and provisioning benchmark.

Measures, in one run against a throwaway PostgreSQL cluster (or `FH_SAAS_TEST_PG_URL`):
- warm routing (`router.connect(t)` + `SELECT 1`) against the physical limit, a raw pooled engine doing
  the same `SELECT 1` on the same database(s), with 10, 1,000 and 10,000 tenants in the catalog,
  routing to 1 or 10 hot tenants (the raw side cycles over the same 10 databases);
- cold routing (every call a different tenant, so every call evicts, reads the catalog and opens a
  connection) and the connections left open against the budget;
- provisioning tenants/s from the template, sequential and with 4 threads;
- the same warm/cold routing over real SQLite tenant files (1,000 files; the catalog is filled to
  `--sqlite-tenants` rows, default 10,000).

Run: `python bench/bench_routing.py [--sqlite-tenants N]` from the repository root.
"""

import argparse, os, sys, tempfile, threading, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / 'tests'))
os.environ.setdefault('FH_SAAS_SECRET_KEY', 'bench-master-key-0123456789abcdef0123456789')

from pgserver import start_server
from fh_saas.db_host import HostDatabase, make_engine
from fh_saas import db_tenant
from fh_saas.db_tenant import add_db_server, provision_tenant, tenant_url, tenants_t
from fh_saas.tenant_router import TenantRouter

SECONDS = 0.5  # per timed chunk
ROUNDS = 6  # chunks of each side, interleaved so both see the same machine load
REAL_SQLITE_FILES = 1_000  # real tenant files; the rest of the catalog is rows never routed to


def prepare(engine) -> int:
    with engine.begin() as c:
        c.exec_driver_sql('CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT)')
    return 1


def rate(fn, threads=1, seconds=SECONDS) -> float:
    "Calls of `fn(i)` per second, over `seconds`, from `threads` threads."
    counts, stop = [0] * threads, threading.Event()

    def loop(k):
        i = n = 0
        while not stop.is_set():
            fn(i)
            i += 1
            n += 1
        counts[k] = n

    ts = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in ts:
        t.join()
    return sum(counts) / seconds


def compare(base_fn, routed_fn, threads=1) -> tuple[float, float]:
    "Calls/s of `base_fn` and `routed_fn`, timed in alternating chunks."
    base = routed_ = 0.0
    for _ in range(ROUNDS):
        base += rate(base_fn, threads) / ROUNDS
        routed_ += rate(routed_fn, threads) / ROUNDS
    return base, routed_


def select1(*engines):
    "Raw pooled `SELECT 1`, cycling over `engines` (one per database) the way routing cycles over tenants."

    def call(i):
        with engines[i % len(engines)].begin() as c:
            c.exec_driver_sql('SELECT 1').scalar()

    return call


def routed(router, ids):
    def call(i):
        with router.connect(ids[i % len(ids)]) as c:
            c.exec_driver_sql('SELECT 1').scalar()

    return call


def add_filler(host_db, n: int, server_id=None, start=0):
    "Catalog rows for `n` more active tenants that the warm loop never routes to (catalog size only)."
    rows = [
        dict(
            id=f'filler{start + i:06d}',
            name='filler',
            status='active',
            is_active=True,
            server_id=server_id,
            db_name=f'tenant_filler{start + i:06d}',
            db_role=f'tenant_filler{start + i:06d}',
            routing_version=1,
            db_url='sqlite:///nonexistent.db' if server_id is None else None,
        )
        for i in range(n)
    ]
    with host_db.transaction() as c:
        for k in range(0, n, 1000):
            c.execute(tenants_t.insert(), rows[k : k + 1000])


def tenant_conns(server) -> int:
    with server.engine.connect() as c:
        return c.exec_driver_sql("SELECT count(*) FROM pg_stat_activity WHERE usename LIKE 'tenant_%%'").scalar()


def bench_postgres(server):
    print("== PostgreSQL ==")
    host_db = HostDatabase(server.create_database('bench_host'))
    u = server.admin_url
    add_db_server(host_db, 'main', u.host, u.password, port=u.port, admin_user=u.username, max_tenants=100_000)
    provision_tenant(host_db, 'warmup', prepare=prepare)  # creates and prepares the template once

    n_seq, n_par = 12, 12
    strategy = os.environ.get('FH_SAAS_TEMPLATE_STRATEGY', 'WAL_LOG')
    steps, last, spent = {}, [0.0], dict(provision=0.0, bare=0.0)

    def timed(action, step):
        now = time.perf_counter()
        steps[step] = steps.get(step, 0.0) + (now - last[0]) / n_seq
        last[0] = now

    db_tenant._after_step = timed
    with server.engine.connect() as c:
        for i in range(n_seq):  # alternate with a bare copy so both see the same machine load
            t = last[0] = time.perf_counter()
            provision_tenant(host_db, f'seq{i:04d}', prepare=prepare)
            spent['provision'] += time.perf_counter() - t
            t = time.perf_counter()
            c.exec_driver_sql(f'CREATE DATABASE bare_{i} TEMPLATE fh_saas_tenant_template STRATEGY {strategy}')
            spent['bare'] += time.perf_counter() - t
    db_tenant._after_step = lambda action, step: None
    seq, bare = n_seq / spent['provision'], n_seq / spent['bare']
    print("mean time per provisioning step: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in steps.items()))
    t = time.perf_counter()
    ts = [
        threading.Thread(
            target=lambda k=k: [
                provision_tenant(host_db, f'par{k}_{i:03d}', prepare=prepare) for i in range(n_par // 4)
            ]
        )
        for k in range(4)
    ]
    for x in ts:
        x.start()
    for x in ts:
        x.join()
    par = n_par / (time.perf_counter() - t)
    print(
        f"provisioning from template ({strategy}): {seq:.1f} tenants/s sequential, {par:.1f} tenants/s "
        f"with 4 threads (target >= 10); a bare CREATE DATABASE from the same template, interleaved: {bare:.1f}/s "
        f"-> sequential provisioning at {seq / bare:.2f}x the bare copy"
    )

    hot = [f'seq{i:04d}' for i in range(10)]
    raw = [make_engine(tenant_url(host_db, t), pool_size=4, max_overflow=0) for t in hot]
    router = TenantRouter(host_db, budget=40, pool_size=4, ttl=5.0)
    filled = host_db.tenants.count
    for n in (10, 1_000, 10_000):
        if filled < n:
            add_filler(host_db, n - filled, host_db.q('SELECT id FROM core_db_servers')[0]['id'], start=filled)
            filled = n
        for n_hot, threads in ((1, 1), (10, 1), (10, 4)):
            base, got = compare(select1(*raw[:n_hot]), routed(router, hot[:n_hot]), threads)
            print(
                f"warm routing, {host_db.tenants.count:>6} tenants in catalog, {n_hot:>2} hot, {threads} thread(s): "
                f"{got:6.0f} calls/s vs raw pooled SELECT 1 on the same database(s) {base:6.0f}/s  "
                f"ratio {got / base:.2f}x (target >= 0.67)"
            )
    t, n = time.perf_counter(), 100_000
    for _ in range(n):
        router._release(router._acquire(hot[0]))
    print(f"router bookkeeping per warm call (lease + release, no I/O): {(time.perf_counter() - t) / n * 1e6:.1f} us")
    router.close()
    for eng in raw:
        eng.dispose()

    real = [r['id'] for r in host_db.q("SELECT id FROM core_tenants WHERE id NOT LIKE 'filler%' ORDER BY id")]
    small = TenantRouter(host_db, budget=10, pool_size=2)
    cold = rate(routed(small, real), 4, seconds=3)
    print(
        f"cold routing over {len(real)} real tenant databases, budget 10 (every call evicts + opens): "
        f"{cold:.0f} calls/s"
    )
    print(f"open tenant connections at the end (pg_stat_activity): {tenant_conns(server)} (budget 10)")
    small.close()
    host_db.close()
    HostDatabase.reset_instance()


def bench_sqlite(n_tenants: int):
    print(f"== SQLite ({min(n_tenants, REAL_SQLITE_FILES)} tenant files, {n_tenants} tenants in the catalog) ==")
    tmp = Path(tempfile.mkdtemp(prefix='fh_saas_bench_'))
    host_db = HostDatabase(f"sqlite:///{tmp / 'host.db'}")
    t = time.perf_counter()
    n_real = min(n_tenants, REAL_SQLITE_FILES)
    for i in range(n_real):
        provision_tenant(host_db, f'ten{i:05d}', prepare=prepare)
    print(f"provisioned {n_real} SQLite tenant files: {n_real / (time.perf_counter() - t):.0f} tenants/s")
    if n_tenants > n_real:
        add_filler(host_db, n_tenants - n_real)
    hot = [f'ten{i:05d}' for i in range(10)]
    raw = [make_engine(tenant_url(host_db, t), pool_size=2, max_overflow=0) for t in hot]
    router = TenantRouter(host_db, budget=40, pool_size=2)
    base, got = compare(select1(*raw), routed(router, hot))
    print(
        f"warm routing, {host_db.tenants.count} tenants in catalog, 10 hot: {got:.0f} calls/s vs raw pooled "
        f"SELECT 1 on the same files {base:.0f}/s  ratio {got / base:.2f}x"
    )
    router.close()
    for eng in raw:
        eng.dispose()
    small = TenantRouter(host_db, budget=10, pool_size=2)
    cold = rate(routed(small, [f'ten{i:05d}' for i in range(n_real)]), seconds=3)
    opened = sum(e.engine.pool.checkedin() + e.engine.pool.checkedout() for e in small._entries.values())
    print(
        f"cold routing over {n_real} tenant files, budget 10: {cold:.0f} calls/s; "
        f"pooled connections at the end {opened} (budget 10)"
    )
    small.close()
    host_db.close()
    HostDatabase.reset_instance()


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--sqlite-tenants', type=int, default=10_000)
    args = ap.parse_args()
    server = start_server()
    try:
        bench_postgres(server)
    finally:
        server.stop()
    bench_sqlite(args.sqlite_tenants)
