"""The account, team and two-factor pages in Chromium against `fh-saas demo`: what the user sees after each action,
and that the change is real (another device signed out, a new address to log in with, a tenant gone from the list)."""

import re

import pyotp
import pytest
from playwright.sync_api import expect

from browser_helpers import chromium, csp_violations, log_in, screenshots_on_failure, served_demo, sign_up


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    with served_demo(tmp_path_factory.mktemp("account-demo")) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def new_page(browser):
    page = browser.new_context().new_page()
    page.set_default_timeout(20_000)
    return page


@pytest.mark.browser
def test_name_sessions_and_password_across_two_devices(demo, browser):
    base, email, old, new = demo, "erin@epsilon.test", "epsilon password 1234", "epsilon password 5678"
    one, two = new_page(browser), new_page(browser)
    violations = [csp_violations(one), csp_violations(two)]
    with screenshots_on_failure("account-devices", one=one, two=two):
        sign_up(one, base, email, old, "Erin", "Epsilon Co")
        one.wait_for_url("**/projects")
        log_in(two, base, email, old)
        two.wait_for_url("**/projects")

        # The name, saved on one device, is the account's: the other device's account page shows it too.
        one.goto(f"{base}/account")
        one.fill("form[action='/account/name'] input[name=name]", "Erin Example")
        one.click("button:has-text('Save name')")
        one.wait_for_url("**/account?done=name_changed")
        expect(one.locator("main")).to_contain_text("Your name has been saved.")
        expect(one.locator("main")).to_contain_text("Name: Erin Example")
        two.goto(f"{base}/account")
        expect(two.locator("main")).to_contain_text("Name: Erin Example")

        # Both devices are listed; one signs the other out, which is refused on its next request.
        devices = one.locator(".card", has_text="Where you are signed in").locator("tbody tr")
        expect(devices).to_have_count(2)
        expect(devices.filter(has_text="this device")).to_have_count(1)
        devices.locator("button:has-text('Sign out')").click()
        one.wait_for_url("**/account?done=session_ended")
        expect(one.locator("main")).to_contain_text("That device has been signed out.")
        expect(devices).to_have_count(1)
        two.goto(f"{base}/projects")
        assert "/login" in two.url

        # A wrong current password changes nothing; the right one changes it and signs the other device out.
        log_in(two, base, email, old)
        two.wait_for_url("**/projects")

        def change_password(current):
            one.fill("form[action='/account/password'] input[name=current]", current)
            one.fill("form[action='/account/password'] input[name=password]", new)
            one.fill("form[action='/account/password'] input[name=confirm]", new)
            one.click("button:has-text('Change password')")

        change_password("not my password 1234")
        one.wait_for_url("**/account?done=password_wrong")
        expect(one.locator("main")).to_contain_text(
            "The current password is wrong. Your password has not been changed."
        )
        two.goto(f"{base}/projects")
        assert "/projects" in two.url
        change_password(old)
        one.wait_for_url("**/account?done=password_changed")
        expect(one.locator("main")).to_contain_text("Every other device has been signed out.")
        two.goto(f"{base}/projects")
        assert "/login" in two.url
        log_in(two, base, email, old)
        expect(two.locator("main")).to_contain_text("Wrong email or password.")
        log_in(two, base, email, new)
        two.wait_for_url("**/projects")
        one.goto(f"{base}/projects")
        assert "/projects" in one.url  # the device that changed it stays signed in
    assert violations == [[], []]


def mail_to(page, base, address) -> list[str]:
    "The text of every message /dev/mail shows sent to `address`, newest first."
    page.goto(f"{base}/dev/mail")
    cards = page.locator("main .card").filter(has=page.locator("p", has_text=f" to {address}"))
    return [c.inner_text() for c in cards.all()]


