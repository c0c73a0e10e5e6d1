"Helpers for the Stripe tests: signed events as Stripe sends them, and an ASGI app served over real HTTP."

import hashlib, hmac, itertools, json, threading, time

import stripe
import uvicorn

from fh_saas.stripe_models import STRIPE_API_VERSION
from pgserver import free_port, wait_for

SECRET = "whsec_test_current"
OLD_SECRET = "whsec_test_previous"
_ids = itertools.count(1)


def sign(payload, secret=SECRET, t=None) -> str:
    "A `Stripe-Signature` header for `payload` (str or bytes), made by the Stripe SDK's own test signer."
    if isinstance(payload, bytes):
        try:
            payload = payload.decode()
        except UnicodeDecodeError:  # the SDK signs text (Stripe sends JSON); for a non-UTF-8 body, the same HMAC
            t = int(time.time()) if t is None else t
            return f"t={t},v1={hmac.new(secret.encode(), f'{t}.'.encode() + payload, hashlib.sha256).hexdigest()}"
    return stripe.WebhookSignature.generate_signature_header(payload, secret, t)


def event(etype, obj, created, event_id=None) -> str:
    "A Stripe event payload (JSON text) of type `etype` about `obj`."
    return json.dumps(
        dict(
            id=event_id or f"evt_{next(_ids):06d}{int(time.time() * 1e6):x}",
            object="event",
            type=etype,
            created=created,
            livemode=False,
            api_version=STRIPE_API_VERSION,
            data=dict(object=obj),
        )
    )


def subscription(
    sub_id,
    status,
    created,
    tenant_id=None,
    customer="cus_1",
    price="price_pro",
    amount=2900,
    quantity=1,
    cancel_at_period_end=False,
    **extra,
) -> dict:
    "A subscription object in the 2025-03-31+ shape (period dates on the item)."
    return dict(
        id=sub_id,
        object="subscription",
        customer=customer,
        status=status,
        metadata={"tenant_id": tenant_id} if tenant_id else {},
        cancel_at_period_end=cancel_at_period_end,
        items=dict(
            object="list",
            data=[
                dict(
                    id=f"si_{sub_id}",
                    quantity=quantity,
                    price=dict(id=price, unit_amount=amount),
                    current_period_start=created,
                    current_period_end=created + 30 * 86400,
                )
            ],
        ),
        **extra,
    )


class ServedApp:
    "An ASGI app served by uvicorn on a free local port in a background thread."

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        wait_for(lambda: self.server.started, 10)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
