"""Findings of the security review, checked on the whole app `setup_saas` mounts, its host on PostgreSQL (where a NUL
byte bites): a NUL byte, invalid UTF-8 or an overlong value is a 400 with a message on every route and form, never a
500; a body is bounded while it is read; a long User-Agent is kept truncated; every response carries the security
headers and the canonical link ignores the Host header; a guessable master key is refused at start-up."""

import inspect, re, socket
from functools import partial
from urllib.parse import quote, urlencode

import anyio
import pytest
from argon2 import PasswordHasher
from fasthtml.common import FastHTML
from starlette.routing import Route
from starlette.testclient import TestClient

from fh_saas.api_keys import create_api_key
from fh_saas.app import setup_saas
from fh_saas.csrf import csrf_token
from fh_saas.billing import seed_plans
from fh_saas.db_host import GlobalUser, HostDatabase, Membership, Subscription
from fh_saas.db_tenant import provision_tenant
from fh_saas.dev_mode import SaasConfigError
from fh_saas.http_guard import DEFAULT_MAX_FIELD
from fh_saas.mail import MemoryOutbox
from fh_saas.pages_auth import AccountPages, AuthPages
from fh_saas.pages_layout import handlers
from fh_saas.passwords import hash_password
from fh_saas.sessions import SessionManager, sessions_t
from stripe_helpers import ServedApp

FAST = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
SECRET = 'security-input-secret-' + '0123456789abcdef' * 2
PW = 'correct horse battery'
LONG_AGENT = 'Mozilla/5.0 (X11; Linux x86_64) ' * 20  # 640 characters
BAD = {'a NUL byte': b'ann\x00', 'invalid UTF-8': b'\xff\xfe', 'an overlong value': b'x' * (DEFAULT_MAX_FIELD + 1)}
REFUSED = ('Remove it and try again.', 'is too long')
GENERIC_FIELDS = ('name', 'email')  # for routes that are not one of the kit's pages


@pytest.fixture
def site(pg_host_db, tmp_path, monkeypatch):
    "The kit on a FastHTML app, host on PostgreSQL, tenants in SQLite files; root is a system admin owning acme."
    monkeypatch.setenv('FH_SAAS_TENANT_DIR', str(tmp_path / 'tenants'))
    app = FastHTML(default_hdrs=False, secret_key=SECRET)
    saas = setup_saas(
        app,
        pg_host_db,
        sessions=SessionManager(pg_host_db, SECRET),
        mailer=MemoryOutbox(),
        webhook_secrets=['whsec_security_input'],
        base_url='https://app.test',
        pages=dict(auth=partial(AuthPages, hasher=FAST), account=partial(AccountPages, hasher=FAST)),
    )

    @app.get('/')
    def home(auth):
        return f'home of {auth.tenant_id}'

    pg_host_db.global_users.insert(
        GlobalUser(id='root', email='root@example.com', is_sys_admin=True, password_hash=hash_password(PW, FAST))
    )
    provision_tenant(pg_host_db, 'acme', 'Acme')
    pg_host_db.memberships.insert(Membership(user_id='root', tenant_id='acme', role='owner'))
    seed_plans(pg_host_db, [dict(id='pro', name='Pro', features=['api'])])
    pg_host_db.subscriptions.insert(
        Subscription(tenant_id='acme', status='active', plan_tier='pro', payment_type='subscription')
    )
    yield saas, app
    saas.router.close()


def signed_in(saas, app) -> tuple[TestClient, str]:
    "A client with a fresh session of root in acme, and that session's form token."
    cli = TestClient(app, follow_redirects=False, base_url='https://app.test')
    cookie = saas.sessions.create('root', 'acme')
    cli.cookies.set(saas.sessions.cookie_name, cookie)
    return cli, csrf_token(saas.sessions.load(cookie))


def routes(app) -> list[tuple[str, str, tuple]]:
    "`(path, method, field names)` of every route of the app: a new route is covered without naming it here."
    fields = {}
    for group in app.state.pages.values():
        for name, (path, methods, _) in handlers(type(group)).items():
            params = inspect.signature(getattr(group, name)).parameters
            for m in methods:
                fields[path, m.upper()] = tuple(p for p in params if p not in ('req', 'auth'))
    return [
        (r.path, m, fields.get((r.path, m)) or GENERIC_FIELDS)
        for r in app.routes
        if isinstance(r, Route)
        for m in sorted(set(r.methods or ['GET']) - {'HEAD'})
    ]


def fill(path: str, value: bytes) -> str:
    "`path` with each of its parameters set to `value`, percent-encoded as a browser sends it."
    return re.sub(r'\{\w+(:\w+)?\}', quote(value, safe=''), path)


