"Tenant migrations on real SQLite files and real PostgreSQL databases: rollback, locking, fleet runs, crashes."

import os, signal, subprocess, sys, textwrap, threading, time
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import given, settings, strategies as st

from fh_saas.db_host import TenantCatalog, make_engine, tenants_t
from fh_saas.tenant_migrations import (
    MigrationFailed,
    MigrationRegistryError,
    TenantMigration,
    TenantSchema,
    TenantSchemaMismatch,
    core_migrations,
    database_version,
    ensure_template_current,
    migrate_database,
    migrate_fleet,
    register_tenant_migration,
    tenant_metadata,
    tenant_schema,
    tenant_settings_t,
    tenant_users_t,
)
from pgserver import wait_for

ROOT = Path(__file__).resolve().parents[1]


class TenantDatabases:
    "Fresh tenant databases on one backend: SQLite files in a folder, or databases on the test PostgreSQL server."

    def __init__(self, backend, tmp_path, pg_server=None):
        self.backend, self.tmp, self.pg = backend, tmp_path, pg_server
        self.urls, self.engines = {}, []

    def new(self, name: str) -> str:
        url = (
            self.pg.create_database(f"tn_{name}") if self.backend == 'postgresql' else f"sqlite:///{self.tmp / name}.db"
        )
        self.urls[name] = url
        return url

    def engine(self, name_or_url: str) -> sa.Engine:
        "A pool-less engine (a fleet run opens hundreds; nothing is left open afterwards)."
        url = self.urls.get(name_or_url, name_or_url)
        eng = (
            make_engine(url, poolclass=sa.pool.NullPool)
            if url.startswith('sqlite')
            else sa.create_engine(url, poolclass=sa.pool.NullPool)
        )
        self.engines.append(eng)
        return eng

    def close(self):
        for e in self.engines:
            e.dispose()
        if self.pg:
            for url in self.urls.values():
                self.pg.drop_database(url)


@pytest.fixture(params=['sqlite', pytest.param('postgresql', marks=pytest.mark.postgres)])
def tdbs(request, tmp_path):
    pg = request.getfixturevalue('pg_server') if request.param == 'postgresql' else None
    dbs = TenantDatabases(request.param, tmp_path, pg)
    yield dbs
    dbs.close()


def tables(engine):
    return set(sa.inspect(engine).get_table_names())


def history(engine):
    with engine.connect() as c:
        return [tuple(r) for r in c.exec_driver_sql('SELECT version, name FROM _fh_saas_schema ORDER BY version')]


def schema_v5(v5_up):
    "Core + v4 (a table, an index, a new column, a row) + v5 `v5_up`."
    return TenantSchema(
        [
            *core_migrations,
            TenantMigration(
                4,
                'notes',
                """
            CREATE TABLE notes (id VARCHAR(32) PRIMARY KEY, body TEXT NOT NULL DEFAULT 'a;b');
            CREATE INDEX ix_notes_body ON notes (body);
            ALTER TABLE tenant_users ADD COLUMN locale VARCHAR(16);
            INSERT INTO tenant_settings (key, value, updated_at)
                VALUES ('notes.enabled', '100%', '2026-01-01T00:00:00+00:00');
        """,
            ),
            TenantMigration(5, 'step5', v5_up),
        ]
    )


# --- one database --------------------------------------------------------------------------------


def test_core_schema_matches_exported_tables(tdbs):
    eng = tdbs.engine(tdbs.new('core'))
    assert migrate_database(eng) == tenant_schema.latest == 3
    assert history(eng) == [(1, 'tenant_users'), (2, 'tenant_settings'), (3, 'tenant_permissions')]
    insp = sa.inspect(eng)
    for t in tenant_metadata.sorted_tables:
        assert [c['name'] for c in insp.get_columns(t.name)] == [c.name for c in t.columns]
    with eng.begin() as c:
        c.execute(tenant_users_t.insert().values(global_user_id='g1'))
    with pytest.raises(sa.exc.IntegrityError), eng.begin() as c:
        c.execute(tenant_users_t.insert().values(global_user_id='g1'))
    assert migrate_database(eng) == 3 and len(history(eng)) == 3


