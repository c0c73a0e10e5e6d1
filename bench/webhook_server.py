"""The app bench_webhooks.py serves in a uvicorn process of its own, on the `DB_*` host database: the Stripe webhook
endpoint, and beside it the floor over HTTP, a bare Starlette endpoint doing only the inbox INSERT + commit
(`/floor`), and the same after the signature check (`/floor/signed`)."""

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.routing import Route

from fh_saas import stripe_webhooks
from fh_saas.db_host import HostDatabase
from webhook_floor import floor_insert

host_db = HostDatabase.from_env()
secrets = stripe_webhooks.webhook_secrets_from_env()


def insert(body: str):
    "The floor: one INSERT ... ON CONFLICT DO NOTHING and its commit."
    with host_db.engine.connect() as conn:
        floor_insert(conn, body)


async def floor(request):
    await run_in_threadpool(insert, (await request.body()).decode())
    return JSONResponse({"status": "processed"})


async def floor_signed(request):
    body = await request.body()
    stripe_webhooks.verify_event(body, request.headers.get("stripe-signature"), secrets)
    await run_in_threadpool(insert, body.decode())
    return JSONResponse({"status": "processed"})


app = Starlette(
    routes=[Route("/floor", floor, methods=["POST"]), Route("/floor/signed", floor_signed, methods=["POST"])]
)
stripe_webhooks.add_stripe_webhook(app, host_db, secrets)
