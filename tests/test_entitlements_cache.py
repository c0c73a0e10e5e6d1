"""The per-process entitlements cache on PostgreSQL: read once per billing change, and a change is never missed, whether
this process, another process or plain SQL made it."""

import json
from contextlib import closing
from datetime import timedelta

import psycopg2
import pytest
import sqlalchemy as sa

from fh_saas.billing import EntitlementsCache, override_feature, seed_plans
from fh_saas.db_host import Subscription, TenantCatalog
from fh_saas.db_values import timestamp, utcnow
from fh_saas.stripe_webhooks import apply_event
from fh_saas.tenant_router import TenantRouter
from pgserver import wait_for
from stripe_helpers import event, subscription
from tenant_helpers import listening

pytestmark = pytest.mark.postgres
TRIAL_END = utcnow() + timedelta(days=1)


@pytest.fixture
def billed(pg_host_db):
    "A host database with a Pro plan and tenant `acme` subscribed to it, and a listening router (as `setup_saas` has)."
    seed_plans(pg_host_db, [dict(id='pro', name='Pro', features=['exports'], quotas={'api_calls': 100})])
    pg_host_db.tenants.insert(TenantCatalog(id='acme', name='Acme'))
    pg_host_db.subscriptions.insert(
        Subscription(tenant_id='acme', status='active', plan_tier='pro', payment_type='subscription')
    )
    pg_host_db.tenants.insert(TenantCatalog(id='globex', name='Globex'))  # on a trial that ends tomorrow
    pg_host_db.subscriptions.insert(
        Subscription(
            tenant_id='globex',
            status='trialing',
            plan_tier='pro',
            payment_type='subscription',
            trial_end=timestamp(TRIAL_END),
        )
    )
    router = TenantRouter(pg_host_db)
    listening(router)
    yield pg_host_db
    router.close()


def statements(engine, f):
    "The statements `engine` runs during `f()`, and what `f` returned."
    seen = []

    def count(conn, cursor, statement, *args):
        seen.append(statement)

    sa.event.listen(engine, 'before_cursor_execute', count)
    try:
        return f(), seen
    finally:
        sa.event.remove(engine, 'before_cursor_execute', count)


def plain_sql(host_db, sql: str, **params):
    "Run `sql` on a connection of its own, outside fh_saas (as another service or a console would)."
    url = host_db.engine.url.set(drivername='postgresql').render_as_string(hide_password=False)
    with closing(psycopg2.connect(url)) as conn, conn, conn.cursor() as cur:
        cur.execute(sql, params)


def test_a_tenant_is_read_once_until_its_billing_changes(billed):
    cache = EntitlementsCache(billed)
    assert cache.enabled and cache(billed, 'acme').has('exports')
    again, seen = statements(billed.engine, lambda: cache(billed, 'acme'))
    assert again.has('exports') and seen == [] and cache.reads == 1


def test_a_write_in_this_process_is_seen_by_the_next_call(billed):
    cache = EntitlementsCache(billed)
    assert not cache(billed, 'acme').has('audit')
    override_feature(billed, 'acme', 'audit', True)
    assert cache(billed, 'acme').has('audit')  # no wait: the commit itself forgot the cached facts


def test_a_change_by_plain_sql_elsewhere_is_announced_by_postgresql(billed):
    cache = EntitlementsCache(billed)
    assert cache(billed, 'acme').access.allowed
    plain_sql(billed, "UPDATE core_subscriptions SET status = 'canceled' WHERE tenant_id = %(t)s", t='acme')
    assert wait_for(lambda: not cache(billed, 'acme').has('exports'), timeout=2)
    plain_sql(billed, "UPDATE core_pricing_plans SET features = '[]' WHERE id = 'pro'")  # a plan: every tenant
    plain_sql(billed, "UPDATE core_subscriptions SET status = 'active' WHERE tenant_id = %(t)s", t='acme')
    assert wait_for(lambda: cache(billed, 'acme').access.allowed, timeout=2)
    assert cache(billed, 'acme').features == frozenset()


def test_the_verdict_is_decided_at_each_call_even_from_cached_facts(billed):
    cache = EntitlementsCache(billed)
    assert cache(billed, 'globex').access.state == 'trialing'
    later, seen = statements(billed.engine, lambda: cache(billed, 'globex', now=TRIAL_END + timedelta(seconds=1)))
    assert not later.access.allowed and seen == []  # the trial ended: refused, from the same facts
    assert cache(billed, 'globex').access.allowed and cache.reads == 1


def test_a_rolled_back_write_forgets_nothing_and_nothing_stale_is_kept(billed):
    cache = EntitlementsCache(billed, ttl=0)
    cache(billed, 'acme')
    cache(billed, 'acme')
    assert cache.reads == 2  # ttl 0: every call reads
    cache = EntitlementsCache(billed)
    cache(billed, 'acme')
    with pytest.raises(RuntimeError), billed.transaction():
        override_feature(billed, 'acme', 'audit', True)
        raise RuntimeError('abandoned')
    assert not cache(billed, 'acme').has('audit') and cache.reads == 1


def test_a_webhook_applied_in_this_process_is_seen_by_the_next_call_without_a_listener(pg_host_db):
    "The webhook inbox commits with SQL of its own; its change is forgotten at once, before any notification."
    seed_plans(
        pg_host_db,
        [dict(id='pro', name='Pro', features=['exports'], stripe_price_monthly='price_pro', amount_monthly=2900)],
    )
    pg_host_db.tenants.insert(TenantCatalog(id='acme', name='Acme'))
    cache = EntitlementsCache(pg_host_db)  # no router, so no listener: only this process's own news
    assert not cache(pg_host_db, 'acme').access.allowed
    t = int(utcnow().timestamp())
    body = event('customer.subscription.created', subscription('sub_1', 'active', t, 'acme'), t)
    assert apply_event(pg_host_db, json.loads(body), body).status == 'processed'
    assert cache(pg_host_db, 'acme').has('exports')
