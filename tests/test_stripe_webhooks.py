"""The Stripe webhook endpoint over real HTTP (uvicorn) on PostgreSQL and SQLite: verification, exactly-once, ordering,
failures."""

import json, queue, random, threading, time
from collections import Counter

import httpx
import pytest
import sqlalchemy as sa
from fasthtml.common import Beforeware, FastHTML, RedirectResponse
from starlette.applications import Starlette

from fh_saas import stripe_webhooks as sw
from fh_saas.audit import audit
from fh_saas.db_host import GlobalUser, Membership, PricingPlan, TenantCatalog
from fh_saas.mail import MemoryOutbox
from pgserver import wait_for
from stripe_helpers import OLD_SECRET, SECRET, ServedApp, event, sign, subscription

T0 = 1_760_000_000


def served(host_db, app=None):
    app = app or Starlette()
    sw.add_stripe_webhook(app, host_db, secrets=[SECRET, OLD_SECRET])
    return ServedApp(app)


@pytest.fixture
def endpoint(host_db):
    "(host_db, post) with the endpoint served over HTTP; `post(body, **headers)` sends a signed delivery."
    host_db.tenants.insert(TenantCatalog(id="acme", name="Acme"))
    with served(host_db) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:

        def post(body, secret=SECRET, t=None, headers=None):
            hdrs = {"Stripe-Signature": sign(body, secret, t)} if headers is None else headers
            return http.post("/stripe/webhook", content=body, headers=hdrs)

        yield host_db, post


def counts(host_db):
    return host_db.webhook_events.count, host_db.subscriptions.count, host_db.audit_logs.count


def inbox(host_db, event_id):
    return host_db.webhook_events(where="event_id = :e", where_args=dict(e=json.loads(event_id)["id"]))[0]


def test_every_bad_delivery_is_400_and_stores_nothing(endpoint):
    host_db, post = endpoint
    good = event("customer.subscription.created", subscription("sub_1", "active", T0, "acme"), T0)
    beyond = 300 + 30  # past the 300 s tolerance with room for a slow machine between posts
    bad = {
        "wrong secret": post(good, secret="whsec_attacker"),
        "tampered body": post(good.replace('"active"', '"canceled"'), headers={"Stripe-Signature": sign(good)}),
        "stale timestamp": post(good, t=int(time.time()) - beyond),
        "future timestamp": post(good, t=int(time.time()) + beyond),
        "missing header": post(good, headers={}),
        "garbage header": post(good, headers={"Stripe-Signature": "garbage"}),
        "v0 scheme only": post(good, headers={"Stripe-Signature": sign(good).replace("v1=", "v0=")}),
        "signed non-JSON": post("not json"),
        "signed non-UTF-8": post(b"\xff\xfe{}"),
        "signed JSON that is not an event": post(json.dumps(dict(id="evt_1", type="x"))),
        "signed event with a bad id": post(good.replace('"id": "evt_', '"id": "evt_../')),
    }
    assert {k: r.status_code for k, r in bad.items()} == dict.fromkeys(bad, 400)
    assert post(good + " " * sw.MAX_BODY).status_code == 413
    assert counts(host_db) == (0, 0, 0)
    assert post(good, secret=OLD_SECRET).json() == dict(status="processed", duplicate=False)


@pytest.mark.postgres
def test_endpoint_is_outside_login_beforeware(pg_host_db):
    pg_host_db.tenants.insert(TenantCatalog(id="acme", name="Acme"))
    app = FastHTML(
        secret_key="test-only", before=Beforeware(lambda req, sess: RedirectResponse("/login", status_code=303))
    )

    @app.get("/")
    def home():
        return "private"

    body = event("customer.subscription.created", subscription("sub_1", "active", T0, "acme"), T0)
    with served(pg_host_db, app) as srv, httpx.Client(base_url=srv.url) as http:
        assert http.get("/", follow_redirects=False).status_code == 303
        r = http.post("/stripe/webhook", content=body, headers={"Stripe-Signature": sign(body)})
    assert r.status_code == 200 and pg_host_db.subscriptions()[0].status == "active"


@pytest.mark.postgres
def test_no_secret_no_endpoint(pg_host_db, monkeypatch):
    monkeypatch.delenv("STRIPE_WEBHOOK_SECRET", raising=False)
    for secrets in ([], None, "", [" "]):
        with pytest.raises(ValueError):
            sw.add_stripe_webhook(Starlette(), pg_host_db, secrets=secrets)


