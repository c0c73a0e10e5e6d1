"HostDatabase on SQLite files and a real PostgreSQL server: the seed API, integrity, concurrency, upgrades, bad input."

import multiprocessing as mp, threading, time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from fh_saas.db_host import (
    HostDatabase,
    GlobalUser,
    TenantCatalog,
    Membership,
    Subscription,
    DuplicateRecord,
    MissingReference,
    HostDatabaseConfigError,
    HostDatabaseUnavailable,
    HOST_SCHEMA_VERSION,
    gen_id,
    timestamp,
    get_db_uri,
    make_engine,
    schema_version,
    users_t,
    EmailsCollide,
)
from pgserver import free_port


def env_for(url: str) -> dict:
    "The `DB_*` variables that describe `url`."
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        return dict(DB_TYPE="SQLITE", DB_NAME=u.database)
    return dict(
        DB_TYPE="POSTGRESQL",
        DB_USER=u.username,
        DB_PASS=u.password,
        DB_HOST=u.host,
        DB_PORT=str(u.port),
        DB_NAME=u.database,
    )


def test_seed_quick_start_runs_verbatim(host_url, monkeypatch):
    for k, v in env_for(host_url).items():
        monkeypatch.setenv(k, v)
    # --- the seed documentation's quick start, as written ---
    host_db = HostDatabase.from_env()
    user = GlobalUser(id=gen_id(), email="user@example.com", oauth_id="google_123", created_at=timestamp())
    host_db.global_users.insert(user)
    host_db.commit()
    all_users = host_db.global_users()
    # ---
    try:
        assert [(u.id, u.email, u.oauth_id) for u in all_users] == [(user.id, "user@example.com", "google_123")]
        assert all_users[0].created_at == user.created_at
        assert HostDatabase.from_env() is host_db
        assert host_db.memberships(where="user_id = :u", where_args=dict(u=user.id)) == []
        assert make_url(get_db_uri(host_db.db)) == make_url(host_url)
    finally:
        host_db.close()
        HostDatabase.reset_instance()


def test_tables_and_version(host_db):
    with host_db.transaction() as c:
        names = set(sa.inspect(c).get_table_names())
        assert schema_version(c, "core") == HOST_SCHEMA_VERSION
    assert {
        "core_users",
        "core_tenants",
        "core_memberships",
        "core_subscriptions",
        "core_pricing_plans",
        "sys_audit_logs",
        "sys_jobs",
        "core_stripe_webhook_events",
    } <= names


def test_get_db_uri_opens_its_own_connection(host_db):
    eng = sa.create_engine(get_db_uri(host_db))
    with eng.connect() as c:
        assert c.exec_driver_sql("SELECT 1").scalar() == 1
    eng.dispose()


def test_duplicate_email_any_case_is_refused_and_writes_nothing(host_db):
    host_db.global_users.insert(GlobalUser(email="Ann@Example.com"))
    with pytest.raises(DuplicateRecord, match="ux_core_users_email"):
        with host_db.transaction():
            host_db.tenants.insert(TenantCatalog(id="t1", name="T1"))
            host_db.global_users.insert(GlobalUser(email="ann@example.COM"))
    assert host_db.global_users.count == 1 and host_db.tenants.count == 0


@pytest.mark.parametrize(
    "table,row",
    [
        (
            "global_users",
            lambda: [GlobalUser(email="a@x.io", oauth_id="gh_1"), GlobalUser(email="b@x.io", oauth_id="gh_1")],
        ),
        ("memberships", lambda: [Membership(user_id="u", tenant_id="t"), Membership(user_id="u", tenant_id="t")]),
        (
            "subscriptions",
            lambda: [
                Subscription(tenant_id="t", stripe_sub_id="sub_1"),
                Subscription(tenant_id="t", stripe_sub_id="sub_1"),
            ],
        ),
    ],
)
def test_unique_rules(host_db, table, row):
    host_db.global_users.insert(GlobalUser(id="u", email="u@x.io"))
    host_db.tenants.insert(TenantCatalog(id="t", name="T"))
    first, second = row()
    getattr(host_db, table).insert(first)
    with pytest.raises(DuplicateRecord):
        getattr(host_db, table).insert(second)


