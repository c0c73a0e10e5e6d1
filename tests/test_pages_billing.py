"""The billing pages through a real FastHTML app: pricing, Checkout and portal against the Stripe stand-in over HTTP,
the billing page when access is blocked, and the no-Stripe explanation."""

import re

import pytest
import sqlalchemy as sa
from datetime import datetime, timedelta, timezone

from fh_saas import stripe_billing
from fh_saas.billing import consume_quota, override_quota
from fh_saas.db_tenant import suspend_tenant
from fh_saas.db_host import Subscription, timestamp
from pages_helpers import fake_stripe, site  # noqa: F401


@pytest.mark.stripe
def test_pricing_public_amounts_and_no_buttons_for_anonymous(site, fake_stripe):
    r = site.client().get('/pricing')
    assert r.status_code == 200
    for text in (
        '$19.99',
        '$49.00',
        '14-day free trial',
        '100 exports a month',
        'Unlimited exports',
        'Sso',
        'Yearly (save up to 17%)',
    ):
        assert text in r.text, text
    assert r.text.index('Starter') < r.text.index('Pro')  # sort_order
    assert 'action="/billing/checkout"' not in r.text and r.text.count('href="/signup"') >= 2  # one per plan
    yearly = site.client().get('/pricing?interval=year').text
    assert '$199.00' in yearly and '$16.58 a month, billed yearly' in yearly and '$19.99' not in yearly
    assert '$49.00' in yearly  # Pro has no yearly price: its monthly one
    assert site.client().get('/pricing?interval=' + 'x' * 300).status_code == 200
    assert 'Log in' in r.text  # anonymous navigation


@pytest.mark.stripe
def test_pricing_shows_current_plan_and_buttons_to_admins_only(site, fake_stripe):
    site.user('owner')
    site.user('mem')
    site.tenant('acme', price='price_pro_m')
    site.member('owner', 'acme', 'owner')
    site.member('mem', 'acme', 'member')
    html = site.client('owner', 'acme').get('/pricing').text
    assert html.count('Current plan') == 1 and re.search(r'card plan current">\s*<h3>\s*Pro', html)
    assert 'owner@example.com' in html  # signed-in top bar on a public page
    # one button per plan but the current one: Starter, for the period shown
    assert html.count('action="/billing/checkout"') == 1 and 'Switch to Starter monthly' in html
    yearly = site.client('owner', 'acme').get('/pricing?interval=year').text
    assert 'Switch to Starter yearly' in yearly and 'value="year"' in yearly
    member = site.client('mem', 'acme').get('/pricing').text
    assert 'action="/billing/checkout"' not in member and 'Ask an owner or admin of Acme' in member


@pytest.mark.stripe
def test_checkout_redirects_to_stripe_with_price_and_metadata(site, fake_stripe):
    site.user('owner')
    site.tenant('acme', sub_status=None)
    site.member('owner', 'acme', 'owner')
    r = site.client('owner', 'acme').post('/billing/checkout', data=dict(plan_id='starter', interval='year'))
    assert r.status_code == 303
    checkout = [(p, key) for m, path, p, key in fake_stripe.calls if path == '/v1/checkout/sessions']
    assert len(checkout) == 1
    p, key = checkout[0]
    assert r.headers['location'] == fake_stripe._idem[key][2]['url']  # the session the stand-in created
    assert r.headers['location'].startswith('https://checkout.stripe.com/c/pay/cs_test_')
    assert p['line_items'] == [dict(price='price_starter_y', quantity='1')]
    assert p['metadata'] == dict(tenant_id='acme', plan_id='starter') and p['client_reference_id'] == 'acme'
    assert p['subscription_data'] == dict(metadata=dict(tenant_id='acme', plan_id='starter'), trial_period_days='14')
    assert (
        p['success_url'] == 'https://app.test/billing?checkout=success'
        and p['cancel_url'] == 'https://app.test/pricing'
    )
    customer = [p for m, path, p, _ in fake_stripe.calls if path == '/v1/customers'][0]
    assert customer['email'] == 'owner@example.com' and customer['metadata'] == dict(tenant_id='acme')


