"""The system-admin pages through a real FastHTML app:
tenant lifecycle, impersonation, two-factor resets, jobs, audit paging and webhook replay."""
import json, re
from datetime import datetime, timedelta, timezone

import pyotp

from fh_saas.api_keys import create_api_key
from fh_saas.audit import audit
from fh_saas.billing import seed_plans
from fh_saas.db_host import StripeWebhookEvent, Subscription, TenantCatalog
from fh_saas.db_tenant import deprovision_key, suspend_tenant
from fh_saas.jobs import claim, enqueue, fail
from fh_saas.pages_admin import tenant_overview
from fh_saas.two_factor import begin_setup, confirm_setup, two_factor_enabled
from pages_helpers import site  # noqa: F401
from stripe_helpers import event, subscription


def admin_world(site):
    site.user('root', is_sys_admin=True); site.user('alice')
    site.tenant('acme'); site.member('alice', 'acme', 'owner')
    return site.client('root'), site.client('alice', 'acme')


def test_non_admins_get_403_everywhere(site):
    _, alice = admin_world(site)
    for path in ('/admin', '/admin/users', '/admin/jobs', '/admin/audit', '/admin/webhooks'):
        r = alice.get(path)
        assert r.status_code == 403 and 'system administrators' in r.text, path
    for path in ('/admin/tenants/acme/suspend', '/admin/impersonate/alice', '/admin/webhooks/replay',
                 '/admin/impersonate/stop'):
        assert alice.post(path).status_code == 403, path
    assert site.client().get('/admin').status_code == 303                     # anonymous: to the login page
    assert site.host_db.tenants['acme'].status == 'active'


def test_tenants_table(site):
    root, _ = admin_world(site)
    html = root.get('/admin').text
    row = re.search(r'<code>acme</code>.*?</tr>', html, re.S).group(0)
    assert 'Acme' in row and 'badge ok">active' in row and 'starter' in row and '/admin/tenants/acme/suspend' in row
    assert '/admin/tenants/acme/resume' not in row and '/admin/tenants/acme/delete' in row
    assert 'acme' not in root.get('/admin?q=zzz').text.split('<main')[1]


def test_suspend_refuses_the_member_on_the_next_request_and_resume_restores(site):
    root, alice = admin_world(site)
    assert alice.post('/notes', data=dict(body='before')).text == 'noted in acme'
    r = root.post('/admin/tenants/acme/suspend')
    assert r.status_code == 303 and 'Tenant acme suspended.' in root.get(r.headers['location']).text
    r = alice.post('/notes', data=dict(body='after'))
    assert r.status_code == 303 and r.headers['location'] == '/tenants'      # refused at once
    assert root.post('/admin/tenants/acme/suspend').status_code == 303       # repeat: a no-op, not audited
    assert root.post('/admin/tenants/acme/resume').status_code == 303
    assert alice.post('/notes', data=dict(body='again')).text == 'noted in acme'
    events = site.host_db.q("select event_type, actor_user_id, tenant_id, target_id from sys_audit_logs"
                            " where event_type like 'admin.%' order by created_at")
    assert [e['event_type'] for e in events] == ['admin.tenant_suspended', 'admin.tenant_resumed']
    assert all(e['actor_user_id'] == 'root' and e['tenant_id'] == 'acme' and e['target_id'] == 'acme' for e in events)


def test_lifecycle_bad_input(site):
    root, _ = admin_world(site)
    assert root.post('/admin/tenants/nope/suspend').status_code == 404
    assert root.post('/admin/tenants/Bad!Id/suspend').status_code == 400
    assert root.post('/admin/tenants/acme/explode').status_code == 404
    site.host_db.tenants.update(dict(id='acme', status='deleting', is_active=False))
    r = root.post('/admin/tenants/acme/resume')
    assert r.status_code == 409 and 'acme is deleting' in r.text
    assert root.post('/admin/tenants/acme/delete').status_code == 409
    assert site.host_db.q("select count(*) n from sys_audit_logs where event_type like 'admin.%'")[0]['n'] == 0


