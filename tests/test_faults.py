"""Fault injection on PostgreSQL: kill -9 a worker mid-provisioning and a webhook server mid-batch; the trial sweep.

The processes are the real entry points (`fh-saas worker` through `fh_saas.cli.main`, the webhook
endpoint under uvicorn), killed with SIGKILL at a moment the test chooses, then started again.
"""

import json, random, signal, subprocess, sys, threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import httpx
import pytest
import sqlalchemy as sa

from fh_saas.db_host import (
    HostDatabase,
    Subscription,
    TenantCatalog,
    audit_t,
    subscriptions_t,
    timestamp,
    webhook_events_t,
)
from fh_saas.db_tenant import register_tenant, tenant_url, tenants_t
from fh_saas.jobs import claim, enqueue, job_handlers, job_scope
from fh_saas.system_jobs import SYSTEM_SCHEDULES
from jobs_helpers import worker_env
from pgserver import free_port, wait_for
from stripe_helpers import event, sign, subscription
from tenant_helpers import new_id, pg_tenant_host, pg_names, secret_key  # noqa: F401 (fixtures)


def _env(url, **extra) -> dict:
    "The environment of a child process on host database `url` (without Stripe credentials: nothing here calls Stripe)."
    env = {**worker_env(url), **extra}
    env.pop('STRIPE_SECRET_KEY', None)
    return env


def _logs(tmp_path) -> str:
    return '\n'.join(p.read_text(errors='replace')[-3000:] for p in sorted(tmp_path.glob('*.log')))


# --- kill -9 a worker in the middle of provisioning ---------------------------------------------


def _worker(url, log, *args, **env) -> subprocess.Popen:
    "An `fh-saas worker` process with a 2 s lease."
    cmd = [
        sys.executable,
        '-c',
        'from fh_saas.cli import main; main()',
        'worker',
        '--lease',
        '2',
        '--poll',
        '0.05',
        *args,
    ]
    return subprocess.Popen(cmd, env=_env(url, **env), stdout=open(log, 'ab'), stderr=subprocess.STDOUT)


@pytest.mark.postgres
@pytest.mark.parametrize('step', ['role', 'database', 'grants'])
def test_worker_killed_mid_provisioning_is_finished_by_the_next_worker(
    pg_tenant_host, pg_server, pg_url, tmp_path, step
):
    tid, ready = new_id('kp'), tmp_path / 'paused'
    with pg_tenant_host.transaction():
        register_tenant(pg_tenant_host, tid)
        job_id = enqueue(
            pg_tenant_host, 'tenant.provision', dict(tenant_id=tid), tenant_id=tid, dedupe_key=f'tenant.provision:{tid}'
        ).id
    a = _worker(
        pg_url,
        tmp_path / 'a.log',
        '--import',
        'slow_steps',
        FH_SAAS_TEST_PAUSE_AFTER=step,
        FH_SAAS_TEST_PAUSE_SIGNAL=str(ready),
    )
    try:
        assert wait_for(ready.exists, 30), _logs(tmp_path)
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait(10)
    assert pg_tenant_host.tenants[tid].status == 'provisioning'
    assert pg_tenant_host.system_jobs[job_id].status == 'running'
    name = f'tenant_{tid}'
    assert (pg_names(pg_server, 'role', name), pg_names(pg_server, 'db', name)) == (
        [name],
        [name] if step != 'role' else [],
    )
    b = _worker(pg_url, tmp_path / 'b.log')
    try:
        assert wait_for(lambda: pg_tenant_host.system_jobs[job_id].status == 'done', 30), _logs(tmp_path)
    finally:
        b.send_signal(signal.SIGTERM)
        assert b.wait(20) == 0, _logs(tmp_path)
    job = pg_tenant_host.system_jobs[job_id]
    assert (job.attempts, json.loads(job.result)) == (2, dict(status='active'))
    assert pg_names(pg_server, 'db', 'tenant_kp%') == [name] and pg_names(pg_server, 'role', 'tenant_kp%') == [name]
    with pg_tenant_host.engine.connect() as c:
        rows = c.execute(sa.select(tenants_t)).mappings().all()
    assert [(r['id'], r['status'], r['is_active'], r['db_name'], r['db_role']) for r in rows] == [
        (tid, 'active', True, name, name)
    ]
    eng = sa.create_engine(tenant_url(pg_tenant_host, tid), poolclass=sa.pool.NullPool)
    try:
        with eng.begin() as c:
            c.exec_driver_sql('CREATE TABLE proof (id int)')
            owners = set(c.exec_driver_sql("SELECT tableowner FROM pg_tables WHERE schemaname = 'public'").scalars())
    finally:
        eng.dispose()
    assert owners == {name}, "every table of the tenant's database belongs to the tenant's role"


