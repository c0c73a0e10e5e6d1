"The job queue and worker on both backends: claims under thread contention, leases, retries, tenant binding."

import json, threading, time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from fh_saas import jobs
from fh_saas.audit import audit, audit_events, current_audit_context
from fh_saas.db_host import HostDatabase, as_utc, timestamp, jobs_t
from fh_saas.jobs import (
    JobRejected,
    Periodic,
    Worker,
    cancel,
    claim,
    complete,
    current_job_tenant,
    enqueue,
    fail,
    heartbeat,
    retry,
    retry_delay,
    schedule,
)
from pgserver import wait_for


@pytest.fixture(scope='module', params=['sqlite', pytest.param('postgresql', marks=pytest.mark.postgres)])
def module_url(request, tmp_path_factory):
    "One host database per backend for this module (creating one per test costs seconds on PostgreSQL)."
    if request.param == 'sqlite':
        yield f"sqlite:///{tmp_path_factory.mktemp('jobs') / 'host.db'}"
        return
    pg_server = request.getfixturevalue('pg_server')
    url = pg_server.create_database('jobs')
    yield url
    pg_server.drop_database(url)


@pytest.fixture
def queue_db(module_url):
    "The module's host database with an empty queue (other tables keep what earlier tests wrote)."
    db = HostDatabase(module_url)
    db.q("delete from sys_jobs")
    yield db
    db.close()
    HostDatabase.reset_instance()


def _jobs(queue_db, **where):
    c = jobs_t.c
    with queue_db.transaction() as conn:
        return conn.execute(sa.select(jobs_t).where(*(c[k] == v for k, v in where.items()))).all()


def _run_worker(worker, until, timeout=20):
    "Run `worker` in a thread until `until()` holds; stop it gracefully and return."
    stop = threading.Event()
    t = threading.Thread(target=worker.run, args=(stop,))
    t.start()
    try:
        assert wait_for(until, timeout), "worker did not finish in time"
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()


def test_concurrent_enqueue_with_one_dedupe_key_makes_one_job(queue_db):
    with ThreadPoolExecutor(8) as ex:
        ids = set(ex.map(lambda i: enqueue(queue_db, 'test.once', dict(i=i), dedupe_key='k1').id, range(16)))
    assert len(ids) == 1 and len(_jobs(queue_db, job_type='test.once')) == 1


def test_contending_threads_claim_each_job_once(queue_db):
    for i in range(60):
        enqueue(queue_db, 'test.claim', dict(i=i))

    def drain(w):
        got = []
        while (job := claim(queue_db, f'w{w}', ['test.claim'])) is not None:
            got.append(job.id)
            assert complete(queue_db, job)
        return got

    with ThreadPoolExecutor(6) as ex:
        claimed = [j for got in ex.map(drain, range(6)) for j in got]
    assert len(claimed) == len(set(claimed)) == 60
    assert {(r.status, r.attempts) for r in _jobs(queue_db, job_type='test.claim')} == {('done', 1)}


def test_claim_order_priority_then_run_at_and_not_before_run_at(queue_db):
    now = datetime.now(timezone.utc)
    old = enqueue(queue_db, 'test.order', run_at=now - timedelta(minutes=5))
    new = enqueue(queue_db, 'test.order', run_at=now - timedelta(minutes=1))
    urgent = enqueue(queue_db, 'test.order', priority=5)
    enqueue(queue_db, 'test.order', run_at=now + timedelta(minutes=5), priority=100)
    got = [claim(queue_db, 'w', ['test.order']).id for _ in range(3)]
    assert got == [urgent.id, old.id, new.id]
    assert claim(queue_db, 'w', ['test.order']) is None


def test_bad_input_is_refused_and_writes_nothing(queue_db):
    for bad in ['', 'Tenant.Provision', 'x', 'a;drop table sys_jobs', 'a' * 70]:
        with pytest.raises(ValueError, match='bad job type'):
            enqueue(queue_db, bad)
    with pytest.raises(ValueError, match='must be JSON'):
        enqueue(queue_db, 'test.bad', dict(x=object()))
    with pytest.raises(ValueError, match='must be a dict'):
        enqueue(queue_db, 'test.bad', 'tenant=acme')
    with pytest.raises(ValueError, match='max_attempts'):
        enqueue(queue_db, 'test.bad', max_attempts=0)
    with pytest.raises(ValueError, match='no time zone'):
        enqueue(queue_db, 'test.bad', run_at='2026-01-01T00:00:00')
    assert queue_db.system_jobs.count == 0