@pytest.mark.stripe
def test_checkout_with_live_subscription_changes_the_plan(site, fake_stripe):
    site.user('owner')
    site.tenant('acme', stripe_sub_id='sub_live1')
    site.member('owner', 'acme', 'owner')
    fake_stripe.add_subscription('sub_live1', 'price_starter_m', 'acme')
    r = site.client('owner', 'acme').post('/billing/checkout', data=dict(plan_id='pro', interval='month'))
    assert r.status_code == 303 and r.headers['location'] == '/billing?done=plan_changed'
    assert fake_stripe.objects['sub_live1']['items']['data'][0]['price']['id'] == 'price_pro_m'
    assert not [c for c in fake_stripe.calls if c[1] == '/v1/checkout/sessions']
    rows = site.host_db.q(
        "select actor_user_id, tenant_id, details from sys_audit_logs"
        " where event_type = 'billing.plan_change_requested'"
    )
    assert rows == [dict(actor_user_id='owner', tenant_id='acme', details='{"interval": "month", "plan_id": "pro"}')]
    assert 'Plan change requested' in site.client('owner', 'acme').get(r.headers['location']).text


@pytest.mark.stripe
def test_billing_forms_carry_the_token_and_a_forged_post_changes_nothing(site, fake_stripe):
    "A POST without this session's form token is refused before Stripe is called, for every billing action."
    site.user('owner')
    site.tenant('acme', stripe_sub_id='sub_live1')
    site.member('owner', 'acme', 'owner')
    fake_stripe.add_subscription('sub_live1', 'price_starter_m', 'acme')
    owner = site.client('owner', 'acme')
    tokens = set(re.findall(r'value="([0-9a-f]{64})" name="csrf"', owner.get('/pricing').text))
    tokens |= set(re.findall(r'value="([0-9a-f]{64})" name="csrf"', owner.get('/billing').text))
    assert tokens == {owner.token()}  # every form on both pages
    other = site.client('owner', 'acme').token()  # the same user's other session
    for path in ('/billing/checkout', '/billing/portal', '/billing/cancel'):
        for bad in ('', 'f' * 64, other):
            r = owner.post(path, data=dict(plan_id='pro', interval='month'), csrf=bad)
            assert r.status_code == 403 and 'did not come from this site' in r.text, (path, bad)
    assert (
        fake_stripe.calls == []
        and fake_stripe.objects['sub_live1']['items']['data'][0]['price']['id'] == 'price_starter_m'
    )
    assert site.host_db.q("select count(*) n from sys_audit_logs where event_type like 'billing.%'")[0]['n'] == 0
    assert owner.post('/billing/cancel').status_code == 303  # the page's own token works


@pytest.mark.stripe
def test_member_and_bad_input_are_refused_without_calling_stripe(site, fake_stripe):
    site.user('owner')
    site.user('mem')
    site.tenant('acme', sub_status=None)
    site.member('owner', 'acme', 'owner')
    site.member('mem', 'acme', 'member')
    mem = site.client('mem', 'acme')
    for path in ('/billing/checkout', '/billing/portal', '/billing/cancel'):
        r = mem.post(path, data=dict(plan_id='starter', interval='month'))
        assert r.status_code == 403 and 'Only owners and admins' in r.text, path
    owner = site.client('owner', 'acme')
    assert owner.post('/billing/checkout', data=dict(plan_id='nope', interval='month')).status_code == 400
    # pro has no yearly price
    assert owner.post('/billing/checkout', data=dict(plan_id='pro', interval='year')).status_code == 400
    assert owner.post('/billing/checkout', data=dict(plan_id='starter', interval='week')).status_code == 400
    r = owner.post('/billing/portal')
    # no Stripe customer yet
    assert r.status_code == 409 and 'Choose a plan first' in r.text
    # nothing to cancel
    assert owner.post('/billing/cancel').status_code == 409
    assert fake_stripe.calls == []