def test_subscription_snapshot_and_period_fallback(endpoint):
    host_db, post = endpoint
    host_db.pricing_plans.insert(
        PricingPlan(id="pro", name="Pro", stripe_price_monthly="price_pro", amount_monthly=1500)
    )
    new_shape = subscription("sub_new", "trialing", T0, "acme", amount=1500, quantity=3, trial_end=T0 + 86400)
    old_shape = dict(subscription("sub_old", "active", T0, "acme"), current_period_start=T0, current_period_end=T0 + 60)
    for item in old_shape["items"]["data"]:
        del item["current_period_start"], item["current_period_end"]
    for obj in (new_shape, old_shape):
        assert post(event("customer.subscription.created", obj, T0)).status_code == 200
    new, old = (
        host_db.subscriptions(where="stripe_sub_id = :s", where_args=dict(s=s))[0] for s in ("sub_new", "sub_old")
    )
    assert (new.status, new.amount_cents, new.stripe_price_id, new.tenant_id) == ("trialing", 4500, "price_pro", "acme")
    assert (new.plan_tier, new.product_name, new.payment_type) == ("pro", "Pro", "subscription")
    assert (
        new.current_period_end == "2025-11-08T08:53:20.000000+00:00"
        and new.trial_end == "2025-10-10T08:53:20.000000+00:00"
    )
    assert old.current_period_end == "2025-10-09T08:54:20.000000+00:00"
    assert host_db.q("SELECT stripe_cust_id FROM core_stripe_customers WHERE tenant_id = 'acme'") == [
        dict(stripe_cust_id="cus_1")
    ]


def test_out_of_order_and_same_second_rule(endpoint):
    host_db, post = endpoint
    newer = event("customer.subscription.updated", subscription("sub_1", "past_due", T0 + 20, "acme"), T0 + 20)
    older = event("customer.subscription.updated", subscription("sub_1", "active", T0 + 10, "acme"), T0 + 10)
    assert post(newer).json()["status"] == "processed"
    assert post(older).json()["status"] == "skipped_out_of_order"
    assert inbox(host_db, older).status == "skipped_out_of_order"
    assert host_db.subscriptions()[0].status == "past_due"
    # Same second: an end wins whichever arrives first; both orders give the same state.
    for order, sub_id in (((0, 1), "sub_a"), ((1, 0), "sub_b")):
        pair = [
            event("customer.subscription.updated", subscription(sub_id, "active", T0, "acme"), T0, f"evt_zz_{sub_id}"),
            event(
                "customer.subscription.deleted", subscription(sub_id, "canceled", T0, "acme"), T0, f"evt_aa_{sub_id}"
            ),
        ]
        for i in order:
            assert post(pair[i]).status_code == 200
    rows = host_db.subscriptions(where="stripe_sub_id IN ('sub_a', 'sub_b')")
    assert [(r.status, r.last_event_id) for r in rows] == [("canceled", "evt_aa_sub_a"), ("canceled", "evt_aa_sub_b")]


def test_late_invoice_does_not_revive_canceled(endpoint):
    host_db, post = endpoint
    post(event("customer.subscription.created", subscription("sub_1", "active", T0, "acme"), T0))
    post(
        event(
            "customer.subscription.deleted",
            subscription("sub_1", "canceled", T0 + 50, "acme", ended_at=T0 + 50),
            T0 + 50,
        )
    )
    invoice = dict(
        id="in_1",
        object="invoice",
        customer="cus_1",
        amount_due=2900,
        amount_paid=2900,
        attempt_count=2,
        parent=dict(subscription_details=dict(subscription="sub_1")),
    )
    for etype, t in (
        ("invoice.payment_succeeded", T0 + 40),
        ("invoice.payment_succeeded", T0 + 60),
        ("invoice.paid", T0 + 60),
    ):
        assert post(event(etype, invoice, t)).json()["status"] == "processed"
    late_update = event("customer.subscription.updated", subscription("sub_1", "active", T0 + 30, "acme"), T0 + 30)
    assert post(late_update).json()["status"] == "skipped_out_of_order"
    sub = host_db.subscriptions()[0]
    assert (sub.status, sub.ended_at) == ("canceled", "2025-10-09T08:54:10.000000+00:00")
    assert Counter(a.event_type for a in host_db.audit_logs()) == {
        "billing.subscription_updated": 2,
        "billing.invoice_paid": 3,
    }