@pytest.mark.parametrize('v5_up', ['INSERT INTO missing_table VALUES (1)', 'python'])
def test_failing_step_rolls_back_every_pending_step(tdbs, v5_up):
    eng = tdbs.engine(tdbs.new('fail'))
    migrate_database(eng, target=3)
    with eng.begin() as c:
        c.execute(tenant_users_t.insert().values(global_user_id='g1'))

    def python_step(conn):
        conn.exec_driver_sql('CREATE TABLE half (x INTEGER)')
        raise ValueError('bad data in row 7')

    schema = schema_v5(python_step if v5_up == 'python' else v5_up)
    with pytest.raises(MigrationFailed) as ei:
        migrate_database(eng, schema)
    assert ei.value.version == 5 and ('bad data in row 7' in str(ei.value) or 'missing_table' in str(ei.value))
    assert database_version(eng) == 3 and len(history(eng)) == 3
    assert not {'notes', 'half'} & tables(eng)
    assert 'locale' not in {c['name'] for c in sa.inspect(eng).get_columns('tenant_users')}
    with eng.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(tenant_settings_t)).scalar() == 0
        assert c.execute(sa.select(tenant_users_t.c.global_user_id)).scalars().all() == ['g1']
    assert migrate_database(eng, schema, target=4) == 4
    with eng.connect() as c:
        assert c.execute(sa.select(tenant_settings_t.c.value)).scalar() == '100%'
        assert c.exec_driver_sql("INSERT INTO notes (id) VALUES ('n1') RETURNING body").scalar() == 'a;b'


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(st.sampled_from("ab;'-/*\n "), max_size=12), min_size=1, max_size=6))
def test_sqlite_scripts_split_only_between_statements(values):
    "Semicolons, quotes and comment markers inside string literals stay in their statement."
    literal = lambda v: "'" + v.replace("'", "''") + "'"
    script = (
        "CREATE TABLE v (i INTEGER, x TEXT);\n"
        + ";\n".join(f"INSERT INTO v VALUES ({i}, {literal(v)})" for i, v in enumerate(values))
        + "; -- end"
    )
    eng = make_engine('sqlite://')
    with eng.begin() as c:
        TenantMigration(1, 'script', script).apply(c)
        assert c.exec_driver_sql('SELECT x FROM v ORDER BY i').scalars().all() == values


def test_database_from_other_code_is_refused(tdbs):
    eng = tdbs.engine(tdbs.new('mismatch'))
    migrate_database(eng, schema_v5('SELECT 1'))
    with pytest.raises(TenantSchemaMismatch, match=r"at tenant schema 5 \('step5'\).*does not exist \(latest: 3\)"):
        migrate_database(eng)
    renamed = TenantSchema(
        [*core_migrations, TenantMigration(4, 'notes', 'SELECT 1'), TenantMigration(5, 'other', 'SELECT 1')]
    )
    with pytest.raises(TenantSchemaMismatch, match="migration 5 is 'other'"):
        migrate_database(eng, renamed)
    assert database_version(eng) == 5


def test_sqlite_engine_without_begin_immediate_is_refused(tmp_path):
    eng = sa.create_engine(f"sqlite:///{tmp_path / 'plain.db'}")
    with pytest.raises(TypeError, match='make_engine'):
        migrate_database(eng)
    assert tables(eng) == set()


# --- concurrency ---------------------------------------------------------------------------------

LOCK_WAITS = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)
"Sessions of this PostgreSQL database waiting for an advisory lock (the migration lock)."


