"map_and_upsert against real SQLite files and a real PostgreSQL cluster."

import threading
from datetime import date, datetime, timezone
from decimal import Decimal
from functools import partial

import polars as pl
import pytest
import sqlalchemy as sa
from fastsql import Database

from fh_saas import utils_polars_mapper as mapper
from fh_saas.db_host import HostDatabase, make_engine
from fh_saas.utils_polars_mapper import map_and_upsert
from pgserver import wait_for


@pytest.fixture(scope="module")
def shared_pg_url(pg_server):
    "One PostgreSQL database for this module; `empty_pg_url` empties it before each test (cheaper than a new one)."
    url = pg_server.create_database("mapper")
    yield url
    pg_server.drop_database(url)


@pytest.fixture
def empty_pg_url(shared_pg_url):
    eng = sa.create_engine(shared_pg_url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    eng.dispose()
    return shared_pg_url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request):
    "An empty database URL on each backend."
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "empty_pg_url")


@pytest.fixture(autouse=True)
def _release_engines():
    yield
    for eng in list(mapper._engines.values()):
        eng.dispose()
    mapper._engines.clear()


@pytest.fixture
def engine(db_url):
    "The test's own engine; `make_engine` so that SQLite DDL is transactional too."
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


def rows(engine, table, order="1"):
    with engine.connect() as c:
        return [tuple(r) for r in c.exec_driver_sql(f"SELECT * FROM {table} ORDER BY {order}")]


def test_insert_then_update(db_url, engine):
    assert map_and_upsert(pl.DataFrame(dict(id=[1, 2, 3], name=["a", "b", "c"])), "items", "id", db_url) == 3
    assert map_and_upsert([dict(id=2, name="B"), dict(id=4, name="d")], "items", "id", db_url) == 2
    assert rows(engine, "items") == [(1, "a"), (2, "B"), (3, "c"), (4, "d")]


def test_columns_missing_from_the_frame_are_kept(db_url, engine):
    with engine.begin() as c:
        c.exec_driver_sql("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, note TEXT DEFAULT 'n')")
    map_and_upsert([dict(id=1, name="a")], "items", "id", db_url)
    with engine.begin() as c:
        c.exec_driver_sql("UPDATE items SET note = 'kept'")
    map_and_upsert([dict(id=1, name="A")], "items", "id", db_url)
    assert rows(engine, "items") == [(1, "A", "kept")]


def test_composite_key(db_url, engine):
    df = pl.DataFrame(dict(tenant=["a", "a", "b"], seq=[1, 2, 1], v=[10, 20, 30]))
    assert map_and_upsert(df, "facts", ["tenant", "seq"], db_url) == 3
    assert (
        map_and_upsert(
            pl.DataFrame(dict(tenant=["b", "b"], seq=[1, 2], v=[31, 40])), "facts", ("tenant", "seq"), db_url
        )
        == 2
    )
    assert rows(engine, "facts", "1, 2") == [("a", 1, 10), ("a", 2, 20), ("b", 1, 31), ("b", 2, 40)]
    pk = sa.inspect(engine).get_pk_constraint("facts")["constrained_columns"]
    assert pk == ["tenant", "seq"]


def test_key_with_a_unique_index_instead_of_the_primary_key(db_url, engine):
    serial = "SERIAL" if engine.dialect.name == "postgresql" else "INTEGER"
    with engine.begin() as c:
        c.exec_driver_sql(f"CREATE TABLE products (id {serial} PRIMARY KEY, sku TEXT NOT NULL, price INTEGER)")
        c.exec_driver_sql("CREATE UNIQUE INDEX ux_products_sku ON products (sku)")
    map_and_upsert([dict(sku="a", price=1), dict(sku="b", price=2)], "products", "sku", db_url)
    map_and_upsert([dict(sku="b", price=3)], "products", "sku", db_url)
    assert rows(engine, "products") == [(1, "a", 1), (2, "b", 3)]


def test_key_only_frame_inserts_missing_rows(db_url, engine):
    assert map_and_upsert([dict(id=1), dict(id=2)], "ids", "id", db_url) == 2
    assert map_and_upsert([dict(id=2), dict(id=3)], "ids", "id", db_url) == 1
    assert rows(engine, "ids") == [(1,), (2,), (3,)]


