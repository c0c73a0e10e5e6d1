"Tenant provisioning and lifecycle on real PostgreSQL clusters and SQLite files."

import re
from functools import partial

import pytest
import sqlalchemy as sa

from fh_saas import db_tenant
from fh_saas.cli import main
from fh_saas.db_host import HostDatabase, host_components, schema_versions_t
from fh_saas.db_tenant import (
    ForeignDatabaseObject,
    InvalidTenantId,
    NoServerAvailable,
    PostgresStore,
    SqliteStore,
    TenantUnavailable,
    close_host_database,
    db_servers_t,
    deprovision_tenant,
    install_mark,
    install_t,
    provision_tenant,
    resume_tenant,
    rotate_secret_key,
    suspend_tenant,
    tenant_engine,
    tenant_url,
    tenants_t,
)
from fh_saas.demo import _tenants_beside_host
from fh_saas.tenant_migrations import TenantMigration, TenantSchema, database_version, migrate_database, tenants_behind
from tenant_helpers import SECRET, as_other_install, new_id, pg_marks, pg_names, prepare, register
from tenant_helpers import pg_tenant_host, secret_key, sqlite_tenant_host  # noqa: F401 (fixtures)


class Crash(Exception):
    "A failure injected between two steps."


def crash_after(monkeypatch, action, step):
    def hook(a, s):
        if (a, s) == (action, step):
            raise Crash(f"{a}:{s}")

    monkeypatch.setattr(db_tenant, '_after_step', hook)


def catalog(host_db, tid) -> list[dict]:
    with host_db.engine.connect() as c:
        return [dict(r) for r in c.execute(sa.select(tenants_t).where(tenants_t.c.id == tid)).mappings()]


def tenant_tables(url) -> list[str]:
    eng = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        return sa.inspect(eng).get_table_names()
    finally:
        eng.dispose()


def assert_pg_tenant(host_db, server, tid):
    "Exactly one database, one role and one active row, and the tenant's own role can use its schema."
    name = f"tenant_{tid}"
    assert pg_names(server, 'db', name) == [name] and pg_names(server, 'role', name) == [name]
    rows = catalog(host_db, tid)
    assert [(r['status'], r['is_active'], r['schema_version']) for r in rows] == [('active', True, 3)]
    eng = sa.create_engine(tenant_url(host_db, tid), poolclass=sa.pool.NullPool)
    with eng.begin() as c:
        c.exec_driver_sql("INSERT INTO notes (body) VALUES ('x')")
        c.exec_driver_sql("CREATE TABLE more (id int)")
        owner = c.exec_driver_sql("SELECT tableowner FROM pg_tables WHERE tablename = 'notes'").scalar()
    eng.dispose()
    assert owner == name


# --- PostgreSQL --------------------------------------------------------------------------------


@pytest.mark.postgres
def test_provision_pg_catalog_and_secrets(pg_tenant_host, pg_server):
    tid = new_id()
    row = provision_tenant(pg_tenant_host, tid, 'Acme', prepare=prepare)
    assert (row.status, row.db_name, row.db_role, row.routing_version) == (
        'active',
        f'tenant_{tid}',
        f'tenant_{tid}',
        2,
    )
    assert_pg_tenant(pg_tenant_host, pg_server, tid)
    url = tenant_url(pg_tenant_host, tid)
    assert url.password and url.password not in row.db_url and sa.make_url(row.db_url).password is None
    with pg_tenant_host.engine.connect() as c:
        dump = ' '.join(
            str(v)
            for r in c.execute(
                sa.select(tenants_t, db_servers_t).select_from(
                    tenants_t.join(db_servers_t, db_servers_t.c.id == tenants_t.c.server_id)
                )
            )
            for v in r
        )
    assert url.password not in dump and pg_server.admin_url.password not in dump and SECRET not in dump
    assert provision_tenant(pg_tenant_host, tid, prepare=prepare).routing_version == 2


@pytest.mark.postgres
def test_tenant_credentials_reach_only_their_own_database(pg_tenant_host, pg_server):
    a, b = new_id('a'), new_id('b')
    for tid in (a, b):
        provision_tenant(pg_tenant_host, tid, prepare=prepare)
    a_url, b_url = tenant_url(pg_tenant_host, a), tenant_url(pg_tenant_host, b)
    assert tenant_tables(a_url) == ['notes']
    with pytest.raises(sa.exc.OperationalError, match='permission denied for database'):
        tenant_tables(a_url.set(database=b_url.database))
    with pytest.raises(sa.exc.OperationalError, match='password authentication failed'):
        tenant_tables(b_url.set(password=a_url.password))
    with pytest.raises(sa.exc.OperationalError, match='permission denied for database'):
        tenant_tables(a_url.set(database=db_tenant.TEMPLATE_DB))


