"The Stripe webhook endpoint alone on the `DB_*` host database: the app a test serves in a process it can kill."
from starlette.applications import Starlette

from fh_saas.db_host import HostDatabase
from fh_saas.stripe_webhooks import add_stripe_webhook
from stripe_helpers import SECRET

app = Starlette()
add_stripe_webhook(app, HostDatabase.from_env(), secrets=[SECRET])
