"""Job throughput on PostgreSQL: `claim()`+`complete()` and `Worker` processes against a bare claim loop.

The bare loop is the floor of what any queue on this table can do: one autocommitted
`UPDATE sys_jobs ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING id` per
job on a connection held for the whole loop, no handler, no lease, no completion write.
`claim()`+`complete()` is the queue API in a loop: one autocommitted claim statement (lease,
attempt, expired leases first, a job out of attempts made dead) and one complete-if-owned
`UPDATE`, each on a pooled connection. A `Worker` adds the handler call, the tenant/audit
binding, the hand-over to its worker thread and the heartbeat thread; it completes the job
just run and claims the next batch in one statement. Each run exits non-zero if a job was
lost or ran twice (every job `done` after exactly one attempt, every handler call counted).
Then one `Worker` sits idle in this process: the statements it sends over a few seconds are
counted (none), and jobs are enqueued one at a time to time how long each takes to start.

Where the time went (cProfile with a CPU clock, and EXPLAIN ANALYZE, on 1000-2000 jobs): before,
each call was its own transaction: the pool's pre-ping, `BEGIN`, the statement, `COMMIT` (eight
round trips per job against the floor's one), plus SQLAlchemy building a new `UPDATE ... WHERE`
and its cache key for every complete: 0.16x (1 process) and 0.19x (4); the `Worker` also polled
(one claim transaction per idle thread per `poll`), 0.14x. Now each call is one statement,
built once and run autocommitted (`HostDatabase.one_statement`): two round trips per job. Two
costs hid behind that. Switching a pooled psycopg2 connection to autocommit through SQLAlchemy's
`isolation_level` costs round trips of its own (psycopg2 sends `SET`s once a level was set
explicitly, as SQLAlchemy does on every return), so `one_statement` flips the driver's switch on
a session left at the server's default. And for a statement the size of the claim, SQLAlchemy's
per-call work (cache key, bind processing, the `IN` list expanded per call) cost more CPU than the
round trip on this 2-core machine, so the job statements are compiled once and handed to the
driver as they are (`types` as one array parameter). What remains over the floor is the second
statement (the floor's `UPDATE` claims and finishes at once), PostgreSQL planning a larger
statement each time (0.4 ms against 0.2 ms), and per job about 4x the floor's client CPU
(`Job`, JSON, two pool checkouts). The pre-ping's round trip at checkout is measured only with
`DB_POOL_PRE_PING=true` (`make_engine` is getting a free liveness check instead). The `Worker`
sends one statement per job: a data-modifying CTE completes the finished jobs still held and
claims one job per idle thread; it sleeps on `LISTEN` (a trigger `NOTIFY`s when a job becomes
`queued`) and wakes for the next due `run_at`, lease expiry or schedule period, so an idle worker
sends nothing. The machine is shared: the variants are interleaved over rounds so a drifting
load hits each alike, and figures still vary by 2x from run to run.

    python bench/bench_jobs.py [jobs] [rounds]   # FH_SAAS_BENCH_PG_URL=<superuser url> to use an existing server
"""

import multiprocessing as mp, os, statistics, sys, threading, time
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).parents[1] / 'tests'))
from pgserver import PgServer, start_cluster

os.environ.setdefault('DB_POOL_PRE_PING', 'false')  # what make_engine's free liveness check gives

from fh_saas.db_host import HostDatabase, gen_id, jobs_t, make_engine, timestamp
from fh_saas.jobs import Worker, claim, complete, enqueue

BARE_CLAIM = sa.text("""
UPDATE sys_jobs SET status = 'done', locked_by = :w, attempts = attempts + 1
WHERE id = (SELECT id FROM sys_jobs WHERE status = 'queued' AND run_at <= now()
            ORDER BY priority DESC, run_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id""")


def fill(engine, n):
    now = timestamp()
    rows = [
        dict(
            id=gen_id(),
            job_type='bench.noop',
            status='queued',
            payload='{}',
            run_at=now,
            attempts=0,
            max_attempts=5,
            priority=0,
            created_at=now,
        )
        for _ in range(n)
    ]
    with engine.begin() as c:
        c.execute(jobs_t.delete())
        c.execute(jobs_t.insert(), rows)
    with engine.connect().execution_options(isolation_level='AUTOCOMMIT') as c:
        c.exec_driver_sql('VACUUM ANALYZE sys_jobs')


def bare_loop(url, w, runs):
    eng = make_engine(url, pool_size=1)
    with eng.connect().execution_options(isolation_level='AUTOCOMMIT') as c:
        while c.execute(BARE_CLAIM, dict(w=f'bare{w}')).first() is not None:
            with runs.get_lock():
                runs.value += 1
    eng.dispose()


def api_loop(url, w, runs):
    host_db = HostDatabase(url)
    while (job := claim(host_db, f'api{w}')) is not None:
        with runs.get_lock():
            runs.value += 1
        complete(host_db, job)
    host_db.close()