def test_oauth_id_and_stripe_sub_may_repeat_when_unset(host_db):
    host_db.tenants.insert(TenantCatalog(id="t", name="T"))
    for i in range(3):
        host_db.global_users.insert(GlobalUser(email=f"u{i}@x.io"))
        host_db.subscriptions.insert(Subscription(tenant_id="t"))
    assert host_db.global_users.count == 3 and host_db.subscriptions.count == 3


def test_foreign_keys_hold_with_the_kits_own_error(host_db):
    with pytest.raises(MissingReference, match="core_memberships: "):
        host_db.memberships.insert(Membership(user_id="nobody", tenant_id="nowhere"))
    assert host_db.memberships.count == 0


def test_failure_inside_a_transaction_leaves_nothing(host_db):
    with pytest.raises(RuntimeError):
        with host_db.transaction() as conn:
            host_db.tenants.insert(TenantCatalog(id="acme", name="Acme"))
            conn.execute(users_t.insert().values(email="owner@acme.io"))
            host_db.memberships.insert(Membership(user_id=host_db.global_users()[0].id, tenant_id="acme"))
            raise RuntimeError("crash half-way through sign-up")
    assert (host_db.tenants.count, host_db.global_users.count, host_db.memberships.count) == (0, 0, 0)


def test_commit_and_rollback_inside_a_scope_are_reported(host_db):
    with host_db.transaction():
        with pytest.raises(RuntimeError, match="commits when it ends"):
            host_db.commit()
        with pytest.raises(RuntimeError, match="roll the scope back"):
            host_db.rollback()


def test_sixteen_threads_insert_and_read_at_once(host_db, race):
    n_threads, per_thread = 16, 25

    def work(t):
        seen = 0
        for i in range(per_thread):
            with host_db.transaction():
                user = host_db.global_users.insert(GlobalUser(email=f"t{t}-{i}@load.test"))
                host_db.tenants.insert(TenantCatalog(id=f"t{t}_{i}", name="x"))
                host_db.memberships.insert(Membership(user_id=user.id, tenant_id=f"t{t}_{i}", role="owner"))
            seen = max(seen, len(host_db.memberships(where="user_id = :u", where_args=dict(u=user.id))))
            assert host_db.global_users[user.id].email == f"t{t}-{i}@load.test"
        return seen

    results = race([partial(work, t) for t in range(n_threads)])
    assert results == [1] * n_threads
    total = n_threads * per_thread
    assert (host_db.global_users.count, host_db.tenants.count, host_db.memberships.count) == (total, total, total)


def test_racing_sign_ups_with_one_email_give_one_user(host_db, race):
    def sign_up(i):
        try:
            with host_db.transaction():
                host_db.global_users.insert(GlobalUser(email="Same@Race.test" if i % 2 else "same@race.TEST"))
            return "ok"
        except DuplicateRecord:
            return "dup"

    outcomes = race([partial(sign_up, i) for i in range(16)])
    assert sorted(outcomes) == ["dup"] * 15 + ["ok"]
    assert host_db.global_users.count == 1


@pytest.mark.postgres
def test_pool_is_bounded_and_connections_are_not_held(pg_url):
    host_db = HostDatabase(pg_url)
    try:
        with ThreadPoolExecutor(32) as ex:
            list(ex.map(lambda i: host_db.global_users.insert(GlobalUser(email=f"{i}@p.io")), range(400)))
        pool = host_db.engine.pool
        assert pool.checkedout() == 0 and pool.size() <= 10
        db = make_url(pg_url).database
        with sa.create_engine(pg_url, poolclass=sa.pool.NullPool).connect() as c:
            n = c.execute(sa.text("select count(*) from pg_stat_activity where datname = :d"), dict(d=db)).scalar()
            idle_in_tx = c.execute(
                sa.text(
                    "select count(*) from pg_stat_activity where datname = :d and state like 'idle in transaction%'"
                ),
                dict(d=db),
            ).scalar()
        assert n <= 10 + 10 + 1 and idle_in_tx == 0
    finally:
        host_db.close()
        HostDatabase.reset_instance()


