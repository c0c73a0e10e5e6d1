"""`require_role` in the demo: a viewer reads the projects but cannot add one; a member can. The demo registers its
tenant migration for the whole process, so it runs in a process of its own."""

import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, re, sys
from starlette.testclient import TestClient
from fh_saas.db_host import GlobalUser
from fh_saas.demo import demo_app
from fh_saas.memberships import add_member
from fh_saas.passwords import hash_password

app, saas = demo_app(sys.argv[1])
out = {}
for role in ('viewer', 'member'):
    email = f'{role}@example.com'
    user = saas.host_db.global_users.insert(GlobalUser(email=email, password_hash=hash_password('long enough pw')))
    add_member(saas.host_db, 'demo', user.id, role)
    cli = TestClient(app, follow_redirects=False)
    cli.post('/login', data=dict(email=email, password='long enough pw'))
    page = cli.get('/projects').text
    token = re.search(r'value="([0-9a-f]{64})" name="csrf"', cli.get('/tenants').text).group(1)   # the session's
    r = cli.post('/projects', data=dict(name=f'by {role}', csrf=token))
    out[role] = dict(form='New project' in page, status=r.status_code, text=r.text)
print(json.dumps(out))
'''


def test_a_viewer_reads_the_projects_and_only_a_member_adds_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(('DB_', 'FH_SAAS_', 'STRIPE_'))}
    env['PYTHONPATH'] = str(ROOT)
    res = subprocess.run(
        [sys.executable, '-c', SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out['viewer']['form'] is False and out['viewer']['status'] == 403
    assert "This needs the member role in Demo Workspace; yours is viewer." in out['viewer']['text']
    assert "<nav" in out['viewer']['text']  # the refusal is a page of the app, not a bare status
    assert (out['member']['form'], out['member']['status']) == (True, 303)