@pytest.mark.browser
def test_a_new_email_address_counts_once_its_link_is_opened(demo, browser):
    base, old, new, password = demo, "finn@eta.test", "finn@theta.test", "eta password 1234"
    page, other = new_page(browser), new_page(browser)
    violations = [csp_violations(page), csp_violations(other)]
    with screenshots_on_failure("account-email", page=page, other=other):
        sign_up(page, base, old, password, "Finn", "Eta Co")
        page.wait_for_url("**/projects")
        page.goto(f"{base}/account")
        page.fill("form[action='/account/email'] input[name=email]", new)
        page.fill("form[action='/account/email'] input[name=password]", password)
        page.click("button:has-text('Change email address')")
        page.wait_for_url("**/account?done=email_change_sent")
        expect(page.locator("main")).to_contain_text("We sent a link to the new address.")

        # Nothing has changed yet: the old address is still the account's, and the new one cannot log in.
        expect(page.locator("main")).to_contain_text(f"Email: {old}")
        expect(page.locator("header, nav, body").first).to_contain_text(old)
        told = mail_to(page, base, old)
        assert any("Your email address is being changed" in m and new in m for m in told), told
        sent = mail_to(page, base, new)
        assert len(sent) == 1 and "Confirm your new email address" in sent[0], sent
        link = re.search(r"http://\S+/verify-email/new-address/[\w-]+", sent[0]).group(0)
        log_in(other, base, new, password)
        expect(other.locator("main")).to_contain_text("Wrong email or password.")

        # The link, opened signed out, makes the new address the account's: it logs in, the old one no longer does.
        other.goto(link)
        expect(other.locator("main")).to_contain_text("Your account now uses this address")
        log_in(other, base, old, password)
        expect(other.locator("main")).to_contain_text("Wrong email or password.")
        log_in(other, base, new, password)
        other.wait_for_url("**/projects")
        other.goto(f"{base}/account")
        expect(other.locator("main")).to_contain_text(f"Email: {new}")
        other.goto(link)
        expect(other.locator("main")).to_contain_text("This link is invalid, expired or already used.")
    assert violations == [[], []]


@pytest.mark.browser
def test_an_admin_renames_the_tenant_then_leaves_it_and_its_only_owner_cannot(demo, browser):
    base, owner, admin = demo, new_page(browser), new_page(browser)
    violations, asked = [csp_violations(owner), csp_violations(admin)], []
    for p in (owner, admin):
        p.on("dialog", lambda d: (asked.append(d.message), d.accept()))
    with screenshots_on_failure("team", owner=owner, admin=admin):
        sign_up(owner, base, "gwen@iota.test", "iota password 1234", "Gwen", "Iota Co")
        owner.wait_for_url("**/projects")
        owner.goto(f"{base}/team")
        owner.fill("form[action='/team/invite'] input[name=email]", "hal@iota.test")
        owner.select_option("form[action='/team/invite'] select[name=role]", "admin")
        owner.click("button:has-text('Send invitation')")
        link = re.search(r"http://\S+/invitations/[\w-]+", mail_to(owner, base, "hal@iota.test")[0]).group(0)
        admin.goto(link)
        admin.click("text=Create an account")
        admin.fill("input[name=password]", "hal password 1234")
        admin.fill("input[name=name]", "Hal")
        admin.click("button:has-text('Create account')")
        admin.click("button:has-text('Accept invitation')")
        admin.wait_for_url("**/projects")

        # Hal, an admin, renames the tenant: the top bar's switcher shows the new name, for him and for Gwen.
        admin.goto(f"{base}/team")
        admin.fill("form[action='/team/rename'] input[name=name]", "Iota Labs")
        admin.click("button:has-text('Rename')")
        admin.wait_for_url("**/team?done=renamed")
        expect(admin.locator("main")).to_contain_text("The tenant has its new name.")
        expect(admin.locator(".switcher summary")).to_contain_text("Iota Labs")
        owner.goto(f"{base}/projects")
        expect(owner.locator(".switcher summary")).to_contain_text("Iota Labs")

        # Hal leaves: asked first, then the tenant is gone from his list and Gwen's team no longer has him.
        admin.goto(f"{base}/team")
        admin.click("button:has-text('Leave this tenant')")
        admin.wait_for_url("**/tenants?done=left")
        expect(admin.locator("main")).to_contain_text("You have left the tenant.")
        expect(admin.locator("main")).not_to_contain_text("Iota Labs")
        owner.goto(f"{base}/team")
        expect(owner.locator("main table").first).not_to_contain_text("hal@iota.test")

        # Gwen, its only owner, is told to hand over first, and stays.
        owner.click("button:has-text('Leave this tenant')")
        owner.wait_for_url("**/team?done=last_owner")
        expect(owner.locator("main")).to_contain_text("You are this tenant's only owner")
        owner.goto(f"{base}/tenants")
        expect(owner.locator("main table")).to_contain_text("Iota Labs")
    assert asked == ["Leave Iota Labs? You lose access to its data until someone invites you again."] * 2
    assert violations == [[], []]