@pytest.mark.stripe
def test_portal_redirects_once_the_tenant_is_a_customer(site, fake_stripe):
    site.user('owner')
    site.tenant('acme', sub_status=None)
    site.member('owner', 'acme', 'owner')
    c = site.client('owner', 'acme')
    c.post('/billing/checkout', data=dict(plan_id='starter', interval='month'))
    assert 'Manage billing' in c.get('/billing').text
    r = c.post('/billing/portal')
    assert r.status_code == 303 and r.headers['location'].startswith('https://billing.stripe.com/p/session/bps_')
    portal = [p for m, path, p, _ in fake_stripe.calls if path == '/v1/billing_portal/sessions'][0]
    assert portal['return_url'] == 'https://app.test/billing'


@pytest.mark.stripe
def test_cancel_at_period_end(site, fake_stripe):
    site.user('owner')
    site.tenant('acme', stripe_sub_id='sub_live2')
    site.member('owner', 'acme', 'owner')
    fake_stripe.add_subscription('sub_live2', 'price_starter_m', 'acme')
    c = site.client('owner', 'acme')
    assert 'action="/billing/cancel"' in c.get('/billing').text
    r = c.post('/billing/cancel')
    assert r.status_code == 303 and fake_stripe.objects['sub_live2']['cancel_at_period_end'] is True
    assert (
        site.host_db.q("select count(*) n from sys_audit_logs where event_type = 'billing.cancel_requested'")[0]['n']
        == 1
    )


@pytest.mark.stripe
def test_stripe_failure_is_a_clear_502(site, fake_stripe):
    site.user('owner')
    site.tenant('acme', sub_status=None)
    site.member('owner', 'acme', 'owner')
    fake_stripe.fail_next = 5
    r = site.client('owner', 'acme').post('/billing/checkout', data=dict(plan_id='starter', interval='month'))
    assert r.status_code == 502 and 'Nothing was changed' in r.text and 'sk_test' not in r.text


def test_billing_page_when_blocked_is_reachable_and_explains(site):
    site.user('owner')
    site.tenant('acme', sub_status='canceled')
    site.member('owner', 'acme', 'owner')
    c = site.client('owner', 'acme')
    r = c.post('/notes', data=dict(body='hi'))
    assert r.status_code == 303 and r.headers['location'] == '/billing'  # the app refuses...
    r = c.get('/billing')
    assert r.status_code == 200  # ...but billing answers
    assert 'Access to Acme is paused: the subscription was canceled' in r.text
    assert 'Nothing is granted while access is paused' in r.text and 'badge bad' in r.text


@pytest.mark.stripe
def test_billing_page_shows_trial_entitlements_and_usage(site, fake_stripe):
    end = datetime.now(timezone.utc) + timedelta(days=10)
    site.user('owner')
    site.tenant('acme', sub_status='trialing', trial_end=timestamp(end), amount_cents=1999)
    site.member('owner', 'acme', 'owner')
    consume_quota(site.host_db, 'acme', 'exports', 7)
    html = site.client('owner', 'acme').get('/billing?checkout=success').text
    assert 'Thank you!' in html and f"Trial ends {end:%Y-%m-%d %H:%M} UTC" in html
    assert '<td>Starter</td>' in html and '$19.99' in html
    assert re.search(r'<td>exports</td>\s*<td>7</td>\s*<td>100</td>', html) and 'width:7%' in html
    assert '<li>api</li>' in html and 'Change plan' in html


def test_billing_page_reuses_the_requests_entitlements(site):
    """The page shows the subscription and plan the beforeware's entitlements read,
    and the usage of every quota in one query."""
    site.user('owner')
    site.tenant('acme', amount_cents=1999)
    site.member('owner', 'acme', 'owner')
    override_quota(site.host_db, 'acme', 'seats', 5)
    consume_quota(site.host_db, 'acme', 'exports', 7)
    consume_quota(site.host_db, 'acme', 'seats', 2)
    reads = []

    def count(conn, cursor, sql, *args):
        reads.extend(t for t in ('core_subscriptions', 'core_quota_usage') if t in sql)

    sa.event.listen(site.host_db.engine, 'before_cursor_execute', count)
    try:
        html = site.client('owner', 'acme').get('/billing').text
    finally:
        sa.event.remove(site.host_db.engine, 'before_cursor_execute', count)
    assert '<td>Starter</td>' in html and '$19.99' in html
    assert re.search(r'<td>exports</td>\s*<td>7</td>', html) and re.search(
        r'<td>seats</td>\s*<td>2</td>\s*<td>5</td>', html
    )
    assert (reads.count('core_subscriptions'), reads.count('core_quota_usage')) == (1, 1)


