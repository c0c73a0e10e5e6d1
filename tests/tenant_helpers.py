"Fixtures and helpers shared by the tenant tests (and importable by their subprocesses)."

import os, secrets, subprocess, sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from fh_saas.db_host import HostDatabase
from fh_saas.db_tenant import add_db_server, deprovision_tenant, tenants_t
from fh_saas.tenant_router import _listeners
from pgserver import wait_for

SECRET = 'test-master-key-' + '0123456789abcdef' * 2
ROOT = Path(__file__).resolve().parents[1]


def prepare(engine) -> int:
    "The tenant schema used by the tests: one table, version 3."
    with engine.begin() as c:
        c.exec_driver_sql(
            'CREATE TABLE IF NOT EXISTS notes (id SERIAL PRIMARY KEY, body TEXT)'
            if engine.dialect.name == 'postgresql'
            else 'CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT)'
        )
    return 3


def new_id(prefix='t') -> str:
    "A tenant id unique across the test session (roles are cluster-wide)."
    return f"{prefix}{secrets.token_hex(5)}"


def register(host_db, server, name='main', **kw) -> dict:
    "Register a test PostgreSQL cluster as a tenant database server."
    u = server.admin_url
    return add_db_server(host_db, name, u.host, u.password, port=u.port, admin_user=u.username, **kw)


def pg_names(server, kind: str, like: str) -> list[str]:
    "Database (`kind='db'`) or role (`'role'`) names on `server` matching the SQL LIKE pattern."
    q = (
        "SELECT datname FROM pg_database WHERE datname LIKE %s"
        if kind == 'db'
        else "SELECT rolname FROM pg_roles WHERE rolname LIKE %s"
    )
    with server.engine.connect() as c:
        return sorted(r[0] for r in c.exec_driver_sql(q, (like,)))


def tenant_connections(server, like='tenant_%') -> int:
    "Open client connections on `server` made by tenant roles."
    with server.engine.connect() as c:
        return c.exec_driver_sql("SELECT count(*) FROM pg_stat_activity WHERE usename LIKE %s", (like,)).scalar()


def run_elsewhere(code: str):
    "Run `code` in a separate Python process (another worker of the app)."
    env = dict(os.environ, PYTHONPATH=str(ROOT), FH_SAAS_SECRET_KEY=SECRET)
    subprocess.run([sys.executable, '-c', code], env=env, check=True, cwd=ROOT, timeout=60)


OTHER_SECRET = 'other-install-key-' + 'fedcba9876543210' * 2


def as_other_install(host_url: str, server, code: str) -> str:
    """Run `code` as another fh_saas install: its own process, master key and host database `host_url` (as `host_db`),
    with `server` registered there as its tenant server `main`; what it prints."""
    u = server.admin_url
    prelude = (
        "import os, sys; sys.path.insert(0, 'tests')\n"
        "from fh_saas.db_host import HostDatabase\n"
        "from fh_saas.db_tenant import add_db_server, deprovision_tenant, provision_tenant\n"
        "from tenant_helpers import prepare\n"
        f"host_db = HostDatabase({host_url!r})\n"
        "if not host_db.q('SELECT id FROM core_db_servers'):\n"
        f"    add_db_server(host_db, 'main', {u.host!r}, os.environ['OTHER_PG_PASSWORD'], port={u.port})\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), FH_SAAS_SECRET_KEY=OTHER_SECRET, OTHER_PG_PASSWORD=u.password)
    r = subprocess.run(
        [sys.executable, '-c', prelude + code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def pg_marks(server, name: str) -> tuple:
    "The comments (fh_saas's install marks) on role `name` and on database `name` of `server`."
    with server.engine.connect() as c:
        return c.exec_driver_sql(
            "SELECT (SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = %s),"
            " (SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s)",
            (name, name),
        ).one()


def listening(router):
    """The `RoutingListener` of `router` (on a PostgreSQL host) once it listens and has made its routers forget what
    came before."""
    listener = _listeners[router.host_db.engine]
    assert wait_for(lambda: listener.listens >= 1)
    return listener


def clean_up(host_db):
    "Drop every tenant database the test left behind, then close the host database."
    with host_db.engine.connect() as c:
        ids = [r[0] for r in c.execute(sa.select(tenants_t.c.id).where(tenants_t.c.status != 'deleted'))]
    for tid in ids:
        deprovision_tenant(host_db, tid)
    host_db.close()
    HostDatabase.reset_instance()


@pytest.fixture(autouse=True)
def secret_key(monkeypatch):
    monkeypatch.setenv('FH_SAAS_SECRET_KEY', SECRET)


@pytest.fixture
def pg_tenant_host(pg_server, pg_url):
    "A PostgreSQL host database with the test cluster registered as its one tenant server."
    host_db = HostDatabase(pg_url)
    register(host_db, pg_server)
    yield host_db
    clean_up(host_db)


@pytest.fixture
def sqlite_tenant_host(tmp_path, monkeypatch):
    "A SQLite host database whose tenants are files in `tmp_path/tenants`."
    monkeypatch.delenv('FH_SAAS_TENANT_DIR', raising=False)
    host_db = HostDatabase(f"sqlite:///{tmp_path / 'host.db'}")
    yield host_db
    clean_up(host_db)