def test_missing_or_unknown_tenant_is_recorded_and_changes_nothing(endpoint):
    host_db, post = endpoint
    no_meta = event("customer.subscription.created", subscription("sub_x", "active", T0, customer="cus_unknown"), T0)
    ghost = event(
        "customer.subscription.created", subscription("sub_y", "active", T0, "no-such-tenant", customer="cus_y"), T0
    )
    session = event(
        "checkout.session.completed",
        dict(
            id="cs_1",
            object="checkout.session",
            mode="subscription",
            subscription="sub_z",
            customer="cus_z",
            payment_status="paid",
        ),
        T0,
    )
    for body in (no_meta, ghost, session):
        assert post(body).json() == dict(status="ignored_no_tenant", duplicate=False)
        assert inbox(host_db, body).status == "ignored_no_tenant"
    assert counts(host_db) == (3, 0, 0)
    assert host_db.q("SELECT count(*) AS n FROM core_stripe_customers") == [dict(n=0)]


def test_unknown_event_type_is_recorded(endpoint):
    host_db, post = endpoint
    body = event("radar.early_fraud_warning.created", dict(id="issfr_1"), T0)
    assert post(body).json() == dict(status="ignored_unhandled", duplicate=False)
    assert (inbox(host_db, body).object_id, counts(host_db)) == ("issfr_1", (1, 0, 0))


def test_checkout_async_payment_in_both_orders(endpoint):
    host_db, post = endpoint

    def session(mode, payment_status, ref="acme", **kw):
        return dict(
            id=f"cs_{mode}_{payment_status}_{kw.get('subscription', '')}",
            object="checkout.session",
            mode=mode,
            client_reference_id=ref,
            customer="cus_1",
            payment_status=payment_status,
            amount_total=4900,
            **kw,
        )

    # subscription mode, delayed method: pending until the async result
    done = event("checkout.session.completed", session("subscription", "unpaid", subscription="sub_s"), T0)
    ok = event(
        "checkout.session.async_payment_succeeded", session("subscription", "paid", subscription="sub_s"), T0 + 90
    )
    assert post(done).json()["status"] == "processed"
    assert host_db.subscriptions()[0].status == "pending_payment"
    assert post(ok).json()["status"] == "processed"
    assert host_db.subscriptions()[0].status == "active"
    # the subscription's own events take over from there
    post(event("customer.subscription.updated", subscription("sub_s", "past_due", T0 + 100), T0 + 100))
    late = event(
        "checkout.session.completed", session("subscription", "paid", subscription="sub_s"), T0 + 1, "evt_late_cs"
    )
    assert post(late).json()["status"] == "skipped_superseded"
    assert host_db.subscriptions()[0].status == "past_due"
    # payment mode, result delivered before the completion
    fail = event("checkout.session.async_payment_failed", session("payment", "unpaid"), T0 + 90)
    first = event("checkout.session.completed", session("payment", "unpaid"), T0)
    assert [post(b).json()["status"] for b in (fail, first)] == ["processed", "skipped_out_of_order"]
    one = host_db.subscriptions(where="payment_type = 'one_time'")[0]
    assert (one.stripe_sub_id, one.status, one.amount_cents, one.tenant_id) == (
        "cs_payment_unpaid_",
        "payment_failed",
        4900,
        "acme",
    )


def test_customer_updated(endpoint):
    host_db, post = endpoint
    cust = lambda email: dict(id="cus_9", object="customer", email=email, metadata=dict(tenant_id="acme"))
    assert post(event("customer.updated", cust("new@acme.test"), T0 + 5)).json()["status"] == "processed"
    assert post(event("customer.updated", cust("old@acme.test"), T0)).json()["status"] == "skipped_out_of_order"
    assert host_db.q("SELECT email FROM core_stripe_customers") == [dict(email="new@acme.test")]


class FlakyHandler:
    """Wraps a real handler: runs it and sends its writes (`tx.flush()`), sets `entered`, calls `hold()` if given (its
    locks still held), then raises on the first `fail` calls."""

    def __init__(self, real, fail=1, hold=None):
        self.real, self.fail, self.hold, self.calls, self.entered = real, fail, hold, 0, threading.Event()

    def __call__(self, host_db, tx, event):
        self.calls += 1
        out = self.real(host_db, tx, event)
        assert tx.flush()
        self.entered.set()
        if self.hold:
            self.hold()
        if self.calls <= self.fail:
            raise RuntimeError("ledger service down; api key sk_live_abc123 leaked into message")
        return out


