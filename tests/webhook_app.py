"""The Stripe webhook endpoint alone on the `DB_*` host database: the app a test serves in a process it can kill.

`FH_SAAS_TEST_HOLD_EVENTS` (comma-separated event ids): after applying one of these events the server
holds its answer for a minute, so a test can kill it between the commit and the response.
"""

import os, time

from starlette.applications import Starlette

from fh_saas import stripe_webhooks
from fh_saas.db_host import HostDatabase
from stripe_helpers import SECRET

_held, _apply = (
    set(filter(None, os.environ.get('FH_SAAS_TEST_HOLD_EVENTS', '').split(','))),
    stripe_webhooks.apply_event,
)


def _apply_then_hold(host_db, event, payload):
    out = _apply(host_db, event, payload)
    if event['id'] in _held:
        time.sleep(60)
    return out


stripe_webhooks.apply_event = _apply_then_hold
app = Starlette()
stripe_webhooks.add_stripe_webhook(app, HostDatabase.from_env(), secrets=[SECRET])
