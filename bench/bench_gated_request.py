"""Host-database statements per gated request: a `setup_saas` app on SQLite, a signed-in member of a paying tenant,
and a route behind `require_feature` + `require_quota`. Counts every statement the host engine executes
(SQLAlchemy `before_cursor_execute`) while the request runs, and how many of them read the tenant's subscriptions.

Run: python bench/bench_gated_request.py"""
import os, tempfile, time
from pathlib import Path

import sqlalchemy as sa
from fasthtml.common import FastHTML
from starlette.testclient import TestClient

from fh_saas.app import setup_saas
from fh_saas.billing import require_feature, require_quota, seed_plans
from fh_saas.db_host import GlobalUser, HostDatabase, Membership, Subscription
from fh_saas.db_tenant import provision_tenant
from fh_saas.mail import MemoryOutbox
from fh_saas.sessions import SessionManager

tmp = Path(tempfile.mkdtemp())
os.environ['FH_SAAS_TENANT_DIR'] = str(tmp / 'tenants')
host_db = HostDatabase(f"sqlite:///{tmp / 'host.db'}")
app = FastHTML(default_hdrs=False, secret_key='b' * 48)
saas = setup_saas(app, host_db, sessions=SessionManager(host_db, 's' * 48), mailer=MemoryOutbox(), webhook_secrets=[])

@app.get('/export')
@require_feature('exports')
@require_quota('exports')
def export(auth): return f'exported for {auth.tenant_id}'

seed_plans(host_db, [dict(id='pro', name='Pro', features=['exports'], quotas={'exports': None})])
host_db.global_users.insert(GlobalUser(id='ann', email='ann@example.com'))
provision_tenant(host_db, 'acme', 'Acme')
host_db.memberships.insert(Membership(user_id='ann', tenant_id='acme', role='owner'))
host_db.subscriptions.insert(Subscription(tenant_id='acme', status='active', plan_tier='pro',
                                          payment_type='subscription'))
cli = TestClient(app, follow_redirects=False)
cli.cookies.set(saas.sessions.cookie_name, saas.sessions.create('ann', 'acme'))

statements = []
sa.event.listen(host_db.engine, 'before_cursor_execute', lambda conn, cur, sql, *a: statements.append(sql))
n = 200
assert cli.get('/export').status_code == 200
statements.clear()
t0 = time.perf_counter()
for _ in range(n): assert cli.get('/export').status_code == 200
dt = time.perf_counter() - t0
subs = sum('core_subscriptions' in s for s in statements)
print(f"statements per gated request: {len(statements) / n:.1f} (reading core_subscriptions: {subs / n:.1f}); "
      f"{n / dt:.0f} requests/s through TestClient")
saas.router.close(); host_db.close(); HostDatabase.reset_instance()