def test_failure_rolls_back_records_and_retry_applies(endpoint, monkeypatch):
    host_db, post = endpoint
    flaky = FlakyHandler(sw.on_subscription)
    monkeypatch.setitem(sw.EVENT_HANDLERS, "customer.subscription.created", flaky)
    body = event("customer.subscription.created", subscription("sub_1", "active", T0, "acme"), T0)
    r = post(body)
    assert r.status_code == 500 and "sk_live" not in r.text
    row = inbox(host_db, body)
    assert (row.status, row.attempts, row.last_error) == (
        "failed",
        1,
        "RuntimeError: ledger service down; api key [redacted] leaked into message",
    )
    assert (host_db.subscriptions.count, host_db.audit_logs.count) == (0, 0)
    assert post(body).json() == dict(status="processed", duplicate=False)
    assert post(body).json() == dict(status="processed", duplicate=True)
    row = inbox(host_db, body)
    assert (row.status, row.attempts, row.last_error) == ("processed", 2, None)
    assert (host_db.subscriptions.count, host_db.audit_logs.count, flaky.calls) == (1, 1, 2)


def lock_waits(host_db, n=1):
    "A `hold`: return once `n` sessions of `host_db`'s database wait for a lock (at most 10 s), i.e. queue behind ours."
    q = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"

    def waiting():
        with host_db.engine.connect() as c:
            return c.exec_driver_sql(q).scalar() >= n

    return lambda: wait_for(waiting, 10)


@pytest.fixture
def pg_endpoint(pg_host_db):
    pg_host_db.tenants.insert(TenantCatalog(id="acme", name="Acme"))
    with served(pg_host_db) as srv:

        def post(body):
            with httpx.Client(base_url=srv.url, timeout=30) as http:
                return http.post("/stripe/webhook", content=body, headers={"Stripe-Signature": sign(body)})

        yield pg_host_db, post


@pytest.mark.postgres
def test_simultaneous_duplicates_apply_once(pg_endpoint, race, monkeypatch):
    host_db, post = pg_endpoint
    slow = FlakyHandler(sw.on_subscription, fail=0, hold=lock_waits(host_db, 3))
    monkeypatch.setitem(sw.EVENT_HANDLERS, "customer.subscription.created", slow)
    body = event("customer.subscription.created", subscription("sub_1", "active", T0, "acme"), T0)
    res = race([lambda: post(body)] * 4)
    assert sorted(r.json()["duplicate"] for r in res) == [False, True, True, True]
    assert (slow.calls, host_db.audit_logs.count, inbox(host_db, body).attempts) == (1, 1, 1)


@pytest.mark.postgres
def test_failed_event_retried_twice_at_once_applies_once(pg_endpoint, race, monkeypatch):
    host_db, post = pg_endpoint
    flaky = FlakyHandler(sw.on_subscription, fail=1)
    monkeypatch.setitem(sw.EVENT_HANDLERS, "customer.subscription.created", flaky)
    body = event("customer.subscription.created", subscription("sub_1", "active", T0, "acme"), T0)
    assert post(body).status_code == 500
    flaky.hold = lock_waits(host_db)
    res = race([lambda: post(body)] * 2)
    assert sorted((r.status_code, r.json()["duplicate"]) for r in res) == [(200, False), (200, True)]
    assert (flaky.calls, host_db.audit_logs.count, inbox(host_db, body).attempts) == (2, 1, 2)


@pytest.mark.postgres
def test_failure_record_never_overwrites_a_concurrent_success(pg_endpoint, race, monkeypatch):
    """Delivery A fails slowly while B waits on the inbox's unique index; B applies after A rolls back; A's failure
    record must not clobber it."""
    host_db, post = pg_endpoint
    flaky = FlakyHandler(sw.on_subscription, fail=1, hold=lock_waits(host_db))  # B behind A; then A's record behind B
    monkeypatch.setitem(sw.EVENT_HANDLERS, "customer.subscription.created", flaky)
    record = sw._record_failure

    def record_once_b_applies(*args):  # else A's record may reach the index before B's retried insert does
        wait_for(lambda: flaky.calls == 2, 10)
        record(*args)

    monkeypatch.setattr(sw, "_record_failure", record_once_b_applies)
    body = event("customer.subscription.created", subscription("sub_1", "active", T0, "acme"), T0)
    res = race([lambda: post(body), lambda: (flaky.entered.wait(10), post(body))[1]])
    assert sorted(r.status_code for r in res) == [200, 500]
    row = inbox(host_db, body)
    assert (row.status, row.attempts, row.last_error, flaky.calls) == ("processed", 1, None, 2)
    assert (host_db.subscriptions()[0].status, host_db.audit_logs.count) == ("active", 1)