@pytest.mark.postgres
def test_auto_created_table_types(empty_pg_url):
    df = pl.DataFrame(
        dict(
            id=[1],
            small=pl.Series([1], dtype=pl.Int16),
            x=[1.5],
            ok=[True],
            name=["n"],
            day=[date(2026, 1, 2)],
            at=[datetime(2026, 1, 2, tzinfo=timezone.utc)],
            doc=[dict(a=1)],
            price=pl.Series([Decimal("1.25")], dtype=pl.Decimal(10, 2)),
        )
    )
    map_and_upsert(df, "typed", "id", empty_pg_url)
    eng = sa.create_engine(empty_pg_url)
    try:
        with eng.connect() as c:
            types = dict(
                c.exec_driver_sql(
                    "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'typed'"
                ).all()
            )
        assert types == dict(
            id="bigint",
            small="smallint",
            x="double precision",
            ok="boolean",
            name="text",
            day="date",
            at="timestamp with time zone",
            doc="jsonb",
            price="numeric",
        )
        assert sa.inspect(eng).get_pk_constraint("typed")["constrained_columns"] == ["id"]
    finally:
        eng.dispose()


def test_unnest_two_levels_and_rename(db_url, engine):
    recs = [dict(id=1, user=dict(name="Ann", geo=dict(lat=1.5, lon=2.5))), dict(id=2, user=dict(name="Bob", geo=None))]
    map_and_upsert(recs, "people", "id", db_url, unnest_cols=["user", "user_geo"], column_map=dict(user_name="name"))
    assert [c["name"] for c in sa.inspect(engine).get_columns("people")] == [
        "id",
        "name",
        "user_geo_lat",
        "user_geo_lon",
    ]
    assert rows(engine, "people") == [(1, "Ann", 1.5, 2.5), (2, "Bob", None, None)]


def test_type_map_casts_round_trip(db_url, engine):
    recs = [
        dict(
            id="1",
            n="7",
            x="2.5",
            ok="YES",
            at="2026-01-02T03:04:05.123456+02:00",
            day="2026-01-02",
            doc=dict(a=[1, 2]),
        ),
        dict(id="2", n=None, x="-1", ok="0", at="2026-01-02T00:00:00Z", day=None, doc=None),
    ]
    tm = dict(id="int", n="int", x="float", ok="bool", at="datetime", day="date", doc="json")
    assert map_and_upsert(recs, "casts", "id", db_url, type_map=tm) == 2
    got = rows(engine, "casts")
    pg = engine.dialect.name == "postgresql"
    at = datetime(2026, 1, 2, 1, 4, 5, 123456, tzinfo=timezone.utc)
    assert [r[:4] for r in got] == [(1, 7, 2.5, True), (2, None, -1.0, False)]
    assert got[0][4] == (at if pg else "2026-01-02T01:04:05.123456+00:00")
    assert got[0][5] == (date(2026, 1, 2) if pg else "2026-01-02")
    assert got[0][6] == ({"a": [1, 2]} if pg else '{"a":[1,2]}')
    assert got[1][5:] == (None, None)


def test_text_survives_csv_exactly(db_url, engine):
    tricky = ['comma, "quoted"', "line\nbreak\r\n", "", "back\\slash", "tab\tend", "ünïcode ✓", "NULL", "\\N", None]
    df = pl.DataFrame(dict(id=list(range(len(tricky))), s=tricky))
    map_and_upsert(df, "texts", "id", db_url)
    assert [r[1] for r in rows(engine, "texts")] == tricky


def test_quoted_identifiers_for_reserved_and_mixed_case_names(db_url, engine):
    map_and_upsert([dict(select=1, Name="x")], "Order", "select", db_url)
    map_and_upsert([dict(select=1, Name="y")], "Order", "select", db_url)
    with engine.connect() as c:
        assert c.exec_driver_sql('SELECT "select", "Name" FROM "Order"').all() == [(1, "y")]