def test_delete_suspends_and_queues_one_deprovision_job(site):
    root, alice = admin_world(site)
    assert root.post('/admin/tenants/acme/delete').status_code == 303
    assert root.post('/admin/tenants/acme/delete').status_code == 303        # a second click queues nothing more
    jobs = site.host_db.q("select job_type, tenant_id, dedupe_key, payload, status from sys_jobs")
    assert jobs == [dict(job_type='tenant.deprovision', tenant_id='acme', dedupe_key='tenant.deprovision:acme',
                         payload='{"tenant_id": "acme"}', status='queued')]
    assert site.host_db.tenants['acme'].status == 'suspended'
    assert alice.post('/notes', data=dict(body='x')).status_code == 303
    row = re.search(r'<code>acme</code>.*?</tr>', root.get('/admin').text, re.S).group(0)
    assert 'deletion' in row and 'queued' in row and '/delete' not in row
    assert site.host_db.q("select count(*) n from sys_audit_logs"
                          " where event_type = 'admin.tenant_delete_requested'")[0]['n'] == 1
    r = root.post('/admin/tenants/acme/resume')
    assert (r.status_code == 409 and 'queued for deletion' in r.text
            and site.host_db.tenants['acme'].status == 'suspended')
    site.host_db.q("update sys_jobs set status = 'dead'")                     # the deprovision handler gave up
    r = root.post('/admin/tenants/acme/delete')
    assert r.status_code == 409 and 'a job that is dead' in r.text
    assert 'deletion' in root.get('/admin').text and 'badge bad">dead' in root.get('/admin').text


def test_impersonation_banner_audit_and_stop(site):
    root, _ = admin_world(site)
    assert 'action="/admin/impersonate/alice"' in root.get('/admin/users').text
    assert 'action="/admin/impersonate/root"' not in root.get('/admin/users').text   # admins cannot be impersonated
    r = root.post('/admin/impersonate/alice')
    assert r.status_code == 303 and r.headers['location'] == '/tenants'
    assert root.get('/tenants').text == 'choose a tenant, alice'
    page = root.get('/admin')
    # acting as alice: no admin area, but the banner
    assert page.status_code == 403
    assert 'You are acting as alice@example.com' in page.text and 'action="/admin/impersonate/stop"' in page.text
    site.saas.sessions.set_tenant(site.saas.sessions.id_hash(root.cookies.get(site.saas.sessions.cookie_name)), 'acme')
    assert root.post('/notes', data=dict(body='as alice')).text == 'noted in acme'
    note = site.host_db.q("select actor_user_id, impersonator_user_id, tenant_id from sys_audit_logs"
                          " where event_type = 'note.created'")
    assert note == [dict(actor_user_id='alice', impersonator_user_id='root', tenant_id='acme')]
    started = site.host_db.q("select actor_user_id, impersonator_user_id, target_id from sys_audit_logs"
                             " where event_type = 'impersonation.started'")
    assert started == [dict(actor_user_id='root', impersonator_user_id='root', target_id='alice')]
    assert root.get('/admin/impersonate/stop').status_code == 405             # a link or image cannot end it
    assert root.post('/admin/impersonate/stop', csrf='').status_code == 403   # nor another site's form
    assert root.get('/admin').status_code == 403                              # still acting as alice
    r = root.post('/admin/impersonate/stop')
    assert r.status_code == 303 and 'You are yourself again' in root.get(r.headers['location']).text
    assert root.get('/admin').status_code == 200
    assert root.post('/admin/impersonate/stop').status_code == 403            # nothing left to stop


def test_admin_forms_carry_the_token_and_a_forged_post_changes_nothing(site):
    "A POST without this session's form token is refused before anything happens, for every admin action."
    root, _ = admin_world(site)
    site.host_db.webhook_events.insert(StripeWebhookEvent(event_id='evt_f', event_type='invoice.paid', status='failed',
                                                          payload_json='{}', event_created=1_760_000_000, attempts=1,
                                                          last_error='boom'))
    pages = root.get('/admin').text + root.get('/admin/users').text + root.get('/admin/webhooks').text
    # suspend, delete, impersonate alice, replay; and the log-out button of each page's top bar
    assert pages.count('name="csrf"') == 4 + 3
    assert set(re.findall(r'value="([0-9a-f]{64})" name="csrf"', pages)) == {root.token()}
    other = site.client('root').token()                                      # the same admin's other session
    for path in ('/admin/tenants/acme/suspend', '/admin/tenants/acme/delete', '/admin/impersonate/alice',
                 '/admin/webhooks/replay'):
        for bad in ('', 'f' * 64, other):
            r = root.post(path, csrf=bad)
            assert r.status_code == 403 and 'did not come from this site' in r.text, (path, bad)
    assert site.host_db.tenants['acme'].status == 'active' and site.host_db.system_jobs.count == 0
    assert (site.host_db.q("select status, attempts from core_stripe_webhook_events")
            == [dict(status='failed', attempts=1)])
    assert site.host_db.audit_logs.count == 0
    assert root.get('/tenants').text == 'choose a tenant, root'                # still root: no impersonation started
    assert root.post('/admin/tenants/acme/suspend').status_code == 303        # the page's own token works
    assert site.host_db.tenants['acme'].status == 'suspended'


