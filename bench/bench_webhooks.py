"""Stripe webhook throughput on PostgreSQL: signed events through the real endpoint (uvicorn in a process of its own,
8 keep-alive HTTP clients) against the physical limit measured in the same run, a bare `INSERT ... ON CONFLICT DO
NOTHING` + commit per event into the inbox table (8 threads). Beside them, the same floor INSERT behind a bare Starlette
endpoint over HTTP, with and without the signature check, shows how much of the gap is HTTP. The four run in
interleaved rounds, and the CPU a delivery costs is read from /proc (the server's process, the PostgreSQL cluster, this
process), a figure that other load on the machine moves far less than a rate. Round trips per event are counted by
the server itself (`log_statement = 'all'` logs one line per message it receives). Every delivery is
checked: applied once, never lost, and each subscription left at its newest event; the benchmark exits 1 otherwise.
Usage: python bench/bench_webhooks.py [events]

Where the time went, before (0.09x: 178 events/s over HTTP against a 2,045/s floor; `apply_event` alone 199/s):
- `apply_event` took about 5 ms an event (cProfile, one thread), 8 round trips as the server counts them (the pool's
  pre-ping, psycopg2's own BEGIN, the inbox INSERT, SELECT ... FOR UPDATE of the subscription, its UPDATE, the audit
  INSERT through fastsql with RETURNING of the whole row, the inbox UPDATE, COMMIT; 14 for a subscription's first
  event). The round trips themselves were under a third of it; most went to building SQLAlchemy statements per
  event: `values()` coercion and cache-key generation were 40% of the profile, fastsql's audit insert about 1.5 ms
  alone (a statement built per call, then a dataclass).
- The old benchmark served uvicorn from a thread of the process running its 8 httpx clients, so all of them shared
  one GIL: there a bare Starlette endpoint doing only the floor INSERT reached 400/s (0.24x of the floor), and a
  no-op endpoint 830/s. The harness, not the endpoint, capped the ratio. A uvicorn process of its own serves that
  same bare INSERT at about 0.65x of the floor and a no-op at about 3,800/s.
After: the event costs 2 round trips of its own: the claim (BEGIN + one statement: inbox INSERT ... ON CONFLICT
... RETURNING, else SELECT ... FOR UPDATE, then the subscription locked and the tenant, claimed tenants and plan
read) and the writes (the subscription's UPDATE, the customer mapping, the audit row and the inbox status, + COMMIT,
in one batch). The first event of a subscription sends its new row in one gated statement and COMMIT after it (3).
The pool's pre-ping adds one to each until it goes. Statements are compiled once per shape; per event only
parameters are filled in. What is left on the server is mostly planning the claim (0.25 to 0.3 ms, execution 0.15 to
0.19 ms); `apply_event` spends most of its time in psycopg2's execute, i.e. waiting for the server.
Measured here, on 2 cores shared with other sessions' tests (load average 10 to 30), by this harness, on the code
before and after the change:
  rate, endpoint / floor:   before 0.22, 0.24, 0.28, 0.26; after 0.45, 0.57, 0.41 (phases in turn), 0.42, 0.43,
                            0.47, 0.68 (interleaved): the load swings within a run, so each ratio swings with it
  CPU ms per delivery:      floor 0.95 to 1.2 (its inserts 0.66 to 0.80 + PostgreSQL 0.29 to 0.32); bare HTTP
                            endpoint about 1.2 to 1.5 + 0.45 to 0.52; endpoint before 4.36 + 1.55, after 1.77 to 1.82
                            + 1.73 to 1.74: by CPU, endpoint / floor 0.17 before, 0.27 to 0.31 after
  round trips per update:   before 8.19, after 3; first event of a subscription 14 -> 4; redelivery 5 -> 3
Where the time goes now: the server's Python fell 2.4x, to about 0.3 ms above the bare HTTP endpoint (which
already spends about 0.6 ms more than the in-process inserts: uvicorn, Starlette, the thread pool). PostgreSQL now
costs as much as the server, about 3 times the bare HTTP endpoint's share. Part of that is the work itself: the
subscription UPDATE, the audit INSERT with its five indexes, and the inbox row inserted and then updated, where the
indexed status keeps that update from being HOT. The other part is planning the claim, 0.25 to 0.3 ms a time.
A server-side prepared statement would save the planning, but not behind PgBouncer in transaction mode.
"""

import http.client, json, os, queue, random, socket, subprocess, sys, threading, time
from collections import Counter
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))

from sqlalchemy.engine import make_url

from fh_saas import stripe_webhooks as sw
from fh_saas.db_host import HostDatabase, TenantCatalog
from pgserver import free_port, start_server, wait_for
from stripe_helpers import SECRET, event, sign, subscription
from webhook_floor import floor_insert