PG_STEPS = PostgresStore.provision_steps


@pytest.mark.postgres
@pytest.mark.parametrize('step', PG_STEPS)
def test_pg_provisioning_resumes_after_a_crash_at_every_step(pg_tenant_host, pg_server, monkeypatch, step):
    tid = new_id()
    crash_after(monkeypatch, 'provision', step)
    with pytest.raises(Crash):
        provision_tenant(pg_tenant_host, tid, prepare=prepare)
    assert [r['status'] for r in catalog(pg_tenant_host, tid)] == ['provisioning' if step != 'activate' else 'active']
    if step == 'database':  # created, but nobody may connect before CONNECT is revoked from PUBLIC
        with pytest.raises(sa.exc.OperationalError, match='not currently accepting connections'):
            tenant_tables(tenant_url(pg_tenant_host, tid))
    monkeypatch.setattr(db_tenant, '_after_step', lambda a, s: None)
    provision_tenant(pg_tenant_host, tid, prepare=prepare)
    provision_tenant(pg_tenant_host, tid, prepare=prepare)
    assert_pg_tenant(pg_tenant_host, pg_server, tid)


@pytest.mark.postgres
@pytest.mark.parametrize('step', PostgresStore.deprovision_steps)
def test_pg_deprovisioning_resumes_after_a_crash_at_every_step(pg_tenant_host, pg_server, monkeypatch, step):
    tid = new_id()
    provision_tenant(pg_tenant_host, tid, prepare=prepare)
    crash_after(monkeypatch, 'deprovision', step)
    with pytest.raises(Crash):
        deprovision_tenant(pg_tenant_host, tid)
    assert catalog(pg_tenant_host, tid)[0]['status'] in ('deleting', 'deleted')
    with pytest.raises(TenantUnavailable):
        resume_tenant(pg_tenant_host, tid)
    monkeypatch.setattr(db_tenant, '_after_step', lambda a, s: None)
    row = deprovision_tenant(pg_tenant_host, tid)
    assert (row.status, row.is_active) == ('deleted', False) and row.deleted_at
    assert pg_names(pg_server, 'db', f'tenant_{tid}') == [] and pg_names(pg_server, 'role', f'tenant_{tid}') == []
    assert deprovision_tenant(pg_tenant_host, tid).routing_version == row.routing_version


@pytest.mark.postgres
def test_pg_lifecycle_bumps_routing_version(pg_tenant_host, pg_server):
    tid = new_id()
    versions = [provision_tenant(pg_tenant_host, tid, prepare=prepare).routing_version]
    for change in (suspend_tenant, resume_tenant, suspend_tenant, deprovision_tenant):
        row = change(pg_tenant_host, tid)
        versions.append(row.routing_version)
        assert row.is_active == (row.status == 'active')
    assert versions == [2, 3, 4, 5, 7] and row.status == 'deleted'
    with pytest.raises(TenantUnavailable, match='deleted'):
        provision_tenant(pg_tenant_host, tid, prepare=prepare)


@pytest.mark.postgres
def test_concurrent_provisioning_of_one_id_yields_one_tenant(pg_tenant_host, pg_server, race):
    tid, n = new_id(), 4
    results = race([lambda: provision_tenant(pg_tenant_host, tid, prepare=prepare)] * n, catch=Exception)
    errors = [r for r in results if isinstance(r, Exception)]
    assert errors == [] and len(results) == n and {r.id for r in results} == {tid}
    assert {(r.status, r.routing_version) for r in results} == {('active', 2)}
    assert_pg_tenant(pg_tenant_host, pg_server, tid)


BAD_IDS = [
    "acme'; DROP DATABASE postgres; --",
    'acme"; DROP ROLE postgres; --',
    '../../etc/passwd',
    'acme/../x',
    'Acme',
    'x',
    'a' * 41,
    'acme\x00',
    'acme\n',
    ' acme',
    'tenant-1',
    'ac me',
    '',
    None,
    42,
]