def test_impersonation_refusals(site):
    root, _ = admin_world(site)
    site.user('other_admin', is_sys_admin=True)
    assert root.post('/admin/impersonate/other_admin').status_code == 409
    assert root.post('/admin/impersonate/ghost').status_code == 409
    assert site.host_db.q("select count(*) n from sys_audit_logs"
                          " where event_type = 'impersonation.started'")[0]['n'] == 0


def test_jobs_page(site):
    root, _ = admin_world(site)
    enqueue(site.host_db, 'mail.send', tenant_id='acme', max_attempts=1)
    job = claim(site.host_db, 'w1')
    fail(site.host_db, job, 'SMTP refused <b>connection</b>')
    html = root.get('/admin/jobs').text
    assert 'badge bad">dead' in html and 'mail.send' in html and '1 / 1' in html
    assert 'SMTP refused &lt;b&gt;connection&lt;/b&gt;' in html                 # escaped
    assert 'mail.send' not in root.get('/admin/jobs?status=queued').text.split('<main')[1]


def test_a_dead_deprovision_job_is_retried_once_from_the_jobs_page(site):
    root, alice = admin_world(site)
    j = enqueue(site.host_db, 'tenant.deprovision', dict(tenant_id='acme'), tenant_id='acme',
                dedupe_key=deprovision_key('acme'), max_attempts=1)
    fail(site.host_db, claim(site.host_db, 'w1'), 'server unreachable')
    html = root.get('/admin/jobs').text
    assert f'action="/admin/jobs/{j.id}/retry"' in html
    for bad in ('', 'f' * 64):
        assert root.post(f'/admin/jobs/{j.id}/retry', csrf=bad).status_code == 403
    assert alice.post(f'/admin/jobs/{j.id}/retry', csrf=alice.token()).status_code == 403
    assert site.host_db.system_jobs[j.id].status == 'dead' and site.host_db.audit_logs.count == 0
    r = root.post(f'/admin/jobs/{j.id}/retry')
    assert (r.status_code, r.headers['location']) == (303, f'/admin/jobs?retried={j.id}')
    assert 'is queued again' in root.get(r.headers['location']).text
    row = site.host_db.system_jobs[j.id]
    assert (row.status, row.attempts) == ('queued', 0) and 'server unreachable' in row.error_log
    r = root.post(f'/admin/jobs/{j.id}/retry')
    assert r.status_code == 409 and 'not dead' in r.text
    [entry] = site.host_db.audit_logs()
    assert ((entry.event_type, entry.actor_user_id, entry.tenant_id, entry.target_id)
            == ('admin.job_retried', 'root', 'acme', j.id))
    assert claim(site.host_db, 'w2').id == j.id


def test_audit_filters_and_older_paging(site):
    root, _ = admin_world(site)
    for i in range(120):
        audit(site.host_db, 'test.ping', target_id=f't{i:03d}', actor_user_id='bot',
              tenant_id='acme' if i % 2 else None)
    audit(site.host_db, 'other.thing', actor_user_id='bot', tenant_id='acme')
    seen, url = [], '/admin/audit?type=test.&actor=bot'
    for _ in range(5):
        html = root.get(url).text
        seen += re.findall(r'title="(t\d{3})"', html)
        m = re.search(r'href="(/admin/audit\?[^"]+)">Older', html)
        if not m: break
        url = m.group(1).replace('&amp;', '&')
        assert 'type=test.' in url and 'actor=bot' in url
    assert seen == [f't{i:03d}' for i in reversed(range(120))]                # newest first, no gaps, no repeats
    acme = re.findall(r'title="(t\d{3})"', root.get('/admin/audit?tenant=acme&type=test.').text)
    assert acme[:3] == ['t119', 't117', 't115'] and len(acme) == 50
    assert 'other.thing' in root.get('/admin/audit?type=other.thing').text
    r = root.get('/admin/audit?before=garbage')
    assert r.status_code == 400 and 'Bad audit cursor' in r.text


