"Billing: plan seeding, the access decision at its edges, entitlements, atomic quotas under concurrency, route guards."

import json
from datetime import timedelta
from functools import partial

import pytest
import sqlalchemy as sa
from fasthtml.common import Beforeware, FastHTML
from starlette.testclient import TestClient

from fh_saas.billing import (
    Access,
    BillingPolicy,
    PlanError,
    QuotaExceeded,
    access_decision,
    active_plans,
    billing_beforeware,
    clear_override,
    consume_quota,
    decide_access,
    entitlements,
    override_feature,
    override_quota,
    month_start,
    quota_usage,
    quota_used,
    require_feature,
    require_quota,
    seed_plans,
    subscription_access,
    usage_t,
    validate_plan,
)
from fh_saas.db_host import HostDatabase, PricingPlan, Subscription, TenantCatalog, as_utc, timestamp
from races import race

T0 = '2026-03-01T12:00:00.000000+00:00'
US = timedelta(microseconds=1)


def at(delta=timedelta()):
    return timestamp(as_utc(T0) + delta)


PLANS = [
    dict(id='free', name='Free', amount_monthly=0, trial_days=0, features=['basic'], quotas={'api_calls': 10}),
    dict(
        id='pro',
        name='Pro',
        stripe_price_monthly='price_pro_m',
        amount_monthly=2900,
        stripe_price_yearly='price_pro_y',
        amount_yearly=29000,
        features=['basic', 'exports'],
        quotas={'api_calls': 100, 'seats': 5},
        tier_level=2,
        sort_order=1,
    ),
    dict(
        id='team',
        name='Team',
        stripe_price_monthly='price_team_m',
        amount_monthly=9900,
        features=['basic', 'exports', 'sso'],
        quotas={'api_calls': None},
        tier_level=3,
        sort_order=2,
    ),
]


def tenant(host_db, tid='acme', **sub):
    "A tenant, with a subscription row when `sub` is given."
    host_db.tenants.insert(TenantCatalog(id=tid, name=tid.title()))
    if sub:
        host_db.subscriptions.insert(Subscription(tenant_id=tid, **sub))


# ---------------------------------------------------------------- plans


def test_seed_plans_is_idempotent(host_db):
    assert seed_plans(host_db, PLANS) == ['free', 'pro', 'team']
    before = {p.id: p for p in host_db.pricing_plans()}
    assert seed_plans(host_db, PLANS) == []
    as_rows = [
        PricingPlan(
            **{**p, 'features': json.dumps(p['features']), 'quotas': json.dumps(p['quotas']), 'currency': 'USD'}
        )
        for p in PLANS
    ]
    assert seed_plans(host_db, as_rows) == [], "PricingPlan rows with JSON text are the same definitions"
    assert {p.id: p for p in host_db.pricing_plans()} == before
    assert all(p.updated_at is None for p in before.values())

    changed = [PLANS[0], {**PLANS[1], 'amount_monthly': 3900}, PLANS[2]]
    assert seed_plans(host_db, changed) == ['pro']
    pro = host_db.pricing_plans['pro']
    assert (pro.amount_monthly, pro.created_at) == (3900, before['pro'].created_at) and pro.updated_at is not None
    assert host_db.pricing_plans.count == 3


def test_seed_plans_retires_missing_plans(host_db):
    seed_plans(host_db, PLANS)
    assert seed_plans(host_db, PLANS[:2], retire_missing=True) == ['team']
    assert [p.id for p in active_plans(host_db)] == ['free', 'pro']
    assert host_db.pricing_plans['team'].is_active is False
    assert seed_plans(host_db, PLANS[:2], retire_missing=True) == []
    assert seed_plans(host_db, PLANS) == ['team']


def test_active_plans_pricing_page_order(sqlite_host_db):
    seed_plans(
        sqlite_host_db,
        [
            {**PLANS[2], 'sort_order': 0},
            {**PLANS[1], 'sort_order': 0, 'tier_level': 9},
            {**PLANS[0], 'sort_order': 5},
            dict(id='old', name='Old', is_active=False),
        ],
    )
    assert [p.id for p in active_plans(sqlite_host_db)] == ['team', 'pro', 'free']
    assert isinstance(active_plans(sqlite_host_db)[0], PricingPlan)


