"""The app under load of `bench_app.py`: a `setup_saas` app with one gated page and one JSON API route, each reading
the tenant's 10 rows of `items` through `auth.db[...]`.

Served by `uvicorn app_under_load:app --app-dir bench --workers W`, configured by the environment: the `DB_*`
variables name the host database, `FH_SAAS_SECRET_KEY` the master key, `FH_SAAS_API_RATE_LIMIT` the API rate limit;
the tenant router keeps its default budget (`FH_SAAS_TENANT_CONN_BUDGET` unset)."""

import os

from fasthtml.common import FastHTML

from fh_saas.api import Api
from fh_saas.app import setup_saas
from fh_saas.billing import require_feature
from fh_saas.mail import MemoryOutbox
from fh_saas.tenant_migrations import register_tenant_migration, tenant_schema

from app_bare import render

FEATURE = 'items'
ITEMS_VERSION = 4
ITEMS_SQL = 'CREATE TABLE items (id INTEGER PRIMARY KEY, name VARCHAR(200) NOT NULL)'


def register_items():
    "The tenant schema's `items` table, as a tenant migration (`bench_app.py` provisions with it)."
    if tenant_schema.latest < ITEMS_VERSION:
        register_tenant_migration(ITEMS_VERSION, 'bench_items', ITEMS_SQL)


def make_app():
    register_items()
    app = FastHTML(default_hdrs=False, secret_key=os.environ['FH_SAAS_SECRET_KEY'])
    saas = setup_saas(app, mailer=MemoryOutbox(), webhook_secrets=[], dev=False)

    @app.get('/items')
    @require_feature(FEATURE)
    def items(auth):
        return render(auth.db['items'](order_by='id'))

    api = Api(app, title='Bench API')

    @api.get('/items', summary='List the items')
    def list_items(auth):
        return [dict(id=r['id'], name=r['name']) for r in auth.db['items'](order_by='id')]

    return app, saas


if os.environ.get('DB_NAME'):  # imported by the server (`bench_app.py` imports `register_items` alone)
    app, saas = make_app()
