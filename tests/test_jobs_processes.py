"""Worker processes: contention, kill -9 mid-job and a server restart under load on PostgreSQL; SIGTERM and SQLite.

Workers are started through the real `fh-saas worker` entry point (`fh_saas.jobs.main`) with the
handlers of `jobs_helpers`, and stopped with SIGTERM.
"""

import json, signal

import pytest
import sqlalchemy as sa

from fh_saas.db_host import jobs_t, make_engine
from jobs_helpers import counts, create_tables, effects_t, runs_t, start_worker, stop_workers
from pgserver import start_cluster, wait_for


def _enqueue(url, n, job_type='test.effect', **kw):
    "Enqueue `n` jobs through a HostDatabase of our own (the workers have theirs)."
    from fh_saas.db_host import HostDatabase
    from fh_saas.jobs import enqueue

    host_db = HostDatabase(url)
    try:
        return [enqueue(host_db, job_type, **kw).id for _ in range(n)]
    finally:
        host_db.close()
        HostDatabase.reset_instance()


def _statuses(engine):
    with engine.connect() as c:
        return dict(c.execute(sa.select(jobs_t.c.status, sa.func.count()).group_by(jobs_t.c.status)).all())


def _logs(tmp_path):
    return '\n'.join(p.read_text(errors='replace')[-3000:] for p in sorted(tmp_path.glob('worker*.log')))


def _prepared(url):
    _enqueue(url, 0)  # creates the host schema
    eng = make_engine(url)
    create_tables(eng)
    return eng


@pytest.fixture
def engine(pg_url):
    eng = _prepared(pg_url)
    yield eng
    eng.dispose()


def test_sqlite_worker_processes_share_the_queue_and_stop_gracefully_on_sigterm(sqlite_url, tmp_path):
    eng = _prepared(sqlite_url)
    [slow] = _enqueue(sqlite_url, 1, payload=dict(pause=1.5), priority=1)  # long enough for a SIGTERM mid-job
    _enqueue(sqlite_url, 40)
    procs = [start_worker(sqlite_url, tmp_path / f'worker{i}.log', '--poll', '0.05') for i in range(2)]
    try:
        assert wait_for(lambda: counts(eng)['runs'] >= 1, 30), _logs(tmp_path)
        with eng.connect() as c:
            holder = c.execute(sa.select(jobs_t.c.locked_by).where(jobs_t.c.id == slow)).scalar()
        pid = int(holder.rsplit(':', 2)[1])
        [slow_proc] = [p for p in procs if p.pid == pid]
        slow_proc.send_signal(signal.SIGTERM)  # mid-job: it must finish the job, then exit
        assert slow_proc.wait(30) == 0, _logs(tmp_path)
        assert _statuses(eng).get('done', 0) >= 1 and counts(eng)['effects'] >= 1
        with eng.connect() as c:
            assert c.execute(sa.select(jobs_t.c.status).where(jobs_t.c.id == slow)).scalar() == 'done'
        assert wait_for(lambda: _statuses(eng).get('done') == 41, 60), _logs(tmp_path)
    finally:
        codes = stop_workers(procs)
    assert codes == [0, 0]
    assert counts(eng) == dict(runs=41, run_jobs=41, effects=41, counter=41)
    eng.dispose()


