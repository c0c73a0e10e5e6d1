"""The demo SaaS in a real browser: Debian's Chromium driven by Playwright against `fh-saas demo` served by uvicorn.

One story, as two people and an admin live it: sign up (the tenant is provisioned by the worker), keep data in
the tenant's own database, hit a feature the plan lacks, invite a teammate who accepts in another browser,
switch tenants without ever seeing the other tenant's data, and have an admin suspend the tenant so its members
are refused on their very next request. Screenshots of every page are saved to test-artifacts/ on failure.
"""
import os, re, shutil, subprocess, sys, time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from pgserver import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"
DEMO_EMAIL, DEMO_PASSWORD = "demo@example.com", "demo password 1234"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    "The demo served by `fh-saas demo` in its own process, on a fresh SQLite folder."
    port, folder = free_port(), tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "FH_SAAS_", "STRIPE_"))}
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from fh_saas.cli import main; sys.exit(main())",
                             "demo", "--folder", str(folder), "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/pricing", timeout=2).status_code == 200: break
        except httpx.TransportError: pass
        if proc.poll() is not None: pytest.fail(f"the demo exited early:\n{proc.stdout.read()}")
        time.sleep(0.2)
    else: pytest.fail("the demo did not start within 60 s")
    yield base
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


@contextmanager
def screenshots_on_failure(name, **pages):
    "Save a full-page screenshot of each page when the block fails."
    try: yield
    except BaseException:
        ARTIFACTS.mkdir(exist_ok=True)
        for who, page in pages.items():
            try: page.screenshot(path=str(ARTIFACTS / f"{name}-{who}.png"), full_page=True)
            except Exception: pass
        raise


def sign_up(page, base, email, password, name, company=None):
    page.goto(f"{base}/signup")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", password)
    page.fill("input[name=name]", name)
    if company: page.fill("input[name=company]", company)
    page.click("button:has-text('Create account')")


def log_in(page, base, email, password):
    page.goto(f"{base}/login")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", password)
    page.click("button:has-text('Log in')")


def add_project(page, name):
    page.fill("input[name=name]", name)
    page.click("button:has-text('Create')")
    expect(page.locator("main table")).to_contain_text(name)


def test_two_teams_an_invitation_and_a_suspension(demo, browser):
    base = demo
    alice, bob, admin = (browser.new_context().new_page() for _ in range(3))
    for p in (alice, bob, admin): p.set_default_timeout(20_000)
    admin.on("dialog", lambda d: d.accept())
    with screenshots_on_failure("story", alice=alice, bob=bob, admin=admin):
        # Alice signs up; the worker creates Alpha's database while the page shows progress, then she lands in it.
        sign_up(alice, base, "alice@alpha.test", "alpha password 1234", "Alice", "Alpha Co")
        alice.wait_for_url("**/projects")
        add_project(alice, "Alpha roadmap")

        # The free plan has projects but not exports: the export sends her to the pricing page.
        alice.click("text=Export CSV (Pro)")
        alice.wait_for_url("**/pricing")
        expect(alice.locator("main")).to_contain_text("Pro")

        # Bob has his own team, Beta, with its own data.
        sign_up(bob, base, "bob@beta.test", "beta password 1234", "Bob", "Beta Co")
        bob.wait_for_url("**/projects")
        add_project(bob, "Beta secret")

        # Alice invites Bob to Alpha; the invitation arrives by mail.
        alice.goto(f"{base}/team")
        alice.fill("input[name=email]", "bob@beta.test")
        alice.click("button:has-text('Send invitation')")
        expect(alice.locator("main")).to_contain_text("Invitation sent to bob@beta.test")
        bob.goto(f"{base}/dev/mail")
        link = re.search(r"http://\S+/invitations/[\w-]+", bob.locator("main").inner_text()).group(0)

        # Bob accepts in his own browser and is switched to Alpha: Alpha's data, never Beta's.
        bob.goto(link)
        bob.click("button:has-text('Accept invitation')")
        bob.wait_for_url("**/projects")
        expect(bob.locator("main")).to_contain_text("Alpha roadmap")
        expect(bob.locator("main")).not_to_contain_text("Beta secret")

        # Switching back to Beta shows Beta's data, never Alpha's.
        bob.goto(f"{base}/tenants")
        bob.locator("tr", has_text="Beta Co").locator("button:has-text('Switch')").click()
        bob.goto(f"{base}/projects")
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
