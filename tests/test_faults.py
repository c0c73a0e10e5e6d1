"""Fault injection on PostgreSQL: kill -9 a worker mid-provisioning and a webhook server mid-batch; the trial sweep.

The processes are the real entry points (`fh-saas worker` through `fh_saas.cli.main`, the webhook
endpoint under uvicorn), killed with SIGKILL at a moment the test chooses, then started again.
"""
import json, os, random, signal, subprocess, sys, threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import httpx
import pytest
import sqlalchemy as sa

from fh_saas.db_host import HostDatabase, Subscription, TenantCatalog, audit_t, subscriptions_t, timestamp, webhook_events_t
from fh_saas.db_tenant import register_tenant, tenant_url, tenants_t
from fh_saas.jobs import claim, enqueue, job_handlers, job_scope
from fh_saas.system_jobs import SYSTEM_SCHEDULES
from jobs_helpers import worker_env
from pgserver import free_port, wait_for
from stripe_helpers import event, sign, subscription
from tenant_helpers import new_id, pg_host, pg_names, secret_key  # noqa: F401 (fixtures)


def _env(url, **extra) -> dict:
    env = {**worker_env(url), **extra}
    env.pop('STRIPE_SECRET_KEY', None)
    return env


def _logs(tmp_path) -> str:
    return '\n'.join(p.read_text(errors='replace')[-3000:] for p in sorted(tmp_path.glob('*.log')))


# --- kill -9 a worker in the middle of provisioning ---------------------------------------------

def _worker(url, log, *args, **env) -> subprocess.Popen:
    "An `fh-saas worker` process with a 2 s lease."
    cmd = [sys.executable, '-c', 'from fh_saas.cli import main; main()', 'worker', '--lease', '2', '--poll', '0.05', *args]
    return subprocess.Popen(cmd, env=_env(url, **env), stdout=open(log, 'ab'), stderr=subprocess.STDOUT)


def _job(host_db, job_id):
    return host_db.system_jobs[job_id]


@pytest.mark.postgres
@pytest.mark.parametrize('step', ['role', 'database', 'grants'])
def test_worker_killed_mid_provisioning_is_finished_by_the_next_worker(pg_host, pg_server, pg_url, tmp_path, step):
    tid, ready = new_id('kp'), tmp_path / 'paused'
    with pg_host.transaction():
        register_tenant(pg_host, tid)
        job_id = enqueue(pg_host, 'tenant.provision', dict(tenant_id=tid), tenant_id=tid, dedupe_key=f'tenant.provision:{tid}').id
    a = _worker(pg_url, tmp_path / 'a.log', '--import', 'slow_steps', FH_SAAS_TEST_PAUSE_AFTER=step,
                FH_SAAS_TEST_PAUSE_SIGNAL=str(ready))
    try: assert wait_for(ready.exists, 30), _logs(tmp_path)
    finally: a.send_signal(signal.SIGKILL); a.wait(10)
    assert pg_host.tenants[tid].status == 'provisioning' and _job(pg_host, job_id).status == 'running'
    name = f'tenant_{tid}'
    assert (pg_names(pg_server, 'role', name), pg_names(pg_server, 'db', name)) == ([name], [name] if step != 'role' else [])
    b = _worker(pg_url, tmp_path / 'b.log')
    try: assert wait_for(lambda: _job(pg_host, job_id).status == 'done', 30), _logs(tmp_path)
    finally: b.send_signal(signal.SIGTERM); assert b.wait(20) == 0, _logs(tmp_path)
    job = _job(pg_host, job_id)
    assert (job.attempts, json.loads(job.result)) == (2, dict(status='active'))
    assert pg_names(pg_server, 'db', 'tenant_kp%') == [name] and pg_names(pg_server, 'role', 'tenant_kp%') == [name]
    with pg_host.engine.connect() as c: rows = c.execute(sa.select(tenants_t)).mappings().all()
    assert [(r['id'], r['status'], r['is_active'], r['db_name'], r['db_role']) for r in rows] == [(tid, 'active', True, name, name)]
    eng = sa.create_engine(tenant_url(pg_host, tid), poolclass=sa.pool.NullPool)
    try:
        with eng.begin() as c:
            c.exec_driver_sql('CREATE TABLE proof (id int)')
            owners = set(c.exec_driver_sql("SELECT tableowner FROM pg_tables WHERE schemaname = 'public'").scalars())
    finally: eng.dispose()
    assert owners == {name}, "every table of the tenant's database belongs to the tenant's role"