@pytest.mark.parametrize(
    'bad, message',
    [
        (dict(id='Pro Plan'), "id must be 1-64 characters"),
        (dict(id=''), "id must be"),
        (dict(name=' '), "name must be a non-empty string"),
        (dict(amount_monthly=-1), "amount_monthly must be a non-negative integer number of cents, got -1"),
        (dict(amount_monthly=29.0), "amount_monthly must be a non-negative integer"),
        (dict(amount_yearly=True), "amount_yearly must be a non-negative integer"),
        (dict(stripe_price_monthly='prod_123'), "stripe_price_monthly must be a Stripe price id"),
        (dict(stripe_price_yearly='price_y', amount_yearly=None), "amount_yearly is required with stripe_price_yearly"),
        (dict(currency='dollar'), "currency must be a three-letter ISO 4217 code"),
        (dict(currency='u$d'), "currency must be"),
        (dict(trial_days=-3), "trial_days must be an integer from 0 to 730"),
        (dict(features='exports'), "features must be a list"),
        (dict(features=['exports', 'exports']), "features must be a list of distinct"),
        (dict(features=['Exports!']), "features must be a list"),
        (dict(features='["a", '), "features must be a list"),
        (dict(quotas={'seats': -5}), "quotas must be an object"),
        (dict(quotas=['seats']), "quotas must be an object"),
        (dict(is_active='yes'), "is_active must be true or false"),
        (dict(colour='red'), "unknown field(s): colour"),
    ],
)
def test_validate_plan_refuses_bad_plans(bad, message):
    with pytest.raises(PlanError) as e:
        validate_plan({**PLANS[1], **bad})
    assert message in str(e.value)


def test_seed_plans_writes_nothing_when_one_plan_is_bad(host_db):
    with pytest.raises(PlanError, match="plan 'pro': amount_monthly"):
        seed_plans(host_db, [PLANS[0], {**PLANS[1], 'amount_monthly': -1}])
    assert host_db.pricing_plans.count == 0


def test_seed_plans_names_every_problem_and_duplicates(sqlite_host_db):
    with pytest.raises(PlanError) as e:
        seed_plans(sqlite_host_db, [{**PLANS[1], 'amount_monthly': -1, 'currency': 'xx'}])
    assert "plan 'pro'" in str(e.value) and 'amount_monthly' in str(e.value) and 'currency' in str(e.value)
    with pytest.raises(PlanError, match=r'duplicate plan id\(s\): pro'):
        seed_plans(sqlite_host_db, [PLANS[1], PLANS[1]])
    with pytest.raises(PlanError, match=r'Stripe price id\(s\) sold by more than one plan: price_pro_y'):
        seed_plans(sqlite_host_db, [PLANS[1], {**PLANS[2], 'stripe_price_monthly': 'price_pro_y', 'amount_monthly': 1}])
    assert sqlite_host_db.pricing_plans.count == 0


def test_a_price_id_belongs_to_one_plan_even_across_seeds(host_db):
    seed_plans(host_db, PLANS)
    clash = dict(id='pro-eu', name='Pro EU', currency='eur', stripe_price_monthly='price_team_m', amount_monthly=2700)
    with pytest.raises(PlanError, match='sold by more than one plan: price_team_m'):
        seed_plans(host_db, [PLANS[0], clash])
    assert [p.id for p in host_db.pricing_plans(order_by='id')] == ['free', 'pro', 'team'], "the seed was rolled back"
    assert seed_plans(host_db, [{**clash, 'stripe_price_monthly': 'price_pro_eu_m'}]) == ['pro-eu']


# ---------------------------------------------------------------- the access decision (pure)

GRACE, PENDING = timedelta(days=7), timedelta(days=14)


@pytest.mark.parametrize(
    'sub, now, allowed, reason',
    [
        (dict(status='trialing', trial_end=T0), at(-US), True, f'trial until {T0}'),
        (dict(status='trialing', trial_end=T0), T0, False, f'trial ended at {T0}'),
        (dict(status='trialing'), T0, False, 'the trial has no end date'),
        (dict(status='active'), T0, True, 'active'),
        (dict(status='active', current_period_end=T0), at(-US), True, 'active'),
        (dict(status='active', current_period_end=T0), T0, True, f'renewal awaited; grace until {at(GRACE)}'),
        (dict(status='active', current_period_end=T0), at(GRACE - US), True, 'renewal awaited'),
        (
            dict(status='active', current_period_end=T0),
            at(GRACE),
            False,
            f'no renewal recorded; grace ended at {at(GRACE)}',
        ),
        (dict(status='past_due', current_period_start=T0), T0, True, f'payment overdue; grace until {at(GRACE)}'),
        (dict(status='past_due', current_period_start=T0), at(GRACE - US), True, 'payment overdue; grace until'),
        (
            dict(status='past_due', current_period_start=T0),
            at(GRACE),
            False,
            f'payment overdue; grace ended at {at(GRACE)}',
        ),
        (dict(status='past_due', current_period_end=T0), T0, False, 'past_due with no start time'),
        (dict(status='pending_payment', created_at=T0), at(PENDING - US), True, 'bank transfer awaiting confirmation'),
        (dict(status='pending_payment', created_at=T0), at(PENDING), False, 'bank transfer not confirmed'),
        (
            dict(status='pending_payment', created_at=at(-PENDING), current_period_start=T0),
            at(PENDING - US),
            True,
            f'bank transfer awaiting confirmation; allowed until {at(PENDING)}',
        ),
        (dict(status='pending_payment'), T0, False, 'pending_payment with no start time'),
        (dict(status='incomplete'), T0, False, 'the first payment has not completed'),
        (dict(status='incomplete_expired'), T0, False, 'the first payment was never completed'),
        (dict(status='unpaid', current_period_start=T0), T0, False, 'invoices are unpaid'),
        (dict(status='paused'), T0, False, 'the subscription is paused'),
        (dict(status='canceled', current_period_end=at(GRACE)), T0, False, 'the subscription was canceled'),
        (dict(status='suspended'), T0, False, "unknown subscription status 'suspended'"),
        (dict(status=None), T0, False, 'unknown subscription status None'),
    ],
)
def test_subscription_access_table(sub, now, allowed, reason):
    a = subscription_access({**sub, 'plan_id': 'pro'}, now)
    assert (a.allowed, a.plan_id) == (allowed, 'pro')
    assert a.reason.startswith(reason), a.reason
    assert a.state == (sub['status'] or 'unknown')


