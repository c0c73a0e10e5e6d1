"Shared fixtures: one real PostgreSQL cluster per test session, fresh databases per test, and `race`."

import os

import pytest

from fh_saas.db_host import HostDatabase
from pgserver import start_cluster, start_server
import races


def pytest_collection_modifyitems(items):
    "Refuse a test that reaches a PostgreSQL cluster unmarked: `-m 'not postgres'` must run without PostgreSQL."

    def reaches(item):
        return {'pg_server', 'second_pg_server'} & set(item.fixturenames) or 'postgresql' in getattr(
            getattr(item, 'callspec', None), 'params', {}
        ).values()

    if unmarked := [i.nodeid for i in items if reaches(i) and not i.get_closest_marker('postgres')]:
        raise pytest.UsageError("these tests use PostgreSQL but are not marked postgres:\n  " + "\n  ".join(unmarked))


MASTER_KEY = 'conftest-master-key-' + '0123456789abcdefghijklmnopqrstuvwxyz'


@pytest.fixture(autouse=True)
def master_key(monkeypatch):
    "Every deployment sets `FH_SAAS_SECRET_KEY` (`setup_saas` refuses to start without one): so does every test."
    if not os.environ.get('FH_SAAS_SECRET_KEY'):
        monkeypatch.setenv('FH_SAAS_SECRET_KEY', MASTER_KEY)


@pytest.fixture(scope="session")
def pg_server():
    server = start_server()
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server):
    "A fresh, empty PostgreSQL database for one test."
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)


@pytest.fixture
def second_pg_server():
    "A second cluster on another port, for tests that place tenants on several servers."
    server = start_cluster()
    yield server
    server.stop()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'host.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def host_url(request, tmp_path):
    "A fresh host database URL on each backend."
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'host.db'}"
    else:
        yield request.getfixturevalue("pg_url")


def opened_host_db(url):
    "The HostDatabase singleton on `url`, closed and forgotten when the test ends."
    db = HostDatabase(url)
    yield db
    db.close()
    HostDatabase.reset_instance()


@pytest.fixture
def host_db(host_url):
    "The HostDatabase singleton on a fresh database (each backend)."
    yield from opened_host_db(host_url)


@pytest.fixture
def sqlite_host_db(sqlite_url):
    "The HostDatabase singleton on a fresh SQLite file (for tests where the backend does not matter)."
    yield from opened_host_db(sqlite_url)


@pytest.fixture
def pg_host_db(pg_url):
    "The HostDatabase singleton on a fresh PostgreSQL database."
    yield from opened_host_db(pg_url)


@pytest.fixture
def race():
    "`race(fns, catch=())`: run the callables together on threads released at one barrier; their outcomes in order."
    return races.race