def test_without_stripe_only_system_admins_are_told_which_variables_to_set(site):
    site.user('owner')
    site.user('root', is_sys_admin=True)
    site.tenant('acme')
    site.member('owner', 'acme', 'owner')
    site.member('root', 'acme', 'owner')
    customer, admin = site.client('owner', 'acme'), site.client('root', 'acme')
    for path in ('/pricing', '/billing'):
        r = customer.get(path)
        assert r.status_code == 200 and 'STRIPE' not in r.text and 'Online payment is not available yet' in r.text
        r = admin.get(path)
        assert r.status_code == 200 and 'STRIPE_SECRET_KEY' in r.text and 'STRIPE_WEBHOOK_SECRET' in r.text, path
        assert 'https://app.test/stripe/webhook' in r.text and 'action="/billing/checkout"' not in r.text
    r = customer.post('/billing/checkout', data=dict(plan_id='starter', interval='month'))
    assert r.status_code == 503 and 'STRIPE' not in r.text and 'not available' in r.text
    assert 'STRIPE_SECRET_KEY' in admin.post('/billing/checkout', data=dict(plan_id='starter')).text


def test_a_gated_feature_says_which_plan_has_it(site):
    site.user('owner')
    site.tenant('acme')
    site.member('owner', 'acme', 'owner')
    c = site.client('owner', 'acme')
    assert 'Your plan does not include sso. It comes with Pro.' in c.get('/pricing?feature=sso').text
    assert 'Your plan does not include that feature.' in c.get('/pricing?feature=<script>').text
    assert 'used all the exports your plan includes this month' in c.get('/pricing?quota=exports').text
    r = c.get('/pricing?quota=' + 'q' * 5000 + '&feature=a%00b')
    assert r.status_code == 200 and 'q' * 100 not in r.text.split('<main')[1]  # not echoed in the page


@pytest.mark.stripe
def test_checkout_raced_by_a_new_subscription_is_a_409(site, fake_stripe, monkeypatch):
    "A subscription that appears between the page's check and Stripe's call: no second subscription, a clear answer."
    site.user('owner')
    site.tenant('acme', sub_status=None)
    site.member('owner', 'acme', 'owner')
    real, calls = stripe_billing.live_subscription, []

    def first_sees_none(db, tid):
        calls.append(tid)
        return None if len(calls) == 1 else real(db, tid)

    monkeypatch.setattr(stripe_billing, 'live_subscription', first_sees_none)
    site.host_db.subscriptions.insert(
        Subscription(tenant_id='acme', status='active', payment_type='subscription', stripe_sub_id='sub_new')
    )
    r = site.client('owner', 'acme').post('/billing/checkout', data=dict(plan_id='starter', interval='month'))
    assert r.status_code == 409 and 'changed while you were choosing' in r.text and len(calls) == 2
    assert not [c for c in fake_stripe.calls if c[1] == '/v1/checkout/sessions']


@pytest.mark.stripe
def test_pricing_for_a_visitor_whose_tenant_is_not_usable(site, fake_stripe):
    "Signed in, but the session's tenant is suspended: shown signed in, without tenant buttons, never refused."
    site.user('owner')
    site.tenant('acme')
    site.member('owner', 'acme', 'owner')
    suspend_tenant(site.host_db, 'acme')
    r = site.client('owner', 'acme').get('/pricing')
    assert r.status_code == 200 and 'owner@example.com' in r.text and 'Choose a tenant' in r.text
    assert 'Choose a tenant first' in r.text and 'action="/billing/checkout"' not in r.text
    # the tenant pages themselves are refused
    assert site.client('owner', 'acme').get('/billing').status_code == 303