def test_grace_periods_follow_the_policy():
    short = BillingPolicy(grace=timedelta(hours=1), pending_grace=timedelta(0))
    late = dict(status='past_due', current_period_start=T0)
    assert subscription_access(late, at(timedelta(minutes=59)), short).allowed
    assert not subscription_access(late, at(timedelta(hours=1)), short).allowed
    assert subscription_access(late, at(timedelta(hours=1)), short).grace_until == at(timedelta(hours=1))
    assert not subscription_access(dict(status='pending_payment', created_at=T0), T0, short).allowed
    with pytest.raises(ValueError, match='no time zone'):
        subscription_access(late, '2026-03-01T12:00:00')


ACTIVE_TENANT = dict(status='active')
FREE = BillingPolicy(free_plan='free')


@pytest.mark.parametrize(
    'tenant_row, subs, policy, expected',
    [
        (None, [], BillingPolicy(), Access(False, 'no_tenant', 'no such tenant')),
        (
            dict(status='suspended'),
            [dict(status='active')],
            FREE,
            Access(False, 'tenant_blocked', 'the tenant is suspended'),
        ),
        (
            dict(status='provisioning'),
            [dict(status='active')],
            BillingPolicy(),
            Access(False, 'tenant_blocked', 'the tenant is provisioning'),
        ),
        (ACTIVE_TENANT, [], BillingPolicy(), Access(False, 'none', 'no subscription')),
        (ACTIVE_TENANT, [], FREE, Access(True, 'free', 'free plan', 'free')),
        (
            ACTIVE_TENANT,
            [dict(status='canceled', plan_id='pro')],
            FREE,
            Access(True, 'free', 'free plan (the subscription was canceled)', 'free'),
        ),
        (
            ACTIVE_TENANT,
            [dict(status='incomplete_expired')],
            FREE,
            Access(True, 'free', 'free plan (the first payment was never completed)', 'free'),
        ),
        (
            ACTIVE_TENANT,
            [dict(status='unpaid', plan_id='pro')],
            FREE,
            Access(False, 'unpaid', 'invoices are unpaid', 'pro'),
        ),
        (
            ACTIVE_TENANT,
            [dict(status='paused', plan_id='pro')],
            FREE,
            Access(False, 'paused', 'the subscription is paused', 'pro'),
        ),
        (
            ACTIVE_TENANT,
            [dict(status='canceled', plan_id='pro')],
            BillingPolicy(),
            Access(False, 'canceled', 'the subscription was canceled', 'pro'),
        ),
        (
            ACTIVE_TENANT,
            [dict(status='canceled', plan_id='team'), dict(status='active', plan_id='pro')],
            BillingPolicy(),
            Access(True, 'active', 'active', 'pro'),
        ),
        (
            ACTIVE_TENANT,
            [dict(status='trialing', trial_end=at(US), plan_id='team'), dict(status='active', plan_id='pro')],
            BillingPolicy(),
            Access(True, 'trialing', f'trial until {at(US)}', 'team', trial_end=at(US)),
        ),
        (
            ACTIVE_TENANT,
            [dict(status='unpaid', plan_id='team'), dict(status='canceled', plan_id='pro')],
            FREE,
            Access(False, 'unpaid', 'invoices are unpaid', 'team'),
        ),
    ],
)
def test_decide_access_table(tenant_row, subs, policy, expected):
    assert decide_access(tenant_row, subs, T0, policy) == expected


