"""The demo SaaS in a real browser: Debian's Chromium driven by Playwright against `fh-saas demo` served by uvicorn.

One story, as two people and an admin live it: sign up (the tenant is provisioned by the worker), keep data in
the tenant's own database, hit a feature the plan lacks, invite a teammate who accepts in another browser,
switch tenants without ever seeing the other tenant's data, and have an admin suspend the tenant so its members
are refused on their very next request. Then an upgrade, with the demo's Stripe SDK pointed at the local Stripe
stand-in: the owner of a free tenant chooses Pro, pays on the stand-in's hosted Checkout page, and the signed events
Stripe sends next, delivered over HTTP to the demo's webhook, unlock the Pro feature. And two-factor sign-in on a
phone-sized screen. Screenshots of every page are saved to test-artifacts/ on failure.
"""

import json, re, time
from pathlib import Path

import httpx
import pyotp
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from playwright.sync_api import expect

from browser_helpers import chromium, csp_violations, log_in, screenshots_on_failure, served_demo, sign_up
from stripe_helpers import SECRET, ServedApp, sign
from stripe_standin import FakeStripe

DEMO_EMAIL, DEMO_PASSWORD = "demo@example.com", "demo password 1234"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    "The demo without Stripe."
    with served_demo(tmp_path_factory.mktemp("demo")) as base:
        yield base


@pytest.fixture(scope="module")
def stripe_standin():
    "The Stripe stand-in, serving its own hosted Checkout page, over real HTTP."
    fake = FakeStripe(hosts_checkout=True)
    with ServedApp(fake.app()) as srv:
        yield fake, srv.url


@pytest.fixture(scope="module")
def paid_demo(tmp_path_factory, stripe_standin):
    "The demo with Stripe configured: the SDK talks to the stand-in, the webhook checks our signing secret."
    with served_demo(
        tmp_path_factory.mktemp("paid-demo"),
        STRIPE_SECRET_KEY="sk_test_standin",
        STRIPE_API_BASE=stripe_standin[1],
        STRIPE_WEBHOOK_SECRET=SECRET,
    ) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def add_project(page, name):
    page.fill("input[name=name]", name)
    page.click("button:has-text('Create')")
    expect(page.locator("main table")).to_contain_text(name)


