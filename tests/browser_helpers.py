"Debian's Chromium driven by Playwright, and the steps every browser test takes."
import shutil
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"


@contextmanager
def chromium():
    "A headless Chromium (Playwright cannot download its own browser here)."
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try: yield b
        finally: b.close()


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