# ---------------------------------------------------------------- the access decision (database)


def test_access_decision_reads_the_host_database(host_db):
    seed_plans(host_db, PLANS)
    tenant(host_db, 'acme', status='trialing', trial_end=T0, stripe_price_id='price_pro_y')
    assert access_decision(host_db, 'acme', now=at(-US)) == Access(
        True, 'trialing', f'trial until {T0}', 'pro', trial_end=T0
    )
    assert access_decision(host_db, 'acme', now=T0).allowed is False
    assert access_decision(host_db, 'acme', now=as_utc(T0) - US).allowed is True

    tenant(
        host_db, 'beta', status='past_due', current_period_start=T0, plan_tier='team', stripe_price_id='price_unknown'
    )
    assert access_decision(host_db, 'beta', now=at(GRACE - US)).plan_id == 'team', "no plan sells the price: plan_tier"
    tenant(host_db, 'gamma', status='active', plan_tier='pro', stripe_price_id='price_team_m')
    assert access_decision(host_db, 'gamma').plan_id == 'team', "the price decides over plan_tier"
    assert not access_decision(host_db, 'beta', now=at(GRACE)).allowed

    seed_plans(host_db, PLANS[::2], retire_missing=True)
    assert access_decision(host_db, 'acme', now=at(-US)).plan_id == 'pro', "a retired plan still serves its subscribers"
    host_db.tenants.update(dict(id='acme', status='suspended'))
    assert access_decision(host_db, 'acme', now=at(-US)).state == 'tenant_blocked'
    assert access_decision(host_db, 'ghost').state == 'no_tenant'


def test_newest_subscription_explains_a_refusal(host_db):
    tenant(host_db, 'acme', status='canceled', created_at=at(-GRACE), plan_tier='team')
    host_db.subscriptions.insert(Subscription(tenant_id='acme', status='incomplete', created_at=T0, plan_tier='pro'))
    assert access_decision(host_db, 'acme', now=T0) == Access(
        False, 'incomplete', 'the first payment has not completed', 'pro'
    )


# ---------------------------------------------------------------- entitlements


def test_entitlements_from_plan_and_overrides(host_db):
    seed_plans(host_db, PLANS)
    tenant(host_db, 'acme', status='active', stripe_price_id='price_pro_m')
    e = entitlements(host_db, 'acme')
    assert e.features == {'basic', 'exports'} and dict(e.quotas) == {'api_calls': 100, 'seats': 5}
    assert (e.limit('seats'), e.limit('storage_gb')) == (5, 0)

    override_feature(host_db, 'acme', 'sso', True)
    override_feature(host_db, 'acme', 'exports', False)
    override_quota(host_db, 'acme', 'seats', 50)
    override_quota(host_db, 'acme', 'storage_gb', None)
    override_quota(host_db, 'acme', 'seats', 25)
    e = entitlements(host_db, 'acme')
    assert e.features == {'basic', 'sso'} and not e.has('exports')
    assert dict(e.quotas) == {'api_calls': 100, 'seats': 25, 'storage_gb': None}

    assert clear_override(host_db, 'acme', 'feature', 'exports') is True
    assert clear_override(host_db, 'acme', 'feature', 'exports') is False
    assert entitlements(host_db, 'acme').has('exports')


def test_an_unknown_plan_grants_only_overrides(host_db):
    tenant(host_db, 'acme', status='active', plan_tier='legacy')
    override_feature(host_db, 'acme', 'exports', True)
    e = entitlements(host_db, 'acme')
    assert (e.access.allowed, e.access.plan_id, e.features, dict(e.quotas)) == (True, 'legacy', {'exports'}, {})
    assert (e.plan, e.subscription['plan_tier']) == (None, 'legacy')


def test_a_refused_tenant_is_entitled_to_nothing(sqlite_host_db):
    seed_plans(sqlite_host_db, PLANS)
    tenant(sqlite_host_db, 'acme', status='unpaid', stripe_price_id='price_pro_m')
    override_feature(sqlite_host_db, 'acme', 'sso', True)
    override_quota(sqlite_host_db, 'acme', 'api_calls', None)
    e = entitlements(sqlite_host_db, 'acme')
    assert (e.access.reason, e.features, dict(e.quotas)) == ('invoices are unpaid', frozenset(), {})
    assert (dict(e.plan), e.subscription['status']) == (dict(id='pro', name='Pro', currency='usd'), 'unpaid'), (
        "what the page shows"
    )
    with pytest.raises(QuotaExceeded, match="tenant 'acme' may not use 'api_calls': invoices are unpaid"):
        consume_quota(sqlite_host_db, 'acme', 'api_calls')