def test_enqueue_rolls_back_with_its_transaction(queue_db):
    with pytest.raises(RuntimeError):
        with queue_db.transaction():
            enqueue(queue_db, 'test.tx')
            raise RuntimeError('the change that asked for the job failed')
    assert queue_db.system_jobs.count == 0


def test_expired_lease_is_reclaimed_and_the_stale_owner_is_fenced_off(queue_db):
    live = enqueue(queue_db, 'test.live')
    assert claim(queue_db, 'w0', ['test.live'], lease=30).id == live.id
    assert claim(queue_db, 'w2', ['test.live']) is None, "a live lease is not claimable"
    j = enqueue(queue_db, 'test.lease', max_attempts=3)
    stale = claim(queue_db, 'w1', ['test.lease'], lease=0.05)
    time.sleep(0.1)
    # same worker name: only the attempt number tells the claims apart
    fresh = claim(queue_db, 'w1', ['test.lease'], lease=30)
    assert (fresh.id, fresh.attempts) == (j.id, 2)
    assert not heartbeat(queue_db, stale) and not complete(queue_db, stale) and fail(queue_db, stale, 'late') is None
    assert complete(queue_db, fresh, dict(n=1))
    row = queue_db.system_jobs[j.id]
    assert (row.status, row.attempts, json.loads(row.result), row.error_log) == ('done', 2, dict(n=1), None)


def test_lease_expiring_on_the_last_attempt_makes_the_job_dead(queue_db):
    j = enqueue(queue_db, 'test.lease', max_attempts=1)
    assert claim(queue_db, 'w1', lease=0.05).attempts == 1
    other = enqueue(queue_db, 'test.lease')
    time.sleep(0.1)
    assert claim(queue_db, 'w2').id == other.id, "the dead job is skipped in the same claim"
    row = queue_db.system_jobs[j.id]
    assert (row.status, row.attempts, row.locked_by) == ('dead', 1, None) and 'lease expired' in row.error_log


def test_failures_back_off_exponentially_then_die(queue_db):
    j = enqueue(queue_db, 'test.fail', max_attempts=3)
    delays = []
    for attempt in (1, 2, 3):
        queue_db.q("update sys_jobs set run_at = :t where id = :i", t=timestamp(), i=j.id)
        job = claim(queue_db, 'w', ['test.fail'])
        assert job.attempts == attempt
        status = fail(queue_db, job, f'boom {attempt}', base=10)
        row = queue_db.system_jobs[j.id]
        if attempt < 3:
            assert status == row.status == 'queued'
            delays.append((as_utc(row.run_at) - datetime.now(timezone.utc)).total_seconds())
    assert status == row.status == 'dead' and row.completed_at is not None
    assert 4 <= delays[0] <= 10 and 9 <= delays[1] <= 20
    assert [ln.split(': ', 1)[1] for ln in row.error_log.splitlines()] == ['boom 1', 'boom 2', 'boom 3']
    assert all(10 * 2 ** (n - 2) <= retry_delay(n, base=10, cap=1e9) <= 10 * 2 ** (n - 1) for n in range(1, 20))
    assert retry_delay(50, base=10, cap=60) <= 60 and retry_delay(10_000) <= 3600


def test_cancel_only_what_has_not_started(queue_db):
    queued, running = enqueue(queue_db, 'test.cancel'), enqueue(queue_db, 'test.cancel', priority=1)
    job = claim(queue_db, 'w')
    assert job.id == running.id and not cancel(queue_db, running.id)
    assert cancel(queue_db, queued.id) and not cancel(queue_db, queued.id)
    assert claim(queue_db, 'w') is None and queue_db.system_jobs[queued.id].status == 'canceled'


def _dead(queue_db, job_type='test.dead', **kw):
    "A job that failed its only attempt, still holding its dedupe key."
    j = enqueue(queue_db, job_type, max_attempts=1, **kw)
    assert fail(queue_db, claim(queue_db, 'w', [job_type]), 'boom') == 'dead'
    return j


def test_a_retried_dead_job_runs_again_and_keeps_its_history(queue_db):
    j = _dead(queue_db, dedupe_key='test.dead:1')
    assert enqueue(queue_db, 'test.dead', dedupe_key='test.dead:1').status == 'dead'  # the key blocks a fresh enqueue
    assert retry(queue_db, j.id)
    job = claim(queue_db, 'w2', ['test.dead'])
    assert (job.id, job.attempts, job.max_attempts) == (j.id, 1, 1)
    assert complete(queue_db, job, dict(ok=True))
    row = queue_db.system_jobs[j.id]
    assert (
        row.status == 'done' and row.error_log.splitlines()[0].endswith('boom') and 'retried by hand' in row.error_log
    )