def test_duplicate_keys_last_wins(db_url, engine):
    df = pl.DataFrame(dict(id=[1, 2, 1, 1], v=["first", "b", "second", "last"]))
    assert map_and_upsert(df, "dups", "id", db_url) == 2
    assert rows(engine, "dups") == [(1, "last"), (2, "b")]
    assert map_and_upsert(pl.DataFrame(dict(id=[2, 3, 2], v=["x", "c", "y"])), "dups", "id", db_url) == 2
    assert rows(engine, "dups") == [(1, "last"), (2, "y"), (3, "c")]


def seed(engine):
    "An existing table with two rows, a CHECK rule and an unrelated column."
    with engine.begin() as c:
        c.exec_driver_sql("DROP TABLE IF EXISTS stock")
        c.exec_driver_sql("CREATE TABLE stock (id INTEGER PRIMARY KEY, qty INTEGER CHECK (qty >= 0), note TEXT)")
        c.exec_driver_sql("INSERT INTO stock VALUES (1, 5, 'a'), (2, 6, 'b')")
    return rows(engine, "stock")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def stock(request, tmp_path):
    "(url, engine, rows before) of a database holding the seeded `stock` table."
    url = f"sqlite:///{tmp_path / 'stock.db'}" if request.param == "sqlite" else request.getfixturevalue("empty_pg_url")
    eng = make_engine(url)
    yield url, eng, seed(eng)
    eng.dispose()


BAD_INPUTS = [
    (dict(df=[dict(sku=1, qty=1)], key_col="id"), "key column(s) ['id'] not in the data"),
    (dict(df=[dict(id=1, qty=1), dict(id=None, qty=2)]), "contain nulls"),
    (dict(df=[dict(id=1, qty="1")], type_map=dict(qty="integer")), "unknown type 'integer'"),
    (dict(df=[dict(id=1, qty="x")], type_map=dict(qty="int")), "column 'qty': cannot convert to int"),
    (dict(df=[dict(id=1, qty=1)], table_name='stock"; DROP TABLE stock; --'), "is not a valid identifier"),
    (dict(df=[dict(id=1, qty=1)], key_col='id"'), "is not a valid identifier"),
    (dict(df=[{"id": 1, 'qty" = 0 --': 1}]), "is not a valid identifier"),
    (dict(df=[dict(id=1, qty=1)], column_map=dict(qty="q'ty")), "is not a valid identifier"),
    (dict(df=[dict(id=1, qty=1, extra=2)]), "has no column(s) ['extra']"),
    (dict(df=[dict(id=1, qty=1)], key_col="qty"), "no primary key or unique index on ['qty']"),
    (dict(df=[dict(id=1, qty=1)], unnest_cols=["qty"]), "not a struct"),
    (dict(df=[dict(id=1, qty=None)]), "holds only nulls"),
    (dict(df="id,qty\n1,2"), "expected a polars DataFrame"),
]


@pytest.mark.parametrize("kw,msg", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_refused_and_writes_nothing(stock, kw, msg):
    db_url, engine, before = stock
    args = dict(table_name="stock", key_col="id") | kw
    with pytest.raises(
        (ValueError, TypeError),
        match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]"),
    ):
        map_and_upsert(args.pop("df"), args.pop("table_name"), args.pop("key_col"), db_url, **args)
    assert rows(engine, "stock") == before


def test_failure_in_the_database_rolls_back_every_row(stock):
    db_url, engine, before = stock
    df = pl.DataFrame(dict(id=[1, 3, 4], qty=[50, 7, -1]))
    with pytest.raises(sa.exc.IntegrityError):
        map_and_upsert(df, "stock", "id", db_url)
    assert rows(engine, "stock") == before


@pytest.mark.postgres
def test_copy_rejects_a_value_the_column_cannot_hold(empty_pg_url):
    engine = make_engine(empty_pg_url)
    try:
        before = seed(engine)
        with pytest.raises(sa.exc.DataError, match='invalid input syntax for type integer: "many"'):
            map_and_upsert([dict(id=1, qty="1"), dict(id=9, qty="many")], "stock", "id", empty_pg_url)
        assert rows(engine, "stock") == before
    finally:
        engine.dispose()