def test_free_plan_entitlements(sqlite_host_db):
    seed_plans(sqlite_host_db, PLANS)
    tenant(sqlite_host_db, 'solo')
    assert entitlements(sqlite_host_db, 'solo').features == frozenset()
    e = entitlements(sqlite_host_db, 'solo', policy=FREE)
    assert (e.access.state, e.features, e.limit('api_calls')) == ('free', {'basic'}, 10)
    assert (dict(e.plan), e.subscription) == (dict(id='free', name='Free', currency='usd'), None)


def test_bad_overrides_are_refused(host_db):
    tenant(host_db, 'acme')
    with pytest.raises(LookupError, match="no tenant 'ghost'"):
        override_feature(host_db, 'ghost', 'sso', True)
    with pytest.raises(ValueError, match="feature key 'SSO!' is not valid"):
        override_feature(host_db, 'acme', 'SSO!', True)
    with pytest.raises(TypeError, match='enabled must be True or False'):
        override_feature(host_db, 'acme', 'sso', 'yes')
    with pytest.raises(ValueError, match='non-negative integer or None'):
        override_quota(host_db, 'acme', 'seats', -1)
    with pytest.raises(ValueError, match="kind must be 'feature' or 'quota'"):
        clear_override(host_db, 'acme', 'plan', 'x')
    assert entitlements(host_db, 'acme').access.allowed is False
    with host_db.transaction() as c:
        assert c.execute(sa.text('SELECT count(*) FROM core_entitlement_overrides')).scalar() == 0


def test_overrides_and_usage_go_with_their_tenant(host_db):
    seed_plans(host_db, PLANS)
    tenant(host_db, 'acme', status='active', plan_tier='pro')
    override_feature(host_db, 'acme', 'sso', True)
    consume_quota(host_db, 'acme', 'api_calls')
    with host_db.transaction() as c:
        c.execute(sa.text("DELETE FROM core_subscriptions WHERE tenant_id = 'acme'"))
        c.execute(sa.text("DELETE FROM core_tenants WHERE id = 'acme'"))
        assert c.execute(sa.text('SELECT count(*) FROM core_entitlement_overrides')).scalar() == 0
        assert c.execute(sa.text('SELECT count(*) FROM core_quota_usage')).scalar() == 0


# ---------------------------------------------------------------- quotas


def pro_acme(host_db, api_calls):
    "`host_db` with tenant acme active on the pro plan and a monthly limit of `api_calls` (`None`: unlimited)."
    seed_plans(host_db, PLANS)
    tenant(host_db, 'acme', status='active', plan_tier='pro')
    override_quota(host_db, 'acme', 'api_calls', api_calls)
    return host_db


def test_consume_quota_counts_and_refuses_past_the_limit(host_db):
    pro_acme(host_db, 5)
    assert consume_quota(host_db, 'acme', 'api_calls', n=3, now=T0) == 2
    with pytest.raises(QuotaExceeded) as e:
        consume_quota(host_db, 'acme', 'api_calls', n=3, now=T0)
    assert str(e.value) == f"tenant 'acme' cannot use 3 more 'api_calls': 3 of 5 used since {month_start(T0)}"
    assert (e.value.limit, e.value.used, e.value.requested) == (5, 3, 3)
    assert quota_used(host_db, 'acme', 'api_calls', now=T0) == 3
    assert consume_quota(host_db, 'acme', 'api_calls', n=2, now=T0) == 0
    with pytest.raises(QuotaExceeded, match="the 'pro' plan has no 'storage_gb' quota"):
        consume_quota(host_db, 'acme', 'storage_gb')
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match='n must be a positive integer'):
            consume_quota(host_db, 'acme', 'api_calls', n=bad, now=T0)
    with pytest.raises(ValueError, match='quota key'):
        consume_quota(host_db, 'acme', 'API calls')
    assert quota_used(host_db, 'acme', 'api_calls', now=T0) == 5


def test_quota_periods_are_utc_calendar_months(host_db):
    pro_acme(host_db, 1)
    last = '2026-03-31T23:59:59.999999+00:00'
    assert month_start(last) == '2026-03-01T00:00:00.000000+00:00'
    assert month_start('2026-04-01T01:00:00+02:00') == month_start(last), "23:00 UTC on March 31"
    assert consume_quota(host_db, 'acme', 'api_calls', now=last) == 0
    with pytest.raises(QuotaExceeded):
        consume_quota(host_db, 'acme', 'api_calls', now='2026-03-01T00:00:00+00:00')
    assert consume_quota(host_db, 'acme', 'api_calls', now='2026-04-01T00:00:00+00:00') == 0
    assert [
        quota_used(host_db, 'acme', 'api_calls', now=m)
        for m in (last, '2026-04-15T00:00:00+00:00', '2026-05-01T00:00:00+00:00')
    ] == [1, 1, 0]