def is_exempt(path):
    return path in ('/stripe/webhook',)  # reads and bounds its own body


@pytest.mark.postgres
def test_every_route_and_form_refuses_bad_values_with_a_message(site):
    "In a path id, the query, a URL-encoded and a multipart form field: 400 with a message, on every route."
    saas, app = site
    found = routes(app)
    assert {
        ('/login', 'POST'),
        ('/signup', 'POST'),
        ('/tenants', 'POST'),
        ('/api-keys', 'POST'),
        ('/admin/tenants/{tenant_id}/{action}', 'POST'),
    } <= {(p, m) for p, m, _ in found}
    checked = 0
    for path, method, names in found:
        for what, bad in BAD.items():
            cli, token = signed_in(saas, app)
            good = path.replace('{', '').replace('}', '')
            tries = [
                ('path id', cli.request(method, fill(path, bad))) if '{' in path else None,
                ('query', cli.request(method, f'{good}?{urlencode({n: bad for n in names})}')),
            ]
            if method != 'GET':
                form = urlencode({'csrf': token, **{n: bad for n in names}})
                tries += [
                    (
                        'form',
                        cli.request(
                            method, good, content=form, headers={'content-type': 'application/x-www-form-urlencoded'}
                        ),
                    ),
                    (
                        'multipart',
                        cli.request(method, good, files={n: (None, bad) for n in names}, data={'csrf': token}),
                    ),
                ]
            for where, r in filter(None, tries):
                checked += 1
                if is_exempt(path) and where in ('form', 'multipart'):
                    assert r.status_code < 500, (path, method, what, where)
                    continue
                assert r.status_code == 400 and any(m in r.text for m in REFUSED), (path, method, what, where, r.text)
    assert checked > 200


@pytest.mark.postgres
def test_values_at_the_limit_reach_the_handlers_and_never_make_a_500(site):
    "The longest value the guard lets through, in every field of every route, signed in and anonymous."
    saas, app = site
    longest = 'x' * DEFAULT_MAX_FIELD
    for path, method, names in routes(app):
        for anonymous in (False, True):
            cli, token = signed_in(saas, app)
            if anonymous:
                cli.cookies.clear()
            url = fill(path, longest.encode())
            r = (
                cli.get(f'{url}?{urlencode({n: longest for n in names})}')
                if method == 'GET'
                else cli.request(method, url, data={'csrf': token, **{n: longest for n in names}})
            )
            assert r.status_code != 500, (path, method, anonymous, r.text[:300])  # 503: Stripe is not set up


@pytest.mark.postgres
def test_a_long_user_agent_is_stored_truncated_and_failed_logins_are_audited(site):
    "A 640-character User-Agent: a failed login is a 401 and audited, a good one signs in; both keep 512 characters."
    saas, app = site
    cli = TestClient(app, follow_redirects=False, base_url='https://app.test', headers={'user-agent': LONG_AGENT})
    r = cli.post('/login', data=dict(email='root@example.com', password='wrong password'))
    assert r.status_code == 401 and 'Wrong email or password' in r.text
    r = cli.post('/login', data=dict(email='root@example.com', password=PW))
    assert r.status_code == 303
    db = saas.host_db
    logs = db.q(
        "select event_type, user_agent from sys_audit_logs where event_type like 'auth.login%' order by created_at"
    )
    assert [(x['event_type'], x['user_agent']) for x in logs] == [
        ('auth.login_failed', LONG_AGENT[:512]),
        ('auth.login', LONG_AGENT[:512]),
    ]
    with db.transaction() as conn:
        assert [a for (a,) in conn.execute(sessions_t.select().with_only_columns(sessions_t.c.user_agent))] == [
            LONG_AGENT[:512]
        ]
    assert cli.get('/account').status_code == 200