# --- kill -9 the webhook server in the middle of a batch -----------------------------------------

T0 = 1_760_000_000
SUBS, PER_SUB, STATUSES = 6, 40, ['trialing', 'active', 'past_due', 'active', 'unpaid']


def _batch() -> list[str]:
    "PER_SUB successive snapshots of each of SUBS subscriptions, one second apart, with a changing status and quantity."
    return [
        event(
            'customer.subscription.updated',
            subscription(f'sub_{s}', STATUSES[i % len(STATUSES)], T0, 'acme', customer=f'cus_{s}', quantity=i + 1),
            T0 + i,
            event_id=f'evt_{s}_{i:03d}',
        )
        for s in range(SUBS)
        for i in range(PER_SUB)
    ]


def _serve(url, port, log, hold=()) -> subprocess.Popen:
    "The endpoint of `webhook_app` under uvicorn, holding the answers to the events `hold` after applying them."
    cmd = [
        sys.executable,
        '-m',
        'uvicorn',
        'webhook_app:app',
        '--host',
        '127.0.0.1',
        '--port',
        str(port),
        '--log-level',
        'warning',
    ]
    proc = subprocess.Popen(
        cmd, env=_env(url, FH_SAAS_TEST_HOLD_EVENTS=','.join(hold)), stdout=open(log, 'ab'), stderr=subprocess.STDOUT
    )

    def up():
        try:
            return httpx.get(f'http://127.0.0.1:{port}/', timeout=1).status_code == 404
        except httpx.TransportError:
            return False

    assert wait_for(up, 30), log.read_text()
    return proc


def _deliver(port, bodies, threads=6) -> dict:
    "POST each signed body from `threads` clients; event id -> whether Stripe would count it delivered (2xx)."
    with httpx.Client(base_url=f'http://127.0.0.1:{port}', timeout=10) as http:

        def post(body):
            try:
                ok = http.post('/stripe/webhook', content=body, headers={'Stripe-Signature': sign(body)}).is_success
            except httpx.TransportError:
                ok = False
            return json.loads(body)['id'], ok

        with ThreadPoolExecutor(threads) as pool:
            return dict(pool.map(post, bodies))


@pytest.mark.postgres
def test_webhook_server_killed_mid_batch_then_redelivery_applies_every_event_once(pg_url, tmp_path):
    host_db = HostDatabase(pg_url)
    try:
        host_db.tenants.insert(TenantCatalog(id='acme', name='Acme'))
        batch = _batch()
        random.Random(7).shuffle(batch)
        ids, held = [json.loads(b)['id'] for b in batch], set([json.loads(b)['id'] for b in batch][5:25:5])

        def inbox_ids():
            with host_db.engine.connect() as c:
                return set(c.execute(sa.select(webhook_events_t.c.event_id)).scalars())

        port = free_port()
        server = _serve(pg_url, port, tmp_path / 'server1.log', hold=held)

        def kill_mid_batch():  # once the held events are committed (their answers never sent) and 60 events are in
            wait_for(lambda: len(stored := inbox_ids()) >= 60 and held <= stored, 60)
            server.send_signal(signal.SIGKILL)

        killer = threading.Thread(target=kill_mid_batch)
        killer.start()
        first = _deliver(port, batch)
        killer.join()
        server.wait(10)
        stored = inbox_ids()
        undelivered = [b for b, i in zip(batch, ids, strict=True) if not first[i]]
        assert 60 <= len(stored) < len(batch), "killed in the middle of the batch"
        assert {i for i in ids if first[i]} <= stored, "every 2xx answer was given after the commit"
        with host_db.engine.connect() as c:
            assert (
                c.execute(
                    sa.select(sa.func.count())
                    .select_from(webhook_events_t)
                    .where(webhook_events_t.c.status == 'processing')
                ).scalar()
                == 0
            ), "the killed transactions left nothing half-done"
        again = undelivered + random.Random(8).sample([b for b, i in zip(batch, ids, strict=True) if first[i]], 40)
        server = _serve(pg_url, port, tmp_path / 'server2.log')
        try:
            second = _deliver(port, again)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(20)
        assert all(second.values()) and len(second) == len(again), _logs(tmp_path)
        with host_db.engine.connect() as c:
            inbox = c.execute(
                sa.select(webhook_events_t.c.event_id, webhook_events_t.c.status, webhook_events_t.c.attempts)
            ).all()
            audited = [
                json.loads(d)['event_id']
                for d in c.execute(
                    sa.select(audit_t.c.details).where(audit_t.c.event_type == 'billing.subscription_updated')
                ).scalars()
            ]
            subs = {r.stripe_sub_id: r for r in c.execute(sa.select(subscriptions_t))}
        assert sorted(e for e, _, _ in inbox) == sorted(ids), "one inbox row per event"
        assert {a for _, _, a in inbox} == {1}, "each event applied by exactly one delivery"
        assert {s for _, s, _ in inbox} == {'processed', 'skipped_out_of_order'}
        processed = sorted(e for e, s, _ in inbox if s == 'processed')
        assert sorted(audited) == processed, "one audit row per applied event, none for a repeat"
        last = PER_SUB - 1
        assert {
            k: (r.status, r.amount_cents, r.last_event_id, r.last_event_created, r.stripe_cust_id)
            for k, r in subs.items()
        } == {
            f'sub_{s}': (STATUSES[last % len(STATUSES)], 2900 * PER_SUB, f'evt_{s}_{last:03d}', T0 + last, f'cus_{s}')
            for s in range(SUBS)
        }, "the newest snapshot of each subscription won"
        assert stored & {json.loads(b)['id'] for b in undelivered} >= held, "applied, but Stripe saw no answer"
        print(
            f"\n{len(batch)} events; {len(stored)} stored when the server was killed; {len(undelivered)} undelivered "
            f"({len(stored & {json.loads(b)['id'] for b in undelivered})} of them applied but unanswered) "
            f"+ 40 delivered redelivered; {len(processed)} applied, "
            f"{len(inbox) - len(processed)} skipped as out of order"
        )
    finally:
        host_db.close()
        HostDatabase.reset_instance()