@pytest.mark.postgres
def test_replay_failed(pg_host_db, monkeypatch):
    pg_host_db.tenants.insert(TenantCatalog(id="acme", name="Acme"))
    monkeypatch.setitem(sw.EVENT_HANDLERS, "customer.subscription.updated", FlakyHandler(sw.on_subscription, fail=3))
    bodies = [
        event("customer.subscription.updated", subscription("sub_1", s, T0 + i, "acme"), T0 + i)
        for i, s in enumerate(("trialing", "active", "past_due"))
    ]
    for b in bodies:
        with pytest.raises(RuntimeError):
            sw.apply_event(pg_host_db, json.loads(b), b)
    assert pg_host_db.webhook_events.count == 3 and pg_host_db.subscriptions.count == 0
    assert sw.replay_failed(pg_host_db) == dict(processed=3)
    assert sw.replay_failed(pg_host_db) == {}
    sub = pg_host_db.subscriptions()[0]
    assert (sub.status, sub.last_event_id) == ("past_due", json.loads(bodies[-1])["id"])
    with pg_host_db.transaction(), pytest.raises(RuntimeError, match="outside"):
        sw.apply_event(pg_host_db, json.loads(bodies[0]), bodies[0])


def storm_events(n_subs=50, per_sub=40, seed=7):
    """per_sub events for each of n_subs subscriptions (a Checkout completion, every 5th an invoice); some end with a
    deletion."""
    rng, events = random.Random(seed), []
    for s in range(n_subs):
        sub_id, tenant = f"sub_storm_{s:02d}", f"t{s:02d}"
        for k in range(per_sub):
            created = T0 + k * 7 + s
            if k == 4:  # the Checkout completion that started it, delivered among the subscription's own events
                session = dict(
                    id=f"cs_{s}",
                    object="checkout.session",
                    mode="subscription",
                    subscription=sub_id,
                    customer=f"cus_{s}",
                    client_reference_id=tenant,
                    payment_status="paid",
                )
                events.append(event("checkout.session.completed", session, T0 + s))
                continue
            if k % 5 == 4:
                inv = dict(
                    id=f"in_{s}_{k}",
                    object="invoice",
                    customer=f"cus_{s}",
                    amount_paid=100 * k,
                    parent=dict(subscription_details=dict(subscription=sub_id, metadata={"tenant_id": tenant})),
                )
                events.append(event(rng.choice(["invoice.paid", "invoice.payment_failed"]), inv, created))
                continue
            last, ends = k == per_sub - 1, s % 5 == 0
            status = "canceled" if last and ends else rng.choice(["trialing", "active", "active", "past_due", "unpaid"])
            etype = (
                "customer.subscription.deleted"
                if last and ends
                else "customer.subscription.created"
                if k == 0
                else "customer.subscription.updated"
            )
            obj = subscription(
                sub_id,
                status,
                created,
                tenant,
                customer=f"cus_{s}",
                price=rng.choice(["price_a", "price_b"]),
                amount=rng.choice([900, 2900]),
                quantity=rng.randint(1, 5),
                cancel_at_period_end=rng.random() < 0.3,
            )
            events.append(event(etype, obj, created))
    return events


def expected_state(events):
    "The state after applying `events` once each, in creation order: the last snapshot of each subscription."
    state = {}
    for body in sorted(events, key=lambda b: json.loads(b)["created"]):
        e = json.loads(body)
        if not e["type"].startswith("customer.subscription."):
            continue
        o = e["data"]["object"]
        item = o["items"]["data"][0]
        state[o["id"]] = (
            o["status"],
            item["price"]["id"],
            item["price"]["unit_amount"] * item["quantity"],
            o["cancel_at_period_end"],
            o["customer"],
            e["id"],
        )
    return state