@pytest.mark.postgres
def test_four_worker_processes_run_each_of_200_jobs_exactly_once(pg_url, engine, tmp_path):
    ids = _enqueue(pg_url, 200, payload=dict(pause=0.002), tenant_id='acme')
    procs = [
        start_worker(pg_url, tmp_path / f'worker{i}.log', '--concurrency', '2', '--poll', '0.05') for i in range(4)
    ]
    logs = [tmp_path / f'worker{i}.log' for i in range(4)]
    try:
        assert wait_for(lambda: _statuses(engine).get('done') == 200, 90), (_statuses(engine), _logs(tmp_path))
        # a worker still importing when the queue empties (a loaded machine) has no SIGTERM handler yet
        assert wait_for(lambda: all('worker on' in log.read_text() for log in logs), 60), _logs(tmp_path)
    finally:
        codes = stop_workers(procs)
    assert codes == [0, 0, 0, 0], _logs(tmp_path)
    assert counts(engine) == dict(runs=200, run_jobs=200, effects=200, counter=200)
    with engine.connect() as c:
        assert set(c.execute(sa.select(effects_t.c.job_id)).scalars()) == set(ids)
        assert set(c.execute(sa.select(effects_t.c.tenant_id)).scalars()) == {'acme'}
        assert c.execute(sa.select(sa.func.max(jobs_t.c.attempts))).scalar() == 1
        workers = {w.rsplit(':', 2)[1] for w in c.execute(sa.select(runs_t.c.worker_id)).scalars()}
    assert len(workers) >= 2, "the work was shared between processes"


@pytest.mark.postgres
def test_kill_9_mid_job_resumes_on_another_worker_without_repeating_steps(pg_url, engine, tmp_path):
    [job_id] = _enqueue(pg_url, 1, 'test.steps', payload=dict(steps=8, hold_after=3))
    a = start_worker(pg_url, tmp_path / 'worker_a.log', '--lease', '1', '--poll', '0.05')
    try:
        assert wait_for(lambda: counts(engine)['effects'] >= 3, 30), _logs(tmp_path)
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait(10)
    done_by_a = counts(engine)['effects']
    assert 3 <= done_by_a < 8
    b = start_worker(pg_url, tmp_path / 'worker_b.log', '--lease', '1', '--poll', '0.05')
    try:
        assert wait_for(lambda: _statuses(engine).get('done') == 1, 30), _logs(tmp_path)
    finally:
        assert stop_workers([b]) == [0], _logs(tmp_path)
    with engine.connect() as c:
        job = c.execute(sa.select(jobs_t).where(jobs_t.c.id == job_id)).one()
        runs = c.execute(sa.select(runs_t.c.worker_id, runs_t.c.attempt).order_by(runs_t.c.id)).all()
        by_step = dict(c.execute(sa.select(effects_t.c.step, effects_t.c.worker_id)).all())
    assert counts(engine)['effects'] == counts(engine)['counter'] == 8 and sorted(by_step) == list(range(8))
    assert (job.status, job.attempts) == ('done', 2) and [r.attempt for r in runs] == [1, 2]
    assert [by_step[s] == runs[0].worker_id for s in range(8)] == [True] * done_by_a + [False] * (8 - done_by_a)
    assert json.loads(job.result) == dict(applied=list(range(done_by_a, 8)))


@pytest.mark.postgres
def test_database_restart_under_load_completes_every_job_once(tmp_path):
    server = start_cluster()
    try:
        url = server.create_database('restart')
        _enqueue(url, 0)
        eng = make_engine(url)
        create_tables(eng)
        _enqueue(url, 200, payload=dict(pause=0.05), max_attempts=20)
        procs = [
            start_worker(
                url,
                tmp_path / f'worker{i}.log',
                '--concurrency',
                '2',
                '--poll',
                '0.05',
                '--lease',
                '2',
                '--retry-base',
                '0.05',
            )
            for i in range(2)
        ]
        try:
            assert wait_for(lambda: _statuses(eng).get('done', 0) >= 30, 60), _logs(tmp_path)
            assert _statuses(eng).get('done', 0) < 190, "still under load when the server restarts"
            server.restart()
            eng.dispose()
            assert wait_for(lambda: _statuses(eng).get('done') == 200, 90), (_statuses(eng), _logs(tmp_path))
        finally:
            codes = stop_workers(procs)
        assert codes == [0, 0], _logs(tmp_path)
        c = counts(eng)
        assert (c['effects'], c['counter'], c['run_jobs']) == (200, 200, 200), c
        assert 'retrying' in _logs(tmp_path) or 'not recorded' in _logs(tmp_path), "the workers did see the outage"
        eng.dispose()
    finally:
        server.stop()