@pytest.mark.browser
def test_two_teams_an_invitation_and_a_suspension(demo, browser):
    base = demo
    alice, bob, admin = (browser.new_context().new_page() for _ in range(3))
    for p in (alice, bob, admin):
        p.set_default_timeout(20_000)
    violations = {who: csp_violations(p) for who, p in dict(alice=alice, bob=bob, admin=admin).items()}
    asked = []  # the confirmations the admin's buttons ask: the first is dismissed
    admin.on("dialog", lambda d: (asked.append(d.message), d.dismiss() if len(asked) == 1 else d.accept()))
    with screenshots_on_failure("story", alice=alice, bob=bob, admin=admin):
        # Alice signs up; the worker creates Alpha's database while the page shows progress, then she lands in it.
        sign_up(alice, base, "alice@alpha.test", "alpha password 1234", "Alice", "Alpha Co")
        alice.wait_for_url("**/projects")
        add_project(alice, "Alpha roadmap")

        # The free plan has projects but not exports: the export sends her to the pricing page.
        alice.click("text=Export CSV (Pro)")
        alice.wait_for_url("**/pricing?feature=exports")
        expect(alice.locator("main")).to_contain_text("Your plan does not include exports. It comes with Pro.")

        # Bob has his own team, Beta, with its own data.
        sign_up(bob, base, "bob@beta.test", "beta password 1234", "Bob", "Beta Co")
        bob.wait_for_url("**/projects")
        add_project(bob, "Beta secret")

        # Alice invites Bob to Alpha; the invitation arrives by mail.
        alice.goto(f"{base}/team")
        alice.fill("input[name=email]", "bob@beta.test")
        alice.click("button:has-text('Send invitation')")
        expect(alice.locator("main")).to_contain_text("Invitation sent.")
        bob.goto(f"{base}/dev/mail")
        link = re.search(r"http://\S+/invitations/[\w-]+", bob.locator("main").inner_text()).group(0)
        shown = bob.frame_locator("iframe.mail-html").first  # the HTML part, as a mail client shows it
        expect(shown.locator("body")).to_contain_text("fh_saas demo")
        expect(shown.locator("body")).to_contain_text(f"Or open {link}")

        # Bob accepts in his own browser and is switched to Alpha: Alpha's data, never Beta's.
        bob.goto(link)
        bob.click("button:has-text('Accept invitation')")
        bob.wait_for_url("**/projects")
        expect(bob.locator("main")).to_contain_text("Alpha roadmap")
        expect(bob.locator("main")).not_to_contain_text("Beta secret")

        # Switching back to Beta shows Beta's data, never Alpha's.
        # (with the top bar's switcher: the tenant's badge opens the other tenants, fetched by htmx)
        bob.click("summary[title='Switch tenant']")
        bob.locator(".switcher .menu button", has_text="Beta Co").click()
        bob.wait_for_url("**/projects")
        expect(bob.locator(".switcher summary")).to_contain_text("Beta Co")
        expect(bob.locator("main")).to_contain_text("Beta secret")
        expect(bob.locator("main")).not_to_contain_text("Alpha roadmap")

        # Alice's team page lists both of them.
        alice.goto(f"{base}/team")
        expect(alice.locator("main table")).to_contain_text("bob@beta.test")

        # The system admin suspends Alpha; Alice is refused on her very next request.
        log_in(admin, base, DEMO_EMAIL, DEMO_PASSWORD)
        admin.goto(f"{base}/admin")
        admin.locator("tr", has_text="Alpha Co").locator("button:has-text('Suspend')").click()
        expect(admin.locator("tr", has_text="Alpha Co")).to_contain_text("suspended")
        alice.goto(f"{base}/projects")
        assert "/projects" not in alice.url
        expect(alice.locator("main")).not_to_contain_text("Alpha roadmap")

        # Bob, working in Beta, is unaffected.
        bob.goto(f"{base}/projects")
        expect(bob.locator("main")).to_contain_text("Beta secret")

        # The admin acts as Bob, then ends it with the banner's button (a POST with the form token).
        admin.goto(f"{base}/admin/users")
        admin.locator("tr", has_text="bob@beta.test").locator("button:has-text('Impersonate')").click()
        expect(admin.locator(".impersonating")).to_contain_text("You are acting as bob@beta.test")
        admin.click("button:has-text('Stop impersonating')")
        admin.wait_for_url("**/admin/users?done=stopped")
        expect(admin.locator("main")).to_contain_text("You are yourself again")

        # Deleting Alpha asks first (fh_saas.js, no inline script): dismissed, nothing happens; accepted, it starts.
        admin.goto(f"{base}/admin")
        admin.locator("tr", has_text="Alpha Co").locator("button:has-text('Delete')").click()
        admin.locator("tr", has_text="Alpha Co").locator("button:has-text('Delete')").click()
        expect(admin.locator("tr", has_text="Alpha Co")).to_contain_text("deletion")
        assert len(asked) == 2 and all("Delete tenant" in m for m in asked), asked

        # Disabling Bob (asked first) refuses him at once and keeps him out; enabling lets him log in again.
        admin.goto(f"{base}/admin/users")
        admin.locator("tr", has_text="bob@beta.test").locator("button:has-text('Disable')").click()
        admin.wait_for_url("**/admin/users?done=disabled")
        expect(admin.locator("main")).to_contain_text("That user is disabled")
        assert len(asked) == 3 and asked[2].startswith("Disable bob@beta.test?"), asked
        bob.goto(f"{base}/projects")
        assert "/login" in bob.url
        log_in(bob, base, "bob@beta.test", "beta password 1234")
        expect(bob.locator("main")).to_contain_text("Wrong email or password.")
        admin.locator("tr", has_text="bob@beta.test").locator("button:has-text('Enable')").click()
        admin.wait_for_url("**/admin/users?done=enabled")
        expect(admin.locator("main")).to_contain_text("Their API keys stay revoked")
        log_in(bob, base, "bob@beta.test", "beta password 1234")
        expect(bob).not_to_have_url(re.compile(r"/login"))

        # Bob logs out with the top bar's button; his session is over.
        bob.click("button:has-text('Log out')")
        bob.wait_for_url("**/login")
        bob.goto(f"{base}/projects")
        assert "/login" in bob.url
    assert violations == dict(alice=[], bob=[], admin=[])


