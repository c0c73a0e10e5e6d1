"""Every page of the demo at a phone's width (390 px) and a laptop's (1280 px), in Chromium: none scrolls sideways.

A visitor's pages, then the demo's system admin's (a member of the demo tenant, with a project, a member and an API
key, so the tables have rows): the pages are found by following the links each page shows, from the home page and
the navigation, so a new page is walked as soon as something links to it. Each page's whole length is saved as a
screenshot in test-artifacts/widths/ (look at them), and the test fails naming every page wider than the screen.
"""

import re
from urllib.parse import urljoin, urlsplit

import pytest
from playwright.sync_api import expect

from browser_helpers import ARTIFACTS, chromium, served_demo

DEMO_EMAIL, DEMO_PASSWORD = "demo@example.com", "demo password 1234"
WIDTHS = {"phone": (390, 844), "laptop": (1280, 800)}
# Links not to follow: they change state, leave the site's pages, or are files rather than pages.
SKIP = re.compile(r"^/(logout|admin/impersonate|dev/mail|api/|_fh_saas/|static/|projects/export)|\.(csv|json)$")
MAX_PAGES = 60


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    with served_demo(tmp_path_factory.mktemp("widths-demo")) as base:
        yield base


def _links(page, base) -> list[str]:
    "The same-site page paths `page` links to, query strings dropped (a `?done=` notice is the same page)."
    hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))")
    paths = []
    for href in hrefs:
        url = urlsplit(urljoin(page.url, href))
        if f"{url.scheme}://{url.netloc}" == base and not SKIP.search(url.path):
            paths.append(url.path)
    return paths


def _walk(page, base, start: list[str], name: str) -> dict[str, int]:
    "Visit every page reachable from `start`; the width of each page wider than the window, by path."
    seen, todo, wide = set(), list(start), {}
    width = page.viewport_size["width"]
    while todo and len(seen) < MAX_PAGES:
        path = todo.pop(0)
        if path in seen:
            continue
        seen.add(path)
        page.goto(base + path)
        scroll = page.evaluate("document.documentElement.scrollWidth")
        if scroll > page.evaluate("window.innerWidth"):
            wide[path] = scroll
        shot = re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-") or "home"
        page.screenshot(path=str(ARTIFACTS / "widths" / f"{name}-{width}-{shot}.png"), full_page=True)
        todo += [p for p in _links(page, base) if p not in seen]
    assert len(seen) < MAX_PAGES, f"more than {MAX_PAGES} pages: {sorted(seen)}"
    return wide


def _signed_in(context, base):
    "The demo's admin, signed in, with a project, a teammate's invitation and an API key in the demo tenant."
    page = context.new_page()
    page.goto(f"{base}/login")
    page.fill("input[name=email]", DEMO_EMAIL)
    page.fill("input[name=password]", DEMO_PASSWORD)
    page.click("button:has-text('Log in')")
    page.wait_for_url(lambda url: "/login" not in url)
    page.goto(f"{base}/projects")
    page.fill("input[name=name]", "A project with a rather long name to see how the table copes on a phone")
    page.click("button:has-text('Create')")
    page.goto(f"{base}/team")
    page.fill("input[name=email]", "a.teammate.with.a.long.address@subdomain.example.com")
    page.click("button:has-text('Send invitation')")
    page.goto(f"{base}/api-keys")
    page.fill("input[name=name]", "Reporting")
    page.click("button:has-text('Create key')")
    expect(page.locator("main")).to_contain_text("Reporting")
    return page


@pytest.mark.browser
@pytest.mark.parametrize("device", WIDTHS)
def test_no_page_is_wider_than_the_screen(demo, device):
    (ARTIFACTS / "widths").mkdir(parents=True, exist_ok=True)
    width, height = WIDTHS[device]
    with chromium() as browser:
        visitor = browser.new_context(viewport=dict(width=width, height=height)).new_page()
        wide = _walk(visitor, demo, ["/", "/login", "/signup", "/pricing", "/password-reset"], "visitor")
        member = _signed_in(browser.new_context(viewport=dict(width=width, height=height)), demo)
        wide |= _walk(member, demo, ["/", "/projects", "/account", "/admin"], "admin")
    assert not wide, f"pages wider than {width} px (path: scrollWidth): {wide}"