def worker_run(url, w, runs):
    host_db = HostDatabase(url)
    stop = threading.Event()

    def watch():
        while not stop.wait(0.02):
            if not host_db.q("select 1 from sys_jobs where status <> 'done' limit 1"):
                stop.set()

    def noop(job):
        with runs.get_lock():
            runs.value += 1

    threading.Thread(target=watch, daemon=True).start()
    Worker(host_db, {'bench.noop': noop}, poll=0.01, name=f'bench{w}').run(stop)
    host_db.close()


def timed(target, url, procs, engine, n):
    "Jobs per second for `procs` processes running `target`; exits if a job was lost or ran twice."
    fill(engine, n)
    ctx = mp.get_context('fork')
    runs = ctx.Value('l', 0)
    ps = [ctx.Process(target=target, args=(url, w, runs)) for w in range(procs)]
    t0 = time.perf_counter()
    for p in ps:
        p.start()
    for p in ps:
        p.join()
    dt = time.perf_counter() - t0
    with engine.connect() as c:
        done, most = c.execute(
            sa.select(sa.func.count(), sa.func.max(jobs_t.c.attempts)).where(jobs_t.c.status == 'done')
        ).one()
    if (done, most, runs.value) != (n, 1, n) or any(p.exitcode for p in ps):
        sys.exit(
            f"guarantee broken ({target.__name__}): {done} of {n} done, at most {most} attempts, "
            f"{runs.value} runs, exit codes {[p.exitcode for p in ps]}"
        )
    return n / dt


def idle_and_wakeup(url, jobs=20, idle_s=3.0):
    "Statements an idle `Worker` sends in `idle_s` seconds, and how long each of `jobs` enqueued jobs takes to start."
    host_db, stop, started, sent = HostDatabase(url), threading.Event(), threading.Event(), []
    host_db.q("delete from sys_jobs")
    begun = {}

    def ping(job):
        begun[job.payload['k']] = time.perf_counter()
        started.set()

    worker = Worker(host_db, {'bench.ping': ping}, name='bench-idle')
    t = threading.Thread(target=worker.run, args=(stop,))
    t.start()
    time.sleep(0.5)  # its first look at the queue

    def count(conn, cursor, statement, *rest):
        sent.append(statement)

    sa.event.listen(host_db.engine, 'before_cursor_execute', count)
    sa.event.listen(host_db.engine, 'checkout', count)  # a checkout may ping
    time.sleep(idle_s)
    sa.event.remove(host_db.engine, 'before_cursor_execute', count)
    sa.event.remove(host_db.engine, 'checkout', count)
    idle = len(sent)
    latencies = []
    for k in range(jobs):
        started.clear()
        t0 = time.perf_counter()
        enqueue(host_db, 'bench.ping', dict(k=k))
        if not started.wait(5):
            sys.exit(f"guarantee broken: job {k} did not start within 5 s")
        latencies.append(begun[k] - t0)
        time.sleep(0.05)
    stop.set()
    t.join()
    if host_db.q("select count(*) as n from sys_jobs where status = 'done' and attempts = 1")[0]['n'] != jobs:
        sys.exit("guarantee broken: the enqueued jobs were not each done once")
    host_db.close()
    HostDatabase.reset_instance()
    return idle, latencies


def main(n=1000, rounds=3):
    server = PgServer(os.environ['FH_SAAS_BENCH_PG_URL']) if 'FH_SAAS_BENCH_PG_URL' in os.environ else start_cluster()
    url = server.create_database('bench')
    try:
        HostDatabase(url).close()
        HostDatabase.reset_instance()  # schema
        engine = make_engine(url)
        print(
            f"{rounds} rounds of {n} no-op jobs per variant, interleaved, PostgreSQL, {os.cpu_count()} CPUs, "
            f"DB_POOL_PRE_PING={os.environ['DB_POOL_PRE_PING']}"
        )
        for procs in (1, 4):
            secs = dict.fromkeys((bare_loop, api_loop, worker_run), 0.0)
            for _ in range(rounds):  # interleaved: a load that drifts (the machine is shared) hits each alike
                for f in secs:
                    secs[f] += n / timed(f, url, procs, engine, n)
            bare, api, work = (rounds * n / s for s in secs.values())
            print(
                f"{procs} process(es): bare claim loop {bare:6.0f} jobs/s | claim()+complete() {api:6.0f} jobs/s "
                f"({api / bare:.2f} of bare) | Worker {work:6.0f} jobs/s ({work / bare:.2f} of bare)"
            )
        engine.dispose()
        idle, lat = idle_and_wakeup(url)
        print(
            f"idle Worker: {idle} statements in 3 s | enqueue to start: "
            f"median {statistics.median(lat) * 1000:.1f} ms, max {max(lat) * 1000:.1f} ms over {len(lat)} jobs"
        )
    finally:
        server.drop_database(url)
        server.stop()


if __name__ == '__main__':
    main(*(int(a) for a in sys.argv[1:]))
