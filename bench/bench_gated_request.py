"""Host-database statements per gated request, on SQLite and on PostgreSQL: a `setup_saas` app, a signed-in member of a
paying tenant, and a route behind `require_feature` (and one behind `require_quota` too). Counts every statement the
host engine sends while the requests run: queries (SQLAlchemy `before_cursor_execute`) plus the BEGIN and COMMIT of
each transaction (engine `commit`/`rollback` events, except where psycopg2 began none: an autocommitted statement),
and how many of the queries read the tenant's subscriptions. Pool checkouts send nothing since pre-ping became a
socket check. bench/bench_app.py counts the same on the server, under load.

Where the statements went (PostgreSQL, before): 11 queries in 4 transactions, about 19 statements with BEGIN/COMMIT
and 3-4 pre-pings: the session (and its touch); user, membership and tenant in a second transaction; the
entitlements (tenant, subscriptions, plans, overrides) in a third; and the router's catalog read every 5 s per tenant.
Now: one autocommitted query joins session, user, impersonator, membership, tenant and its server (the session's
touch, once a minute, is a second statement); the entitlements come from `EntitlementsCache`, read again only when
PostgreSQL announces a billing change; the router takes the beforeware's catalog row instead of reading its own; and
`require_quota`'s count is one autocommitted upsert.

Measured here (2 cores, shared with other work), per request:
- PostgreSQL: `require_feature` 1.0 statement, none reading core_subscriptions; with `require_quota` 2.0;
- SQLite: `require_feature` 9.0 statements (5 queries in 2 transactions: SQLite does not cache the entitlements, as
  nothing announces its changes).

Run: python bench/bench_gated_request.py   (exits 1 if a request is refused)"""

import os, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
import sqlalchemy as sa
from fasthtml.common import FastHTML
from starlette.testclient import TestClient

from fh_saas.app import setup_saas
from fh_saas.billing import require_feature, require_quota, seed_plans
from fh_saas.db_host import GlobalUser, HostDatabase, Membership, Subscription
from fh_saas.db_tenant import provision_tenant
from fh_saas.mail import MemoryOutbox
from fh_saas.sessions import SessionManager
from pgserver import start_server

N = 300


class Counter:
    "Statements an engine sends: queries, and the BEGIN and COMMIT/ROLLBACK around them."

    def __init__(self, engine):
        self.queries, self.ends = [], 0
        sa.event.listen(engine, 'before_cursor_execute', lambda conn, cur, sql, *a: self.queries.append(sql))
        for end in ('commit', 'rollback'):
            sa.event.listen(engine, end, self._end)

    def _end(self, conn):
        "A transaction ends; it sent BEGIN and COMMIT unless psycopg2 says none was begun (an autocommitted statement)."
        raw = conn.connection.dbapi_connection
        if not hasattr(raw, 'get_transaction_status') or raw.get_transaction_status() != 0:
            self.ends += 1

    def clear(self):
        self.queries, self.ends = [], 0

    @property
    def statements(self) -> int:
        return len(self.queries) + 2 * self.ends


def gated_app(host_db, tmp: Path):
    os.environ['FH_SAAS_TENANT_DIR'] = str(tmp / 'tenants')
    app = FastHTML(default_hdrs=False, secret_key='b' * 48)
    saas = setup_saas(
        app, host_db, sessions=SessionManager(host_db, 's' * 48), mailer=MemoryOutbox(), webhook_secrets=[]
    )

    @app.get('/report')
    @require_feature('exports')
    def report(auth):
        return f'report for {auth.tenant_id}'

    @app.get('/export')
    @require_feature('exports')
    @require_quota('exports')
    def export(auth):
        return f'exported for {auth.tenant_id}'

    seed_plans(host_db, [dict(id='pro', name='Pro', features=['exports'], quotas={'exports': None})])
    host_db.global_users.insert(GlobalUser(id='ann', email='ann@example.com'))
    provision_tenant(host_db, 'acme', 'Acme')
    host_db.memberships.insert(Membership(user_id='ann', tenant_id='acme', role='owner'))
    host_db.subscriptions.insert(
        Subscription(tenant_id='acme', status='active', plan_tier='pro', payment_type='subscription')
    )
    cli = TestClient(app, follow_redirects=False)
    cli.cookies.set(saas.sessions.cookie_name, saas.sessions.create('ann', 'acme'))
    return saas, cli


def measure(name: str, url: str) -> bool:
    tmp = Path(tempfile.mkdtemp())
    host_db = HostDatabase(url)
    saas, cli = gated_app(host_db, tmp)
    counter, ok = Counter(host_db.engine), True
    for path, what in (('/report', 'require_feature'), ('/export', 'require_feature + require_quota')):
        ok = all(cli.get(path).status_code == 200 for _ in range(3)) and ok  # warm: the caches fill
        time.sleep(0.5)  # the warm-up's notifications arrive
        counter.clear()
        t0 = time.perf_counter()
        ok = all(cli.get(path).status_code == 200 for _ in range(N)) and ok
        dt = time.perf_counter() - t0
        subs = sum('core_subscriptions' in q for q in counter.queries)
        print(
            f"{name}, {what}: host statements per gated request {counter.statements / N:.1f} "
            f"({len(counter.queries) / N:.1f} queries in {counter.ends / N:.1f} transactions; reading "
            f"core_subscriptions {subs / N:.1f}); {N / dt:.0f} requests/s through TestClient"
        )
    saas.router.close()
    host_db.close()
    HostDatabase.reset_instance()
    return ok


if __name__ == '__main__':
    os.environ.setdefault('FH_SAAS_SECRET_KEY', 'bench-master-key-0123456789abcdef0123456789')
    ok = measure('SQLite', f"sqlite:///{Path(tempfile.mkdtemp()) / 'host.db'}")
    server = start_server()
    try:
        ok = measure('PostgreSQL', server.create_database('gated')) and ok
    finally:
        server.stop()
    if not ok:
        print('a gated request was refused')
        sys.exit(1)