@pytest.mark.postgres
@pytest.mark.parametrize("pre_ping", ["true", "false"])
def test_a_connection_the_server_dropped_is_replaced_at_checkout(pg_url, pg_server, monkeypatch, pre_ping):
    monkeypatch.setenv("DB_POOL_PRE_PING", pre_ping)
    engine = make_engine(pg_url, pool_size=2, max_overflow=0)
    try:
        with engine.connect() as a, engine.connect() as b:  # two pooled connections, both returned to the pool
            pids = {c.exec_driver_sql("SELECT pg_backend_pid()").scalar() for c in (a, b)}
        with pg_server.engine.connect() as admin:  # the server drops them, as a restart would
            for pid in pids:
                admin.execute(sa.text("SELECT pg_terminate_backend(:p)"), dict(p=pid))
            while admin.execute(
                sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:p)"), dict(p=list(pids))
            ).scalar():
                time.sleep(0.01)
        failures = 0
        for _ in range(3):
            try:
                with engine.connect() as c:
                    assert c.exec_driver_sql("SELECT 1").scalar() == 1
            except sa.exc.OperationalError:
                failures += 1
        # with or without the round-trip ping, the pool sees the closed sockets and reconnects: nothing fails
        assert failures == 0 and engine.pool._pre_ping is (pre_ping == "true")
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_statement_whose_connection_the_server_drops_fails_as_a_database_error(pg_url, pg_server):
    "The server ends the backend mid-statement: one_statement raises SQLAlchemy's error (callers retry on it), never"
    " psycopg2's InterfaceError from restoring the closed connection's settings, and the next statement works."
    host_db, sleeping = (
        HostDatabase(pg_url),
        sa.text("SELECT pid FROM pg_stat_activity WHERE datname = :db AND query = 'SELECT pg_sleep(30)'"),
    )
    try:

        def kill():
            with pg_server.engine.connect() as admin:
                while (pid := admin.execute(sleeping, dict(db=make_url(pg_url).database)).scalar()) is None:
                    time.sleep(0.01)
                admin.execute(sa.text("SELECT pg_terminate_backend(:p)"), dict(p=pid))

        killer = threading.Thread(target=kill)
        killer.start()
        with pytest.raises(sa.exc.OperationalError), host_db.one_statement() as c:
            c.exec_driver_sql("SELECT pg_sleep(30)")
        killer.join()
        with host_db.one_statement() as c:
            assert c.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        host_db.close()
        HostDatabase.reset_instance()


SEED_SCHEMA = [
    "CREATE TABLE core_users (id TEXT PRIMARY KEY, email TEXT, oauth_id TEXT, password_hash TEXT, stripe_cust_id TEXT,"
    " is_sys_admin BOOLEAN, created_at TEXT, last_login TEXT)",
    "CREATE TABLE core_tenants (id TEXT PRIMARY KEY, name TEXT, db_url TEXT, is_active BOOLEAN, plan_tier TEXT,"
    " created_at TEXT)",
    "CREATE TABLE core_memberships (id TEXT PRIMARY KEY, user_id TEXT, tenant_id TEXT, profile_id TEXT,"
    " meta_attributes TEXT, role TEXT, is_active BOOLEAN, created_at TEXT)",
    "INSERT INTO core_users (id, email, is_sys_admin, created_at)"
    " VALUES ('u1', 'old@seed.io', false, '2025-01-01T00:00:00+00:00')",
    "INSERT INTO core_tenants VALUES ('t1', 'Old Co', NULL, false, 'basic', '2025-01-01T00:00:00+00:00')",
    "INSERT INTO core_tenants VALUES ('t2', 'Live Co', NULL, true, 'pro', '2025-01-01T00:00:00+00:00')",
]