@pytest.mark.browser
def test_an_owner_deletes_her_tenant_and_then_her_account(demo, browser):
    page = browser.new_context().new_page()
    page.set_default_timeout(20_000)
    violations, asked = csp_violations(page), []
    page.on("dialog", lambda d: (asked.append(d.message), d.accept()))
    with screenshots_on_failure("deletion", dana=page):
        sign_up(page, demo, "dana@delta.test", "delta password 1234", "Dana", "Delta Co")
        page.wait_for_url("**/projects")

        # The team page's danger zone: her tenant's name typed, the browser asks once more, and it is being deleted.
        page.goto(f"{demo}/team")
        page.fill("form[action='/team/delete'] input[name=name]", "Delta Co")
        page.click("button:has-text('Delete this tenant')")
        page.wait_for_url("**/tenants?done=deleting")
        expect(page.locator("main")).to_contain_text("The tenant is being deleted")  # (the demo's worker may be done)

        # A tenant going away needs no owner, so her account can go too; she lands on the login page, signed out.
        page.goto(f"{demo}/account")
        page.fill("form[action='/account/delete'] input[name=password]", "delta password 1234")
        page.fill("form[action='/account/delete'] input[name=email]", "dana@delta.test")
        page.click("button:has-text('Delete my account')")
        page.wait_for_url("**/login?done=account_deleted")
        expect(page.locator("main")).to_contain_text("Your account has been deleted")
        page.goto(f"{demo}/account")
        assert "/login" in page.url
    assert asked == ["Delete Delta Co and all its data for good?", "Delete your account for good?"]
    assert violations == []


@pytest.mark.browser
def test_pages_cannot_be_framed_even_by_the_same_site(demo, browser):
    "/team's one-click forms cannot be clickjacked: the browser refuses to show the page in a frame."
    base = demo
    page = browser.new_context().new_page()
    page.set_default_timeout(20_000)
    refused = csp_violations(page)
    with screenshots_on_failure("framing", page=page):
        log_in(page, base, DEMO_EMAIL, DEMO_PASSWORD)
        page.wait_for_url("**/projects")
        page.goto(f"{base}/pricing")  # a page of the site itself frames /team
        page.evaluate(
            "url => { const f = document.createElement('iframe'); f.src = url; document.body.append(f); }",
            f"{base}/team",
        )
        page.wait_for_function("() => document.querySelector('iframe').contentDocument === null")
        assert any("frame-ancestors" in m for m in refused), refused


def fits(page) -> bool:
    "Whether the page is no wider than the window (nothing to scroll sideways)."
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


@pytest.mark.browser
def test_two_factor_sign_in_on_a_phone(demo, browser):
    "On a 390 px wide screen: turn two-factor sign-in on with the key shown, sign out, sign in with a code."
    base, email, password = demo, "carol@gamma.test", "gamma password 1234"
    page = browser.new_context(viewport=dict(width=390, height=844)).new_page()
    page.set_default_timeout(20_000)
    with screenshots_on_failure("two-factor", carol=page):
        sign_up(page, base, email, password, "Carol", "Gamma Co")
        page.wait_for_url("**/projects")
        page.goto(f"{base}/account")
        page.click("button:has-text('Set up two-factor sign-in')")
        expect(page.locator("main svg")).to_be_visible()
        assert fits(page)
        app = pyotp.TOTP(page.locator("#two-factor-secret").inner_text().replace(" ", ""))
        page.fill("input[name=code]", app.now())
        page.click("button:has-text('Turn on')")
        expect(page.locator("#recovery-codes li")).to_have_count(10)
        assert fits(page)
        page.click("button:has-text('Log out')")
        page.wait_for_url("**/login")
        log_in(page, base, email, password)
        page.wait_for_url("**/login/two-factor**")
        assert fits(page)
        page.fill("input[name=code]", app.at(time.time() + 30))  # the next step's code: the one used is spent
        page.click("button:has-text('Verify')")
        page.wait_for_url("**/projects")
        assert fits(page)
        page.goto(f"{base}/account")
        expect(page.locator("main")).to_contain_text("10 recovery codes left")
        assert fits(page)