def test_the_audit_log_names_people_and_tenants_and_filters_by_email_and_day(site):
    root, _ = admin_world(site)
    alice = site.host_db.global_users['alice']
    audit(site.host_db, 'member.added', actor_user_id='alice', impersonator_user_id='root', tenant_id='acme',
          target_id='alice')
    html = root.get('/admin/audit').text
    row = re.search(r'<tr>(?:(?!</tr>).)*member\.added.*?</tr>', html, re.S).group(0)
    assert row.count(alice.email) == 2 and 'Acme' in row and ' by ' in row
    assert '>alice<' not in row and '>acme<' not in row                      # names, not ids (ids on hover)
    assert 'member.added' in root.get('/admin/audit', params=dict(actor=alice.email.upper())).text
    assert 'member.added' not in root.get('/admin/audit', params=dict(actor='nobody@example.com')).text
    today = datetime.now(timezone.utc).date()
    assert 'member.added' in root.get('/admin/audit', params=dict(since=str(today), until=str(today))).text
    yesterday = str(today - timedelta(days=1))
    assert 'member.added' not in root.get('/admin/audit', params=dict(until=yesterday)).text
    for bad in ('yesterday', '2026-13-01', 'x' * 500, 'a\x00b'):
        r = root.get('/admin/audit', params=dict(since=bad))
        assert r.status_code == 400 and 'YYYY-MM-DD' in r.text, bad


def test_replay_reapplies_a_failed_event(site):
    root, _ = admin_world(site)
    payload = event('customer.subscription.updated', subscription('sub_r1', 'active', 1_760_000_000, tenant_id='acme',
                                                                  price='price_pro_m'), 1_760_000_000)
    e = json.loads(payload)
    site.host_db.webhook_events.insert(StripeWebhookEvent(event_id=e['id'], event_type=e['type'], status='failed',
                                                          payload_json=payload, event_created=e['created'], attempts=1,
                                                          last_error='database was down'))
    html = root.get('/admin/webhooks').text
    assert 'badge bad">failed' in html and 'database was down' in html and 'Replay 1 failed event' in html
    r = root.post('/admin/webhooks/replay')
    assert r.status_code == 200 and 'Replayed 1 processed.' in r.text and 'badge ok">processed' in r.text
    assert (site.host_db.q("select status from core_subscriptions where stripe_sub_id = 'sub_r1'")
            == [dict(status='active')])
    assert (site.host_db.q("select details from sys_audit_logs where event_type = 'admin.webhooks_replayed'")
            == [dict(details='{"processed": 1}')])
    assert 'There were no failed events to replay.' in root.post('/admin/webhooks/replay').text


def test_tenant_overview_on_both_backends(host_db):
    "The one-query tenants table (nested correlated subqueries, string concatenation) on SQLite and PostgreSQL."
    seed_plans(host_db, [dict(id='pro', name='Pro', amount_monthly=1999, stripe_price_monthly='price_pro_m')])
    for tid in ('acme', 'beta', 'a_c'): host_db.tenants.insert(TenantCatalog(id=tid, name=tid.title()))
    host_db.subscriptions.insert(Subscription(tenant_id='acme', status='canceled', plan_tier='legacy',
                                              created_at='2026-01-01T00:00:00.000000+00:00'))
    host_db.subscriptions.insert(Subscription(tenant_id='acme', status='past_due', stripe_price_id='price_pro_m',
                                              created_at='2026-02-01T00:00:00.000000+00:00'))
    host_db.subscriptions.insert(Subscription(tenant_id='beta', status='canceled', plan_tier='legacy'))
    enqueue(host_db, 'tenant.deprovision', tenant_id='beta', dedupe_key=deprovision_key('beta'))
    rows = {r['id']: (r['plan'], r['subscription'], r['deletion']) for r in tenant_overview(host_db)}
    assert rows == {'acme': ('pro', 'past_due', None), 'beta': ('legacy', 'canceled', 'queued'),
                    'a_c': (None, None, None)}
    assert [r['id'] for r in tenant_overview(host_db, '_')] == ['a_c']       # LIKE wildcards are literal


