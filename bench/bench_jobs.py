"""Job throughput on PostgreSQL: `Worker` processes against a bare claim loop on the same table.

The bare loop is the floor of what any queue on this table can do: one autocommitted
`UPDATE sys_jobs ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING id` per
job, no handler, no lease, no completion write. `claim()`+`complete()` is the queue API in a loop:
two transactions per job (claim with lease, then complete-if-owned), each borrowing a pooled
connection (with its pre-ping). A `Worker` adds the handler call, the tenant/audit binding, the
heartbeat thread and the idle poll.

    python bench/bench_jobs.py [jobs]        # FH_SAAS_BENCH_PG_URL=<superuser url> to use an existing server
"""
import multiprocessing as mp, os, sys, threading, time
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).parents[1] / 'tests'))
from pgserver import PgServer, start_cluster

from fh_saas.db_host import HostDatabase, gen_id, jobs_t, make_engine, timestamp
from fh_saas.jobs import Worker, claim, complete

BARE_CLAIM = sa.text("""
UPDATE sys_jobs SET status = 'done', locked_by = :w, attempts = attempts + 1
WHERE id = (SELECT id FROM sys_jobs WHERE status = 'queued' AND run_at <= now()
            ORDER BY priority DESC, run_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id""")


def fill(engine, n):
    now = timestamp()
    rows = [dict(id=gen_id(), job_type='bench.noop', status='queued', payload='{}', run_at=now, attempts=0,
                 max_attempts=5, priority=0, created_at=now) for _ in range(n)]
    with engine.begin() as c:
        c.execute(jobs_t.delete())
        c.execute(jobs_t.insert(), rows)
    with engine.connect().execution_options(isolation_level='AUTOCOMMIT') as c:
        c.exec_driver_sql('VACUUM ANALYZE sys_jobs')


def bare_loop(url, w):
    eng = make_engine(url, pool_size=1)
    with eng.connect().execution_options(isolation_level='AUTOCOMMIT') as c:
        while c.execute(BARE_CLAIM, dict(w=f'bare{w}')).first() is not None: pass
    eng.dispose()


def api_loop(url, w):
    host_db = HostDatabase(url)
    while (job := claim(host_db, f'api{w}')) is not None: complete(host_db, job)
    host_db.close()


def worker_run(url, w):
    host_db = HostDatabase(url)
    stop = threading.Event()
    def watch():
        while not stop.wait(0.02):
            if not host_db.q("select 1 from sys_jobs where status <> 'done' limit 1"): stop.set()
    threading.Thread(target=watch, daemon=True).start()
    Worker(host_db, {'bench.noop': lambda job: None}, poll=0.01, name=f'bench{w}').run(stop)
    host_db.close()


def timed(target, url, procs, engine, n):
    fill(engine, n)
    ctx = mp.get_context('fork')
    ps = [ctx.Process(target=target, args=(url, w)) for w in range(procs)]
    t0 = time.perf_counter()
    for p in ps: p.start()
    for p in ps: p.join()
    dt = time.perf_counter() - t0
    with engine.connect() as c:
        done = c.execute(sa.select(sa.func.count()).where(jobs_t.c.status == 'done')).scalar()
    assert done == n, f"{done} of {n} jobs done"
    return n / dt


def main(n=2000):
    server = PgServer(os.environ['FH_SAAS_BENCH_PG_URL']) if 'FH_SAAS_BENCH_PG_URL' in os.environ else start_cluster()
    url = server.create_database('bench')
    try:
        HostDatabase(url).close(); HostDatabase.reset_instance()  # schema
        engine = make_engine(url)
        print(f"{n} no-op jobs per run, PostgreSQL, {os.cpu_count()} CPUs")
        for procs in (1, 4):
            bare, api, work = (timed(f, url, procs, engine, n) for f in (bare_loop, api_loop, worker_run))
            print(f"{procs} process(es): bare claim loop {bare:6.0f} jobs/s | claim()+complete() {api:6.0f} jobs/s "
                  f"({api / bare:.2f} of bare) | Worker {work:6.0f} jobs/s ({work / bare:.2f} of bare)")
        engine.dispose()
    finally:
        server.drop_database(url)
        server.stop()


if __name__ == '__main__': main(*(int(a) for a in sys.argv[1:]))
