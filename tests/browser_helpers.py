"The demo served in its own process, Debian's Chromium driven by Playwright, and the steps every browser test takes."

import os, shutil, subprocess, sys, time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import sync_playwright

from pgserver import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"


def wait_until_serving(url: str, proc, log: Path, what: str, seconds: float = 60):
    "Return once `url` answers 200; fail with `log` if `proc` exits first, or after `seconds`."
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"{what} exited early:\n{log.read_text()}")
        time.sleep(0.2)
    pytest.fail(f"{what} did not start within {seconds:.0f} s")


@contextmanager
def served_demo(folder, **settings):
    """`fh-saas demo` in its own process on a fresh SQLite folder,
    with only `settings` of the DB_/FH_SAAS_/STRIPE_ variables."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "FH_SAAS_", "STRIPE_"))} | settings
    Path(folder).mkdir(parents=True, exist_ok=True)
    log = Path(folder) / "demo.log"  # a file, not a pipe: the mail it prints must never fill a buffer nobody reads
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from fh_saas.cli import main; sys.exit(main())",
            "demo",
            "--folder",
            str(folder),
            "--port",
            str(port),
        ],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{base}/pricing", proc, log, "the demo")
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def chromium():
    "A headless Chromium (Playwright cannot download its own browser here)."
    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield b
        finally:
            b.close()


@contextmanager
def screenshots_on_failure(name, **pages):
    "Save a full-page screenshot of each page when the block fails."
    try:
        yield
    except BaseException:
        ARTIFACTS.mkdir(exist_ok=True)
        for who, page in pages.items():
            try:
                page.screenshot(path=str(ARTIFACTS / f"{name}-{who}.png"), full_page=True)
            except Exception:
                pass
        raise


def sign_up(page, base, email, password, name, company=None):
    page.goto(f"{base}/signup")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", password)
    page.fill("input[name=name]", name)
    if company:
        page.fill("input[name=company]", company)
    page.click("button:has-text('Create account')")


def log_in(page, base, email, password):
    "Fill in and send the login form (where it lands is the caller's to check)."
    page.goto(f"{base}/login")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", password)
    page.click("button:has-text('Log in')")


def csp_violations(page) -> list:
    "The Content-Security-Policy violations `page` reports on its console, collected as they happen."
    found = []
    page.on("console", lambda m: found.append(m.text) if "Content Security Policy" in m.text else None)
    return found
