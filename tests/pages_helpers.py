"""A FastHTML app wired the way `setup_saas` wires it (SQLite host file, sessions, tenant router, beforeware),
with the billing and admin pages mounted, and a browser that submits its session's form token."""

from dataclasses import dataclass

import pytest
from fasthtml.common import FastHTML
from starlette.testclient import TestClient

from fh_saas import billing, stripe_billing as sb
from fh_saas.audit import audit
from fh_saas.beforeware import DEFAULT_SKIP, AuthResolver, saas_beforeware
from fh_saas.db_host import GlobalUser, HostDatabase, Membership, Subscription
from fh_saas.db_tenant import TenantNotFound, TenantUnavailable, provision_tenant
from fh_saas.mail import MemoryOutbox
from fh_saas.csrf import csrf_token
from fh_saas.pages_admin import AdminPages
from fh_saas.pages_billing import BillingPages
from fh_saas.saas_context import Saas
from fh_saas.sessions import SessionManager
from fh_saas.tenant_router import TenantRouter
from stripe_helpers import ServedApp
from stripe_standin import FakeStripe

SECRET = 'pages-test-secret-' + 'y' * 40
PLANS = [
    dict(
        id='starter',
        name='Starter',
        description='For small teams',
        amount_monthly=1999,
        amount_yearly=19900,
        stripe_price_monthly='price_starter_m',
        stripe_price_yearly='price_starter_y',
        trial_days=14,
        features=['api'],
        quotas={'exports': 100},
        sort_order=1,
    ),
    dict(
        id='pro',
        name='Pro',
        amount_monthly=4900,
        amount_yearly=None,
        stripe_price_monthly='price_pro_m',
        trial_days=0,
        features=['api', 'sso'],
        quotas={'exports': None},
        sort_order=2,
    ),
]


class Browser(TestClient):
    """A test client that, like a browser submitting a page's form,
    posts its session's form token unless given `csrf` ('' or a wrong one)."""

    def __init__(self, app, sessions: SessionManager, **kw):
        super().__init__(app, **kw)
        self.sessions = sessions

    def token(self) -> str:
        return csrf_token(self.sessions.load(self.cookies.get(self.sessions.cookie_name)))

    def post(self, url, data=None, csrf: str | None = None, **kw):
        if self.cookies.get(self.sessions.cookie_name):
            data = {'csrf': self.token() if csrf is None else csrf, **(data or {})}
        return super().post(url, data=data, **kw)


@dataclass
class Site:
    saas: Saas
    app: FastHTML

    @property
    def host_db(self):
        return self.saas.host_db

    def user(self, uid, **kw):
        self.host_db.global_users.insert(GlobalUser(id=uid, email=f'{uid}@example.com', **kw))

    def tenant(self, tid, sub_status='active', price='price_starter_m', **sub):
        provision_tenant(self.host_db, tid, tid.title())
        if sub_status:
            self.host_db.subscriptions.insert(
                Subscription(
                    tenant_id=tid, status=sub_status, stripe_price_id=price, payment_type='subscription', **sub
                )
            )

    def member(self, uid, tid, role='member'):
        self.host_db.memberships.insert(Membership(user_id=uid, tenant_id=tid, role=role))

    def client(self, uid=None, tenant_id=None) -> Browser:
        "A browser signed in as `uid` (in `tenant_id`), or anonymous."
        c = Browser(self.app, self.saas.sessions, follow_redirects=False, base_url='https://app.test')
        if uid:
            c.cookies.set(self.saas.sessions.cookie_name, self.saas.sessions.create(uid, tenant_id))
        return c


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.setenv('FH_SAAS_TENANT_DIR', str(tmp_path / 'tenants'))
    host_db = HostDatabase(f"sqlite:///{tmp_path / 'host.db'}")
    billing.seed_plans(host_db, PLANS)
    sessions, router = SessionManager(host_db, SECRET), TenantRouter(host_db)
    saas = Saas(host_db, sessions, router, MemoryOutbox(), base_url='https://app.test')
    resolver = AuthResolver(
        host_db,
        sessions,
        tenant_db=router.tenant_db,
        access=billing.entitlements,
        unavailable=(TenantNotFound, TenantUnavailable),
        tenantless=(r'/tenants.*', r'/account.*', r'/logout', r'/admin.*'),
    )
    app = FastHTML(before=saas_beforeware(resolver, skip=[*DEFAULT_SKIP, r'/pricing']), secret_key=SECRET)
    BillingPages(saas).mount(app)
    AdminPages(saas).mount(app)

    @app.get('/tenants')
    def tenants(auth):
        return f'choose a tenant, {auth.user.id}'

    @app.post('/notes')
    def add_note(auth, body: str):
        "A tenant page that writes to the tenant database and audits."
        auth.db.q('CREATE TABLE IF NOT EXISTS notes (body TEXT)')
        auth.db.q('INSERT INTO notes VALUES (:b)', b=body)
        audit(host_db, 'note.created', target_id=auth.tenant_id)
        return f'noted in {auth.tenant_id}'

    yield Site(saas, app)
    router.close()
    host_db.close()
    HostDatabase.reset_instance()


@pytest.fixture
def fake_stripe(site):
    "The local Stripe stand-in over real HTTP, installed as `saas.stripe`."
    fake = FakeStripe()
    with ServedApp(fake.app()) as srv:
        site.saas.stripe = sb.stripe_client('sk_test_standin', base_addresses={'api': srv.url}, max_network_retries=0)
        yield fake
    site.saas.stripe = None
