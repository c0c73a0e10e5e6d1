"""`setup_saas` end to end on a SQLite host file: a route behind billing's guards reads the tenant's billing once per
request (the beforeware's entitlements), with the app's policy, and counts quotas on the app's own host database."""

import re, threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import sqlalchemy as sa
from fasthtml.common import FastHTML
from starlette.testclient import TestClient

from fh_saas.app import setup_saas
from fh_saas.api_keys import create_api_key
from fh_saas.billing import BillingPolicy, entitlements, quota_used, require_feature, require_quota, seed_plans
from fh_saas.db_host import GlobalUser, HostDatabase, Membership, Subscription
from fh_saas.db_tenant import provision_tenant
from fh_saas.guards import require_role
from fh_saas.mail import MemoryOutbox, send_mail
from fh_saas.memberships import Roles, add_member, invite
from fh_saas.passwords import hash_password
from fh_saas.sessions import SessionManager

PLANS = [
    dict(id='pro', name='Pro', features=['exports'], quotas={'exports': 2}),
    dict(id='free', name='Free', features=['exports'], quotas={'exports': 1}),
]


DEFAULT_POLICY = BillingPolicy()


def _site(tmp_path, monkeypatch, policy=DEFAULT_POLICY):
    monkeypatch.setenv('FH_SAAS_TENANT_DIR', str(tmp_path / 'tenants'))
    host_db = HostDatabase(f"sqlite:///{tmp_path / 'host.db'}")
    app = FastHTML(default_hdrs=False, secret_key='a' * 48)
    saas = setup_saas(
        app,
        host_db,
        sessions=SessionManager(host_db, 's' * 48),
        mailer=MemoryOutbox(),
        webhook_secrets=[],
        policy=policy,
    )

    @app.get('/export')
    @require_feature('exports')
    @require_quota('exports')
    def export(auth, req):
        return f"{auth.access.plan_id}:{req.scope['entitlements'] is auth.entitlements}"

    seed_plans(host_db, PLANS)
    host_db.global_users.insert(GlobalUser(id='ann', email='ann@example.com'))
    for tid in ('acme', 'solo'):
        provision_tenant(host_db, tid, tid.title())
        host_db.memberships.insert(Membership(user_id='ann', tenant_id=tid, role='owner'))
    host_db.subscriptions.insert(
        Subscription(tenant_id='acme', status='active', plan_tier='pro', payment_type='subscription')
    )
    return saas, app


@pytest.fixture
def saas_app(tmp_path, monkeypatch):
    saas, app = _site(tmp_path, monkeypatch)
    yield saas, app
    saas.router.close()
    saas.host_db.close()
    HostDatabase.reset_instance()


def _client(saas, app, tenant_id):
    cli = TestClient(app, follow_redirects=False)
    cli.cookies.set(saas.sessions.cookie_name, saas.sessions.create('ann', tenant_id))
    return cli


def test_a_gated_request_reads_billing_once(saas_app):
    """The guards reuse the beforeware's entitlements:
    one read of the subscriptions per request, and the quota counted once."""
    saas, app = saas_app
    cli = _client(saas, app, 'acme')
    reads = []

    def count(conn, cursor, sql, *args):
        if 'core_subscriptions' in sql:
            reads.append(sql)

    sa.event.listen(saas.host_db.engine, 'before_cursor_execute', count)
    try:
        r = cli.get('/export')
    finally:
        sa.event.remove(saas.host_db.engine, 'before_cursor_execute', count)
    assert (r.status_code, r.text) == (200, 'pro:True')
    assert len(reads) == 1, "billing's guards recomputed the entitlements the beforeware had computed"
    assert quota_used(saas.host_db, 'acme', 'exports') == 1
    assert cli.get('/export').status_code == 200
    r = cli.get('/export')
    assert r.status_code == 429 and "2 of 2 used" in r.text
    assert quota_used(saas.host_db, 'acme', 'exports') == 2


def test_a_lapsed_tenant_is_refused_before_the_guards(saas_app):
    saas, app = saas_app
    r = _client(saas, app, 'solo').get('/export')
    assert (r.status_code, r.headers['location']) == (303, '/billing')
    assert quota_used(saas.host_db, 'solo', 'exports') == 0


def test_the_guards_apply_the_apps_policy(tmp_path, monkeypatch):
    """With a free plan in `setup_saas`'s policy,
    a tenant without a subscription gets the free plan's grants behind the guards."""
    saas, app = _site(tmp_path, monkeypatch, BillingPolicy(free_plan='free'))
    try:
        cli = _client(saas, app, 'solo')
        assert cli.get('/export').text == 'free:True'
        assert cli.get('/export').status_code == 429
        assert quota_used(saas.host_db, 'solo', 'exports') == 1
    finally:
        saas.router.close()
        saas.host_db.close()
        HostDatabase.reset_instance()