def test_quota_usage_reads_every_quota_of_one_tenant_and_month(host_db):
    seed_plans(host_db, PLANS)
    for t in ('acme', 'beta'):
        tenant(host_db, t, status='active', plan_tier='pro')
    override_quota(host_db, 'acme', 'seats', 9)
    consume_quota(host_db, 'acme', 'api_calls', n=3, now=T0)
    consume_quota(host_db, 'acme', 'seats', n=2, now=T0)
    consume_quota(host_db, 'acme', 'api_calls', now=at(timedelta(days=31)))
    consume_quota(host_db, 'beta', 'api_calls', now=T0)
    assert quota_usage(host_db, 'acme', now=T0) == {'api_calls': 3, 'seats': 2}
    assert quota_usage(host_db, 'acme', now=at(timedelta(days=31))) == {'api_calls': 1}
    assert quota_usage(host_db, 'ghost', now=T0) == {}


def test_unlimited_quota_still_counts(sqlite_host_db):
    seed_plans(sqlite_host_db, PLANS)
    tenant(sqlite_host_db, 'acme', status='active', plan_tier='team')
    assert [consume_quota(sqlite_host_db, 'acme', 'api_calls', n=1000, now=T0) for _ in range(3)] == [None] * 3
    assert quota_used(sqlite_host_db, 'acme', 'api_calls', now=T0) == 3000


def _race_lists(n_threads, work):
    "Run `work(i)` on `n_threads` threads released together; the lists they return, joined (also in worker processes)."
    return [r for rs in race([partial(work, i) for i in range(n_threads)]) for r in rs]


def test_concurrent_consumers_never_pass_the_limit(host_db):
    "16 threads race for one quota: exactly `limit` units are granted, each remaining value once."
    limit = 50
    pro_acme(host_db, limit)

    def work(i):
        out = []
        for _ in range(5):
            try:
                out.append(consume_quota(host_db, 'acme', 'api_calls', now=T0))
            except QuotaExceeded:
                out.append('refused')
        return out

    outcomes = _race_lists(16, work)
    granted = [o for o in outcomes if o != 'refused']
    assert len(outcomes) == 80 and len(granted) == limit
    assert sorted(granted) == list(range(limit)), "every remaining value was handed out exactly once"
    assert quota_used(host_db, 'acme', 'api_calls', now=T0) == limit


def test_consumers_passing_their_entitlements_never_pass_the_limit(host_db):
    "16 threads with the entitlements in hand (as a guard has them) race 1-3 units at a time for the month's first use."
    limit = 40
    ents = entitlements(pro_acme(host_db, limit), 'acme', now=T0)

    def work(i):
        out = []
        for k in range(5):
            n = 1 + (i + k) % 3
            try:
                out.append((n, consume_quota(host_db, 'acme', 'api_calls', n=n, now=T0, entitlements=ents)))
            except QuotaExceeded as e:
                assert (e.limit, e.requested) == (limit, n) and e.used + n > limit
                out.append((n, None))
        return out

    outcomes = _race_lists(16, work)
    granted = sum(n for n, rest in outcomes if rest is not None)
    assert granted == quota_used(host_db, 'acme', 'api_calls', now=T0) and limit - 2 <= granted <= limit
    assert sorted(rest for _, rest in outcomes if rest is not None)[0] == limit - granted
    with host_db.transaction() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(usage_t)).scalar() == 1
    with pytest.raises(QuotaExceeded, match=f"cannot use {limit + 1} more 'api_calls'"):
        consume_quota(host_db, 'acme', 'api_calls', n=limit + 1, now=at(timedelta(days=31)), entitlements=ents)
    with pytest.raises(ValueError, match="entitlements of tenant 'acme' passed for tenant 'beta'"):
        consume_quota(host_db, 'beta', 'api_calls', entitlements=ents)
    assert quota_usage(host_db, 'acme', now=at(timedelta(days=31))) == {}, "a refused first use writes no row"


@pytest.mark.postgres
def test_concurrent_mixed_sizes_on_postgresql(pg_host_db):
    "16 threads consume 1-4 units each try on PostgreSQL: the count equals the sum granted and never passes the limit."
    host_db = pro_acme(pg_host_db, 97)

    def work(i):
        out = []
        for k in range(6):
            n = 1 + (i + k) % 4
            try:
                out.append((n, consume_quota(host_db, 'acme', 'api_calls', n=n, now=T0)))
            except QuotaExceeded as e:
                assert e.used + n > 97
                out.append((n, None))
        return out

    outcomes = _race_lists(16, work)
    granted = sum(n for n, rest in outcomes if rest is not None)
    used = quota_used(host_db, 'acme', 'api_calls', now=T0)
    assert used == granted and 97 - 3 <= used <= 97
    assert min(rest for _, rest in outcomes if rest is not None) == 97 - used
    with host_db.transaction() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(usage_t)).scalar() == 1


