"""The README as a new user meets it: written from nbs/index.ipynb, every Python block runs as written in a fresh
folder, and the app it builds serves a sign-up that ends on the app's own home page, in a real browser."""

import os, re, secrets, signal, subprocess, sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import expect

from browser_helpers import chromium, screenshots_on_failure, sign_up, wait_until_serving
from pgserver import free_port

ROOT = Path(__file__).resolve().parents[1]
FILE_NAME = re.compile(r'# ([\w.-]+\.py)\n')


def python_blocks() -> list[tuple[str | None, str]]:
    "The README's Python blocks in order, each with the file it is (its first line `# name.py`) or None."
    blocks = re.findall(r'^```python\n(.*?)^```', (ROOT / 'README.md').read_text(), re.M | re.S)
    return [((m := FILE_NAME.match(b)) and m.group(1), b) for b in blocks]


def fresh_env(**settings) -> dict:
    "This environment without any DB_/FH_SAAS_/STRIPE_/SMTP_ setting, plus `settings` and a new master key."
    env = {k: v for k, v in os.environ.items() if not k.startswith(('DB_', 'FH_SAAS_', 'STRIPE_', 'SMTP_'))}
    return env | dict(FH_SAAS_SECRET_KEY=secrets.token_urlsafe(48), PYTHONPATH=str(ROOT)) | settings


def test_readme_is_written_from_the_index_notebook():
    res = subprocess.run([sys.executable, str(ROOT / '.ci' / 'readme.py'), '--check'], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_every_python_block_runs_as_written_in_order(tmp_path):
    "The blocks that are files are written; the others run, in order, as one script in a fresh folder."
    blocks = python_blocks()
    assert [name for name, _ in blocks if name] == ['app.py'] and len(blocks) > 5
    for name, code in blocks:
        if name:
            (tmp_path / name).write_text(code)
    script = '\n'.join(code for name, code in blocks if not name)
    res = subprocess.run(
        [sys.executable, '-c', script], cwd=tmp_path, env=fresh_env(), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / 'app_host.db').exists() and (tmp_path / 'tenants' / 'acme.db').exists()


@contextmanager
def served_readme_app(folder: Path):
    "`python app.py` from the README, as its instructions say, in `folder`, on a free port."
    (folder / 'app.py').write_text(dict(python_blocks())['app.py'])
    port = free_port()
    log = folder / 'app.log'  # a file, not a pipe: the mail it prints must never fill a buffer nobody reads
    proc = subprocess.Popen(
        [sys.executable, 'app.py'],
        cwd=folder,
        env=fresh_env(PORT=str(port)),
        text=True,
        stdout=log.open('w'),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{base}/login", proc, log, "app.py")
        yield base, proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the reloader and the server it started
        proc.wait(10)


@pytest.mark.browser
def test_the_readme_app_signs_up_to_its_own_home_page(tmp_path):
    with served_readme_app(tmp_path) as (base, proc), chromium() as browser:
        page = browser.new_page(viewport=dict(width=390, height=844))
        with screenshots_on_failure('readme-app', page=page):
            sign_up(page, base, 'ann@example.com', 'long enough pw', 'Ann', 'Acme')
            page.wait_for_url(f"{base}/", timeout=30_000)  # provisioned by the app's own in-process job
            expect(page.locator('main')).to_contain_text('You are signed in as ann@example.com')
            expect(page.locator('main h1')).to_have_text('Welcome to Acme')
            assert page.evaluate('document.documentElement.scrollWidth') <= 390  # a phone's width, no wider
            page.click("nav a:has-text('Mail')")
            link = page.locator("main a[href*='/verify-email/']")
            expect(link).to_have_count(1)
            link.click()
            expect(page.locator('main')).to_contain_text('confirmed')