def deliver(base, event) -> dict:
    "POST `event` to the demo's webhook signed as Stripe signs it; Stripe's view of the answer."
    payload = json.dumps(event)
    r = httpx.post(
        f"{base}/stripe/webhook",
        content=payload,
        timeout=10,
        headers={"Stripe-Signature": sign(payload), "Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text
    return r.json()


def export_refused(page, base) -> bool:
    "Whether the export, fetched with the page's session, is refused for want of the `exports` feature."
    r = page.request.get(f"{base}/projects/export", max_redirects=0)
    return r.status == 402 and "does not include 'exports'" in r.text()


@pytest.mark.browser
@pytest.mark.stripe
def test_upgrade_through_checkout_is_unlocked_by_the_webhook(paid_demo, stripe_standin, browser):
    base, (fake, stripe_url) = paid_demo, stripe_standin
    alice = browser.new_context().new_page()
    alice.set_default_timeout(20_000)
    violations = csp_violations(alice)
    with screenshots_on_failure("upgrade", alice=alice):
        # The demo created Pro's Stripe prices at start, through the SDK pointed at the stand-in.
        prices = {
            (o["unit_amount"], o["recurring"]["interval"]): o["id"]
            for o in fake.objects.values()
            if o["object"] == "price"
        }
        assert set(prices) == {(1900, "month"), (19000, "year")}

        # Alice's new tenant is on the free plan: projects yes, exports no.
        sign_up(alice, base, "alice@gamma.test", "gamma password 1234", "Alice", "Gamma Co")
        alice.wait_for_url("**/projects")
        add_project(alice, "Gamma launch")
        add_project(alice, "=1+2")  # a cell a spreadsheet would run as a formula, but for the export's escaping
        assert export_refused(alice, base)

        # She chooses Pro monthly and lands on the (stand-in's) hosted Checkout page for the monthly price.
        alice.goto(f"{base}/pricing")
        alice.locator(".card.plan", has_text="Pro").locator("button:has-text('Choose Pro monthly')").click()
        alice.wait_for_url(f"{stripe_url}/c/pay/cs_test_*")
        expect(alice.locator("body")).to_contain_text(prices[(1900, "month")])
        session = fake.objects[alice.url.rsplit("/", 1)[1]]
        tenant_id = session["metadata"]["tenant_id"]
        assert (
            session["client_reference_id"] == tenant_id and session["subscription_data"]["metadata"]["plan_id"] == "pro"
        )

        # She pays and is sent back to billing; until Stripe's events arrive nothing is unlocked.
        alice.click("button:has-text('Pay')")
        alice.wait_for_url("**/billing?checkout=success")
        expect(alice.locator("main")).to_contain_text("Thank you")
        assert export_refused(alice, base)

        # Stripe's events for the payment reach the webhook, signed; Pro (on its 14-day trial) is now the tenant's plan.
        completed, created = fake.events
        assert (completed["type"], created["type"]) == ("checkout.session.completed", "customer.subscription.created")
        assert created["data"]["object"]["metadata"]["tenant_id"] == tenant_id
        forged = json.dumps(created)
        r = httpx.post(
            f"{base}/stripe/webhook",
            content=forged,
            headers={"Stripe-Signature": sign(forged, "whsec_not_ours")},
            timeout=10,
        )
        assert r.status_code == 400 and export_refused(alice, base)  # a forged event unlocks nothing
        assert [deliver(base, e)["status"] for e in fake.events] == ["processed", "processed"]
        # Stripe redelivers: no second effect
        assert deliver(base, created) == dict(status="processed", duplicate=True)

        alice.goto(f"{base}/billing")
        sub = alice.locator(".card", has_text="Subscription")
        expect(sub).to_contain_text("Pro")
        expect(sub).to_contain_text("trialing")
        expect(sub).to_contain_text(created["data"]["object"]["id"])
        expect(alice.locator(".card", has_text="Plan features")).to_contain_text("exports")

        # The export now downloads her tenant's projects as CSV.
        alice.goto(f"{base}/projects")
        with alice.expect_download() as download:
            alice.click("text=Export CSV (Pro)")
        assert download.value.suggested_filename == "projects.csv"
        rows = Path(download.value.path()).read_text().splitlines()
        assert rows[0] == "name,created_at" and rows[1].startswith("Gamma launch,") and len(rows) == 3
        assert rows[2].startswith("'=1+2,")
    assert violations == []


@pytest.mark.postgres
def test_the_demo_runs_on_postgresql_unchanged(second_pg_server, tmp_path):
    "With DB_TYPE=POSTGRESQL the same demo keeps its host database and its tenants' databases on PostgreSQL."
    u = make_url(second_pg_server.create_database("demo_host"))
    settings = dict(
        DB_TYPE="POSTGRESQL",
        DB_USER=u.username,
        DB_PASS=u.password,
        DB_HOST=u.host,
        DB_PORT=str(u.port),
        DB_NAME=u.database,
    )
    with served_demo(tmp_path / "demo", **settings) as base, httpx.Client(base_url=base) as c:
        r = c.post("/login", data=dict(email=DEMO_EMAIL, password=DEMO_PASSWORD), follow_redirects=True)
        assert r.url.path == "/projects"
        tag = re.search(r'<input[^>]*name="csrf"[^>]*>', c.get("/projects").text).group(0)
        c.post("/projects", data=dict(name="Stored in PostgreSQL", csrf=re.search(r'value="(\w+)"', tag).group(1)))
        assert "Stored in PostgreSQL" in c.get("/projects").text
    eng = sa.create_engine(second_pg_server.url("tenant_demo"), poolclass=sa.pool.NullPool)
    with eng.connect() as conn:
        assert conn.exec_driver_sql("SELECT name FROM projects").scalars().all() == ["Stored in PostgreSQL"]
    eng.dispose()
    assert not (tmp_path / "demo" / "tenants").exists()
