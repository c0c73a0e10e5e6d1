"""An app's own columns on the core tables: created in the database, read and written through the kit's models, on
both backends. Adding a column changes the process's models, so each check runs in a process of its own."""

import os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import sys
import sqlalchemy as sa
from fh_saas.db_host import GlobalUser, HostDatabase, TenantCatalog, add_host_columns, tenants_t, users_t

add_host_columns(users_t, sa.Column('company_size', sa.String(16)))
host_db = HostDatabase(sys.argv[1])
add_host_columns(tenants_t, sa.Column('region', sa.String(8), server_default='eu'))   # after the database opened
add_host_columns(users_t, sa.Column('company_size', sa.String(16)))                 # again: harmless
host_db.global_users.insert(GlobalUser(id='ann', email='ann@example.com', company_size='11-50'))
host_db.tenants.insert(TenantCatalog(id='acme', name='Acme'))
ann, acme = host_db.global_users['ann'], host_db.tenants['acme']
assert isinstance(ann, GlobalUser) and (ann.company_size, acme.region) == ('11-50', 'eu'), (ann, acme)
for bad in (sa.Column('seats', sa.Integer, nullable=False), sa.Column('email', sa.Text)):
    try: add_host_columns(users_t, bad)
    except ValueError as e: print('refused:', e)
    else: raise SystemExit(f'{bad.name} was added')
host_db.close(); HostDatabase.reset_instance()
print('ok')
'''

REOPEN = r'''
import sys
from fh_saas.db_host import HostDatabase
host_db = HostDatabase(sys.argv[1])
print(host_db.q("select company_size from core_users where id = 'ann'"))
'''


def run(code, url):
    env = {k: v for k, v in os.environ.items() if not k.startswith(('DB_', 'FH_SAAS_'))} | {'PYTHONPATH': str(ROOT)}
    res = subprocess.run([sys.executable, '-c', code, url], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_an_apps_columns_are_read_and_written_through_the_models(host_url):
    out = run(SCRIPT, host_url)
    assert out.splitlines()[-1] == 'ok'
    assert "must be nullable or have a server default" in out and "core_users already has a column 'email'" in out
    assert run(REOPEN, host_url).strip() == "[{'company_size': '11-50'}]"  # kept, and read by a process without it
