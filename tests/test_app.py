"""`setup_saas` end to end on a SQLite host file: a route behind billing's guards reads the tenant's billing once per
request (the beforeware's entitlements), with the app's policy, and counts quotas on the app's own host database."""
import pytest
import sqlalchemy as sa
from fasthtml.common import FastHTML
from starlette.testclient import TestClient

from fh_saas.app import setup_saas
from fh_saas.billing import BillingPolicy, quota_used, require_feature, require_quota, seed_plans
from fh_saas.db_host import GlobalUser, HostDatabase, Membership, Subscription
from fh_saas.db_tenant import provision_tenant
from fh_saas.mail import MemoryOutbox
from fh_saas.sessions import SessionManager

PLANS = [dict(id='pro', name='Pro', features=['exports'], quotas={'exports': 2}),
         dict(id='free', name='Free', features=['exports'], quotas={'exports': 1})]


def _site(tmp_path, monkeypatch, policy=BillingPolicy()):
    monkeypatch.setenv('FH_SAAS_TENANT_DIR', str(tmp_path / 'tenants'))
    host_db = HostDatabase(f"sqlite:///{tmp_path / 'host.db'}")
    app = FastHTML(default_hdrs=False, secret_key='a' * 48)
    saas = setup_saas(app, host_db, sessions=SessionManager(host_db, 's' * 48), mailer=MemoryOutbox(), webhook_secrets=[],
                      policy=policy)

    @app.get('/export')
    @require_feature('exports')
    @require_quota('exports')
    def export(auth, req): return f"{auth.access.plan_id}:{req.scope['entitlements'] is auth.entitlements}"

    seed_plans(host_db, PLANS)
    host_db.global_users.insert(GlobalUser(id='ann', email='ann@example.com'))
    for tid in ('acme', 'solo'):
        provision_tenant(host_db, tid, tid.title())
        host_db.memberships.insert(Membership(user_id='ann', tenant_id=tid, role='owner'))
    host_db.subscriptions.insert(Subscription(tenant_id='acme', status='active', plan_tier='pro', payment_type='subscription'))
    return saas, app


@pytest.fixture
def saas_app(tmp_path, monkeypatch):
    saas, app = _site(tmp_path, monkeypatch)
    yield saas, app
    saas.router.close(); saas.host_db.close(); HostDatabase.reset_instance()


def _client(saas, app, tenant_id):
    cli = TestClient(app, follow_redirects=False)
    cli.cookies.set(saas.sessions.cookie_name, saas.sessions.create('ann', tenant_id))
    return cli


def test_a_gated_request_reads_billing_once(saas_app):
    "The guards reuse the beforeware's entitlements: one read of the subscriptions per request, and the quota counted once."
    saas, app = saas_app
    cli = _client(saas, app, 'acme')
    reads = []
    def count(conn, cursor, sql, *args):
        if 'core_subscriptions' in sql: reads.append(sql)
    sa.event.listen(saas.host_db.engine, 'before_cursor_execute', count)
    try: r = cli.get('/export')
    finally: sa.event.remove(saas.host_db.engine, 'before_cursor_execute', count)
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
    "With a free plan in `setup_saas`'s policy, a tenant without a subscription gets the free plan's grants behind the guards."
    saas, app = _site(tmp_path, monkeypatch, BillingPolicy(free_plan='free'))
    try:
        cli = _client(saas, app, 'solo')
        assert cli.get('/export').text == 'free:True'
        assert cli.get('/export').status_code == 429
        assert quota_used(saas.host_db, 'solo', 'exports') == 1
    finally:
        saas.router.close(); saas.host_db.close(); HostDatabase.reset_instance()