def _consume_in_process(url, n_threads, tries, out):
    "A worker process: its own HostDatabase, `n_threads` threads each trying `tries` units; reports its grants."
    HostDatabase.reset_instance()  # the parent's pooled connections stay untouched in the forked copy
    host_db = HostDatabase(url)

    def work(i):
        got = []
        for _ in range(tries):
            try:
                got.append(consume_quota(host_db, 'acme', 'api_calls', now=T0))
            except QuotaExceeded:
                pass
        return got

    out.put(_race_lists(n_threads, work))
    host_db.close()


@pytest.mark.postgres
def test_consumers_in_several_processes_on_postgresql(pg_url, pg_host_db):
    "3 processes x 6 threads x 5 tries race for 50 units: exactly 50 are granted, each remaining value once."
    import multiprocessing as mp

    host_db = pro_acme(pg_host_db, 50)
    ctx = mp.get_context('fork')
    out = ctx.Queue()
    procs = [ctx.Process(target=_consume_in_process, args=(pg_url, 6, 5, out)) for _ in range(3)]
    for p in procs:
        p.start()
    granted = [r for _ in procs for r in out.get(timeout=60)]
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert sorted(granted) == list(range(50))
    assert quota_used(host_db, 'acme', 'api_calls', now=T0) == 50


# ---------------------------------------------------------------- route guards


class _Auth:
    def __init__(self, tenant_id):
        self.tenant_id = tenant_id


def _app(host_db, **guard):
    "A FastHTML app whose beforeware plays the auth layer: the tenant comes from the `x-tenant` header."

    def set_auth(req):
        req.scope['auth'] = _Auth(req.headers.get('x-tenant'))

    app = FastHTML(before=Beforeware(set_auth), secret_key='test-only')
    app.state.host_db = host_db

    @app.get('/reports/{fmt}')
    @require_feature('exports', **guard)
    def report(fmt: str, req, rows: int = 10):
        return f"{fmt}:{rows}:{sorted(req.scope['entitlements'].features)}"

    @app.post('/sso')
    @require_feature('sso', **guard)
    async def sso():
        return 'sso on'

    @app.get('/api/ping')
    @require_quota('api_calls', **guard)
    def ping():
        return 'pong'

    return TestClient(app)


@pytest.fixture
def billed(sqlite_host_db):
    "The HTTP layer on SQLite (the decisions under it are tested on both backends above)."
    seed_plans(sqlite_host_db, PLANS)
    tenant(sqlite_host_db, 'acme', status='active', stripe_price_id='price_pro_m')
    tenant(sqlite_host_db, 'lapsed', status='trialing', trial_end=at(-US))
    return sqlite_host_db


ACME, HTML, HTMX = {'x-tenant': 'acme'}, {'accept': 'text/html'}, {'hx-request': 'true'}


def test_require_feature_lets_entitled_tenants_through(billed):
    cli = _app(billed)
    r = cli.get('/reports/csv?rows=3', headers=ACME)
    assert (r.status_code, r.text) == (200, "csv:3:['basic', 'exports']")
    override_feature(billed, 'acme', 'sso', True)
    assert cli.post('/sso', headers=ACME).text == 'sso on'


def test_require_feature_refusals(billed):
    cli = _app(billed)
    r = cli.post('/sso', headers=ACME)
    assert (r.status_code, r.text) == (402, "your plan does not include 'sso'")
    r = cli.post('/sso', headers={**ACME, **HTML}, follow_redirects=False)
    assert (r.status_code, r.headers['location']) == (303, '/pricing?feature=sso')  # the page says which plan has it
    r = cli.post('/sso', headers={**ACME, **HTMX, **HTML})
    assert (r.status_code, r.headers['hx-redirect'], r.text) == (
        402,
        '/pricing?feature=sso',
        "your plan does not include 'sso'",
    )
    r = cli.get('/reports/csv', headers={'x-tenant': 'lapsed'})
    assert (r.status_code, r.text) == (402, f"billing: trial ended at {at(-US)}")
    r = cli.get('/reports/csv', headers={'x-tenant': 'lapsed', **HTMX})
    assert (r.status_code, r.headers['hx-redirect']) == (402, '/pricing')
    r = cli.get('/reports/csv', headers={'x-tenant': 'ghost'})
    assert (r.status_code, r.text) == (402, 'billing: no such tenant')
    r = cli.get('/reports/csv')
    assert (r.status_code, r.text) == (401, 'sign in and choose a tenant first')