def test_concurrent_retries_queue_a_dead_job_once(queue_db, race):
    j = _dead(queue_db)
    results = race([lambda: retry(queue_db, j.id)] * 8)
    assert sorted(results) == [False] * 7 + [True]
    assert queue_db.system_jobs[j.id].error_log.count('retried by hand') == 1


def test_only_dead_jobs_are_retried(queue_db):
    queued, running, done = (enqueue(queue_db, 'test.alive', priority=p) for p in (0, 1, 2))
    finished = claim(queue_db, 'w', ['test.alive'])
    assert finished.id == done.id and complete(queue_db, finished)
    assert claim(queue_db, 'w', ['test.alive']).id == running.id
    canceled = enqueue(queue_db, 'test.alive')
    assert cancel(queue_db, canceled.id)
    jobs = (queued, running, done, canceled)
    assert not any(retry(queue_db, j.id) for j in jobs) and not retry(queue_db, 'no-such-job')
    assert [queue_db.system_jobs[j.id].status for j in jobs] == ['queued', 'running', 'done', 'canceled']


def test_periodic_job_is_enqueued_once_per_period_by_many_workers(queue_db):
    t = datetime(2026, 5, 1, 12, 30, tzinfo=timezone.utc)
    with ThreadPoolExecutor(6) as ex:
        hourly = lambda i: schedule(queue_db, 'test.sweep', timedelta(hours=1), now=t + timedelta(minutes=i)).id
        ids = set(ex.map(hourly, range(12)))
    assert len(ids) == 1
    schedule(queue_db, 'test.sweep', timedelta(hours=1), now=t + timedelta(hours=1))
    schedule(queue_db, 'test.sweep', timedelta(hours=1), tenant_id='acme', now=t)
    assert len(_jobs(queue_db, job_type='test.sweep')) == 3


def test_workers_with_schedules_enqueue_one_job_per_period(queue_db, monkeypatch):
    "Each worker schedules before its first claim (an idle worker on PostgreSQL then waits for a notification)."
    seen, polls = [], Counter()
    exchange = jobs._exchange

    def counted_exchange(host_db, worker_id, *args):
        try:
            return exchange(host_db, worker_id, *args)
        finally:
            polls[worker_id] += 1

    monkeypatch.setattr(jobs, '_exchange', counted_exchange)
    handlers = {'test.tick': lambda job: seen.append(job.id)}
    daily = [Periodic('test.tick', timedelta(days=1))]
    workers = [Worker(queue_db, handlers, poll=0.01, schedules=daily) for _ in range(3)]
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,)) for w in workers]
    for t in threads:
        t.start()
    assert wait_for(lambda: seen, 10)
    assert wait_for(lambda: len(polls) == 3, 10), "every worker claimed, so every worker had scheduled"
    stop.set()
    for t in threads:
        t.join(10)
    assert len(seen) == 1 and len(_jobs(queue_db, job_type='test.tick')) == 1


def test_each_job_sees_only_its_own_tenant(queue_db):
    tenants = ['acme', 'globex', None, 'initech', 'umbrella']
    jobs = {enqueue(queue_db, 'test.tenant', dict(i=i), tenant_id=tenants[i % 5]).id: tenants[i % 5] for i in range(40)}
    seen = {}

    def handler(job):
        time.sleep(0.002)  # keeps several jobs in flight at once
        seen[job.id] = (current_job_tenant(), current_audit_context())
        audit(queue_db, 'test.job_ran', target_id=job.id)

    _run_worker(
        Worker(queue_db, {'test.tenant': handler}, concurrency=4, poll=0.01),
        lambda: len(_jobs(queue_db, job_type='test.tenant', status='done')) == 40,
    )
    assert {j: t for j, (t, _) in seen.items()} == jobs
    assert all(
        ctx.request_id == f'job:{j}' and ctx.tenant_id == jobs[j] and ctx.actor_user_id is None
        for j, (_, ctx) in seen.items()
    )
    rows = audit_events(queue_db, event_type='test.job_ran', limit=100)
    assert len(rows) == 40 and all(
        r.tenant_id == jobs[r.target_id] and r.request_id == f'job:{r.target_id}' for r in rows
    )
    assert current_job_tenant() is None


