"""The bare app of `bench_app.py`: plain FastHTML, no fh_saas, one route reading a tenant's 10 rows through a pooled
SQLAlchemy engine (a normal `QueuePool`) and rendering them as `render` does for the app under load.

Served by `uvicorn app_bare:app --app-dir bench`; `BENCH_BARE_URL` is the database's SQLAlchemy URL."""

import os

import sqlalchemy as sa
from fasthtml.common import H1, FastHTML, Main, Table, Tbody, Td, Th, Thead, Title, Tr

ITEMS_SQL = 'SELECT id, name FROM items ORDER BY id'


def render(rows):
    "The page of `rows` (dicts with `id` and `name`), the same in both apps."
    body = Tbody(*[Tr(Td(str(r['id'])), Td(r['name'])) for r in rows])
    return Title('Items'), Main(H1('Items'), Table(Thead(Tr(Th('#'), Th('Name'))), body))


engine = sa.create_engine(url, pool_size=32, max_overflow=0) if (url := os.environ.get('BENCH_BARE_URL')) else None
app = FastHTML(default_hdrs=False)


@app.get('/items')
def items():
    with engine.connect() as conn:
        rows = conn.execute(sa.text(ITEMS_SQL)).mappings().all()
    return render(rows)