def test_an_app_with_its_own_roles_invites_and_guards_with_them(tmp_path, monkeypatch):
    "A `developer` invited to a tenant of an app whose roles are developer < admin < owner joins as a developer."
    monkeypatch.setenv('FH_SAAS_TENANT_DIR', str(tmp_path / 'tenants'))
    host_db, outbox = HostDatabase(f"sqlite:///{tmp_path / 'host.db'}"), MemoryOutbox()
    app = FastHTML(default_hdrs=False, secret_key='a' * 48)
    roles = Roles(('developer', 'admin', 'owner'))
    saas = setup_saas(
        app,
        host_db,
        sessions=SessionManager(host_db, 's' * 48),
        mailer=outbox,
        webhook_secrets=[],
        policy=BillingPolicy(free_plan='free'),
        base_url='https://app.test',
        roles=roles,
    )
    try:

        @app.post('/deploys')
        @require_role('developer')
        def deploy(auth):
            return f'deployed by a {auth.role}'

        seed_plans(host_db, PLANS)
        host_db.global_users.insert(GlobalUser(id='ann', email='ann@example.com'))
        bob = host_db.global_users.insert(
            GlobalUser(email='bob@example.com', password_hash=hash_password('long pw 123'))
        )
        provision_tenant(host_db, 'acme', 'Acme')
        add_member(host_db, 'acme', 'ann', 'owner', roles=roles)
        invite(
            host_db,
            'acme',
            'bob@example.com',
            'developer',
            'ann',
            outbox,
            lambda tok: f'https://app.test/invitations/{tok}',
            roles=roles,
        )
        link = re.search(r'https://app\.test(/\S+)', outbox.last_text('bob@example.com')).group(1)
        cli = TestClient(app, follow_redirects=False, base_url='https://app.test')
        assert cli.post('/login', data=dict(email='bob@example.com', password='long pw 123')).status_code == 303
        r = cli.post(f'{link}/accept')
        assert r.status_code == 303, r.text
        assert [(m.user_id, m.role) for m in host_db.memberships(where="tenant_id = 'acme'", order_by='role')] == [
            (bob.id, 'developer'),
            ('ann', 'owner'),
        ]
        assert cli.post('/deploys').text == 'deployed by a developer'
    finally:
        saas.router.close()
        host_db.close()
        HostDatabase.reset_instance()


def test_setup_saas_takes_publishable_paths_and_the_apps_own_access_decision(tmp_path, monkeypatch):
    "A publishable key reaches only the paths the app names; the app's access decision replaces billing's."
    monkeypatch.setenv('FH_SAAS_TENANT_DIR', str(tmp_path / 'tenants'))
    host_db = HostDatabase(f"sqlite:///{tmp_path / 'host.db'}")
    app = FastHTML(default_hdrs=False, secret_key='a' * 48)
    decided = []

    def access(host_db, tenant_id):
        decided.append(tenant_id)
        return entitlements(host_db, tenant_id, policy=BillingPolicy(free_plan='free'))

    saas = setup_saas(
        app,
        host_db,
        sessions=SessionManager(host_db, 's' * 48),
        mailer=MemoryOutbox(),
        webhook_secrets=[],
        publishable=[r'/api/public/.*'],
        access=access,
    )
    try:

        @app.get('/api/public/ping')
        def ping(auth):
            return dict(tenant=auth.tenant_id)

        @app.get('/api/private')
        def private(auth):
            return dict(tenant=auth.tenant_id)

        seed_plans(host_db, PLANS)
        host_db.global_users.insert(GlobalUser(id='ann', email='ann@example.com'))
        provision_tenant(host_db, 'acme', 'Acme')
        add_member(host_db, 'acme', 'ann', 'owner')
        pk, _ = create_api_key(host_db, 'acme', 'ann', 'web', kind='publishable')
        cli = TestClient(app)
        assert cli.get('/api/public/ping', headers={'X-API-Key': pk}).json() == dict(tenant='acme')
        assert cli.get('/api/private', headers={'X-API-Key': pk}).status_code == 403
        assert decided == ['acme']  # the app's decision ran (the refused call stops before billing)
    finally:
        saas.router.close()
        host_db.close()
        HostDatabase.reset_instance()