def test_upgrades_a_host_database_from_an_earlier_version(host_url):
    eng = sa.create_engine(host_url)
    with eng.begin() as c:
        for sql in SEED_SCHEMA:
            c.exec_driver_sql(sql)
    eng.dispose()
    host_db = HostDatabase(host_url)
    try:
        assert host_db.global_users["u1"].is_active is True
        assert [(t.id, t.status, t.routing_version) for t in host_db.tenants(order_by="id")] == [
            ("t1", "suspended", 0),
            ("t2", "active", 0),
        ]
        with pytest.raises(DuplicateRecord):
            host_db.global_users.insert(GlobalUser(email="OLD@seed.io"))
        with host_db.transaction() as c:
            assert schema_version(c, "core") == HOST_SCHEMA_VERSION
            c.exec_driver_sql("UPDATE sys_schema_versions SET version = 1 WHERE component = 'core'")
    finally:
        host_db.close()
        HostDatabase.reset_instance()
    host_db = HostDatabase(host_url)  # a second upgrade over what is already there changes nothing
    try:
        assert host_db.tenants.count == 2
        with host_db.transaction() as c:
            assert schema_version(c, "core") == HOST_SCHEMA_VERSION
    finally:
        host_db.close()
        HostDatabase.reset_instance()


def at_core_v3_with_users(url, emails: dict):
    "A host database at core schema v3 (before emails were normalised) holding users `{id: email}` as typed."
    HostDatabase(url).close()
    HostDatabase.reset_instance()
    eng = sa.create_engine(url)
    with eng.begin() as c:
        for uid, email in emails.items():
            c.execute(users_t.insert().values(id=uid, email=email, created_at=timestamp()))
        c.exec_driver_sql("UPDATE sys_schema_versions SET version = 3 WHERE component = 'core'")
    return eng


def test_the_upgrade_stores_every_email_normalised(host_url):
    typed = dict(u1='Émile@Example.COM', u2='ﬁona@example.com', u3='plain@example.com')
    at_core_v3_with_users(host_url, typed).dispose()
    host_db = HostDatabase(host_url)
    try:
        assert {u.id: u.email for u in host_db.global_users()} == dict(
            u1='émile@example.com', u2='fiona@example.com', u3='plain@example.com'
        )
        with host_db.transaction() as c:
            assert schema_version(c, "core") == HOST_SCHEMA_VERSION
    finally:
        host_db.close()
        HostDatabase.reset_instance()


def test_the_upgrade_refuses_emails_that_become_one_address_and_names_them(host_url):
    eng = at_core_v3_with_users(host_url, dict(u1='ﬁona@example.com', u2='Fiona@Example.com', u3='Émile@x.io'))
    with pytest.raises(EmailsCollide) as e:
        HostDatabase(host_url)
    HostDatabase.reset_instance()
    message = str(e.value)
    assert (
        'not upgraded' in message
        and 'user u1 (ﬁona@example.com)' in message
        and 'user u2 (Fiona@Example.com)' in message
        and 'u3' not in message
    )
    with eng.connect() as c:  # nothing changed, nothing merged
        assert sorted(c.execute(sa.select(users_t.c.id, users_t.c.email)).all()) == [
            ('u1', 'ﬁona@example.com'),
            ('u2', 'Fiona@Example.com'),
            ('u3', 'Émile@x.io'),
        ]
        assert schema_version(c, "core") == 3
    with eng.begin() as c:
        c.execute(users_t.update().where(users_t.c.id == 'u2').values(email='fiona2@example.com'))
    eng.dispose()
    host_db = HostDatabase(host_url)
    try:
        assert sorted(u.email for u in host_db.global_users()) == [
            'fiona2@example.com',
            'fiona@example.com',
            'émile@x.io',
        ]
    finally:
        host_db.close()
        HostDatabase.reset_instance()