def test_worker_retries_failures_and_rejects_hopeless_jobs(queue_db):
    tries = {}

    def flaky(job):
        tries[job.id] = tries.get(job.id, 0) + 1
        if job.attempts < 3:
            raise ConnectionError(f'upstream down (try {job.attempts})')
        return dict(ok=job.attempts)

    def hopeless(job):
        raise JobRejected('tenant does not exist')

    ok, bad = enqueue(queue_db, 'test.flaky'), enqueue(queue_db, 'test.hopeless')
    _run_worker(
        Worker(queue_db, {'test.flaky': flaky, 'test.hopeless': hopeless}, poll=0.01, retry_base=0.02),
        lambda: {r.status for r in _jobs(queue_db)} <= {'done', 'dead'},
    )
    row = queue_db.system_jobs[ok.id]
    assert (row.status, row.attempts, json.loads(row.result), tries[ok.id]) == ('done', 3, dict(ok=3), 3)
    assert 'ConnectionError: upstream down (try 2)' in row.error_log
    row = queue_db.system_jobs[bad.id]
    assert (row.status, row.attempts) == ('dead', 1) and 'rejected: tenant does not exist' in row.error_log


def test_heartbeats_keep_a_long_job_from_being_taken(queue_db):
    j = enqueue(queue_db, 'test.long')
    started, stolen = threading.Event(), []

    def long(job):
        started.set()
        for _ in range(20):
            time.sleep(0.1)
            if (other := claim(queue_db, 'thief', lease=30)) is not None:
                stolen.append(other.id)

    _run_worker(
        Worker(queue_db, {'test.long': long}, poll=0.01, lease=1.0),  # the job runs for twice its lease
        lambda: queue_db.system_jobs[j.id].status == 'done',
    )
    assert started.is_set() and stolen == [] and queue_db.system_jobs[j.id].attempts == 1


def test_graceful_stop_finishes_the_job_in_hand(queue_db):
    j = enqueue(queue_db, 'test.slow')
    enqueue(queue_db, 'test.slow', run_at=datetime.now(timezone.utc))
    started, release = threading.Event(), threading.Event()

    def slow(job):
        started.set()
        release.wait(10)

    stop = threading.Event()
    t = threading.Thread(target=Worker(queue_db, {'test.slow': slow}, poll=0.01).run, args=(stop,))
    t.start()
    assert started.wait(10)
    stop.set()
    release.set()
    t.join(10)  # the stop comes while the job is in hand
    assert not t.is_alive()
    assert sorted(r.status for r in _jobs(queue_db, job_type='test.slow')) == ['done', 'queued']
    assert queue_db.system_jobs[j.id].status == 'done'  # the one in hand, the earlier of the two


def test_a_broken_worker_stops_and_raises_instead_of_limping_on(queue_db):
    worker = Worker(
        queue_db,
        {'test.x': lambda job: None},
        concurrency=2,
        poll=0.01,
        schedules=[Periodic('Not A Type', timedelta(hours=1))],
    )
    with pytest.raises(RuntimeError, match='worker thread crashed') as e:
        worker.run(threading.Event())
    assert 'bad job type' in str(e.value.__cause__)


@pytest.mark.postgres
def test_an_idle_worker_on_postgresql_is_woken_by_notifications_and_due_times_not_polls(pg_url):
    host_db = HostDatabase(pg_url)
    try:
        host_db.q("delete from sys_jobs")
        ran = []
        worker = Worker(host_db, {'test.wake': lambda job: ran.append(job.payload['n'])}, concurrency=2, poll=3600)
        stop = threading.Event()
        t = threading.Thread(target=worker.run, args=(stop,))
        t.start()
        try:
            assert wait_for(lambda: worker._idle == 2, 10), "both threads idle, with no poll due for an hour"
            enqueue(host_db, 'test.wake', dict(n=1))
            assert wait_for(lambda: ran == [1], 10), "the notification woke it"
            soon = datetime.now(timezone.utc) + timedelta(seconds=0.3)
            enqueue(host_db, 'test.wake', dict(n=2), run_at=soon)
            assert wait_for(lambda: ran == [1, 2], 10), "it slept until the job was due"
            assert datetime.now(timezone.utc) >= soon
        finally:
            stop.set()
            t.join(30)
        assert not t.is_alive()
        assert [(r.status, r.attempts) for r in _jobs(host_db, job_type='test.wake')] == [('done', 1)] * 2
    finally:
        host_db.close()
        HostDatabase.reset_instance()