def test_a_worker_serves_no_more_requests_at_once_than_its_threads(tmp_path, monkeypatch):
    "With `FH_SAAS_THREADS=2`, eight gated requests in flight never run more than two handlers at once."
    monkeypatch.setenv('FH_SAAS_THREADS', '2')
    saas, app = _site(tmp_path, monkeypatch)
    state, lock, crowded = dict(running=0, peak=0), threading.Lock(), threading.Event()

    @app.get('/busy')
    def busy():
        with lock:
            state['running'] += 1
            state['peak'] = max(state['peak'], state['running'])
            if state['running'] > 2:
                crowded.set()
        crowded.wait(0.3)  # give a third handler the chance to start alongside
        with lock:
            state['running'] -= 1
        return 'done'

    try:
        with _client(saas, app, 'acme') as cli, ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: cli.get('/busy').status_code, range(8)))
        assert statuses == [200] * 8
        assert state['peak'] == 2 and not crowded.is_set()
    finally:
        saas.router.close()
        saas.host_db.close()
        HostDatabase.reset_instance()


def test_errors_answer_in_the_sites_layout_and_a_crash_names_its_request(saas_app):
    saas, app = saas_app

    @app.get('/crash')
    def crash():
        raise RuntimeError('secret internals')

    cli = _client(saas, app, 'acme')
    r = TestClient(app, raise_server_exceptions=False, cookies=dict(cli.cookies)).get('/crash')
    assert r.status_code == 500 and 'Something went wrong' in r.text and 'secret internals' not in r.text
    assert re.search(r'Reference: <code>[0-9a-f]{32}</code>', r.text)
    r = cli.get('/no/such/page')
    assert r.status_code == 404 and 'Page not found' in r.text and 'fh_saas.css' in r.text
    r = cli.get('/api/no/such/thing')
    assert r.status_code == 404 and r.headers['content-type'] == 'application/json'


def test_the_dev_outbox_is_shown_in_development_only_and_only_to_this_machine(tmp_path, monkeypatch):
    from fh_saas.dev_mode import DevOutbox

    monkeypatch.setenv('FH_SAAS_TENANT_DIR', str(tmp_path / 'tenants'))
    host_db, routers = HostDatabase(f"sqlite:///{tmp_path / 'host.db'}"), []
    try:
        dev_app, prod_app = FastHTML(default_hdrs=False, secret_key='a' * 48), FastHTML(secret_key='a' * 48)
        sessions = SessionManager(host_db, 's' * 48)
        saas = setup_saas(dev_app, host_db, sessions=sessions, webhook_secrets=[], dev=True)
        routers.append(saas.router)
        saas.mailer.send('ann@example.com', 'Reset your password', 'http://127.0.0.1:5001/password-reset/tok-123')
        here = TestClient(dev_app, client=('127.0.0.1', 50000))
        assert here.get('/dev/mail').status_code == 200 and 'tok-123' in here.get('/dev/mail').text
        assert 'tok-123' in TestClient(dev_app, client=('::1', 50000)).get('/dev/mail').text
        send_mail(
            saas.mailer,
            'bob@example.com',
            saas.mail.invitation('<script>x</script>', 'member', 'http://i/t', timedelta(days=7)),
        )
        page = here.get('/dev/mail')
        frame = re.search(r'<iframe srcdoc=(["\'])(.*?)\1 sandbox=""[^>]*>', page.text, re.S)
        assert frame and '&amp;lt;script&amp;gt;x' in frame.group(2) and '<script>x' not in page.text
        assert "script-src 'self' 'nonce-" in page.headers['content-security-policy']
        for client, headers in [
            (('192.168.1.20', 50000), {}),
            (('testclient', 50000), {}),
            (('127.0.0.1', 50000), {'X-Forwarded-For': '203.0.113.9'}),
            (('127.0.0.1', 50000), {'Forwarded': 'for=203.0.113.9'}),
        ]:
            r = TestClient(dev_app, client=client).get('/dev/mail', headers=headers)
            assert r.status_code == 404 and 'tok-123' not in r.text, (client, headers)
        prod = setup_saas(prod_app, host_db, sessions=sessions, webhook_secrets=[], dev=False, mailer=DevOutbox())
        routers.append(prod.router)
        prod.mailer.send('ann@example.com', 'Reset your password', 'http://127.0.0.1:5001/password-reset/tok-456')
        r = TestClient(prod_app, client=('127.0.0.1', 50000), follow_redirects=False).get('/dev/mail')
        assert r.status_code in (303, 404) and 'tok-456' not in r.text
    finally:
        for router in routers:
            router.close()
        host_db.close()
        HostDatabase.reset_instance()