def test_two_threads_migrating_one_database_apply_each_step_once(tdbs, race):
    url = tdbs.new('race')
    migrate_database(tdbs.engine(url))
    calls, locking = [], threading.Semaphore(0)

    def slow_step(conn):
        calls.append(threading.get_ident())
        for _ in range(2):
            assert locking.acquire(timeout=30)  # ours took the lock; the other thread is taking it
        if conn.dialect.name == 'postgresql':
            wait_for(lambda: conn.exec_driver_sql(LOCK_WAITS).scalar(), 30)
        conn.exec_driver_sql('CREATE TABLE notes (id INTEGER PRIMARY KEY)')

    schema = TenantSchema([*core_migrations, TenantMigration(4, 'notes', slow_step)])

    def taking_the_lock(conn, cursor, statement, *args):
        if statement.startswith('BEGIN IMMEDIATE') or 'pg_advisory_xact_lock' in statement:
            locking.release()

    def run():
        eng = tdbs.engine(url)
        sa.event.listen(eng, 'before_cursor_execute', taking_the_lock)
        return migrate_database(eng, schema)

    outcomes = race([run, run], catch=Exception)
    errors = [o for o in outcomes if isinstance(o, Exception)]
    results = [o for o in outcomes if o not in errors]
    assert errors == [] and results == [4, 4] and len(calls) == 1
    assert history(tdbs.engine(url))[-1] == (4, 'notes')


@pytest.mark.postgres
def test_busy_tenant_fails_fast_and_unchanged_on_postgresql(pg_url):
    "ALTER TABLE behind an open transaction: the migration gives up after lock_timeout instead of stalling the tenant."
    eng = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    migrate_database(eng)
    schema = TenantSchema(
        [*core_migrations, TenantMigration(4, 'locale', 'ALTER TABLE tenant_users ADD COLUMN locale TEXT')]
    )
    with eng.connect() as reader:
        reader.execute(sa.select(tenant_users_t)).all()  # holds ACCESS SHARE until its transaction ends
        t = time.monotonic()
        with pytest.raises(MigrationFailed, match='lock timeout'):
            migrate_database(eng, schema, lock_timeout=0.2)
        assert time.monotonic() - t < 5
        reader.rollback()
    assert database_version(eng) == 3
    assert migrate_database(eng, schema, lock_timeout=0.2) == 4


CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from fh_saas.db_host import make_engine
    from fh_saas.tenant_migrations import TenantMigration, TenantSchema, core_migrations, migrate_database
    mode, work = sys.argv[1], Path(sys.argv[2])

    def step(conn):
        with open(work/'applied', 'a') as f: f.write(f"{os.getpid()}\\n")
        conn.exec_driver_sql('CREATE TABLE notes (id INTEGER PRIMARY KEY)')
        if mode == 'crash':
            (work/'ddl-done').touch()
            time.sleep(60)
        deadline = time.monotonic() + 30   # until the other process waits for the migration lock
        while not conn.exec_driver_sql(sys.argv[3]).scalar() and time.monotonic() < deadline: time.sleep(0.01)

    engine = make_engine(os.environ['TENANT_URL'])
    (work/f'ready-{os.getpid()}').touch()
    while not (work/'go').exists(): time.sleep(0.01)
    t0 = time.monotonic()
    v = migrate_database(engine, TenantSchema([*core_migrations, TenantMigration(4, 'notes', step)]))
    print(v, t0, time.monotonic())