@pytest.mark.postgres
def test_storm_2000_events_8_clients(pg_host_db):
    events = storm_events()
    assert len(events) == 2000
    with pg_host_db.transaction():
        for s in range(50):
            pg_host_db.tenants.insert(TenantCatalog(id=f"t{s:02d}", name=f"Tenant {s}"))
    rng = random.Random(11)
    deliveries = events + rng.sample(events, 600)
    rng.shuffle(deliveries)
    work, results = queue.SimpleQueue(), Counter()
    for d in deliveries:
        work.put(d)

    def client():
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            while True:
                try:
                    body = work.get_nowait()
                except queue.Empty:
                    return
                r = http.post("/stripe/webhook", content=body, headers={"Stripe-Signature": sign(body)})
                results[(r.status_code, r.json().get("duplicate"))] += 1

    with served(pg_host_db) as srv:
        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert results == {(200, False): 2000, (200, True): 600}

    rows = {
        r.stripe_sub_id: (
            r.status,
            r.stripe_price_id,
            r.amount_cents,
            r.cancel_at_period_end,
            r.stripe_cust_id,
            r.last_event_id,
        )
        for r in pg_host_db.subscriptions()
    }
    assert rows == expected_state(events)
    inbox_rows = pg_host_db.q("SELECT event_id, status, attempts FROM core_stripe_webhook_events")
    assert len(inbox_rows) == 2000 and {r["attempts"] for r in inbox_rows} == {1}
    statuses = Counter(r["status"] for r in inbox_rows)
    assert (
        set(statuses) <= {"processed", "skipped_out_of_order", "skipped_superseded"}
        and statuses["processed"] >= 350 + 50
    )
    assert pg_host_db.q("SELECT count(*) AS n FROM core_stripe_customers") == [dict(n=50)]
    effects = Counter(json.loads(a.details)["event_id"] for a in pg_host_db.audit_logs())
    processed = {r["event_id"] for r in inbox_rows if r["status"] == "processed"}
    assert set(effects) == processed and set(effects.values()) == {1}
    # each subscription's applied events are a strictly increasing sequence ending in its last event
    applied = pg_host_db.q("""SELECT w.object_id, w.event_created FROM core_stripe_webhook_events w
                           WHERE w.status = 'processed' AND w.event_type LIKE 'customer.subscription.%'""")
    assert len(applied) == len({(a["object_id"], a["event_created"]) for a in applied})


@pytest.mark.postgres
def test_checkout_and_subscription_creation_racing_do_not_deadlock(pg_endpoint, race, monkeypatch):
    """The Checkout completion holds its locks for a while; the subscription's creation arrives meanwhile. Both take
    the subscription row and the customer mapping: in different orders they would deadlock (one 500)."""
    host_db, post = pg_endpoint
    linked, hold = threading.Event(), lock_waits(host_db)

    def slow_checkout(host_db, tx, event):
        out = sw.on_checkout_session(host_db, tx, event)
        assert tx.flush()  # the new subscription row and the customer mapping written, their locks kept
        linked.set()
        hold()  # until the creation waits
        return out

    monkeypatch.setitem(sw.EVENT_HANDLERS, "checkout.session.completed", slow_checkout)
    session = dict(
        id="cs_1",
        object="checkout.session",
        mode="subscription",
        subscription="sub_1",
        customer="cus_1",
        client_reference_id="acme",
        payment_status="paid",
    )
    checkout = event("checkout.session.completed", session, T0)
    created = event("customer.subscription.created", subscription("sub_1", "trialing", T0, "acme"), T0)
    res = race([lambda: post(checkout), lambda: (linked.wait(10), post(created))[1]])
    assert [r.status_code for r in res] == [200, 200]
    assert {(e.event_type, e.status, e.attempts) for e in host_db.webhook_events()} == {
        ("checkout.session.completed", "processed", 1),
        ("customer.subscription.created", "processed", 1),
    }
    assert [(s.stripe_cust_id, s.status) for s in host_db.subscriptions()] == [("cus_1", "trialing")]


