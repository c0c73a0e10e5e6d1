"""The whole app under load: a `setup_saas` app served by uvicorn with W workers on PostgreSQL, N tenants each in
its own database, against a bare FastHTML app doing the same pooled `SELECT` of 10 rows, in the same run.

After the request-path work of 2026-12-02 (`--tenants 100 1000 --workers 2 --seconds 15`, same machine, quieter;
three runs at 100 tenants, one at 1,000):

    tenants workers  page x     api x      errors  page p50/p99 ms  host/tenant stmts/req  new tenant conns/req  RSS MB
        100       2  0.35-0.38  0.41-0.44  0.00%      148/337            2.1/3.1              0.05-0.06            115
       1000       2  0.14       0.15       0.00%      358/885            3.3/8.3              0.91                 130

What changed it: a gated request reads its identity in one autocommitted host statement (session, user,
impersonator, membership, tenant and server joined; an API key likewise), the entitlements come from a per-process
cache that PostgreSQL's triggers invalidate, `require_quota` and the API meter count in one statement, the router
takes the beforeware's catalog row, the request pins its tenant until the response is sent, tenants at one schema
version share reflected tables (no reflection on the request path), pools check a connection at checkout without
a round trip, and the budget counts connections (a quiet tenant costs one), so 100 tenants stay connected in the
default budget. Host statements per request: page 1.1, API 3.0 (identity, rate counter, quota) at 100 tenants. At
1,000 tenants nearly every request still opens a tenant connection (SCRAM login plus SQLAlchemy's first-connect
queries: most of the 8.3 tenant statements); the host's extra statements there are the session touch and the
entitlements re-read after the cache's 60 s safety TTL, at ~12 s between requests per tenant. The page and API
ratios are still short of 0.5x: the profile (`--profile`, on-CPU) puts ~50% of the serving threads' time in
`do_execute`/`do_commit`, i.e. the app's two round trips (host, tenant) against the bare app's one.

Then (2026-12-02, later): under load a worker ran up to AnyIO's 40 threads against a host pool that keeps 10
connections, so a busy moment opened host connections beyond the pool and closed each as it came back (SQLAlchemy
keeps only `pool_size` idle): 0.06 new host connections per API request, each a PostgreSQL login, ~40% of the API's
samples in psycopg2's `connect`. A worker now runs as many request threads as its host pool keeps (`FH_SAAS_THREADS`,
default `DB_POOL_SIZE`): 0.00 new host connections per request, API 0.46 -> 0.55x, page 0.37 -> 0.46x (one run each,
other work on the machine). Over 73,466 timed requests at 100 tenants the largest worker grew from 111 MB after the
warm-up to 116 MB. What remains: the tenant side's new connections (0.04-0.07 per request: two requests for one
tenant at once need a second connection, and the default budget of 100 holds one per tenant), and CPU: the machine
is saturated, and a gated request takes two thread hops (beforeware, handler) where the bare app takes one.

Baseline, measured 2026-12-02 before any optimisation of the request path (`--seconds 20`, the router's default
budget). The machine has 2 cores shared with other helpers' benchmarks, and the load generator and PostgreSQL run on
the same cores, so figures move by tens of percent between runs (the bare app did 333 requests/s in run 1, 172-213
in run 2). Ratios are against the bare app of the same run; statements per request are page and API together:

    tenants workers  run  page x  api x  errors  page p50/p99 ms  host/tenant stmts/req  new tenant conns/req  RSS MB
        100       2    1    0.05   0.05   0.00%      1503/4559          23.3/14.1              0.58/0.54       207
        100       2    2    0.07   0.06   2.86%      1340/7331          23.2/14.0              0.53/0.58       206
        100       4    1    0.04   0.06   0.00%      1598/6432          23.8/14.3              0.56/0.52       201
        100       4    2    0.06   0.05   0.52%      2232/6688          23.4/14.4              0.59/0.50       187
       1000       2    1    0.03   0.03   2.29%      2684/6584          24.0/23.5              0.95/0.93       206
       1000       2    2    0.03   0.03   3.20%      3893/6548          24.7/23.4              0.95/0.96       219
       1000       4    1    0.04   0.02   0.00%      3453/8348          24.6/24.1              0.95/0.98       212
       1000       4    2    0.03   0.03   0.00%      2966/7061          24.6/24.0              0.96/0.97       212
    (20 tenants, 2 workers, `--seconds 5`, for contrast: page 0.17-0.27 x, api 0.17-0.44 x, 20.4-22.0 host and
    4.4-4.5 tenant statements/request, 0.05-0.15 new tenant connections/request, RSS 121 MB.)

The bare app: 172-446 requests/s, 3.0 statements/request (BEGIN, SELECT, ROLLBACK), RSS 65 MB. What the figures say:
- the router's default budget (100 connections a worker, 2 a tenant: 50 tenants cached per worker) is the cliff. At 20
  tenants everything stays cached; at 100 about half the requests, at 1,000 nearly all, find their tenant evicted and
  pay a new engine, a new connection (SCRAM login, SQLAlchemy's dialect initialisation: `show ...`, `version()`) and a
  fresh reflection of `items` by `auth.db['items']` (a new `TenantDatabase` per cache entry): 14 tenant statements
  per request at 100 tenants, 23-24 at 1,000, against 4.4 when cached. More workers do not help (each has its own
  cache and the cores are shared) and use more connections;
- the host database: 15.5 statements per page request and 25 per API call when cached, 18-20 and 28-30 when not.
  A page request runs 3 host transactions (session, user+membership+tenant, entitlements), each BEGIN, a pool
  pre-ping `SELECT 1`, its SELECTs and COMMIT; an API call 5 (key, resolve, entitlements, rate counter, quota:
  entitlements read again, then the usage UPDATE). A tenant cache miss adds a catalog read (and its ROLLBACK). The
  session's last_seen_at UPDATE runs once a minute per session. The host pool (10 + 10 overflow a worker) opens
  0.1-0.27 new host connections per request: its overflow connections are closed on return;
- the tenant side when cached: BEGIN, pre-ping, the SELECT, COMMIT (the bare app: BEGIN, SELECT, ROLLBACK);
- errors: uvicorn replaced app workers in every configuration of run 2 (1, 1, 2 and 4, the last during the warm-up;
  run 1 did not count them yet, its 1,000/2 errors were the same): its supervisor kills a worker that does not
  answer its 5 s health check (presumably the answering thread waits that long for the GIL or a core). The requests
  in flight on it fail (`IncompleteReadError`) and the benchmark exits 1. The bare app's workers never were.
  "errors" above are the timed windows' only;
- p99 latencies of 5-10 s with 32 connections: the queue in front of ~10-20 requests/s.

Profile (`--profile 10`, run 1; py-spy wall-clock samples of the threads serving requests in one app worker; run 1
took the first worker, which at 1,000/4 served nothing in its window as the other workers had accepted all the
keep-alive connections: the clients now connect one at a time and the busiest worker is profiled):
- 100 tenants, gated page: own time in `do_execute` 48%, `do_commit` 9%, psycopg2 `connect` 7%, `do_ping` 7%,
  `do_rollback` 5%, i.e. ~75% waiting on PostgreSQL round trips; inclusive: `TenantDatabase.__getitem__` ->
  `PooledDatabase.table` (reflecting `items`) 55%, `AuthResolver.resolve` 35%, `TenantRouter.connect` 22%,
  `entitlements` 11%, `SessionManager.load` 9%. The API: reflection 41%, resolve 43%, `do_ping` 12.5% own.
- 1,000 tenants: reflection 73% (page) and 84% (API) inclusive; `connect` 12-15% own, `_login_under_any_key` 8-16%.
- 20 tenants (all cached), gated page: `do_execute` 48%, `do_ping` 17%, `do_commit` 16.5% own; inclusive
  `AuthResolver.resolve` 68%, `entitlements` 24%, `SessionManager.load` 13%, the tenant query (`BoundTable.__call__`)
  18.5%, `TenantRouter.connect` 11%; API: resolve 65.5%, `consume_quota` 20%, `hit` (rate limit) 12%,
  `verify_api_key` 11.5%.

Per configuration it prints

    app load (N tenants, W workers): gated page R x, api R x, errors E%, p50/p99 A/B ms,
    host statements/request H, tenant statements/request T, RSS M MB

(on one line) and a few detail lines: R is the requests/s of the gated page (a signed-in member's session cookie, a
route behind `require_feature` reading the tenant's 10 rows through `auth.db['items']`), resp. of the JSON API call
(an API key, `Api` of fh_saas.api, the same 10 rows), divided by the bare app's requests/s; p50/p99 are the gated
page's; H and T are the statements PostgreSQL ran in the host database, resp. in tenant databases, per request of the
app (page and API together; BEGIN/COMMIT and pool pre-pings included), counted server-side by `pg_stat_statements`
over the timed windows; RSS is the largest app worker's resident memory after the run (/proc). The detail lines give
each side's requests/s and latencies, statements per request of each kind (the bare app's too), new tenant and host
connections per request (PostgreSQL's `log_connections`), `max_connections`, each app worker's CPU seconds in the
windows, and workers uvicorn replaced. `--statements K` adds the K statements run most per request of each kind.

How:
- a throwaway cluster (tests/pgserver.py `start_cluster`) with `max_connections=700`, `pg_stat_statements` preloaded
  and `log_connections=on`; a host database; N tenants provisioned by `provision_tenant` onto the cluster (registered
  with `add_db_server`), their schema the kit's tenant migrations plus an `items` table (bench/app_under_load.py
  registers it as tenant migration 4), 10 rows named `<tenant>-item-<i>`, one owner with a session
  (`SessionManager.create`) and a secret API key (`create_api_key`), a `Subscription` to a plan granting the feature
  `items` and an unlimited `api_calls` quota (so the API meters each call, as a paying plan would);
- the app: bench/app_under_load.py (`uvicorn app_under_load:app --workers W`, configured by `DB_*`,
  `FH_SAAS_SECRET_KEY`; the router keeps its default budget of 100 connections per worker; the API rate limit is
  raised to 10^9/60 so that it counts every call but never refuses one); the page is rendered by the same function
  as the bare app's, not in the kit's layout (`saas.page`);
- the bare app: bench/app_bare.py (plain FastHTML, a SQLAlchemy engine with a `QueuePool` of 32, so no connection
  is opened under load, on the first tenant's database as its role), same worker count;
- a load generator in a process of its own: raw asyncio HTTP/1.1 keep-alive clients (`--connections`, default 32,
  connecting one at a time) on loopback, each request for a random tenant (its cookie or API key). Warm-up: every
  tenant once on the page and once on the API (the bare app: as many requests). Then `--rounds` rounds of bare, page
  and API windows, each `--seconds`/rounds long and at most `--requests`/rounds requests, interleaved so that all
  three see the same machine load. Every response is checked: status 200 and exactly the tenant's own 10 rows. Any
  error (non-200, a 15 s timeout, a connection error) or wrong response makes the benchmark exit 1, after printing
  the status codes.
- `--profile S`: afterwards, `py-spy record --idle` samples the busiest app worker for S seconds of page load and S
  of API load, keeps the threads serving a request, and prints the top frames by own and by inclusive samples.

Run (from the repository root; PYTHONPATH makes the servers import this checkout's fh_saas):
    PYTHONPATH=$PWD python bench/bench_app.py                        # 100 tenants, 2 workers, 10 s per side
    PYTHONPATH=$PWD python bench/bench_app.py --tenants 20 --seconds 5   # a quick check, well under a minute
    PYTHONPATH=$PWD python bench/bench_app.py --tenants 100 1000 --workers 2 4 --seconds 20 --statements 12 \
        --profile 10                                                     # the figures above, ~25 minutes
"""