@pytest.mark.postgres
def test_bad_ids_are_rejected_before_anything_is_created(pg_tenant_host, pg_server, tmp_path):
    before_dbs, before_roles = pg_names(pg_server, 'db', '%'), pg_names(pg_server, 'role', '%')
    for bad in BAD_IDS:
        for call in (
            lambda bad=bad: provision_tenant(pg_tenant_host, bad, prepare=prepare),
            lambda bad=bad: suspend_tenant(pg_tenant_host, bad),
            lambda bad=bad: deprovision_tenant(pg_tenant_host, bad),
            lambda bad=bad: tenant_url(pg_tenant_host, bad),
        ):
            with pytest.raises(InvalidTenantId):
                call()
    assert pg_tenant_host.tenants.count == 0
    assert (pg_names(pg_server, 'db', '%'), pg_names(pg_server, 'role', '%')) == (before_dbs, before_roles)


@pytest.mark.postgres
def test_two_servers_least_loaded_and_named_placement(pg_tenant_host, pg_server, second_pg_server):
    register(pg_tenant_host, second_pg_server, 'second')
    ids = [new_id() for _ in range(4)]
    rows = [provision_tenant(pg_tenant_host, tid, prepare=prepare) for tid in ids]
    servers = {s['id']: s['name'] for s in pg_tenant_host.q('SELECT id, name FROM core_db_servers')}
    assert sorted(servers[r.server_id] for r in rows) == ['main', 'main', 'second', 'second']
    named = provision_tenant(pg_tenant_host, new_id(), prepare=prepare, server='second')
    assert servers[named.server_id] == 'second'
    for r in rows + [named]:
        cluster = pg_server if servers[r.server_id] == 'main' else second_pg_server
        assert_pg_tenant(pg_tenant_host, cluster, r.id)
        other = second_pg_server if cluster is pg_server else pg_server
        assert pg_names(other, 'db', r.db_name) == []
    for r in rows + [named]:
        deprovision_tenant(pg_tenant_host, r.id)


@pytest.mark.postgres
def test_full_or_unknown_server_refuses_without_creating(pg_tenant_host, pg_server):
    with pg_tenant_host.transaction() as c:
        c.execute(db_servers_t.update().values(max_tenants=1))
    first = new_id()
    provision_tenant(pg_tenant_host, first, prepare=prepare)
    before = pg_names(pg_server, 'db', 'tenant_%')
    with pytest.raises(NoServerAvailable):
        provision_tenant(pg_tenant_host, new_id(), prepare=prepare)
    with pytest.raises(NoServerAvailable, match="'nowhere'"):
        provision_tenant(pg_tenant_host, new_id(), server='nowhere')
    assert pg_names(pg_server, 'db', 'tenant_%') == before and pg_tenant_host.tenants.count == 1
    assert provision_tenant(pg_tenant_host, first, prepare=prepare).status == 'active'


@pytest.mark.postgres
def test_pg_secret_key_is_required(pg_tenant_host, monkeypatch):
    with monkeypatch.context() as m, pytest.raises(ValueError, match='FH_SAAS_SECRET_KEY'):
        m.setenv('FH_SAAS_SECRET_KEY', 'too short')
        provision_tenant(pg_tenant_host, new_id())
    assert pg_tenant_host.tenants.count == 0


# --- SQLite ------------------------------------------------------------------------------------


def sqlite_files(host_db) -> list[str]:
    d = db_tenant.tenant_dir(host_db)
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.mark.parametrize('step', SqliteStore.provision_steps)
def test_sqlite_provisioning_resumes_after_a_crash_at_every_step(sqlite_tenant_host, monkeypatch, step):
    crash_after(monkeypatch, 'provision', step)
    with pytest.raises(Crash):
        provision_tenant(sqlite_tenant_host, 'acme', prepare=prepare)
    monkeypatch.setattr(db_tenant, '_after_step', lambda a, s: None)
    row = provision_tenant(sqlite_tenant_host, 'acme', prepare=prepare)
    assert [(r['status'], r['schema_version']) for r in catalog(sqlite_tenant_host, 'acme')] == [('active', 3)]
    assert tenant_tables(row.db_url) == ['notes'] and 'acme.db' in sqlite_files(sqlite_tenant_host)


