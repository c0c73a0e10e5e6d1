"""Stripe calls: a subscription lifecycle against localstripe (real HTTP, real signed webhooks), and Checkout, portal,
plan change, plan sync and undelivered events against a local stand-in."""

import json, socket, subprocess, time

import httpx
import pytest
from starlette.applications import Starlette

from fh_saas import stripe_billing as sb, stripe_models, stripe_webhooks as sw
from fh_saas.audit import audit_context
from fh_saas.db_host import PricingPlan, TenantCatalog
from pgserver import free_port, wait_for
from stripe_helpers import SECRET, ServedApp, event, subscription
from stripe_standin import FakeStripe

pytestmark = [pytest.mark.postgres, pytest.mark.stripe]
URLS = dict(success_url="https://app.test/billing/ok", cancel_url="https://app.test/billing")


@pytest.fixture
def acme_host(pg_host_db):
    "The PostgreSQL host database with tenant acme in its catalog."
    pg_host_db.tenants.insert(TenantCatalog(id="acme", name="Acme Ltd"))
    return pg_host_db


@pytest.fixture(scope="module")
def localstripe_url():
    port = free_port()
    proc = subprocess.Popen(
        ["localstripe", "--port", str(port), "--from-scratch"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def up():
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            return False

    assert wait_for(up, 20), "localstripe did not start"
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def fake():
    fake = FakeStripe()
    with ServedApp(fake.app()) as srv:
        fake.client = sb.stripe_client("sk_test_standin", base_addresses={"api": srv.url}, max_network_retries=1)
        yield fake


def test_lifecycle_against_localstripe(acme_host, localstripe_url):
    """Customer, subscription, cancel at period end (drift found and fixed by reconcile), cancel now; state arrives by
    signed webhooks."""
    client = sb.stripe_client("sk_test_lifecycle", base_addresses={"api": localstripe_url})
    app = Starlette()
    sw.add_stripe_webhook(app, acme_host, secrets=[SECRET])
    with ServedApp(app) as srv:
        httpx.post(
            f"{localstripe_url}/_config/webhooks/fh_saas", data=dict(url=f"{srv.url}/stripe/webhook", secret=SECRET)
        ).raise_for_status()
        cust = sb.ensure_customer(client, acme_host, "acme", email="billing@acme.test")
        assert sb.ensure_customer(client, acme_host, "acme") == cust
        assert client.v1.customers.retrieve(cust).metadata["tenant_id"] == "acme"
        client.v1.plans.create(
            params=dict(id="pro-monthly", product=dict(name="Pro"), amount=2900, currency="usd", interval="month")
        )
        pm = client.v1.payment_methods.create(
            params=dict(type="card", card=dict(number="4242424242424242", exp_month=12, exp_year=2030, cvc="123"))
        )
        client.v1.payment_methods.attach(pm.id, params=dict(customer=cust))
        client.v1.customers.update(cust, params=dict(invoice_settings=dict(default_payment_method=pm.id)))
        # what Checkout does for us in production: a subscription carrying the tenant in its metadata
        sub = client.v1.subscriptions.create(
            params=dict(customer=cust, items=[dict(plan="pro-monthly")], metadata=dict(tenant_id="acme"))
        )
        assert wait_for(lambda: acme_host.subscriptions.count == 1, 15)
        row = acme_host.subscriptions()[0]
        assert (row.tenant_id, row.stripe_sub_id, row.status, row.amount_cents, row.stripe_price_id) == (
            "acme",
            sub.id,
            "active",
            2900,
            "pro-monthly",
        )
        assert row.current_period_end == stripe_models.epoch_iso(sub.to_dict()["current_period_end"])
        assert sb.reconcile(client, acme_host) == []

        sb.cancel_subscription(client, acme_host, "acme", at_period_end=True)  # localstripe sends no event for it
        drift = sb.reconcile(client, acme_host, fix=True)
        assert [(d.stripe_sub_id, d.field, d.ours, d.stripe) for d in drift] == [
            (sub.id, "cancel_at_period_end", False, True)
        ]
        assert acme_host.subscriptions()[0].cancel_at_period_end is True and sb.reconcile(client, acme_host) == []

        sb.cancel_subscription(client, acme_host, "acme", at_period_end=False)
        assert wait_for(lambda: acme_host.subscriptions()[0].status == "canceled", 15)
    statuses = {e.event_type: e.status for e in acme_host.webhook_events()}
    assert statuses["customer.subscription.created"] == statuses["customer.subscription.deleted"] == "processed"
    updates = acme_host.audit_logs(where="event_type = 'billing.subscription_updated'", order_by="created_at")
    assert updates[-1].details.count("canceled")
    with pytest.raises(LookupError):
        sb.cancel_subscription(client, acme_host, "acme")


def test_customer_is_created_once_even_after_a_crash(acme_host, fake, monkeypatch):
    real = sb.link_customer

    def crash(*a):
        raise ConnectionError("host database went away")

    monkeypatch.setattr(sb, "link_customer", crash)
    with pytest.raises(ConnectionError):
        sb.ensure_customer(fake.client, acme_host, "acme")
    monkeypatch.setattr(sb, "link_customer", real)
    cust = sb.ensure_customer(fake.client, acme_host, "acme")
    assert sb.ensure_customer(fake.client, acme_host, "acme") == cust == sb.tenant_customer(acme_host, "acme")
    created = [c for c in fake.calls if c[:2] == ("POST", "/v1/customers")]
    # the retry reused the key ...
    assert len(created) == 2 and created[0][3] == created[1][3]
    # ... so one customer
    assert [o for o in fake.objects.values() if o["object"] == "customer"] == [fake.objects[cust]]
    assert created[0][2] == dict(name="Acme Ltd", metadata=dict(tenant_id="acme"))


def test_network_retry_reuses_the_key(acme_host, fake):
    fake.fail_next = 1
    cust = sb.ensure_customer(fake.client, acme_host, "acme")
    keys = [c[3] for c in fake.calls if c[1] == "/v1/customers"]
    assert len(keys) == 2 and keys[0] == keys[1] and cust in fake.objects


def test_subscription_checkout(acme_host, fake):
    acme_host.pricing_plans.insert(
        PricingPlan(
            id="pro",
            name="Pro",
            stripe_price_monthly="price_pm",
            stripe_price_yearly="price_py",
            amount_monthly=2900,
            amount_yearly=29000,
            trial_days=14,
        )
    )
    with audit_context(request_id="req-1"):
        s = sb.create_subscription_checkout(fake.client, acme_host, "acme", "pro", interval="year", **URLS)
        again = sb.create_subscription_checkout(fake.client, acme_host, "acme", "pro", interval="year", **URLS)
    assert again.id == s.id and s.url.startswith("https://checkout.stripe.com/") and s.client_reference_id == "acme"
    params = [c[2] for c in fake.calls if c[1] == "/v1/checkout/sessions"][0]
    assert params["line_items"] == [dict(price="price_py", quantity="1")]
    assert params["subscription_data"] == dict(metadata=dict(tenant_id="acme", plan_id="pro"), trial_period_days="14")
    with audit_context(request_id="req-2"):
        other = sb.create_subscription_checkout(fake.client, acme_host, "acme", "pro", trial_days=0, **URLS)
    assert other.id != s.id
    assert (
        "trial_period_days"
        not in [c[2] for c in fake.calls if c[1] == "/v1/checkout/sessions"][-1]["subscription_data"]
    )
    sessions = [c for c in fake.calls if c[1] == "/v1/checkout/sessions"]
    assert len({c[3] for c in sessions}) == 2
    # a tenant that already pays is sent to change_plan
    body = event(
        "customer.subscription.created", subscription("sub_live", "active", 1_760_000_000, "acme"), 1_760_000_000
    )
    sw.apply_event(acme_host, json.loads(body), body)
    with pytest.raises(ValueError, match="change_plan"):
        sb.create_subscription_checkout(fake.client, acme_host, "acme", "pro", **URLS)


def test_payment_checkout_and_portal(acme_host, fake):
    with pytest.raises(LookupError):
        sb.create_portal_session(fake.client, acme_host, "acme", "https://app.test/billing")
    s = sb.create_payment_checkout(fake.client, acme_host, "acme", "price_credits_100", quantity=3, **URLS)
    params = [c[2] for c in fake.calls if c[1] == "/v1/checkout/sessions"][0]
    assert (s.mode, params["line_items"], params["payment_intent_data"]) == (
        "payment",
        [dict(price="price_credits_100", quantity="3")],
        dict(metadata=dict(tenant_id="acme")),
    )
    for bad in (dict(price_id="prod_x"), dict(price_id="price_x", quantity=0)):
        with pytest.raises(ValueError):
            sb.create_payment_checkout(fake.client, acme_host, "acme", **{"quantity": 1, **bad}, **URLS)
    portal = sb.create_portal_session(fake.client, acme_host, "acme", "https://app.test/billing")
    assert portal.url.startswith("https://billing.stripe.com/")
    assert portal.customer == sb.tenant_customer(acme_host, "acme")


def test_change_plan_swaps_the_item_price(acme_host, fake):
    acme_host.pricing_plans.insert(PricingPlan(id="basic", name="Basic", stripe_price_monthly="price_basic"))
    acme_host.pricing_plans.insert(PricingPlan(id="pro", name="Pro", stripe_price_monthly="price_pro"))
    fake.add_subscription("sub_1", "price_basic", "acme")
    body = event("customer.subscription.created", fake.objects["sub_1"], 1_760_000_000)
    sw.apply_event(acme_host, json.loads(body), body)
    for target in ("pro", "basic", "pro"):
        sub = sb.change_plan(fake.client, acme_host, "acme", target)
        assert sub["items"]["data"][0]["price"]["id"] == f"price_{target}"
    updates = [c for c in fake.calls if c[:2] == ("POST", "/v1/subscriptions/sub_1")]
    assert [u[2]["items"] for u in updates] == [
        [dict(id="si_sub_1", price=p)] for p in ("price_pro", "price_basic", "price_pro")
    ]
    assert len({u[3] for u in updates}) == 3 and {u[2]["proration_behavior"] for u in updates} == {"create_prorations"}
    assert sb.change_plan(fake.client, acme_host, "acme", "pro")["id"] == "sub_1"  # already there: no update
    assert len([c for c in fake.calls if c[:2] == ("POST", "/v1/subscriptions/sub_1")]) == 3
    with pytest.raises(ValueError):
        sb.change_plan(fake.client, acme_host, "acme", "pro", proration_behavior="sometimes")


def test_sync_plans(acme_host, fake):
    acme_host.pricing_plans.insert(PricingPlan(id="pro", name="Pro", amount_monthly=2900, amount_yearly=29000))
    acme_host.pricing_plans.insert(
        PricingPlan(id="done", name="Done", amount_monthly=900, stripe_price_monthly="price_existing")
    )
    assert len(sb.sync_plans(fake.client, acme_host)) == 2
    pro = acme_host.pricing_plans["pro"]
    assert pro.stripe_price_monthly.startswith("price_") and pro.stripe_price_yearly.startswith("price_")
    prices = [c[2] for c in fake.calls if c[1] == "/v1/prices"]
    assert [(p["unit_amount"], p["recurring"]["interval"], p["lookup_key"]) for p in prices] == [
        ("2900", "month", "pro_month"),
        ("29000", "year", "pro_year"),
    ]
    assert sb.sync_plans(fake.client, acme_host) == []
    assert acme_host.pricing_plans["done"].stripe_price_monthly == "price_existing"


def test_fetch_undelivered(acme_host, fake):
    now = int(time.time())
    bodies = [
        event("customer.subscription.updated", subscription("sub_u", s, now - 100 + i, "acme"), now - 100 + i)
        for i, s in enumerate(("trialing", "active", "past_due"))
    ]
    done = json.loads(bodies[0])
    sw.apply_event(acme_host, done, bodies[0])
    fake.events = sorted((json.loads(b) for b in bodies), key=lambda e: -e["created"])
    assert sw.fetch_undelivered(fake.client, acme_host, days=1) == dict(already_applied=1, processed=2)
    assert acme_host.subscriptions()[0].status == "past_due"
    assert sw.fetch_undelivered(fake.client, acme_host, days=1) == dict(already_applied=3)


def test_reconcile_reports_missing_rows(acme_host, fake):
    fake.add_subscription("sub_remote", "price_x", "acme")
    body = event(
        "customer.subscription.created", subscription("sub_gone", "active", 1_760_000_000, "acme"), 1_760_000_000
    )
    sw.apply_event(acme_host, json.loads(body), body)
    drift = sb.reconcile(fake.client, acme_host, fix=True)
    assert sorted((d.stripe_sub_id, d.field) for d in drift) == [
        ("sub_gone", "missing_in_stripe"),
        ("sub_remote", "missing_locally"),
    ]
    assert acme_host.subscriptions(where="stripe_sub_id = 'sub_remote'")[0].status == "active"
    assert [d.field for d in sb.reconcile(fake.client, acme_host)] == ["missing_in_stripe"]


def test_reconcile_never_overwrites_a_newer_event(acme_host, fake):
    "An event applied after the listing began is newer than the listing: the drift is reported, our row kept."
    fake.add_subscription("sub_1", "price_x", "acme", status="active")
    newer = int(time.time()) + 5
    body = event(
        "customer.subscription.updated",
        subscription("sub_1", "past_due", newer, "acme", price="price_x", amount=1000),
        newer,
    )
    sw.apply_event(acme_host, json.loads(body), body)
    drift = sb.reconcile(fake.client, acme_host, fix=True)
    assert [(d.field, d.ours, d.stripe) for d in drift if d.field == "status"] == [("status", "past_due", "active")]
    row = acme_host.subscriptions()[0]
    assert row.status == "past_due" and row.last_event_created == newer