import argparse, asyncio, json, os, random, re, signal, socket, subprocess, sys, tempfile, time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / 'bench'
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / 'tests'))
sys.path.insert(2, str(BENCH))
os.environ.setdefault('FH_SAAS_SECRET_KEY', 'bench-master-key-0123456789abcdef0123456789')

MAX_CONNECTIONS = 700
TIMEOUT = 15.0  # seconds a request may take before it counts as an error
ROW_RE = re.compile(r'([a-z][a-z0-9_]*)-item-(\d+)')
KINDS = ('bare', 'page', 'api')
LABEL = dict(bare='bare', page='gated page', api='api')


# ---------------------------------------------------------------------------------------------------- load generator
def rows_ok(kind: str, tid: str, body: bytes) -> bool:
    "Whether `body` shows exactly the 10 rows of tenant `tid`."
    if kind == 'api':
        try:
            names = [r['name'] for r in json.loads(body)]
        except (ValueError, TypeError, KeyError):
            return False
        return names == [f'{tid}-item-{i}' for i in range(1, 11)]
    return ROW_RE.findall(body.decode('utf-8', 'replace')) == [(tid, str(i)) for i in range(1, 11)]


async def read_response(reader) -> tuple[int, dict, bytes]:
    head = await reader.readuntil(b'\r\n\r\n')
    lines = head.decode('latin-1').split('\r\n')
    status = int(lines[0].split(' ', 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(':') for h in lines[1:] if h)}
    if 'content-length' in headers:
        return status, headers, await reader.readexactly(int(headers['content-length']))
    if headers.get('transfer-encoding', '').lower() == 'chunked':
        body = b''
        while size := int((await reader.readuntil(b'\r\n')).split(b';')[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b'\r\n')
        return status, headers, body
    return status, headers, await reader.read()


async def load(cmd: dict, targets: list) -> dict:
    """Requests from `cmd['connections']` keep-alive clients: every target once (`warmup`), else random targets until
    `seconds` pass or `requests` are sent."""
    kind, port, path = cmd['kind'], cmd['port'], cmd['path']
    reqs = [(tid, f'GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{hdr}\r\n'.encode()) for tid, hdr in targets]
    order = iter(random.sample(reqs, len(reqs)) if cmd.get('warmup') else ())
    left, lat, errors, wrong = [cmd.get('requests') or 10**9], [], Counter(), []
    t0 = time.perf_counter()
    deadline = t0 + cmd.get('seconds', 1e9)

    async def client(i):
        await asyncio.sleep(0.003 * i)  # one connection at a time, so that one worker does not accept them all
        conn = None
        while True:
            if cmd.get('warmup'):
                if (nxt := next(order, None)) is None:
                    break
                tid, req = nxt
            else:
                if left[0] <= 0 or time.perf_counter() >= deadline:
                    break
                left[0] -= 1
                tid, req = random.choice(reqs)
            try:
                async with asyncio.timeout(TIMEOUT):
                    if conn is None:
                        conn = await asyncio.open_connection('127.0.0.1', port)
                    start = time.perf_counter()
                    conn[1].write(req)
                    status, headers, body = await read_response(conn[0])
                lat.append((time.perf_counter() - start) * 1000)
                if status != 200:
                    errors[str(status)] += 1
                elif not rows_ok(kind, tid, body):
                    wrong.append(f'{tid}: {body[:300]!r}')
                if headers.get('connection', '').lower() == 'close':
                    conn[1].close()
                    conn = None
            except (
                TimeoutError,
                OSError,
                EOFError,
                ValueError,
                IndexError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
            ) as e:
                errors['timeout' if isinstance(e, TimeoutError) else type(e).__name__] += 1
                if conn is not None:
                    conn[1].close()
                    conn = None
        if conn is not None:
            conn[1].close()

    await asyncio.gather(*[client(i) for i in range(cmd['connections'])])
    return dict(
        n=len(lat) + sum(v for k, v in errors.items() if not k.isdigit()),
        elapsed=time.perf_counter() - t0,
        lat=lat,
        errors=dict(errors),
        wrong=len(wrong),
        wrong_samples=wrong[:3],
    )


def loadgen_main():
    "The load generator process: one JSON command a line on stdin, one JSON result a line on stdout."
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    targets = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd['op'] == 'targets':
            targets = cmd['targets']
            res = {}
        else:
            res = asyncio.run(load(cmd, targets[cmd['kind']]))
        sys.stdout.write(json.dumps(res) + '\n')
        sys.stdout.flush()


class LoadGen:
    "The parent's handle on the load generator process."

    def __init__(self, targets: dict):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, '--loadgen'], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.ask(op='targets', targets=targets)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + '\n')
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError('the load generator died')
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(10)