def test_refuses_a_newer_schema_than_it_knows(host_url):
    HostDatabase(host_url).close()
    HostDatabase.reset_instance()
    eng = sa.create_engine(host_url)
    with eng.begin() as c:
        c.exec_driver_sql(
            f"UPDATE sys_schema_versions SET version = {HOST_SCHEMA_VERSION + 1} WHERE component = 'core'"
        )
    eng.dispose()
    with pytest.raises(RuntimeError, match="newer than this fh_saas"):
        HostDatabase(host_url)
    HostDatabase.reset_instance()


def _open_in_process(url, q):
    try:
        HostDatabase(url).close()
        q.put("ok")
    except Exception as e:
        q.put(repr(e))


@pytest.mark.postgres
def test_many_processes_create_the_schema_at_once(pg_url):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_open_in_process, args=(pg_url, q)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(q.get(timeout=5) for _ in procs) == ["ok"] * 4
    eng = sa.create_engine(pg_url)
    with eng.connect() as c:
        assert c.exec_driver_sql("select version from sys_schema_versions where component = 'core'").all() == [
            (HOST_SCHEMA_VERSION,)
        ]
    eng.dispose()


def test_singleton_refuses_a_second_url(tmp_path):
    a = HostDatabase(f"sqlite:///{tmp_path / 'a.db'}")
    try:
        assert HostDatabase(f"sqlite:///{tmp_path / 'a.db'}") is a and HostDatabase() is a
        with pytest.raises(RuntimeError, match="already open"):
            HostDatabase(f"sqlite:///{tmp_path / 'b.db'}")
    finally:
        a.close()
        HostDatabase.reset_instance()


@pytest.mark.parametrize(
    "env,message",
    [
        (dict(DB_TYPE="POSTGRESQL"), "DB_PASS is required"),
        (dict(DB_TYPE="ORACLE", DB_PASS="x"), "DB_TYPE='ORACLE' is not supported"),
        (dict(DB_PASS="x", DB_PORT="fivefour"), "DB_PORT='fivefour'"),
        (dict(DB_PASS="x", DB_POOL_SIZE="0"), "DB_POOL_SIZE='0' is not a whole number of at least 1"),
        (dict(DB_PASS="x", DB_POOL_PRE_PING="sometimes"), "DB_POOL_PRE_PING='sometimes': use true or false"),
    ],
)
def test_bad_configuration_names_the_variable(monkeypatch, env, message):
    for k in ("DB_TYPE", "DB_USER", "DB_PASS", "DB_HOST", "DB_PORT", "DB_NAME", "DB_POOL_SIZE", "DB_POOL_PRE_PING"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(HostDatabaseConfigError, match=message):
        HostDatabase.from_env()
    assert HostDatabase._instance is None


def test_unreachable_server_is_one_clear_error_without_the_password(monkeypatch):
    port = free_port()
    monkeypatch.setenv("DB_TYPE", "POSTGRESQL")
    monkeypatch.setenv("DB_PASS", "Sup3rS3cret!")
    monkeypatch.setenv("DB_HOST", "127.0.0.1")
    monkeypatch.setenv("DB_PORT", str(port))
    with pytest.raises(HostDatabaseUnavailable) as ei:
        HostDatabase.from_env()
    msg = str(ei.value)
    assert f"127.0.0.1:{port}/app_host" in msg and "Sup3rS3cret" not in msg and ei.value.__cause__ is None
    assert HostDatabase._instance is None


@pytest.mark.postgres
def test_wrong_password_is_reported_without_it(pg_url):
    bad = make_url(pg_url).set(password="not-the-Password-42")
    with pytest.raises(HostDatabaseUnavailable, match="password authentication failed") as ei:
        HostDatabase(bad)
    assert "not-the-Password-42" not in str(ei.value)
    HostDatabase.reset_instance()