@pytest.mark.parametrize('step', SqliteStore.deprovision_steps)
def test_sqlite_deprovisioning_resumes_after_a_crash_at_every_step(sqlite_tenant_host, monkeypatch, step):
    provision_tenant(sqlite_tenant_host, 'acme', prepare=prepare)
    crash_after(monkeypatch, 'deprovision', step)
    with pytest.raises(Crash):
        deprovision_tenant(sqlite_tenant_host, 'acme')
    monkeypatch.setattr(db_tenant, '_after_step', lambda a, s: None)
    assert deprovision_tenant(sqlite_tenant_host, 'acme').status == 'deleted'
    assert sqlite_files(sqlite_tenant_host) == []


def test_sqlite_concurrent_provisioning_and_bad_ids(sqlite_tenant_host, race):
    results = race([lambda: provision_tenant(sqlite_tenant_host, 'acme', prepare=prepare).routing_version] * 4)
    assert results == [2] * 4 and len(catalog(sqlite_tenant_host, 'acme')) == 1
    for bad in BAD_IDS:
        with pytest.raises(InvalidTenantId):
            provision_tenant(sqlite_tenant_host, bad, prepare=prepare)
    assert sqlite_files(sqlite_tenant_host) == ['acme.db'] and sqlite_tenant_host.tenants.count == 1
    assert not list(db_tenant.tenant_dir(sqlite_tenant_host).parent.parent.glob('etc*'))


def test_tenant_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv('FH_SAAS_TENANT_DIR', str(tmp_path / 'elsewhere'))
    host_db = HostDatabase(f"sqlite:///{tmp_path / 'host.db'}")
    try:
        row = provision_tenant(host_db, 'acme', prepare=prepare)
        assert (
            row.db_url == f"sqlite:///{tmp_path / 'elsewhere' / 'acme.db'}"
            and (tmp_path / 'elsewhere' / 'acme.db').exists()
        )
        deprovision_tenant(host_db, 'acme')
    finally:
        host_db.close()
        HostDatabase.reset_instance()


@pytest.mark.postgres
def test_template_is_kept_at_the_latest_schema(pg_tenant_host, pg_server, monkeypatch):
    first = provision_tenant(pg_tenant_host, new_id(), prepare=prepare)

    def prepare_v4(engine):
        prepare(engine)
        with engine.begin() as c:
            c.exec_driver_sql('CREATE TABLE IF NOT EXISTS tags (id int)')
        return 4

    monkeypatch.setattr(PostgresStore, '_prepared', set())  # a new deploy: a fresh process with a newer migrator
    later = provision_tenant(pg_tenant_host, new_id(), prepare=prepare_v4)
    assert (first.schema_version, later.schema_version) == (3, 4)
    assert sorted(tenant_tables(tenant_url(pg_tenant_host, later.id))) == ['notes', 'tags']
    assert tenant_tables(tenant_url(pg_tenant_host, first.id)) == ['notes']
    eng = sa.create_engine(pg_server.url(db_tenant.TEMPLATE_DB), poolclass=sa.pool.NullPool)
    with eng.begin() as c:
        c.exec_driver_sql('DROP TABLE tags')  # leave the shared template as other tests expect
    eng.dispose()


V1 = TenantSchema([TenantMigration(1, 'notes', 'CREATE TABLE notes (id serial PRIMARY KEY, body text)')])
V2 = TenantSchema([*V1, TenantMigration(2, 'tags', 'CREATE TABLE tags (id int)')])


@pytest.mark.postgres
def test_provisioning_resumed_by_a_newer_deploy_ends_at_the_newer_version(
    pg_tenant_host, second_pg_server, monkeypatch
):
    register(pg_tenant_host, second_pg_server, 'second')  # a cluster of its own: its template gets these tests' schema
    tid = new_id()
    crash_after(monkeypatch, 'provision', 'database')
    with pytest.raises(Crash):
        provision_tenant(pg_tenant_host, tid, prepare=partial(migrate_database, schema=V1), server='second')
    monkeypatch.setattr(db_tenant, '_after_step', lambda a, s: None)
    monkeypatch.setattr(PostgresStore, '_prepared', set())  # a new deploy, with migration 2, resumes it
    row = provision_tenant(pg_tenant_host, tid, prepare=partial(migrate_database, schema=V2))
    eng = tenant_engine(pg_tenant_host, tid, poolclass=sa.pool.NullPool)
    try:
        assert (row.status, row.schema_version, database_version(eng)) == ('active', 2, 2)
        assert sorted(sa.inspect(eng).get_table_names()) == ['_fh_saas_schema', 'notes', 'tags']
        with eng.connect() as c:  # migration 2 ran on resume, and what it made is the tenant's too
            assert c.exec_driver_sql(
                "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'"
            ).scalars().all() == [row.db_role]
        assert tenants_behind(pg_tenant_host, 2) == []
    finally:
        eng.dispose()
        deprovision_tenant(pg_tenant_host, tid)  # before the second cluster stops