""")


def spawn(mode, url, work):
    env = dict(os.environ, TENANT_URL=url, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    return subprocess.Popen(
        [sys.executable, '-c', CHILD, mode, str(work), LOCK_WAITS],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.postgres
@pytest.mark.parametrize('tdbs', ['postgresql'], indirect=True)
def test_two_processes_migrating_one_database_apply_each_step_once(tdbs, tmp_path):
    url = tdbs.new('procs')
    work = tmp_path / 'work'
    work.mkdir()
    procs = [spawn('race', url, work) for _ in range(2)]
    assert wait_for(lambda: len(list(work.glob('ready-*'))) == 2, timeout=30)
    (work / 'go').touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    (v1, s1, e1), (v2, s2, e2) = [map(float, o.split()) for o, _ in outs]
    assert v1 == v2 == 4
    assert max(s1, s2) < min(e1, e2), "the two migrations did not overlap"
    assert len((work / 'applied').read_text().split()) == 1
    assert history(tdbs.engine(url))[-1] == (4, 'notes')


def test_process_killed_mid_migration_leaves_previous_version(tdbs, tmp_path):
    url = tdbs.new('crash')
    migrate_database(tdbs.engine(url))
    work = tmp_path / 'work'
    work.mkdir()
    proc = spawn('crash', url, work)
    (work / 'go').touch()
    assert wait_for(lambda: (work / 'ddl-done').exists(), timeout=30)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    eng = tdbs.engine(url)
    assert database_version(eng) == 3 and 'notes' not in tables(eng)
    assert (
        migrate_database(
            eng, TenantSchema([*core_migrations, TenantMigration(4, 'notes', 'CREATE TABLE notes (id INTEGER)')])
        )
        == 4
    )


# --- fleet ---------------------------------------------------------------------------------------


@pytest.fixture
def fleet(host_db, tmp_path, request):
    "Three tenants on the host database's backend, all at version 3."
    backend = host_db.url.get_backend_name()
    dbs = TenantDatabases(backend, tmp_path, request.getfixturevalue('pg_server') if backend == 'postgresql' else None)
    for i in range(3):
        name = f"t{i}"
        migrate_database(dbs.engine(dbs.new(name)))
        host_db.tenants.insert(TenantCatalog(id=name, name=name, status='active', schema_version=3))
    yield dbs
    dbs.close()


def catalog(host_db):
    with host_db.transaction() as c:
        return dict(c.execute(sa.select(tenants_t.c.id, tenants_t.c.schema_version)).all())


# The fleet logic is the same on both backends: the runs that depend on the database run on both,
# the bookkeeping ones on SQLite only, to keep the suite fast.


def test_fleet_failure_is_isolated_and_a_rerun_resumes(host_db, fleet):
    schema = schema_v5('SELECT 1')
    with fleet.engine('t2').begin() as c:
        c.execute(tenant_settings_t.insert().values(key='notes.enabled', value='no'))
    host_db.tenants.insert(TenantCatalog(id='paused', name='P', status='suspended', schema_version=0))
    fleet.new('paused')
    host_db.tenants.insert(TenantCatalog(id='closed', name='C', status='deleted', schema_version=0))
    seen = []
    report = migrate_fleet(
        host_db,
        fleet.engine,
        concurrency=3,
        schema=schema,
        progress=lambda o, done, total: seen.append((o.tenant_id, done, total)),
    )

    assert [(o.tenant_id, o.failed_version) for o in report.failed] == [('t2', 4)]
    assert 'notes.enabled' in report.failed[0].error or 'unique' in report.failed[0].error.lower()
    assert {o.tenant_id: o.version for o in report.migrated} == dict(paused=5, t0=5, t1=5)
    assert sorted(s[1] for s in seen) == [1, 2, 3, 4] and {s[2] for s in seen} == {4}
    assert catalog(host_db) == dict(t0=5, t1=5, t2=3, paused=5, closed=0)
    t2 = fleet.engine('t2')
    assert database_version(t2) == 3 and 'notes' not in tables(t2)
    assert 'locale' not in {c['name'] for c in sa.inspect(t2).get_columns('tenant_users')}

    with t2.begin() as c:
        c.execute(tenant_settings_t.delete())
    again = migrate_fleet(host_db, fleet.engine, schema=schema)
    assert [(o.tenant_id, o.from_version, o.version) for o in again.outcomes] == [('t2', 3, 5)]
    assert migrate_fleet(host_db, fleet.engine, schema=schema).outcomes == []
    assert catalog(host_db)['t2'] == 5 and database_version(t2) == 5


def test_fleet_heals_a_catalog_left_behind(host_db, fleet):
    "A crash between the tenant's commit and the catalog's: the next run only corrects the catalog."
    schema = schema_v5('SELECT 1')
    migrate_database(fleet.engine('t1'), schema)
    report = migrate_fleet(host_db, fleet.engine, schema=schema, tenant_ids=['t1'])
    assert [(o.tenant_id, o.from_version, o.version) for o in report.outcomes] == [('t1', 3, 5)]
    assert catalog(host_db)['t1'] == 5 and len(history(fleet.engine('t1'))) == 5
    assert catalog(host_db)['t0'] == 3


def test_fleet_reports_unreachable_and_foreign_databases(host_db, fleet):
    host_db.tenants.insert(TenantCatalog(id='ghost', name='G', status='active', schema_version=0))
    missing = (
        f"sqlite:///{fleet.tmp}/no/such/dir/ghost.db"
        if fleet.backend == 'sqlite'
        else sa.make_url(fleet.urls['t0']).set(database='no_such_db').render_as_string(hide_password=False)
    )
    migrate_database(fleet.engine('t2'), schema_v5('SELECT 1'))
    engine_for = lambda tid: fleet.engine(missing if tid == 'ghost' else tid)
    report = migrate_fleet(host_db, engine_for, target=4, schema=schema_v5('SELECT 1'))
    failed = {o.tenant_id: o for o in report.failed}
    assert set(failed) == {'ghost'} and failed['ghost'].failed_version is None
    assert 'OperationalError' in failed['ghost'].error
    password = sa.make_url(fleet.urls['t0']).password
    assert not password or password not in failed['ghost'].error
    assert {o.tenant_id: o.version for o in report.migrated} == dict(t0=4, t1=4, t2=5)

    report = migrate_fleet(host_db, fleet.engine, schema=TenantSchema(core_migrations[:2]), tenant_ids=['t0'], target=2)
    assert report.outcomes == []
    host_db.tenants.update(dict(id='t0', schema_version=1))
    report = migrate_fleet(host_db, fleet.engine, schema=TenantSchema(core_migrations[:2]), tenant_ids=['t0'])
    assert 'TenantSchemaMismatch' in report.failed[0].error and 'at tenant schema 4' in report.failed[0].error


@pytest.mark.parametrize('host_url', ['sqlite'], indirect=True)
def test_fleet_concurrency_is_bounded(host_db, fleet):
    lock, active, peak = threading.Lock(), [0], [0]

    def tracked(conn):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.1)  # long enough for the runs to overlap
        with lock:
            active[0] -= 1

    schema = TenantSchema([*core_migrations, TenantMigration(4, 'tracked', tracked)])
    assert len(migrate_fleet(host_db, fleet.engine, concurrency=2, schema=schema).migrated) == 3
    assert peak[0] == 2


def test_two_fleet_runs_at_once_apply_each_step_once(host_db, fleet):
    "Two deploy hooks run the fleet migration together: every tenant gets the step once, both runs succeed."
    lock, applied = threading.Lock(), []

    def counted(conn):
        with lock:
            applied.append(conn.engine.url.database)
        time.sleep(0.05)  # keeps both fleet runs busy at once

    schema = TenantSchema([*core_migrations, TenantMigration(4, 'counted', counted)])
    reports = [None, None]

    def run(i):
        reports[i] = migrate_fleet(host_db, fleet.engine, concurrency=2, schema=schema)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r.ok for r in reports) and sorted(applied) == sorted(set(applied)) and len(applied) == 3
    assert catalog(host_db) == dict(t0=4, t1=4, t2=4)


@pytest.mark.parametrize('host_url', ['sqlite'], indirect=True)
def test_fleet_interrupted_leaves_every_tenant_whole(host_db, fleet):
    schema = schema_v5('SELECT 1')

    def stop(outcome, done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        migrate_fleet(host_db, fleet.engine, concurrency=1, schema=schema, progress=stop)
    versions = {t: database_version(fleet.engine(t)) for t in fleet.urls}
    assert set(versions.values()) <= {3, 5} and 1 <= list(versions.values()).count(5) <= 2
    assert catalog(host_db) == versions
    assert len(migrate_fleet(host_db, fleet.engine, schema=schema).migrated) == list(versions.values()).count(3)


@pytest.mark.parametrize('host_url', ['sqlite'], indirect=True)
def test_fleet_argument_errors(host_db, fleet):
    with pytest.raises(ValueError, match="unknown tenant ids: 'nope'"):
        migrate_fleet(host_db, fleet.engine, tenant_ids=['t0', 'nope'])
    with pytest.raises(ValueError, match='not in this schema'):
        migrate_fleet(host_db, fleet.engine, target=4)
    with pytest.raises(ValueError, match='concurrency'):
        migrate_fleet(host_db, fleet.engine, concurrency=0)
    assert set(catalog(host_db).values()) == {3}


# --- provisioning from a template ----------------------------------------------------------------


@pytest.mark.postgres
def test_tenants_copied_from_the_template_are_born_migrated(pg_server):
    tpl_url = pg_server.create_database('tpl')
    tpl = make_engine(tpl_url)
    assert ensure_template_current(tpl, TenantSchema(core_migrations[:2])) == 2
    assert ensure_template_current(tpl) == 3
    tpl_name, new_url = sa.make_url(tpl_url).database, pg_server.url('tenant_from_tpl')
    try:
        with pg_server.engine.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE tenant_from_tpl TEMPLATE "{tpl_name}"')
        eng = sa.create_engine(new_url, poolclass=sa.pool.NullPool)
        before = history(eng)
        assert migrate_database(eng) == 3 and history(eng) == before == [
            (1, 'tenant_users'),
            (2, 'tenant_settings'),
            (3, 'tenant_permissions'),
        ]
    finally:
        pg_server.drop_database(new_url)
        pg_server.drop_database(tpl_url)


# --- registry ------------------------------------------------------------------------------------


def test_registry_refuses_duplicates_and_disorder():
    s = TenantSchema([TenantMigration(1, 'a', 'SELECT 1'), TenantMigration(5, 'e', 'SELECT 1')])
    with pytest.raises(MigrationRegistryError, match="duplicate tenant migration version 5: 'e' and 'again'"):
        s.add(TenantMigration(5, 'again', 'SELECT 1'))
    with pytest.raises(
        MigrationRegistryError, match=r"tenant migration 3 \('c'\) is out of order: the latest is 5 \('e'\)"
    ):
        s.add(TenantMigration(3, 'c', 'SELECT 1'))
    with pytest.raises(MigrationRegistryError, match='out of order'):
        TenantSchema([TenantMigration(2, 'b', 'SELECT 1'), TenantMigration(1, 'a', 'SELECT 1')])
    with pytest.raises(MigrationRegistryError, match='expected a TenantMigration'):
        s.add((6, 'f', 'SELECT 1'))
    for bad in [
        (True, 'x', 'SELECT 1'),
        ('2', 'x', 'SELECT 1'),
        (-1, 'x', 'SELECT 1'),
        (6, 'x', None),
        (6, 'x' * 129, 'SELECT 1'),
    ]:
        with pytest.raises(MigrationRegistryError):
            TenantMigration(*bad)

    @s.migration(6, 'f')
    def f(conn):
        pass

    assert [m.version for m in s] == [1, 5, 6] and s.get(6).up is f
    with pytest.raises(MigrationRegistryError, match='duplicate'):
        register_tenant_migration(3, 'mine', 'SELECT 1')
    assert [m.name for m in tenant_schema] == ['tenant_users', 'tenant_settings', 'tenant_permissions']