def test_joins_the_callers_transaction(db_url, engine):
    with pytest.raises(RuntimeError):
        with engine.begin() as conn:
            map_and_upsert([dict(id=1, v="x")], "joined", "id", conn)
            assert conn.exec_driver_sql("SELECT count(*) FROM joined").scalar() == 1
            raise RuntimeError("caller fails later")
    assert not sa.inspect(engine).has_table("joined")


@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection")
def test_host_database_objects_are_accepted(db_url):
    host_db = HostDatabase(db_url)
    try:
        map_and_upsert([dict(id=1, v="x")], "via_host", "id", host_db)
        map_and_upsert([dict(id=1, v="y")], "via_host", "id", host_db.db)
        with host_db.transaction():
            map_and_upsert([dict(id=2, v="z")], "via_host", "id", host_db)
            host_db.q("INSERT INTO via_host (id, v) VALUES (3, 'w')")
        assert host_db.q("SELECT id, v FROM via_host ORDER BY id") == [
            dict(id=1, v="y"),
            dict(id=2, v="z"),
            dict(id=3, v="w"),
        ]
        fdb = Database(db_url)
        try:
            map_and_upsert([dict(id=4, v="f")], "via_host", "id", fdb)
        finally:
            fdb.close()
            fdb.engine.dispose()
        assert host_db.q("SELECT v FROM via_host WHERE id = 4") == [dict(v="f")]
    finally:
        host_db.close()
        HostDatabase.reset_instance()


def connections_to(pg_server, url):
    with pg_server.engine.connect() as c:
        return c.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (sa.make_url(url).database,)
        ).scalar()


@pytest.mark.postgres
def test_engines_are_reused(pg_server, pg_url):
    for i in range(50):
        map_and_upsert([dict(id=i % 7, v=i)], "calls", "id", pg_url)
    assert connections_to(pg_server, pg_url) == 1
    assert len(mapper._engines) == 1 and mapper._engine_for(pg_url) is next(iter(mapper._engines.values()))

    def work(t):
        for i in range(10):
            map_and_upsert([dict(id=100 * t + i, v=i)], "calls", "id", pg_url)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= connections_to(pg_server, pg_url) <= 6
    assert len(mapper._engines) == 1


def test_concurrent_first_writes_create_the_table_once(db_url, engine, race):
    outcomes = race(
        [partial(map_and_upsert, [dict(id=t, v=str(t))], "raced", "id", db_url) for t in range(4)], catch=Exception
    )
    errors = [o for o in outcomes if isinstance(o, Exception)]
    assert errors == []
    assert rows(engine, "raced") == [(0, "0"), (1, "1"), (2, "2"), (3, "3")]


def waits_on_a_lock(pg_server, url) -> bool:
    with pg_server.engine.connect() as c:
        return (
            c.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
                (sa.make_url(url).database,),
            ).scalar()
            > 0
        )


@pytest.mark.postgres
@pytest.mark.parametrize(
    "other,after",
    [
        ("INSERT INTO stock VALUES (3, 1, 'other')", [(1, 50, "a"), (2, 60, "b"), (3, 70, "other")]),
        ("DELETE FROM stock WHERE id = 2", [(1, 50, "a"), (2, 60, None), (3, 70, None)]),
    ],
    ids=["insert", "delete"],
)
def test_a_concurrent_writer_loses_no_row_and_causes_no_conflict(pg_server, empty_pg_url, other, after):
    "Another transaction inserts a key being upserted, or deletes one, and commits while the upsert waits for it."
    engine = make_engine(empty_pg_url)
    outcome = []

    def upsert():
        try:
            outcome.append(
                map_and_upsert(pl.DataFrame(dict(id=[1, 2, 3], qty=[50, 60, 70])), "stock", "id", empty_pg_url)
            )
        except Exception as e:
            outcome.append(e)

    try:
        seed(engine)
        with engine.connect() as c:
            c.exec_driver_sql(other)
            writer = threading.Thread(target=upsert)
            writer.start()
            assert wait_for(lambda: waits_on_a_lock(pg_server, empty_pg_url))
            c.commit()
        writer.join()
        assert outcome == [3]
        assert rows(engine, "stock") == after
    finally:
        engine.dispose()