# ----------------------------------------------------------------------------------------------------- provisioning
def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def provision(server, n: int) -> dict:
    "A host database and `n` tenants with their rows, users, sessions, keys and subscriptions; what the load needs."
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url
    from fh_saas.api_keys import create_api_key
    from fh_saas.billing import seed_plans
    from fh_saas.db_host import GlobalUser, HostDatabase, Membership, Subscription
    from fh_saas.db_tenant import add_db_server, provision_tenant, tenant_engine, tenant_url
    from fh_saas.sessions import SessionManager
    from app_under_load import FEATURE, register_items

    register_items()
    host_url = server.create_database('bench_host')
    host_db = HostDatabase(host_url)
    u = server.admin_url
    add_db_server(host_db, 'main', u.host, u.password, port=u.port, admin_user=u.username, max_tenants=n + 10)
    seed_plans(host_db, [dict(id='pro', name='Pro', features=[FEATURE], quotas={'api_calls': None})])
    sessions = SessionManager.from_env(host_db)
    ids = [f'bench{i:05d}' for i in range(n)]

    def one(tid):
        provision_tenant(host_db, tid, f'Bench {tid}')
        eng = tenant_engine(host_db, tid, poolclass=sa.pool.NullPool)
        try:
            with eng.begin() as c:
                c.execute(
                    sa.text('INSERT INTO items (id, name) VALUES (:id, :name)'),
                    [dict(id=i, name=f'{tid}-item-{i}') for i in range(1, 11)],
                )
        finally:
            eng.dispose()
        uid = f'u_{tid}'
        host_db.global_users.insert(GlobalUser(id=uid, email=f'{tid}@example.com', name=f'Owner of {tid}'))
        host_db.memberships.insert(Membership(user_id=uid, tenant_id=tid, role='owner'))
        host_db.subscriptions.insert(
            Subscription(tenant_id=tid, status='active', plan_tier='pro', payment_type='subscription')
        )
        key, _ = create_api_key(host_db, tid, uid, 'bench')
        return tid, sessions.create(uid, tid), key

    t0, done, out = time.perf_counter(), 0, []
    out.append(one(ids[0]))  # the first one prepares the template
    with ThreadPoolExecutor(4) as ex:
        for res in ex.map(one, ids[1:]):
            out.append(res)
            done = len(out)
            if done % max(1, n // 10) == 0 or done == n:
                print(f'  provisioned {done}/{n} tenants ({time.perf_counter() - t0:.0f} s)', flush=True)
    cookie = sessions.cookie_name
    bare_url = tenant_url(host_db, ids[0]).render_as_string(hide_password=False)
    host = make_url(host_url)
    host_db.close()
    HostDatabase.reset_instance()
    return dict(
        host_db_name=host.database,
        host_password=host.password,
        host_port=host.port,
        bare_url=bare_url,
        targets=dict(
            page=[(t, f'Cookie: {cookie}={c}\r\n') for t, c, _ in out],
            api=[(t, f'Authorization: Bearer {k}\r\n') for t, _, k in out],
            bare=[(ids[0], '')],
        ),
    )


# ---------------------------------------------------------------------------------------------------------- servers
class Server:
    "`uvicorn module:app --workers W` on a free port, in a process group of its own."

    def __init__(self, module: str, workers: int, env: dict):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                '-m',
                'uvicorn',
                f'{module}:app',
                '--app-dir',
                str(BENCH),
                '--host',
                '127.0.0.1',
                '--port',
                str(self.port),
                '--workers',
                str(workers),
                '--log-level',
                'warning',
                '--no-access-log',
            ],
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        self.workers = workers

    def wait_ready(self, timeout=60.0):
        "Until every worker answers (a request to a path that does not exist, on several connections)."
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f'the server exited with {self.proc.returncode}')
            if len(self.worker_pids()) == self.workers:
                try:
                    with socket.create_connection(('127.0.0.1', self.port), timeout=5) as s:
                        s.sendall(b'GET /_ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
                        if s.recv(64).startswith(b'HTTP/1.1'):
                            return
                except OSError:
                    pass
            time.sleep(0.2)
        raise RuntimeError('the server did not start')

    def worker_pids(self) -> list[int]:
        "The uvicorn workers (spawned children of the master; not multiprocessing's resource tracker)."
        try:
            kids = Path(f'/proc/{self.proc.pid}/task/{self.proc.pid}/children').read_text().split()
        except OSError:
            return []
        return [int(k) for k in kids if b'spawn_main' in _read(f'/proc/{k}/cmdline')]

    def rss_mb(self) -> float:
        "The largest worker's resident memory, MB."

        def rss(pid):
            m = re.search(rb'VmRSS:\s+(\d+) kB', _read(f'/proc/{pid}/status'))
            return int(m.group(1)) / 1024 if m else 0.0

        return max((rss(p) for p in self.worker_pids()), default=0.0)

    def cpu(self) -> dict[int, float]:
        "CPU seconds (user + system) each worker has used so far."
        ticks = os.sysconf('SC_CLK_TCK')

        def used(pid):
            fields = _read(f'/proc/{pid}/stat').rpartition(b')')[2].split()
            return (int(fields[11]) + int(fields[12])) / ticks if len(fields) > 12 else 0.0

        return {p: used(p) for p in self.worker_pids()}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _read(path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return b''


# ------------------------------------------------------------------------------------------------- server-side counts
class Counts:
    "Statements (`pg_stat_statements`) and new connections (`log_connections`) by database, between two snapshots."

    def __init__(self, server, host_db_name: str):
        self.server, self.host = server, host_db_name

    def snapshot(self) -> dict:
        with self.server.engine.connect() as c:
            rows = c.exec_driver_sql(
                "SELECT CASE WHEN d.datname = %s THEN 'host' ELSE 'tenant' END, s.query, sum(s.calls)::bigint"
                " FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid"
                " WHERE d.datname = %s OR d.datname LIKE 'tenant\\_%%' GROUP BY 1, 2",
                (self.host, self.host),
            ).all()
            dealloc = c.exec_driver_sql('SELECT dealloc FROM pg_stat_statements_info').scalar()
        return dict(
            calls=Counter({(side, q): n for side, q, n in rows}),
            dealloc=dealloc,
            log=self.server.log_path.stat().st_size,
        )

    def diff(self, a: dict, b: dict) -> dict:
        with open(self.server.log_path, 'rb') as f:
            f.seek(a['log'])
            text = f.read(b['log'] - a['log']).decode('utf-8', 'replace')
        dbs = re.findall(r'connection authorized: user=\S+ database=(\S+)', text)
        calls = b['calls'] - a['calls']
        return dict(
            host=sum(n for (side, _), n in calls.items() if side == 'host'),
            tenant=sum(n for (side, _), n in calls.items() if side == 'tenant'),
            calls=calls,
            dealloc=b['dealloc'] - a['dealloc'],
            host_conns=sum(d == self.host for d in dbs),
            tenant_conns=sum(d.startswith('tenant_') for d in dbs),
            fatal=re.findall(r'FATAL:\s+(.*)', text),
        )


def top_statements(calls: Counter, side: str, n: int, top: int) -> list[str]:
    "The statements run most often per request on `side` ('host' or 'tenant'), shortened."
    rows = sorted(((v, q) for (s, q), v in calls.items() if s == side), reverse=True)[:top]
    return [f"{v / n:5.2f}  {' '.join(q.split())[:100]}" for v, q in rows]


# ------------------------------------------------------------------------------------------------------------ profile
def profile(pid: int, gen: LoadGen, cmd: dict, seconds: float, top: int = 12) -> list[str]:
    """Where the requests' time goes in worker `pid` while `cmd` runs: py-spy's wall-clock samples (`--idle`) of the
    threads serving a request (a stack through fh_saas, Starlette, FastHTML, uvicorn's protocol or the app; idle
    pool threads, the idle event loop and the routing listener left out), top frames by own and inclusive samples."""
    out = Path(tempfile.mkdtemp(prefix='bench_app_')) / 'raw.txt'
    spy = subprocess.Popen(
        [
            'py-spy',
            'record',
            '-p',
            str(pid),
            '-d',
            str(int(seconds)),
            '-r',
            '100',
            '-F',
            '--idle',
            '--nonblocking',
            '-f',
            'raw',
            '-o',
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(0.5)
    gen.ask(**dict(cmd, seconds=seconds))
    _, err = spy.communicate(timeout=seconds + 60)
    if not out.exists():
        return [f'py-spy failed: {err.decode()[-300:]}']
    serving = re.compile(r'\((fh_saas|starlette|fasthtml|bench|uvicorn/protocols)/')
    strip = re.compile(rf'\((?:{re.escape(str(ROOT))}|.*site-packages|.*lib/python3\.\d+)/')
    own, incl, total, seen = Counter(), Counter(), 0, 0
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(' ')
        frames, n = [strip.sub('(', f) for f in stack.split(';')], int(n)
        seen += n
        if 'RoutingListener' in stack or not any(serving.search(f) for f in frames):
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    out.unlink()
    out.parent.rmdir()
    share = lambda c, keep=lambda k: True: [f'{100 * v / total:5.1f}%  {k}' for k, v in c.most_common() if keep(k)][
        :top
    ]
    return [
        f'{total} of {seen} samples in threads serving a request (on average {total / (100 * seconds):.1f} '
        'such threads); own:',
        *share(own),
        'inclusive, fh_saas and app frames:',
        *share(incl, lambda k: '(fh_saas/' in k or '(bench/' in k),
    ]


# ---------------------------------------------------------------------------------------------------------- the run
def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float('nan')


def measure(server, prov: dict, n: int, workers: int, args) -> bool:
    "One configuration: both servers, warm-up, interleaved windows; prints the figures; False if anything failed."
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ('FH_SAAS_TENANT_CONN_BUDGET', 'DB_POOL_SIZE', 'DB_MAX_OVERFLOW', 'DB_POOL_PRE_PING')
    }
    base['PYTHONPATH'] = os.pathsep.join([str(ROOT), str(BENCH)])
    app_env = dict(
        base,
        DB_TYPE='POSTGRESQL',
        DB_HOST='127.0.0.1',
        DB_PORT=str(prov['host_port']),
        DB_USER='postgres',
        DB_PASS=prov['host_password'],
        DB_NAME=prov['host_db_name'],
        FH_SAAS_ENV='production',
        FH_SAAS_API_RATE_LIMIT='1000000000/60',
    )
    bare_env = dict(base, BENCH_BARE_URL=prov['bare_url'])
    servers = dict(bare=Server('app_bare', workers, bare_env), app=Server('app_under_load', workers, app_env))
    gen, counts = LoadGen(prov['targets']), Counts(server, prov['host_db_name'])
    port = dict(bare=servers['bare'].port, page=servers['app'].port, api=servers['app'].port)
    path = dict(bare='/items', page='/items', api='/api/items')
    cmd = lambda kind, **kw: dict(
        op='run', kind=kind, port=port[kind], path=path[kind], connections=args.connections, **kw
    )
    try:
        for s in servers.values():
            s.wait_ready()
        started = {k: set(s.worker_pids()) for k, s in servers.items()}
        t0 = time.perf_counter()
        warm = [
            gen.ask(**cmd('bare', requests=max(n, 200))),
            gen.ask(**cmd('page', warmup=True)),
            gen.ask(**cmd('api', warmup=True)),
        ]
        bad = Counter()
        for w in warm:
            bad.update(w['errors'])
        wrong = sum(w['wrong'] for w in warm)
        ok = not bad and not wrong
        print(
            f'  warmed up in {time.perf_counter() - t0:.1f} s'
            + (f'; warm-up errors {dict(bad)}' if bad else '')
            + (f'; wrong warm-up responses {wrong}' if wrong else ''),
            flush=True,
        )
        tot = {
            k: dict(
                n=0,
                elapsed=0.0,
                lat=[],
                errors=Counter(),
                wrong=0,
                samples=[],
                host=0,
                tenant=0,
                dealloc=0,
                host_conns=0,
                tenant_conns=0,
                fatal=[],
                calls=Counter(),
            )
            for k in KINDS
        }
        per = dict(seconds=args.seconds / args.rounds, requests=max(1, args.requests // args.rounds))
        cpu0, warm_rss = servers['app'].cpu(), servers['app'].rss_mb()
        for _ in range(args.rounds):
            for kind in KINDS:
                a = counts.snapshot()
                r = gen.ask(**cmd(kind, **per))
                d = counts.diff(a, counts.snapshot())
                t = tot[kind]
                t['n'] += r['n']
                t['elapsed'] += r['elapsed']
                t['lat'] += r['lat']
                t['errors'].update(r['errors'])
                t['wrong'] += r['wrong']
                t['samples'] += r['wrong_samples']
                for k in ('host', 'tenant', 'dealloc', 'host_conns', 'tenant_conns', 'fatal', 'calls'):
                    t[k] += d[k]
        rss, bare_rss = servers['app'].rss_mb(), servers['bare'].rss_mb()
        cpu = {p: c - cpu0.get(p, 0.0) for p, c in servers['app'].cpu().items()}
        replaced = {k: len(started[k] - set(s.worker_pids())) for k, s in servers.items()}
        rate = {k: t['n'] / t['elapsed'] for k, t in tot.items()}
        app_n = tot['page']['n'] + tot['api']['n']
        app_err = sum(tot['page']['errors'].values()) + sum(tot['api']['errors'].values())

        def per_req(k, kinds=('page', 'api')):
            return sum(tot[x][k] for x in kinds) / max(1, sum(tot[x]['n'] for x in kinds))

        lat = lambda k: f"{pct(tot[k]['lat'], 0.5):.1f}/{pct(tot[k]['lat'], 0.99):.1f}"
        print(
            f"app load ({n} tenants, {workers} workers): gated page {rate['page'] / rate['bare']:.2f} x, "
            f"api {rate['api'] / rate['bare']:.2f} x, errors {100 * app_err / max(1, app_n):.2f}%, "
            f"p50/p99 {lat('page')} ms, host statements/request {per_req('host'):.1f}, "
            f"tenant statements/request {per_req('tenant'):.1f}, RSS {rss:.0f} MB"
        )
        print(
            f"  requests/s: bare {rate['bare']:.0f}, gated page {rate['page']:.0f}, api {rate['api']:.0f} "
            f"({tot['bare']['n']}, {tot['page']['n']}, {tot['api']['n']} requests in {args.rounds} rounds); "
            f"p50/p99 ms: bare {lat('bare')}, api {lat('api')}"
        )
        sp = lambda k: f"{per_req('host', (k,)):.1f}/{per_req('tenant', (k,)):.1f}"
        print(
            f"  statements/request host/tenant: gated page {sp('page')}, api {sp('api')}, bare {sp('bare')}; "
            f"new connections/request tenant/host: gated page {per_req('tenant_conns', ('page',)):.2f}/"
            f"{per_req('host_conns', ('page',)):.2f}, api {per_req('tenant_conns', ('api',)):.2f}/"
            f"{per_req('host_conns', ('api',)):.2f}, bare {per_req('tenant_conns', ('bare',)):.2f}"
        )
        print(
            f"  max_connections {MAX_CONNECTIONS}; router budget default (100 a worker); "
            f"largest app worker RSS {warm_rss:.0f} MB after the warm-up, {rss:.0f} MB after the "
            f"{app_n} timed requests; largest bare worker RSS {bare_rss:.0f} MB; {args.connections} client "
            f"connections; app workers' CPU seconds in the windows: "
            f"{', '.join(f'{c:.1f}' for c in sorted(cpu.values(), reverse=True))}"
        )
        if any(replaced.values()):
            print(
                f"  workers replaced during the run (uvicorn kills one that misses its 5 s health check): "
                f"app {replaced['app']}, bare {replaced['bare']}"
            )
        for k, t in tot.items():
            if t['errors'] or t['wrong']:
                ok = False
                print(f"  ERRORS {LABEL[k]}: {dict(t['errors'])}, wrong responses {t['wrong']} {t['samples'][:2]}")
            if t['dealloc']:
                print(f"  warning: pg_stat_statements evicted entries during {LABEL[k]}: counts low")
            if t['fatal']:
                print(f"  server FATALs during {LABEL[k]}: {Counter(t['fatal']).most_common(3)}")
        for kind in ('page', 'api') if args.statements else ():
            for side in ('host', 'tenant'):
                print(f'  {side} statements per {LABEL[kind]} request (pg_stat_statements, top {args.statements}):')
                for line in top_statements(tot[kind]['calls'], side, tot[kind]['n'], args.statements):
                    print('    ' + line)
        if args.profile:
            pid = max(cpu, key=cpu.get)  # the busiest worker
            for kind in ('page', 'api'):
                print(f'  py-spy, the busiest app worker (pid {pid}), {LABEL[kind]} load, {args.profile:.0f} s:')
                for line in profile(pid, gen, cmd(kind, requests=10**9), args.profile):
                    print('    ' + line)
    finally:
        gen.close()
        for s in servers.values():
            s.stop()
    return ok


def main():
    if '--loadgen' in sys.argv:
        return loadgen_main()
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--tenants', type=int, nargs='+', default=[100])
    p.add_argument('--workers', type=int, nargs='+', default=[2])
    p.add_argument('--seconds', type=float, default=10.0, help='timed seconds per side (bare, page, api)')
    p.add_argument('--requests', type=int, default=1_000_000, help='at most this many timed requests per side')
    p.add_argument('--rounds', type=int, default=3, help='interleaved bare/page/api windows')
    p.add_argument('--connections', type=int, default=32)
    p.add_argument('--statements', type=int, default=0, metavar='K', help="print the app's K most run statements")
    p.add_argument('--profile', type=float, default=0, metavar='S', help='py-spy one app worker for S s per kind')
    args = p.parse_args()
    from pgserver import start_cluster

    ok = True
    for n in args.tenants:
        t0 = time.perf_counter()
        server = start_cluster(
            settings={
                'max_connections': MAX_CONNECTIONS,
                'log_connections': 'on',
                'shared_preload_libraries': 'pg_stat_statements',
                'pg_stat_statements.max': 50000,
                'pg_stat_statements.track_utility': 'on',
            }
        )
        try:
            with server.engine.connect() as c:
                c.exec_driver_sql('CREATE EXTENSION pg_stat_statements')
                print(
                    f'PostgreSQL cluster on port {server.admin_url.port}: max_connections '
                    f"{c.exec_driver_sql('SHOW max_connections').scalar()}, pg_stat_statements, log_connections",
                    flush=True,
                )
            prov = provision(server, n)
            print(f'  {n} tenants ready in {time.perf_counter() - t0:.0f} s', flush=True)
            for w in args.workers:
                ok = measure(server, prov, n, w, args) and ok
        finally:
            server.stop()
    sys.exit(0 if ok else 1)


if __name__ == '__main__':
    main()