@pytest.mark.postgres
def test_a_body_over_the_limit_is_refused_while_it_is_read(site):
    "Declared too large: 413 before reading; streamed without a length: 413 once it passes the limit, the rest unread."
    saas, app = site
    cli = TestClient(app, follow_redirects=False, base_url='https://app.test')
    form = {'content-type': 'application/x-www-form-urlencoded'}
    r = cli.post('/login', content=b'email=a&password=' + b'x' * (64 * 1024), headers=form)
    assert (r.status_code, r.text) == (413, 'The request is too large.')
    pulled, sent = [], []  # the app as the server calls it: 64 KiB pieces

    async def receive():
        pulled.append(1)
        return dict(type='http.request', body=b'x' * 65536, more_body=len(pulled) < 30 * 16)  # 30 MiB in all

    async def send(message):
        sent.append(message)

    scope = dict(
        type='http',
        asgi=dict(version='3.0'),
        http_version='1.1',
        method='POST',
        scheme='https',
        path='/signup',
        raw_path=b'/signup',
        query_string=b'',
        root_path='',
        client=('127.0.0.1', 1),
        server=('app.test', 443),
        headers=[
            (b'host', b'app.test'),
            (b'transfer-encoding', b'chunked'),
            (b'content-type', b'application/x-www-form-urlencoded'),
        ],
    )
    anyio.run(app, scope, receive, send)
    assert sent[0]['status'] == 413 and b''.join(m.get('body', b'') for m in sent[1:]) == b'The request is too large.'
    assert len(pulled) == 2, f"read {len(pulled)} pieces of 64 KiB before refusing"
    r = cli.post(
        '/api/anything', content=b'{"a": "' + b'x' * 70000 + b'"}', headers={'content-type': 'application/json'}
    )
    assert r.status_code == 413 and r.json()['error']['code'] == 'too_large'


@pytest.mark.postgres
def test_a_malformed_multipart_form_is_a_400_with_a_message(site):
    _, app = site
    cli = TestClient(app, follow_redirects=False)
    for body in (b'garbage', b'--B\r\nno header line\r\n\r\nx\r\n--B--\r\n'):
        r = cli.post('/login', content=body, headers={'content-type': 'multipart/form-data; boundary=B'})
        assert (r.status_code, r.text) == (400, 'The form could not be read. Reload the page and try again.')


def first_answer(port: int, head: bytes, start: bytes) -> bytes:
    "The server's first bytes in answer to `head` and the `start` of a body the client never finishes."
    with socket.create_connection(('127.0.0.1', port), timeout=60) as s:  # the timeout only ends a hung server
        s.sendall(head + start)
        return s.recv(200)


@pytest.mark.postgres
def test_over_real_http_the_answer_comes_before_the_rest_of_the_body(site):
    "uvicorn in front: a 30 MiB Content-Length, or 128 KiB of chunks, is answered 413 though the body never ends."
    _, app = site
    head = b'POST /login HTTP/1.1\r\nHost: app.test\r\nContent-Type: application/x-www-form-urlencoded\r\n'
    piece = b'%x\r\n%s\r\n' % (65536, b'x' * 65536)
    with ServedApp(app) as srv:
        declared = first_answer(srv.port, head + b'Content-Length: %d\r\n\r\n' % (30 << 20), b'email=a')
        chunked = first_answer(srv.port, head + b'Transfer-Encoding: chunked\r\n\r\n', piece * 2)
    assert declared.startswith(b'HTTP/1.1 413') and chunked.startswith(b'HTTP/1.1 413'), (declared, chunked)


@pytest.mark.postgres
def test_the_body_limit_is_the_apps_to_set(pg_host_db, tmp_path, monkeypatch):
    "`FH_SAAS_MAX_BODY` (or `setup_saas(max_body=)`) moves the limit; a malformed one stops the app at start-up."
    monkeypatch.setenv('FH_SAAS_TENANT_DIR', str(tmp_path / 'tenants'))
    kw = dict(sessions=SessionManager(pg_host_db, SECRET), mailer=MemoryOutbox(), webhook_secrets=[])
    monkeypatch.setenv('FH_SAAS_MAX_BODY', 'lots')
    with pytest.raises(SaasConfigError, match='FH_SAAS_MAX_BODY'):
        setup_saas(FastHTML(), pg_host_db, **kw)
    monkeypatch.setenv('FH_SAAS_MAX_BODY', str(256 * 1024))
    app = FastHTML(default_hdrs=False)
    saas = setup_saas(app, pg_host_db, **kw)
    try:
        cli = TestClient(app, follow_redirects=False)
        padded = dict(email='a@example.com', password='wrong password', **{f'pad{i}': 'p' * 4000 for i in range(25)})
        r = cli.post('/login', data=padded)  # 100 KiB: over the default, under this app's limit
        assert r.status_code == 401 and 'Wrong email or password' in r.text
        assert cli.post('/login', content=b'x' * (300 * 1024)).status_code == 413
    finally:
        saas.router.close()