KINDS = TenantSchema(
    [
        TenantMigration(
            1,
            'kinds',
            """
    CREATE SCHEMA app;
    CREATE TABLE app.items (id serial PRIMARY KEY);
    CREATE TYPE mood AS ENUM ('ok');
    CREATE DOMAIN positive AS int CHECK (VALUE > 0);
    CREATE TYPE pair AS (a int, b int);
    CREATE TYPE span AS RANGE (subtype = int4);
    CREATE FUNCTION app.greet() RETURNS text LANGUAGE sql AS $$ SELECT 'hi' $$;
    CREATE PROCEDURE tidy() LANGUAGE sql AS $$ SELECT 1 $$""",
        )
    ]
)


@pytest.mark.postgres
def test_the_tenant_role_owns_every_kind_of_object_its_migrations_made(pg_tenant_host, second_pg_server):
    register(pg_tenant_host, second_pg_server, 'second')  # a cluster of its own: its template gets these tests' schema
    row = provision_tenant(pg_tenant_host, new_id(), prepare=partial(migrate_database, schema=KINDS), server='second')
    eng = tenant_engine(pg_tenant_host, row.id, poolclass=sa.pool.NullPool)
    try:
        with eng.begin() as c:  # what a later migration, run as the tenant role, does
            for stmt in (
                "ALTER TYPE mood ADD VALUE 'great'",
                "ALTER DOMAIN positive ADD CHECK (VALUE < 100)",
                "ALTER TYPE pair ADD ATTRIBUTE c int",
                "CREATE OR REPLACE FUNCTION app.greet() RETURNS text LANGUAGE sql AS $$ SELECT 'hello' $$",
                "CREATE OR REPLACE PROCEDURE tidy() LANGUAGE sql AS $$ SELECT 2 $$",
                "ALTER TABLE app.items ADD COLUMN body text",
                "CREATE TABLE app.more (id int)",
                "ALTER TYPE span RENAME TO spans",
            ):
                c.exec_driver_sql(stmt)
            assert c.exec_driver_sql("SELECT app.greet()").scalar() == 'hello'
            owners = c.exec_driver_sql("""SELECT nspname, nspowner::regrole::text FROM pg_namespace
                                          WHERE nspname IN ('app', 'public') ORDER BY 1""").all()
        assert owners == [('app', row.db_role), ('public', 'pg_database_owner')]
    finally:
        eng.dispose()
        deprovision_tenant(pg_tenant_host, row.id)  # before the second cluster stops


@pytest.mark.postgres
def test_suspend_and_resume_are_idempotent(pg_tenant_host):
    tid = new_id()
    provision_tenant(pg_tenant_host, tid, prepare=prepare)
    first = suspend_tenant(pg_tenant_host, tid)
    assert suspend_tenant(pg_tenant_host, tid).routing_version == first.routing_version
    assert resume_tenant(pg_tenant_host, tid).status == 'active'
    assert resume_tenant(pg_tenant_host, tid).routing_version == first.routing_version + 1


# --- shared servers: what this install made, and what it did not -------------------------------------------------


@pytest.mark.postgres
def test_a_second_install_on_the_server_adopts_none_of_the_first_ones_tenants(pg_tenant_host, pg_server):
    tid = new_id()
    provision_tenant(pg_tenant_host, tid, prepare=prepare)
    mark = install_mark(pg_tenant_host)
    assert pg_marks(pg_server, f'tenant_{tid}') == (mark, mark)
    other = pg_server.create_database()
    try:
        said = as_other_install(
            other,
            pg_server,
            f"""
for step in (lambda: provision_tenant(host_db, {tid!r}, prepare=prepare), lambda: deprovision_tenant(host_db, {tid!r})):
    try: print(step().status)
    except Exception as e: print(type(e).__name__, e)""",
        )
    finally:
        pg_server.drop_database(other)
    refused = (
        f"ForeignDatabaseObject {{}} 'tenant_{tid}' on server 'main' is another fh_saas install's: fh_saas "
        "adopts only what this install made; use another tenant id here (installs that share a server must not "
        "share tenant ids)"
    )
    assert said.splitlines() == [refused.format('role'), refused.format('database')]
    assert_pg_tenant(pg_tenant_host, pg_server, tid)  # still there, and its own credentials still log in
    assert pg_marks(pg_server, f'tenant_{tid}') == (mark, mark)