def test_require_feature_without_pricing_page(billed):
    cli = _app(billed, pricing_path=None)
    r = cli.post('/sso', headers={**ACME, **HTML, **HTMX}, follow_redirects=False)
    assert (r.status_code, 'hx-redirect' in r.headers, 'location' in r.headers) == (402, False, False)


def test_require_feature_uses_the_policy(billed):
    assert _app(billed).get('/reports/csv', headers={'x-tenant': 'lapsed'}).status_code == 402
    tenant(billed, 'solo')
    override_feature(billed, 'solo', 'exports', True)
    assert (
        _app(billed, policy=FREE).get('/reports/csv', headers={'x-tenant': 'solo'}).text
        == "csv:10:['basic', 'exports']"
    )


def test_guards_stack(billed):
    def set_auth(req):
        req.scope['auth'] = _Auth(req.headers.get('x-tenant'))

    app = FastHTML(before=Beforeware(set_auth), secret_key='test-only')
    app.state.host_db = billed

    @app.get('/bulk-export')
    @require_feature('exports')
    @require_quota('api_calls', n=40)
    async def bulk_export(req):
        return f"exported for {req.scope['auth'].tenant_id}"

    cli = TestClient(app)
    assert [cli.get('/bulk-export', headers=ACME).status_code for _ in range(3)] == [200, 200, 429]
    assert quota_used(billed, 'acme', 'api_calls') == 80
    override_feature(billed, 'acme', 'exports', False)
    assert cli.get('/bulk-export', headers=ACME).status_code == 402
    assert quota_used(billed, 'acme', 'api_calls') == 80, "a refused feature consumes nothing"


def test_guard_arguments_are_checked_when_decorating():
    with pytest.raises(ValueError, match='n must be a positive integer'):
        require_quota('api_calls', n=0)
    with pytest.raises(ValueError, match='quota key'):
        require_quota('API calls')
    with pytest.raises(ValueError, match="feature key 'Exports' is not valid"):
        require_feature('Exports')


def test_require_quota_counts_each_call(billed):
    override_quota(billed, 'acme', 'api_calls', 3)
    cli = _app(billed)
    assert [cli.get('/api/ping', headers=ACME).text for _ in range(3)] == ['pong'] * 3
    r = cli.get('/api/ping', headers=ACME)
    assert r.status_code == 429 and "cannot use 1 more 'api_calls': 3 of 3 used" in r.text
    assert cli.get('/api/ping', headers={**ACME, **HTMX}).headers['hx-redirect'] == '/pricing?quota=api_calls'
    assert quota_used(billed, 'acme', 'api_calls') == 3
    assert cli.get('/api/ping', headers={'x-tenant': 'lapsed'}).status_code == 402


def test_billing_beforeware_guards_every_page(billed):
    def set_auth(req):
        req.scope['auth'] = _Auth(req.headers.get('x-tenant'))

    app = FastHTML(before=[Beforeware(set_auth), billing_beforeware(skip=[r'/static/.*'])], secret_key='test-only')
    app.state.host_db = billed

    @app.get('/{page}')
    def page(page: str):
        return f"page {page}"

    @app.get('/static/{name}')
    def static(name: str):
        return name

    cli = TestClient(app)
    assert cli.get('/dashboard', headers=ACME).text == 'page dashboard'
    assert cli.get('/dashboard').text == 'page dashboard', "no tenant: left to the auth layer"
    lapsed = {'x-tenant': 'lapsed'}
    r = cli.get('/dashboard', headers=lapsed)
    assert (r.status_code, r.text) == (402, f"billing: trial ended at {at(-US)}")
    assert cli.get('/dashboard', headers={**lapsed, **HTML}, follow_redirects=False).headers['location'] == '/pricing'
    assert cli.get('/dashboard', headers={**lapsed, **HTMX}).headers['hx-redirect'] == '/pricing'
    assert cli.get('/pricing', headers=lapsed).text == 'page pricing'
    assert cli.get('/static/app.css', headers=lapsed).text == 'app.css'
    assert cli.get('/pricing2', headers=lapsed).status_code == 402, "skip paths match whole paths"


def test_guards_without_the_apps_host_database_fail_loudly(billed):
    """An auth layer that names only the tenant, on an app that never said which host database it uses: an error, not
    a guess."""

    def set_auth(req):
        req.scope['auth'] = _Auth('acme')

    app = FastHTML(before=Beforeware(set_auth), secret_key='test-only')

    @app.get('/x')
    @require_feature('exports')
    def x():
        return 'x'

    with pytest.raises(RuntimeError, match='set app.state.host_db'):
        TestClient(app).get('/x')