def test_users_search_is_case_insensitive_and_literal(site):
    root, _ = admin_world(site)
    site.user('Bob_Smith')
    assert 'bob_smith@example.com' not in root.get('/admin/users?q=zzz').text.lower()
    html = root.get('/admin/users?q=BOB_').text
    assert 'Bob_Smith@example.com' in html and 'alice@example.com' not in html
    # '%' matches only a literal '%'
    assert 'alice@example.com' not in root.get('/admin/users?q=%25').text


def test_admin_pages_name_the_sessions_current_tenant_while_it_is_active(site):
    "/admin needs no tenant, yet the top bar still says where the admin works, and stops saying it once suspended."
    admin_world(site)
    site.member('root', 'acme', 'admin')
    root = site.client('root', 'acme')
    page = root.get('/admin').text
    assert '<span class="badge">Acme</span>' in page and 'href="/team"' in page
    suspend_tenant(site.host_db, 'acme')
    page = root.get('/admin').text
    assert 'Choose a tenant' in page and 'href="/team"' not in page


def test_a_system_admins_api_key_does_not_open_the_admin_area(site):
    site.user('root', is_sys_admin=True); site.user('alice')
    site.tenant('acme'); site.member('root', 'acme', 'owner'); site.member('alice', 'acme')
    secret, _ = create_api_key(site.host_db, 'acme', 'root', 'automation', 'secret', 'live')
    api = site.client()
    for path in ('/admin', '/admin/users', '/admin/jobs', '/admin/audit', '/admin/webhooks'):
        r = api.get(path, headers={'Authorization': f'Bearer {secret}'})
        # /admin is a tenantless path here: the beforeware refuses a key there, before the admin area's own check
        assert r.status_code == 403 and 'only inside its own tenant' in r.text, path
        assert 'alice@example.com' not in r.text, path
    assert 'alice@example.com' in site.client('root').get('/admin/users').text   # the same admin, signed in, is let in


def test_an_admin_resets_a_users_two_factor_and_ends_their_sessions(site, monkeypatch):
    monkeypatch.setenv('FH_SAAS_SECRET_KEY', 'admin-test-secret-' + 'w' * 40)
    root, alice = admin_world(site)
    assert 'reset-two-factor' not in root.get('/admin/users').text              # alice has none yet
    confirm_setup(site.host_db, 'alice', pyotp.TOTP(begin_setup(site.host_db, 'alice')).now())
    page = root.get('/admin/users').text
    assert 'action="/admin/users/alice/reset-two-factor"' in page and 'badge ok">two-factor' in page
    assert alice.post('/admin/users/alice/reset-two-factor').status_code == 403   # not an admin
    assert root.post('/admin/users/alice/reset-two-factor', csrf='').status_code == 403
    assert two_factor_enabled(site.host_db, 'alice') and alice.get('/billing').status_code == 200
    r = root.post('/admin/users/alice/reset-two-factor')
    assert (r.status_code, r.headers['location']) == (303, '/admin/users?done=two_factor_reset')
    assert 'Two-factor sign-in is off for that user' in root.get(r.headers['location']).text
    assert not two_factor_enabled(site.host_db, 'alice') and alice.get('/billing').status_code == 303
    reset = site.host_db.q("select actor_user_id, target_id from sys_audit_logs where event_type = 'two_factor.reset'")
    assert reset == [dict(actor_user_id='root', target_id='alice')]
    again = root.post('/admin/users/alice/reset-two-factor')
    assert again.headers['location'] == '/admin/users?done=two_factor_off'
    assert root.post('/admin/users/nobody/reset-two-factor').headers['location'] == '/admin/users?done=two_factor_off'


def test_stopping_an_impersonation_returns_the_admin_to_their_tenant(site):
    site.user('root', is_sys_admin=True); site.user('alice')
    site.tenant('acme'); site.tenant('ops'); site.member('alice', 'acme', 'owner'); site.member('root', 'ops', 'owner')
    root = site.client('root', 'ops')
    assert root.post('/admin/impersonate/alice').status_code == 303
    record = site.saas.sessions.load(root.cookies.get(site.saas.sessions.cookie_name))
    assert (record.user_id, record.tenant_id, record.return_tenant_id) == ('alice', None, 'ops')
    root.post('/admin/impersonate/stop')
    record = site.saas.sessions.load(root.cookies.get(site.saas.sessions.cookie_name))
    assert (record.user_id, record.tenant_id, record.return_tenant_id) == ('root', 'ops', None)