@pytest.mark.postgres
def test_every_response_carries_the_security_headers(site):
    "A page that could be framed (/team), a public one, a refusal and a redirect all carry them, HSTS on https."
    saas, app = site
    cli, _ = signed_in(saas, app)
    for r in (
        cli.get('/team'),
        cli.get('/pricing'),
        cli.get('/login'),
        cli.get('/admin/tenants/%00'),
        TestClient(app, follow_redirects=False).get('/team'),
    ):
        csp = r.headers['content-security-policy']
        assert "frame-ancestors 'none'" in csp and re.search(r"script-src 'self' 'nonce-[\w-]{16,}'", csp), csp
        assert 'unsafe-inline' not in csp.split('script-src')[1].split(';')[0]
        assert (r.headers['x-frame-options'], r.headers['x-content-type-options']) == ('DENY', 'nosniff')
        assert r.headers['referrer-policy'] == 'same-origin' and 'camera=()' in r.headers['permissions-policy']
        assert r.headers['strict-transport-security'].startswith('max-age=')


INLINE_HANDLER = re.compile(r'<[^>]*\son[a-z]+\s*=', re.I)


@pytest.mark.postgres
def test_no_page_needs_an_inline_script_the_policy_would_refuse(site):
    "Every page the kit serves, with its confirm buttons shown: no inline handler, no script without src or nonce."
    saas, app = site
    saas.host_db.global_users.insert(GlobalUser(id='bob', email='bob@example.com'))
    saas.host_db.memberships.insert(Membership(user_id='bob', tenant_id='acme', role='member'))
    create_api_key(saas.host_db, 'acme', 'root', 'ci', 'secret', 'test')
    cli, _ = signed_in(saas, app)
    pages = [p for p, m, _ in routes(app) if m == 'GET' and '{' not in p and not p.startswith('/_fh_saas')]
    assert {'/team', '/api-keys', '/admin', '/admin/users', '/login'} <= set(pages)
    for path in pages:
        r = cli.get(path)
        assert r.status_code == 200 or path not in ('/team', '/api-keys', '/admin', '/admin/users'), (path, r)
        html = r.text
        assert not INLINE_HANDLER.search(html), (path, INLINE_HANDLER.search(html).group(0))
        assert all('src=' in tag or 'nonce=' in tag for tag in re.findall(r'<script\b[^>]*>', html)), path
    assert 'data-confirm="Revoke this key?' in cli.get('/api-keys').text
    assert 'data-confirm="Remove this member' in cli.get('/team').text


@pytest.mark.postgres
def test_the_canonical_link_is_built_from_base_url_not_the_host_header(site):
    saas, app = site
    r = TestClient(app, headers={'host': 'evil.com'}).get('/pricing?period=yearly')
    assert '<link rel="canonical" href="https://app.test/pricing?period=yearly">' in r.text
    assert 'evil.com' not in r.text


@pytest.mark.postgres
def test_an_app_extends_the_content_security_policy(pg_host_db, tmp_path, monkeypatch):
    "`setup_saas(csp=...)` adds sources; a malformed one stops the app at start-up; http sites get no HSTS."
    monkeypatch.setenv('FH_SAAS_TENANT_DIR', str(tmp_path / 'tenants'))
    kw = dict(sessions=SessionManager(pg_host_db, SECRET), mailer=MemoryOutbox(), webhook_secrets=[])
    with pytest.raises(SaasConfigError, match='Content-Security-Policy'):
        setup_saas(FastHTML(), pg_host_db, csp={'script-src': "'unsafe-inline'; frame-ancestors *"}, **kw)
    app = FastHTML(default_hdrs=False)
    saas = setup_saas(app, pg_host_db, csp={'img-src': ['https://img.example.com']}, base_url='http://localhost', **kw)
    try:
        r = TestClient(app).get('/pricing')
        assert "img-src 'self' data: https://img.example.com" in r.headers['content-security-policy']
        assert 'strict-transport-security' not in r.headers
    finally:
        saas.router.close()


@pytest.mark.parametrize('weak', ['k' * 32, 'ab' * 20, '0123' * 10])
def test_a_repetitive_master_key_is_refused_with_how_to_make_one(tmp_path, monkeypatch, weak):
    "A key of one repeated character (or a short repeated pattern) is long enough but not random: setup_saas stops."
    monkeypatch.setenv('FH_SAAS_SECRET_KEY', weak)
    monkeypatch.delenv('FH_SAAS_PREVIOUS_SECRET_KEYS', raising=False)
    host_db = HostDatabase(f"sqlite:///{tmp_path / 'host.db'}")
    try:
        with pytest.raises(SaasConfigError, match='too repetitive') as e:
            setup_saas(FastHTML(default_hdrs=False), host_db, mailer=MemoryOutbox(), webhook_secrets=[])
        assert weak not in str(e.value)
        assert 'python -c "import secrets; print(secrets.token_urlsafe(32))"' in str(e.value)
    finally:
        host_db.close()
        HostDatabase.reset_instance()