def turn_on_two_factor(page, base) -> pyotp.TOTP:
    page.goto(f"{base}/account")
    page.click("button:has-text('Set up two-factor sign-in')")
    app = pyotp.TOTP(page.locator("#two-factor-secret").inner_text().replace(" ", ""))
    page.fill("input[name=code]", app.now())
    page.click("button:has-text('Turn on')")
    page.wait_for_url("**/account?done=two_factor_enabled")
    return app


@pytest.mark.browser
def test_a_tenant_requires_two_factor_and_an_admin_resets_it(demo, browser):
    base, owner, member, admin = demo, new_page(browser), new_page(browser), new_page(browser)
    violations, asked = [csp_violations(p) for p in (owner, member, admin)], []
    admin.on("dialog", lambda d: (asked.append(d.message), d.accept()))
    with screenshots_on_failure("two-factor-rules", owner=owner, member=member, admin=admin):
        sign_up(owner, base, "ines@kappa.test", "kappa password 1234", "Ines", "Kappa Co")
        owner.wait_for_url("**/projects")
        owner.goto(f"{base}/team")
        owner.fill("form[action='/team/invite'] input[name=email]", "jo@kappa.test")
        owner.click("button:has-text('Send invitation')")
        link = re.search(r"http://\S+/invitations/[\w-]+", mail_to(owner, base, "jo@kappa.test")[0]).group(0)
        member.goto(link)
        member.click("text=Create an account")
        member.fill("input[name=password]", "jo password 1234")
        member.click("button:has-text('Create account')")
        member.click("button:has-text('Accept invitation')")
        member.wait_for_url("**/projects")

        # The owner must have it herself first; then members must.
        owner.goto(f"{base}/team")
        owner.click("button:has-text('Require two-factor sign-in')")
        owner.wait_for_url("**/team?done=two_factor_yours_first")
        expect(owner.locator("main")).to_contain_text("Turn on two-factor sign-in for your own account first")
        turn_on_two_factor(owner, base)
        owner.goto(f"{base}/team")
        owner.click("button:has-text('Require two-factor sign-in')")
        owner.wait_for_url("**/team?done=two_factor_required")
        expect(owner.locator("main")).to_contain_text("Members must use two-factor sign-in.")

        # Jo, without it, is sent to set it up on her next request; once on, the tenant is hers again.
        member.goto(f"{base}/projects")
        member.wait_for_url("**/account?done=two_factor_required")
        expect(member.locator("main")).to_contain_text("A workspace you belong to requires two-factor sign-in.")
        turn_on_two_factor(member, base)
        member.goto(f"{base}/projects")
        assert member.url.endswith("/projects")

        # The system admin resets Jo's two-factor sign-in: she is signed out and signs in with her password alone.
        log_in(admin, base, "demo@example.com", "demo password 1234")
        admin.wait_for_url("**/projects")
        admin.goto(f"{base}/admin/users")
        admin.locator("tr", has_text="jo@kappa.test").locator("button:has-text('Reset two-factor')").click()
        admin.wait_for_url("**/admin/users?done=two_factor_reset")
        expect(admin.locator("main")).to_contain_text("Two-factor sign-in is off for that user")
        member.goto(f"{base}/projects")
        assert "/login" in member.url
        log_in(member, base, "jo@kappa.test", "jo password 1234")
        member.wait_for_url("**/account?done=two_factor_required")
        expect(member.locator("main")).to_contain_text("Set up two-factor sign-in")
    assert asked == ["Turn off two-factor sign-in for jo@kappa.test and sign them out everywhere?"]
    assert violations == [[], [], []]