@pytest.mark.postgres
def test_round_trips_on_postgresql(pg_host_db):
    """An event is two round trips of its own (the claim sent with BEGIN, the writes with COMMIT), the first event of a
    subscription three, a repeat delivery two (the claim, then ROLLBACK); psycopg2 leaves autocommit afterwards."""
    pg_host_db.tenants.insert(TenantCatalog(id="acme", name="Acme"))
    sent = []
    sa.event.listen(pg_host_db.engine, "before_cursor_execute", lambda c, cur, st, *a: sent.append(st.split()[0]))

    def apply(body):
        sent.clear()
        out = sw.apply_event(pg_host_db, json.loads(body), body)
        return out.status, out.duplicate, sent[:]

    first = event("customer.subscription.created", subscription("sub_1", "trialing", T0, "acme"), T0)
    update = event("customer.subscription.updated", subscription("sub_1", "active", T0 + 1, "acme"), T0 + 1)
    assert apply(first) == ("processed", False, ["BEGIN;", "WITH", "COMMIT"])
    assert apply(update) == ("processed", False, ["BEGIN;", "UPDATE"])
    assert apply(update) == ("processed", True, ["BEGIN;", "ROLLBACK"])
    with pg_host_db.engine.connect() as conn:
        assert conn.connection.dbapi_connection.autocommit is False
    assert (pg_host_db.subscriptions()[0].status, pg_host_db.audit_logs.count) == ("active", 2)


def test_customer_of_a_tenant_mapped_to_another_is_ignored(endpoint):
    host_db, post = endpoint
    post(event("customer.subscription.created", subscription("sub_1", "active", T0, "acme", customer="cus_1"), T0))
    other = dict(id="cus_2", object="customer", email="x@acme.test", metadata=dict(tenant_id="acme"))
    assert post(event("customer.updated", other, T0 + 5)).json()["status"] == "ignored_no_tenant"
    assert host_db.q("SELECT stripe_cust_id, email FROM core_stripe_customers") == [
        dict(stripe_cust_id="cus_1", email=None)
    ]


@pytest.mark.postgres
def test_own_handler_runs_in_the_events_transaction(pg_endpoint, monkeypatch):
    "An app's handler writing through `host_db` and `tx.execute` commits or rolls back with the event."
    host_db, post = pg_endpoint

    def own(host_db, tx, event):
        audit(host_db, "billing.own_handler", target_id=event["id"])
        tx.execute(sa.text("UPDATE core_tenants SET name = 'Acme Inc' WHERE id = 'acme'"))
        if event["data"]["object"]["id"] == "issfr_fail":
            raise RuntimeError("own handler failed")
        return sw.Outcome("processed", "acme")

    monkeypatch.setitem(sw.EVENT_HANDLERS, "radar.early_fraud_warning.created", own)
    assert post(event("radar.early_fraud_warning.created", dict(id="issfr_fail"), T0)).status_code == 500
    assert (host_db.audit_logs.count, host_db.tenants["acme"].name) == (0, "Acme")
    assert post(event("radar.early_fraud_warning.created", dict(id="issfr_ok"), T0)).json()["status"] == "processed"
    assert (host_db.audit_logs.count, host_db.tenants["acme"].name) == (1, "Acme Inc")


class _Refusing(MemoryOutbox):
    "An outbox whose server refuses one address."

    def send(self, to, subject, body, html=None):
        if to == 'ann@example.com':
            raise ConnectionRefusedError('smtp refused ann')
        super().send(to, subject, body, html)


def test_a_failed_payment_is_mailed_to_the_owners_even_when_one_address_fails(host_db):
    host_db.tenants.insert(TenantCatalog(id="acme", name="Acme"))
    for uid in ('ann', 'bob'):
        host_db.global_users.insert(GlobalUser(id=uid, email=f'{uid}@example.com'))
        host_db.memberships.insert(Membership(user_id=uid, tenant_id='acme', role='owner'))
    outbox, app = _Refusing(), Starlette()
    sw.add_stripe_webhook(
        app, host_db, secrets=[SECRET], after=sw.payment_failed_mail(host_db, outbox, 'https://app.test/billing')
    )
    inv = dict(
        id='in_1',
        object='invoice',
        customer='cus_1',
        parent=dict(subscription_details=dict(subscription='sub_1', metadata={'tenant_id': 'acme'})),
    )
    body = event('invoice.payment_failed', inv, T0)
    with ServedApp(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        r = http.post('/stripe/webhook', content=body, headers={'Stripe-Signature': sign(body)})
    assert (r.status_code, r.json()['status']) == (200, 'processed')
    assert [m['To'] for m in outbox.messages] == ['bob@example.com']
    assert outbox.last_to('bob@example.com')['Subject'] == 'A payment for Acme failed'
