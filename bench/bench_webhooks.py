"""Stripe webhook throughput on PostgreSQL: signed events through the real endpoint (uvicorn, 8 HTTP clients)
against the physical limit measured in the same run, a bare `INSERT ... ON CONFLICT DO NOTHING` + commit per
event into the inbox table. Usage: python bench/bench_webhooks.py [events]"""
import json, queue, sys, threading, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))

import httpx
from sqlalchemy.dialects import postgresql
from starlette.applications import Starlette

from fh_saas import stripe_webhooks as sw
from fh_saas.db_host import HostDatabase, TenantCatalog, webhook_events_t
from pgserver import start_server
from stripe_helpers import SECRET, ServedApp, event, sign, subscription

CLIENTS, SUBS, T0 = 8, 50, 1_760_000_000


def make_events(n):
    return [event("customer.subscription.updated", subscription(f"sub_{i % SUBS}", "active", T0 + i, f"t{i % SUBS}",
                                                                customer=f"cus_{i % SUBS}", quantity=1 + i % 3), T0 + i)
            for i in range(n)]


def run_threads(work, fn, n=CLIENTS):
    threads = [threading.Thread(target=fn) for _ in range(n)]
    t = time.perf_counter()
    for th in threads: th.start()
    for th in threads: th.join()
    return time.perf_counter() - t


def bare_inserts(engine, events):
    "The floor: one INSERT ... ON CONFLICT DO NOTHING and one commit per event, same clients, same table."
    work = queue.SimpleQueue()
    for e in events: work.put(e)
    def worker():
        with engine.connect() as conn:
            while True:
                try: body = work.get_nowait()
                except queue.Empty: return
                ev = json.loads(body)
                conn.execute(postgresql.insert(webhook_events_t).values(
                    event_id=ev["id"], event_type=ev["type"], status="processed", payload_json=body,
                    event_created=ev["created"])
                    .on_conflict_do_nothing(index_elements=["event_id"]))
                conn.commit()
    return run_threads(work, worker)


def through_endpoint(url, events):
    work = queue.SimpleQueue()
    for e in events: work.put(e)
    def worker():
        with httpx.Client(base_url=url, timeout=60) as http:
            while True:
                try: body = work.get_nowait()
                except queue.Empty: return
                r = http.post("/stripe/webhook", content=body, headers={"Stripe-Signature": sign(body, SECRET)})
                assert r.status_code == 200, r.text
    return run_threads(work, worker)


def main(n=2000):
    server = start_server()
    try:
        host_db = HostDatabase(server.create_database("bench"))
        with host_db.transaction():
            for s in range(SUBS): host_db.tenants.insert(TenantCatalog(id=f"t{s}", name=f"Tenant {s}"))
        floor_s = bare_inserts(host_db.engine, make_events(n))
        host_db.q("DELETE FROM core_stripe_webhook_events")
        direct = make_events(n)
        t = time.perf_counter()
        for body in direct[: n // 4]: sw.apply_event(host_db, json.loads(body), body)
        direct_s = (time.perf_counter() - t) * 4
        app = Starlette()
        sw.add_stripe_webhook(app, host_db, secrets=[SECRET])
        with ServedApp(app) as srv: endpoint_s = through_endpoint(srv.url, make_events(n))
        floor, ep, one = n / floor_s, n / endpoint_s, n / direct_s
        print(f"events: {n}, {CLIENTS} concurrent clients, {SUBS} subscriptions, PostgreSQL 15")
        print(f"bare INSERT ... ON CONFLICT + commit (floor): {floor:8.0f} events/s")
        print(f"apply_event, 1 thread, no HTTP:               {one:8.0f} events/s")
        print(f"endpoint over HTTP (verify+inbox+apply+audit): {ep:8.0f} events/s")
        print(f"endpoint / floor: {ep / floor:.2f}")
        host_db.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
