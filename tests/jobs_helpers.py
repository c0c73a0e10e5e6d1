"""Test job types and worker processes for the job tests.

Effects are recorded the way a real handler must record them: each step is a row under a unique
key, inserted with ON CONFLICT DO NOTHING, and a counter is bumped in the same transaction only
when the row was new. `test_runs` logs every execution (committed before the effect), so a test
can tell a job that ran twice from one whose effect happened twice.
"""

import os, signal, subprocess, sys, time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url

from fh_saas.jobs import job_handler, current_job_tenant

meta = sa.MetaData()
effects_t = sa.Table(
    'test_effects',
    meta,
    sa.Column('job_id', sa.String(64), primary_key=True),
    sa.Column('step', sa.Integer, primary_key=True),
    sa.Column('worker_id', sa.String(128)),
    sa.Column('tenant_id', sa.String(64)),
)
runs_t = sa.Table(
    'test_runs',
    meta,
    sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
    sa.Column('job_id', sa.String(64), nullable=False),
    sa.Column('worker_id', sa.String(128)),
    sa.Column('attempt', sa.Integer),
)
counters_t = sa.Table(
    'test_counters',
    meta,
    sa.Column('name', sa.String(64), primary_key=True),
    sa.Column('n', sa.Integer, nullable=False),
)


def create_tables(engine):
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(counters_t.insert().values(name='effects', n=0))


def _record_run(job):
    with job.host_db.transaction() as conn:
        conn.execute(runs_t.insert().values(job_id=job.id, worker_id=job.worker_id, attempt=job.attempts))


def apply_step(job, step: int) -> bool:
    "Apply `step` of `job` once: the unique key decides, the counter moves only with a new row."
    with job.host_db.transaction() as conn:
        dialect = postgresql if conn.dialect.name == 'postgresql' else sqlite
        ins = (
            dialect.insert(effects_t)
            .values(job_id=job.id, step=step, worker_id=job.worker_id, tenant_id=current_job_tenant())
            .on_conflict_do_nothing()
        )
        if conn.execute(ins).rowcount != 1:
            return False
        conn.execute(counters_t.update().where(counters_t.c.name == 'effects').values(n=counters_t.c.n + 1))
        return True


@job_handler('test.effect')
def one_effect(job):
    "One effect, after an optional pause."
    _record_run(job)
    time.sleep(job.payload.get('pause', 0))
    apply_step(job, 0)
    return dict(tenant=current_job_tenant())


@job_handler('test.steps')
def several_steps(job):
    "`steps` idempotent steps; a rerun skips the steps already applied. Step `hold_after`, applied by this run, holds."
    _record_run(job)
    applied = []
    for step in range(job.payload['steps']):
        if apply_step(job, step):
            applied.append(step)
        job.heartbeat()
        if step + 1 == job.payload.get('hold_after') and step in applied:
            time.sleep(60)  # until killed
    return dict(applied=applied)


def worker_env(url: str) -> dict:
    "The `DB_*` variables that make `HostDatabase.from_env()` open `url`."
    u = make_url(url)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])])}
    if u.get_backend_name() == 'sqlite':
        return {**env, 'DB_TYPE': 'SQLITE', 'DB_NAME': u.database}
    return {
        **env,
        'DB_TYPE': 'POSTGRESQL',
        'DB_USER': u.username,
        'DB_PASS': u.password,
        'DB_HOST': u.host,
        'DB_PORT': str(u.port),
        'DB_NAME': u.database,
    }


def start_worker(url: str, log_path, *args) -> subprocess.Popen:
    "An `fh-saas worker` process (the real CLI entry point) with this module's handlers."
    cmd = [sys.executable, '-c', 'from fh_saas.jobs import main; main()', '--import', 'jobs_helpers', *args]
    return subprocess.Popen(cmd, env=worker_env(url), stdout=open(log_path, 'ab'), stderr=subprocess.STDOUT)


def stop_workers(procs, timeout=20):
    "SIGTERM each worker and return their exit codes (after a graceful stop)."
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    return [p.wait(timeout) for p in procs]


def counts(engine) -> dict:
    with engine.connect() as c:
        return dict(
            runs=c.execute(sa.select(sa.func.count()).select_from(runs_t)).scalar(),
            run_jobs=c.execute(sa.select(sa.func.count(sa.distinct(runs_t.c.job_id)))).scalar(),
            effects=c.execute(sa.select(sa.func.count()).select_from(effects_t)).scalar(),
            counter=c.execute(sa.select(counters_t.c.n).where(counters_t.c.name == 'effects')).scalar(),
        )