def their_object(server, kind: str, name: str):
    "A role or database called `name` that someone other than fh_saas made on `server`."
    with server.engine.connect() as c:
        c.exec_driver_sql(
            f'CREATE ROLE "{name}" LOGIN PASSWORD \'theirs\'' if kind == 'role' else f'CREATE DATABASE "{name}"'
        )


def drop_their_object(server, kind: str, name: str):
    with server.engine.connect() as c:
        c.exec_driver_sql(f'DROP {kind.upper()} "{name}"')


@pytest.mark.postgres
@pytest.mark.parametrize('kind', ['role', 'database'])
def test_a_role_or_database_fh_saas_did_not_make_is_never_adopted_nor_dropped(pg_tenant_host, pg_server, kind):
    tid = new_id()
    name = f'tenant_{tid}'
    their_object(pg_server, kind, name)
    try:
        says = (
            f"{kind} '{name}' on server 'main' carries no fh_saas install mark: fh_saas adopts only what this "
            "install made; use another tenant id, or drop the"
        )
        with pytest.raises(ForeignDatabaseObject, match=re.escape(says)):
            provision_tenant(pg_tenant_host, tid, prepare=prepare)
        with pytest.raises(ForeignDatabaseObject, match=re.escape(says)):
            deprovision_tenant(pg_tenant_host, tid)
        assert pg_marks(pg_server, name)[kind == 'database'] is None
        if kind == 'role':  # its password is still its own
            eng = sa.create_engine(
                pg_server.admin_url.set(username=name, password='theirs'), poolclass=sa.pool.NullPool
            )
            with eng.connect() as c:
                assert c.exec_driver_sql('SELECT current_user').scalar() == name
            eng.dispose()
        else:
            with pg_server.engine.connect() as c:
                owner = c.exec_driver_sql(
                    "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (name,)
                ).scalar()
            assert owner == pg_server.admin_url.username
    finally:
        drop_their_object(pg_server, kind, name)
    assert deprovision_tenant(pg_tenant_host, tid).status == 'deleted'
    assert pg_names(pg_server, 'db', name) == [] and pg_names(pg_server, 'role', name) == []


@pytest.mark.postgres
def test_a_resumed_provisioning_adopts_its_own_database_whose_mark_a_crash_cut_off(
    pg_tenant_host, pg_server, monkeypatch
):
    tid = new_id()
    name = f'tenant_{tid}'
    crash_after(monkeypatch, 'provision', 'database')
    with pytest.raises(Crash):
        provision_tenant(pg_tenant_host, tid, prepare=prepare)
    with pg_server.engine.connect() as c:  # as if the crash came between cloning and marking the database
        c.exec_driver_sql(f'COMMENT ON DATABASE "{name}" IS NULL')
    monkeypatch.setattr(db_tenant, '_after_step', lambda a, s: None)
    provision_tenant(pg_tenant_host, tid, prepare=prepare)
    assert_pg_tenant(pg_tenant_host, pg_server, tid)
    assert pg_marks(pg_server, name) == (install_mark(pg_tenant_host),) * 2


def test_the_install_id_is_made_once_by_the_upgrade(host_db):
    mark = install_mark(host_db)
    assert re.fullmatch('fh_saas install [0-9a-f]{32}', mark)
    with host_db.transaction() as c:  # fh_saas before install ids: db_tenant's schema v1, without core_install
        install_t.drop(c)
        c.execute(schema_versions_t.update().where(schema_versions_t.c.component == 'db_tenant').values(version=1))
    host_components['db_tenant'].upgrade(host_db.engine)
    again = install_mark(host_db)
    host_components['db_tenant'].upgrade(host_db.engine)
    assert again != mark and install_mark(host_db) == again
    with pytest.raises(sa.exc.IntegrityError), host_db.transaction() as c:
        c.execute(install_t.insert().values(one=1, install_id='a' * 32))
    assert len(host_db.q('SELECT * FROM core_install')) == 1