ROOT, CLIENTS, SUBS, ROUNDS, T0 = Path(__file__).resolve().parents[1], 8, 50, 4, 1_760_000_000


def make_events(n, prefix):
    "n updates of SUBS subscriptions (`prefix` names them), one second apart, each a full snapshot."
    return [
        event(
            "customer.subscription.updated",
            subscription(
                f"sub_{prefix}_{i % SUBS}",
                "active",
                T0 + i,
                f"t{i % SUBS}",
                customer=f"cus_{i % SUBS}",
                quantity=1 + i % 3,
            ),
            T0 + i,
        )
        for i in range(n)
    ]


def with_redeliveries(events, seed=18):
    "`events` in order, a tenth of them delivered a second time a little later (Stripe delivers at least once)."
    rng, out = random.Random(seed), list(events)
    for body in rng.sample(events, len(events) // 10):
        out.insert(min(len(out), out.index(body) + rng.randint(1, 200)), body)
    return out


def run_threads(fn, n=CLIENTS):
    threads = [threading.Thread(target=fn) for _ in range(n)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t


def bare_inserts(engine, deliveries):
    "The floor: one INSERT ... ON CONFLICT DO NOTHING and one commit per delivery, same clients, same table."
    work = queue.SimpleQueue()
    for d in deliveries:
        work.put(d)

    def worker():
        with engine.connect() as conn:
            while True:
                try:
                    body = work.get_nowait()
                except queue.Empty:
                    return
                floor_insert(conn, body)

    return run_threads(worker)


def post_all(port, path, deliveries, clients=CLIENTS):
    "(seconds, Counter of (status, duplicate)) posting the signed `deliveries` to `path` from `clients` connections."
    work, counts = queue.SimpleQueue(), []
    for body in deliveries:
        work.put((body.encode(), sign(body, SECRET)))

    def worker():
        seen, conn = Counter(), http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        counts.append(seen)
        while True:
            try:
                body, sig = work.get_nowait()
            except queue.Empty:
                break
            conn.request("POST", path, body, {"Stripe-Signature": sig, "Content-Type": "application/json"})
            r = conn.getresponse()
            seen[(r.status, json.loads(r.read()).get("duplicate"))] += 1
        conn.close()

    seconds = run_threads(worker, clients)
    return seconds, sum(counts, Counter())


def _listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@contextmanager
def served(url):
    "bench/webhook_server.py under uvicorn in its own process on the database `url`: (its port, its pid)."
    u, port = make_url(url), free_port()
    env = dict(
        os.environ,
        DB_TYPE="POSTGRESQL",
        DB_HOST=u.host,
        DB_PORT=str(u.port),
        DB_USER=u.username,
        DB_PASS=u.password,
        DB_NAME=u.database,
        STRIPE_WEBHOOK_SECRET=SECRET,
        PYTHONPATH=str(ROOT),
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "webhook_server:app",
            "--app-dir",
            str(ROOT / "bench"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env=env,
    )
    try:
        wait_for(lambda: _listening(port) or proc.poll() is not None, 60)
        if proc.poll() is not None or not _listening(port):
            sys.exit("the webhook server did not start")
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


class StatementLog:
    "Counts what the server receives: with `log_statement = 'all'` it logs one line per message, i.e. per round trip."

    MARK = "LOG:  statement: "

    def __init__(self, server):
        self.server = server
        with server.engine.connect() as c:
            self.data_dir = c.exec_driver_sql("SHOW data_directory").scalar()
        self.path = Path(self.data_dir).parent / "log"  # where tests/pgserver.py's cluster logs; None elsewhere
        if not self.path.exists():
            self.path = None

    def _set(self, value):
        with self.server.engine.connect() as c:
            c.exec_driver_sql(f"ALTER SYSTEM SET log_statement = '{value}'")
            c.exec_driver_sql("SELECT pg_reload_conf()")
        time.sleep(0.5)  # every backend reads the new setting before its next command

    def per_event(self, run, events) -> float:
        "Round trips per event while `run()` delivers `events` events, nothing else talking to the server."
        self._set("all")
        try:
            before = self.path.read_text(errors="replace").count(self.MARK)
            run()
            time.sleep(0.2)
            return (self.path.read_text(errors="replace").count(self.MARK) - before) / events
        finally:
            self._set("none")


def _ticks(pid, children=False) -> int:
    "CPU clock ticks of process `pid` (all its threads), with its reaped children's if `children`."
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return sum(int(f) for f in fields[11 : 15 if children else 13])


class CpuMeter:
    """CPU seconds spent so far by the webhook server's process, the PostgreSQL cluster (postmaster, its children and
    the children it reaped) and this process (the floor's inserts, or the HTTP clients): a cost per delivery that the
    other sessions sharing the machine do not change, unlike a rate."""

    def __init__(self, data_dir: str, server_pid: int):
        self.postmaster = int(Path(data_dir, "postmaster.pid").read_text().split()[0])
        self.server, self.tick = server_pid, os.sysconf("SC_CLK_TCK")

    def _cluster(self) -> int:
        kids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and self._parent(p) == self.postmaster]
        return _ticks(self.postmaster, children=True) + sum(_ticks(k) for k in kids)

    @staticmethod
    def _parent(proc: Path) -> int:
        try:
            return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return -1

    def now(self) -> tuple:
        "(server, postgres, this process) CPU seconds."
        me = os.times()
        return _ticks(self.server) / self.tick, self._cluster() / self.tick, me.user + me.system


def check(host_db, events, results, redelivered) -> list[str]:
    "What went wrong in the endpoint's run: an event applied twice or lost, a subscription not at its newest event."
    ids = [json.loads(b)["id"] for b in events]
    bad = (
        [f"responses {dict(results)}, expected {len(ids)} applied and {redelivered} duplicates"]
        if results != {(200, False): len(ids), (200, True): redelivered}
        else []
    )
    rows = host_db.q(
        "SELECT event_id, status, attempts FROM core_stripe_webhook_events WHERE event_id = ANY(:ids)", ids=ids
    )
    if len(rows) != len(ids):
        bad.append(f"{len(ids) - len(rows)} events lost from the inbox")
    if {r["attempts"] for r in rows} != {1}:
        bad.append("an event was applied more than once (attempts)")
    if {r["status"] for r in rows} - {"processed", "skipped_out_of_order"}:
        bad.append("an event failed")
    processed = Counter(r["event_id"] for r in rows if r["status"] == "processed")
    audited = Counter(
        json.loads(a["details"])["event_id"]
        for a in host_db.q("SELECT details FROM sys_audit_logs WHERE details::json->>'event_id' = ANY(:ids)", ids=ids)
    )
    if audited != processed:
        bad.append("audit rows differ from the applied events (one each expected)")
    newest = {}
    for body in events:
        e = json.loads(body)
        o = e["data"]["object"]
        newest[o["id"]] = (o["status"], 2900 * o["items"]["data"][0]["quantity"], e["id"])
    state = {
        r["stripe_sub_id"]: (r["status"], r["amount_cents"], r["last_event_id"])
        for r in host_db.q(
            "SELECT stripe_sub_id, status, amount_cents, last_event_id FROM core_subscriptions "
            "WHERE stripe_sub_id = ANY(:s)",
            s=list(newest),
        )
    }
    if state != newest:
        bad.append("a subscription is not at its newest event (an older one overwrote it)")
    return bad


def round_trips(log, port, host_db):
    "Round trips per event, counted by the server, one client: update, first event, redelivery, HTTP floor, floor."
    new = make_events(20, "rt")  # 20 subscriptions' first events ...
    updates = [
        event(
            "customer.subscription.updated",
            subscription(f"sub_rt_{i % 20}", "past_due", T0 + 100 + i, f"t{i % 20}"),
            T0 + 100 + i,
        )
        for i in range(100)
    ]
    return (
        log.per_event(lambda: post_all(port, "/stripe/webhook", new, 1), 20),
        log.per_event(lambda: post_all(port, "/stripe/webhook", updates, 1), 100),
        log.per_event(lambda: post_all(port, "/stripe/webhook", updates[:20], 1), 20),
        log.per_event(lambda: post_all(port, "/floor", make_events(100, "rtf"), 1), 100),
        log.per_event(lambda: bare_inserts(host_db.engine, make_events(100, "rtb")), 100),
    )


def interleaved(runs: dict, meter: CpuMeter) -> tuple[dict, dict]:
    """Deliveries per second of each entry of `runs` (name: (fn, deliveries)), run in ROUNDS turns of a part of its
    deliveries each so that all see the same load on a shared machine; and its CPU ms per delivery by process."""
    spent, cpu = dict.fromkeys(runs, 0.0), {name: [0.0, 0.0, 0.0] for name in runs}
    for r in range(ROUNDS):
        for name, (fn, deliveries) in runs.items():
            k, before = len(deliveries), meter.now()
            spent[name] += fn(deliveries[r * k // ROUNDS : (r + 1) * k // ROUNDS])
            cpu[name] = [c + b - a for c, a, b in zip(cpu[name], before, meter.now(), strict=True)]
    return (
        {name: len(d) / spent[name] for name, (_, d) in runs.items()},
        {name: [1000 * c / len(runs[name][1]) for c in cpu[name]] for name in runs},
    )


def report(n, m, rates, cpu, one, rts, problems):
    floor, http_floor, signed_floor, ep = (rates[k] for k in ("floor", "http", "signed", "endpoint"))
    # the floor's own work is this process's inserts + PostgreSQL; an endpoint's, its server + PostgreSQL
    own = dict(
        floor=cpu["floor"][1] + cpu["floor"][2], **{k: cpu[k][0] + cpu[k][1] for k in ("http", "signed", "endpoint")}
    )
    http_impl = f"{'httptools' if find_spec('httptools') else 'h11'}, {'uvloop' if find_spec('uvloop') else 'asyncio'}"
    print(
        f"deliveries: {m} ({n} events, {m - n} delivered twice), {CLIENTS} concurrent clients, {SUBS} "
        f"subscriptions, PostgreSQL 15; uvicorn ({http_impl}) in a process of its own; {ROUNDS} interleaved rounds"
    )
    print(f"bare INSERT ... ON CONFLICT + commit (floor):      {floor:8.0f} deliveries/s")
    print(
        f"bare Starlette endpoint, that INSERT, over HTTP:   {http_floor:8.0f} deliveries/s "
        f"({http_floor / floor:.2f} of the floor: what HTTP leaves)"
    )
    print(
        f"  the same after the signature check:              {signed_floor:8.0f} deliveries/s "
        f"({signed_floor / floor:.2f})"
    )
    print(f"apply_event, 1 thread, no HTTP:                    {one:8.0f} events/s")
    print(f"endpoint over HTTP (verify+inbox+apply+audit):     {ep:8.0f} deliveries/s")
    print(f"endpoint / floor: {ep / floor:.2f}   endpoint / bare HTTP endpoint: {ep / http_floor:.2f}")
    print(
        "CPU ms per delivery, server + PostgreSQL: floor (its inserts) {0[2]:.2f} + {0[1]:.2f}, bare HTTP "
        "endpoint {1[0]:.2f} + {1[1]:.2f}, after the signature check {2[0]:.2f} + {2[1]:.2f}, endpoint {3[0]:.2f} + "
        "{3[1]:.2f}; the HTTP clients {3[2]:.2f}".format(*(cpu[k] for k in ("floor", "http", "signed", "endpoint")))
    )
    print(
        f"endpoint / floor by CPU per delivery: {own['floor'] / own['endpoint']:.2f}   "
        f"endpoint / bare HTTP endpoint: {own['http'] / own['endpoint']:.2f}"
    )
    if rts:
        print(
            "round trips per event, counted by the server: first event of a subscription {:.2f}, "
            "update {:.2f}, redelivery {:.2f}; bare HTTP endpoint {:.2f}, floor {:.2f}".format(*rts)
        )
    else:
        print("round trips: not counted (the server's log is not where tests/pgserver.py puts it)")
    print(
        "checks: "
        + (
            "; ".join(problems)
            if problems
            else f"{n} events applied once each, {m - n} redeliveries answered as duplicates, "
            f"{SUBS} subscriptions at their newest event, one audit row per applied event"
        )
    )


def main(n=2000):
    server = start_server()
    try:
        url = server.create_database("bench")
        host_db = HostDatabase(url)
        with host_db.transaction():
            for s in range(SUBS):
                host_db.tenants.insert(TenantCatalog(id=f"t{s}", name=f"Tenant {s}"))
        direct = make_events(n // 4, "direct")
        t = time.perf_counter()
        for body in direct:
            sw.apply_event(host_db, json.loads(body), body)
        one = len(direct) / (time.perf_counter() - t)
        log, events, results = StatementLog(server), make_events(n, "ep"), Counter()
        deliveries = with_redeliveries(events)
        with served(url) as (port, pid):
            for path in ("/floor", "/floor/signed", "/stripe/webhook"):
                post_all(port, path, make_events(200, "warm"))

            def endpoint(part):
                seconds, counts = post_all(port, "/stripe/webhook", part)
                results.update(counts)
                return seconds

            rates, cpu = interleaved(
                dict(
                    floor=(lambda part: bare_inserts(host_db.engine, part), with_redeliveries(make_events(n, "floor"))),
                    http=(lambda part: post_all(port, "/floor", part)[0], with_redeliveries(make_events(n, "http"))),
                    signed=(
                        lambda part: post_all(port, "/floor/signed", part)[0],
                        with_redeliveries(make_events(n, "signed")),
                    ),
                    endpoint=(endpoint, deliveries),
                ),
                CpuMeter(log.data_dir, pid),
            )
            rts = round_trips(log, port, host_db) if log.path else None
        problems = check(host_db, events, results, len(deliveries) - n)
        report(n, len(deliveries), rates, cpu, one, rts, problems)
        host_db.close()
        return 1 if problems else 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
