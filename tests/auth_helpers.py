"A small but real multi-tenant FastHTML app for the auth tests: host DB, per-tenant SQLite databases, routes."

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from argon2 import PasswordHasher
from fasthtml.common import FastHTML
from starlette.responses import RedirectResponse, Response
from starlette.testclient import TestClient

from fh_saas.db_host import (
    HostDatabase,
    GlobalUser,
    TenantCatalog,
    Membership,
    Subscription,
    PooledDatabase,
    make_engine,
)
from fh_saas.audit import audit
from fh_saas.sessions import SessionManager, logout, start_impersonation, stop_impersonation
from fh_saas.passwords import login, hash_password, LoginFailed, LoginThrottled, LoginThrottle, change_password
from fh_saas.memberships import switch_tenant, MembershipError
from fh_saas.beforeware import AuthResolver, saas_beforeware
from fh_saas.rate_limits import RateLimit

FAST = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
SECRET = 'test-secret-' + '0123456789abcdefghijklmnopqrstuvwxyz'


class Clock:
    "A clock the tests move by hand."

    def __init__(self):
        self.t = datetime(2026, 3, 1, 12, tzinfo=timezone.utc)

    def __call__(self):
        return self.t

    def advance(self, **kw):
        self.t += timedelta(**kw)


@dataclass
class Access:
    allowed: bool
    state: str
    reason: str | None = None


@dataclass
class Entitled:
    access: Access


def subscription_access(host_db: HostDatabase, tenant_id: str) -> Entitled:
    "Entitlements carrying only a verdict: allowed while the tenant's newest subscription is active or trialing."
    rows = host_db.q(
        "select status from core_subscriptions where tenant_id = :t order by created_at desc limit 1", t=tenant_id
    )
    state = rows[0]['status'] if rows else 'none'
    ok = state in ('active', 'trialing')
    return Entitled(Access(ok, state, None if ok else f'subscription is {state}'))


class TenantDbs:
    """One SQLite file per tenant, each holding a `marker` row with its own tenant id and a `notes` table; records every
    open."""

    def __init__(self, root):
        self.root, self.dbs, self.opened = root, {}, []

    def add(self, tenant_id: str):
        db = PooledDatabase(make_engine(f"sqlite:///{self.root / f'{tenant_id}.db'}"))
        db.q("create table marker (tenant_id text not null)")
        db.q("create table notes (id integer primary key, body text, written_for text)")
        db.q("insert into marker values (:t)", t=tenant_id)
        self.dbs[tenant_id] = db

    def __call__(self, tenant_id: str):
        self.opened.append(tenant_id)
        return self.dbs[tenant_id]

    def close(self):
        for db in self.dbs.values():
            db.close()


@dataclass
class World:
    host_db: HostDatabase
    sessions: SessionManager
    tenant_dbs: TenantDbs
    clock: Clock
    resolver: AuthResolver = None
    app: FastHTML = None

    def user(self, uid, password='correct horse battery', **kw):
        self.host_db.global_users.insert(
            GlobalUser(id=uid, email=f'{uid}@example.com', password_hash=hash_password(password, FAST), **kw)
        )

    def tenant(self, tid, sub_status='active'):
        self.host_db.tenants.insert(TenantCatalog(id=tid, name=tid.title()))
        self.host_db.subscriptions.insert(Subscription(tenant_id=tid, status=sub_status))
        self.tenant_dbs.add(tid)

    def member(self, uid, tid, role='member'):
        self.host_db.memberships.insert(Membership(user_id=uid, tenant_id=tid, role=role))

    def client(self, **kw) -> TestClient:
        return TestClient(self.app, follow_redirects=False, **kw)

    def login_client(self, uid, password='correct horse battery', **kw) -> TestClient:
        c = self.client(**kw)
        r = c.post('/login', data=dict(email=f'{uid}@example.com', password=password))
        assert r.status_code == 303, r.text
        return c


# Frozen dataclasses, shared as make_world's defaults (B008: built once, not at each call).
DEFAULT_RATE_LIMIT, DEFAULT_THROTTLE = RateLimit(5, 60), LoginThrottle()


def make_world(host_db, tmp_path, rate_limit=DEFAULT_RATE_LIMIT, throttle=DEFAULT_THROTTLE) -> World:
    clock = Clock()
    sessions = SessionManager(host_db, SECRET, idle=timedelta(minutes=30), absolute=timedelta(hours=8), clock=clock)
    w = World(host_db, sessions, TenantDbs(tmp_path), clock)
    w.resolver = AuthResolver(
        host_db,
        sessions,
        w.tenant_dbs,
        subscription_access,
        rate_limit=rate_limit,
        unavailable=(KeyError,),
        publishable=(r'/api/public/.*',),
        tenantless=(r'/tenants.*', r'/account.*', r'/logout', r'/admin/.*'),
    )
    app = FastHTML(before=saas_beforeware(w.resolver), secret_key=SECRET)

    @app.post('/login')
    def do_login(req, email: str, password: str):
        try:
            _, cookie = login(sessions, email, password, req.client.host, req.headers.get('user-agent'), throttle, FAST)
        except LoginThrottled as e:
            return Response(str(e), 429, headers={'Retry-After': str(e.retry_after)})
        except LoginFailed:
            return Response('wrong email or password', 401)
        return sessions.set_cookie(RedirectResponse('/notes', 303), cookie, req.url.scheme == 'https')

    @app.post('/logout')
    def do_logout(auth):
        logout(sessions, auth.session)
        return sessions.clear_cookie(RedirectResponse('/login', 303))

    @app.post('/account/password')
    def new_password(auth, old: str, new: str):
        change_password(sessions, auth.session, old, new, FAST)
        return 'changed'

    @app.post('/tenants/switch')
    def do_switch(auth, tenant_id: str):
        try:
            switch_tenant(sessions, auth.session, tenant_id)
        except MembershipError as e:
            return Response(str(e), 403)
        return RedirectResponse('/notes', 303)

    @app.get('/tenants')
    def tenants(auth):
        return f'choose a tenant, {auth.user.id}'

    @app.get('/notes')
    def notes(auth):
        return dict(
            tenant=auth.db.q("select tenant_id from marker")[0]['tenant_id'],
            user=auth.user.id,
            role=auth.role,
            impersonator=auth.impersonator and auth.impersonator.id,
            notes=[n['body'] for n in auth.db.q("select body from notes order by id")],
        )

    @app.post('/notes')
    def add_note(auth, body: str):
        auth.db.q("insert into notes (body, written_for) values (:b, :t)", b=body, t=auth.tenant_id)
        with host_db.transaction():
            audit(host_db, 'note.created', target_id=auth.tenant_id)
        return 'ok'

    @app.get('/api/notes')
    def api_notes(auth):
        return dict(
            tenant=auth.db.q("select tenant_id from marker")[0]['tenant_id'], mode=auth.mode, key=auth.api_key_id
        )

    @app.get('/api/public/ping')
    def public_ping(auth):
        return dict(tenant=auth.tenant_id)

    @app.get('/billing')
    def billing(auth):
        return f'billing for {auth.tenant_id}: {auth.access}'

    @app.post('/admin/impersonate/stop')
    def unimpersonate(auth):
        stop_impersonation(sessions, auth.session)
        return 'ok'

    @app.post('/admin/impersonate/{uid}')
    def impersonate(auth, uid: str):
        start_impersonation(sessions, auth.session, uid)
        return 'ok'

    @app.get('/stripe/webhook')
    def webhook(req):
        return 'webhook reached without auth'

    w.app = app
    return w