def remove_marks(server, name: str):
    "Leave role and database `name` as fh_saas made them before it marked what it makes."
    with server.engine.connect() as c:
        for kind in ('ROLE', 'DATABASE'):
            c.exec_driver_sql(f'COMMENT ON {kind} "{name}" IS NULL')


@pytest.mark.postgres
def test_an_install_from_before_marks_marks_its_tenants_with_one_command(pg_tenant_host, pg_server, capsys):
    old, adopted = new_id('old'), new_id('adopted')
    for tid in (old, adopted):
        provision_tenant(pg_tenant_host, tid, prepare=prepare)
        remove_marks(pg_server, f'tenant_{tid}')
    with pg_server.engine.connect() as c:  # one that another install adopted too, before marks, and marked since
        c.exec_driver_sql(f"COMMENT ON ROLE \"tenant_{adopted}\" IS 'fh_saas install {'b' * 32}'")
    assert [tid for tid, _ in rotate_secret_key(pg_tenant_host).failed] == sorted([old, adopted])
    with pytest.raises(ForeignDatabaseObject, match=re.escape('run `fh-saas tenants mark` once')):
        deprovision_tenant(pg_tenant_host, old)
    assert main(['tenants', 'mark']) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"FAILED {adopted}: role 'tenant_{adopted}' on server 'main' is another fh_saas install's: fh_saas "
        "adopts only what this install made; use another tenant id here (installs that share a server "
        "must not share tenant ids)",
        "marked the role and database of 1 tenant(s) as this install's, 1 failed",
    ]
    mark = install_mark(pg_tenant_host)
    assert pg_marks(pg_server, f'tenant_{old}') == (mark, mark)
    assert pg_marks(pg_server, f'tenant_{adopted}') == (f"fh_saas install {'b' * 32}", None)
    assert main(['tenants', 'mark']) == 1 and capsys.readouterr().out.splitlines()[-1].endswith(
        "1 tenant(s) as this install's, 1 failed"
    )
    assert deprovision_tenant(pg_tenant_host, old).status == 'deleted'
    remove_marks(pg_server, f'tenant_{adopted}')  # the operator settles whose it is: this install's
    assert main(['tenants', 'mark']) == 0


# --- the host database beside tenant databases ------------------------------------------------------------------


@pytest.mark.postgres
def test_beside_the_host_a_tenant_role_reaches_neither_the_host_database_nor_another_tenant(pg_host_db):
    _tenants_beside_host(pg_host_db)  # the demo on PostgreSQL: tenants on the host database's own server
    a, b = (provision_tenant(pg_host_db, new_id(), prepare=prepare).id for _ in range(2))
    try:
        a_url, b_url = tenant_url(pg_host_db, a), tenant_url(pg_host_db, b)
        assert tenant_tables(a_url) == ['notes']
        for database in (pg_host_db.url.database, b_url.database):
            with pytest.raises(sa.exc.OperationalError, match='permission denied for database'):
                tenant_tables(a_url.set(database=database))
        assert pg_host_db.q('SELECT count(*) AS n FROM core_tenants') == [dict(n=2)]  # the host still connects
    finally:
        for tid in (a, b):
            deprovision_tenant(pg_host_db, tid)


@pytest.mark.postgres
def test_doctor_reports_who_may_connect_to_the_host_database(pg_tenant_host, pg_server, capsys):
    host = pg_tenant_host.url.database
    tid = provision_tenant(pg_tenant_host, new_id(), prepare=prepare).id
    with pg_server.engine.connect() as c:
        c.exec_driver_sql(f'GRANT CONNECT ON DATABASE "{host}" TO "tenant_{tid}"')
    assert main(['doctor']) == 1
    assert capsys.readouterr().out.splitlines() == [
        f'PUBLIC may connect to the host database {host}: run REVOKE CONNECT ON DATABASE "{host}" FROM PUBLIC',
        f'tenant role tenant_{tid} may connect to the host database {host}: run REVOKE CONNECT ON DATABASE "{host}" '
        f'FROM "tenant_{tid}"',
        '2 problem(s)',
    ]
    assert close_host_database(pg_tenant_host) == []
    assert main(['doctor']) == 0 and 'keeps every integrity rule' in capsys.readouterr().out
    with pytest.raises(sa.exc.OperationalError, match='permission denied for database'):
        tenant_tables(tenant_url(pg_tenant_host, tid).set(database=host))