# --- the expired-trial sweep ---------------------------------------------------------------------


def _run_sweep(host_db, claimed=None):
    "Claim and run one `billing.trial_sweep` job as a worker does (after all sweeps at `claimed` hold one); its result."
    job = claim(host_db, f'sweeper-{threading.get_ident()}', ['billing.trial_sweep'])
    if claimed:
        claimed.wait()
    with job_scope(job):
        return job_handlers['billing.trial_sweep'](job)


def test_trial_sweep_ends_each_expired_local_trial_once_even_when_two_sweeps_race(host_db, race):
    assert 'billing.trial_sweep' in {p.job_type for p in SYSTEM_SCHEDULES}
    now = datetime.now(timezone.utc)
    for t in ('acme', 'globex'):
        host_db.tenants.insert(TenantCatalog(id=t, name=t))

    def trial(tenant, hours, stripe_sub_id=None, status='trialing'):
        return host_db.subscriptions.insert(
            Subscription(
                tenant_id=tenant,
                status=status,
                stripe_sub_id=stripe_sub_id,
                trial_end=timestamp(now + timedelta(hours=hours)),
            )
        ).id

    expired = [trial(('acme', 'globex')[i % 2], -1 - i) for i in range(20)]
    kept = [trial('acme', 2), trial('acme', -3, stripe_sub_id='sub_stripe'), trial('globex', -3, status='active')]
    for _ in range(2):
        enqueue(host_db, 'billing.trial_sweep')
    claimed = threading.Barrier(2)  # a second barrier, after the claims: both sweeps hold a job before either runs
    results = race([lambda: _run_sweep(host_db, claimed)] * 2)
    assert sum(r['expired'] for r in results) == 20, "between them the two sweeps ended each trial once"
    rows = {s.id: s for s in host_db.subscriptions()}
    assert {(rows[i].status, rows[i].ended_at == rows[i].trial_end) for i in expired} == {('canceled', True)}
    assert [rows[i].status for i in kept] == ['trialing', 'trialing', 'active'] and {
        rows[i].ended_at for i in kept
    } == {None}
    audits = host_db.audit_logs(where="event_type = 'billing.trial_expired'")
    assert sorted((a.target_id, a.tenant_id) for a in audits) == sorted((i, rows[i].tenant_id) for i in expired)
    assert {json.loads(a.details)['trial_end'] for a in audits} == {rows[i].trial_end for i in expired}
    enqueue(host_db, 'billing.trial_sweep')
    assert _run_sweep(host_db) == dict(expired=0)
    assert len(host_db.audit_logs(where="event_type = 'billing.trial_expired'")) == 20
