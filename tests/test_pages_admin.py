"""The system-admin pages through a real FastHTML app:
tenant lifecycle, impersonation, two-factor resets, disabling users, jobs, audit paging and webhook replay."""

import json, re
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import pyotp

from fh_saas.api_keys import create_api_key, verify_api_key
from fh_saas.audit import audit
from fh_saas.billing import seed_plans
from fh_saas.db_host import GlobalUser, StripeWebhookEvent, Subscription, TenantCatalog
from fh_saas.db_tenant import deprovision_key, suspend_tenant
from fh_saas.jobs import claim, enqueue, fail
from fh_saas.pages_admin import AdminPages, UserRefused, set_user_active, tenant_cursor
from fh_saas.pages_admin import monthly_revenue, signups_since, tenant_overview, tenants_by_status
from fh_saas.sessions import SessionManager
from fh_saas.two_factor import begin_setup, confirm_setup, two_factor_enabled
from pages_helpers import site  # noqa: F401
from stripe_helpers import event, subscription


def admin_world(site):
    site.user('root', is_sys_admin=True)
    site.user('alice')
    site.tenant('acme')
    site.member('alice', 'acme', 'owner')
    return site.client('root'), site.client('alice', 'acme')


def test_non_admins_get_403_everywhere(site):
    _, alice = admin_world(site)
    for path in ('/admin', '/admin/users', '/admin/jobs', '/admin/audit', '/admin/webhooks'):
        r = alice.get(path)
        assert r.status_code == 403 and 'system administrators' in r.text, path
    for path in (
        '/admin/tenants/acme/suspend',
        '/admin/impersonate/alice',
        '/admin/webhooks/replay',
        '/admin/impersonate/stop',
    ):
        assert alice.post(path).status_code == 403, path
    assert site.client().get('/admin').status_code == 303  # anonymous: to the login page
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
    assert r.status_code == 303 and r.headers['location'] == '/tenants'  # refused at once
    assert root.post('/admin/tenants/acme/suspend').status_code == 303  # repeat: a no-op, not audited
    assert root.post('/admin/tenants/acme/resume').status_code == 303
    assert alice.post('/notes', data=dict(body='again')).text == 'noted in acme'
    events = site.host_db.q(
        "select event_type, actor_user_id, tenant_id, target_id from sys_audit_logs"
        " where event_type like 'admin.%' order by created_at"
    )
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
    assert root.post('/admin/tenants/acme/delete').status_code == 303  # a second click queues nothing more
    jobs = site.host_db.q("select job_type, tenant_id, dedupe_key, payload, status from sys_jobs")
    assert jobs == [
        dict(
            job_type='tenant.deprovision',
            tenant_id='acme',
            dedupe_key='tenant.deprovision:acme',
            payload='{"tenant_id": "acme"}',
            status='queued',
        )
    ]
    assert site.host_db.tenants['acme'].status == 'suspended'
    assert alice.post('/notes', data=dict(body='x')).status_code == 303
    row = re.search(r'<code>acme</code>.*?</tr>', root.get('/admin').text, re.S).group(0)
    assert 'deletion' in row and 'queued' in row and '/delete' not in row
    assert (
        site.host_db.q("select count(*) n from sys_audit_logs where event_type = 'admin.tenant_delete_requested'")[0][
            'n'
        ]
        == 1
    )
    r = root.post('/admin/tenants/acme/resume')
    assert (
        r.status_code == 409 and 'queued for deletion' in r.text and site.host_db.tenants['acme'].status == 'suspended'
    )
    site.host_db.q("update sys_jobs set status = 'dead'")  # the deprovision handler gave up
    r = root.post('/admin/tenants/acme/delete')
    assert r.status_code == 409 and 'a job that is dead' in r.text
    assert 'deletion' in root.get('/admin').text and 'badge bad">dead' in root.get('/admin').text


def test_impersonation_banner_audit_and_stop(site):
    root, _ = admin_world(site)
    assert 'action="/admin/impersonate/alice"' in root.get('/admin/users').text
    assert 'action="/admin/impersonate/root"' not in root.get('/admin/users').text  # admins cannot be impersonated
    r = root.post('/admin/impersonate/alice')
    assert r.status_code == 303 and r.headers['location'] == '/tenants'
    assert root.get('/tenants').text == 'choose a tenant, alice'
    page = root.get('/admin')
    # acting as alice: no admin area, but the banner
    assert page.status_code == 403
    assert 'You are acting as alice@example.com' in page.text and 'action="/admin/impersonate/stop"' in page.text
    site.saas.sessions.set_tenant(site.saas.sessions.id_hash(root.cookies.get(site.saas.sessions.cookie_name)), 'acme')
    assert root.post('/notes', data=dict(body='as alice')).text == 'noted in acme'
    note = site.host_db.q(
        "select actor_user_id, impersonator_user_id, tenant_id from sys_audit_logs where event_type = 'note.created'"
    )
    assert note == [dict(actor_user_id='alice', impersonator_user_id='root', tenant_id='acme')]
    started = site.host_db.q(
        "select actor_user_id, impersonator_user_id, target_id from sys_audit_logs"
        " where event_type = 'impersonation.started'"
    )
    assert started == [dict(actor_user_id='root', impersonator_user_id='root', target_id='alice')]
    assert root.get('/admin/impersonate/stop').status_code == 405  # a link or image cannot end it
    assert root.post('/admin/impersonate/stop', csrf='').status_code == 403  # nor another site's form
    assert root.get('/admin').status_code == 403  # still acting as alice
    r = root.post('/admin/impersonate/stop')
    assert r.status_code == 303 and 'You are yourself again' in root.get(r.headers['location']).text
    assert root.get('/admin').status_code == 200
    assert root.post('/admin/impersonate/stop').status_code == 403  # nothing left to stop


def test_admin_forms_carry_the_token_and_a_forged_post_changes_nothing(site):
    "A POST without this session's form token is refused before anything happens, for every admin action."
    root, _ = admin_world(site)
    site.host_db.webhook_events.insert(
        StripeWebhookEvent(
            event_id='evt_f',
            event_type='invoice.paid',
            status='failed',
            payload_json='{}',
            event_created=1_760_000_000,
            attempts=1,
            last_error='boom',
        )
    )
    pages = root.get('/admin').text + root.get('/admin/users').text + root.get('/admin/webhooks').text
    # suspend, delete, impersonate alice, disable alice, replay; and the log-out button of each page's top bar
    assert pages.count('name="csrf"') == 5 + 3
    assert set(re.findall(r'value="([0-9a-f]{64})" name="csrf"', pages)) == {root.token()}
    other = site.client('root').token()  # the same admin's other session
    for path in (
        '/admin/tenants/acme/suspend',
        '/admin/tenants/acme/delete',
        '/admin/impersonate/alice',
        '/admin/users/alice/disable',
        '/admin/webhooks/replay',
    ):
        for bad in ('', 'f' * 64, other):
            r = root.post(path, csrf=bad)
            assert r.status_code == 403 and 'did not come from this site' in r.text, (path, bad)
    assert site.host_db.tenants['acme'].status == 'active' and site.host_db.system_jobs.count == 0
    assert site.host_db.global_users['alice'].is_active
    assert site.host_db.q("select status, attempts from core_stripe_webhook_events") == [
        dict(status='failed', attempts=1)
    ]
    assert site.host_db.audit_logs.count == 0
    assert root.get('/tenants').text == 'choose a tenant, root'  # still root: no impersonation started
    assert root.post('/admin/tenants/acme/suspend').status_code == 303  # the page's own token works
    assert site.host_db.tenants['acme'].status == 'suspended'


def test_impersonation_refusals(site):
    root, _ = admin_world(site)
    site.user('other_admin', is_sys_admin=True)
    assert root.post('/admin/impersonate/other_admin').status_code == 409
    assert root.post('/admin/impersonate/ghost').status_code == 409
    assert (
        site.host_db.q("select count(*) n from sys_audit_logs where event_type = 'impersonation.started'")[0]['n'] == 0
    )


def test_jobs_page(site):
    root, _ = admin_world(site)
    enqueue(site.host_db, 'mail.send', tenant_id='acme', max_attempts=1)
    job = claim(site.host_db, 'w1')
    fail(site.host_db, job, 'SMTP refused <b>connection</b>')
    html = root.get('/admin/jobs').text
    assert 'badge bad">dead' in html and 'mail.send' in html and '1 / 1' in html
    assert 'SMTP refused &lt;b&gt;connection&lt;/b&gt;' in html  # escaped
    assert 'mail.send' not in root.get('/admin/jobs?status=queued').text.split('<main')[1]


def test_a_dead_deprovision_job_is_retried_once_from_the_jobs_page(site):
    root, alice = admin_world(site)
    j = enqueue(
        site.host_db,
        'tenant.deprovision',
        dict(tenant_id='acme'),
        tenant_id='acme',
        dedupe_key=deprovision_key('acme'),
        max_attempts=1,
    )
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
    assert (entry.event_type, entry.actor_user_id, entry.tenant_id, entry.target_id) == (
        'admin.job_retried',
        'root',
        'acme',
        j.id,
    )
    assert claim(site.host_db, 'w2').id == j.id


def test_audit_filters_and_older_paging(site):
    root, _ = admin_world(site)
    for i in range(120):
        audit(
            site.host_db, 'test.ping', target_id=f't{i:03d}', actor_user_id='bot', tenant_id='acme' if i % 2 else None
        )
    audit(site.host_db, 'other.thing', actor_user_id='bot', tenant_id='acme')
    seen, url = [], '/admin/audit?type=test.&actor=bot'
    for _ in range(5):
        html = root.get(url).text
        seen += re.findall(r'title="(t\d{3})"', html)
        m = re.search(r'href="(/admin/audit\?[^"]+)">Older', html)
        if not m:
            break
        url = m.group(1).replace('&amp;', '&')
        assert 'type=test.' in url and 'actor=bot' in url
    assert seen == [f't{i:03d}' for i in reversed(range(120))]  # newest first, no gaps, no repeats
    acme = re.findall(r'title="(t\d{3})"', root.get('/admin/audit?tenant=acme&type=test.').text)
    assert acme[:3] == ['t119', 't117', 't115'] and len(acme) == 50
    assert 'other.thing' in root.get('/admin/audit?type=other.thing').text
    r = root.get('/admin/audit?before=garbage')
    assert r.status_code == 400 and 'Bad audit cursor' in r.text


def test_the_audit_log_names_people_and_tenants_and_filters_by_email_and_day(site):
    root, _ = admin_world(site)
    alice = site.host_db.global_users['alice']
    audit(
        site.host_db,
        'member.added',
        actor_user_id='alice',
        impersonator_user_id='root',
        tenant_id='acme',
        target_id='alice',
    )
    html = root.get('/admin/audit').text
    row = re.search(r'<tr>(?:(?!</tr>).)*member\.added.*?</tr>', html, re.S).group(0)
    assert row.count(alice.email) == 2 and 'Acme' in row and ' by ' in row
    assert '>alice<' not in row and '>acme<' not in row  # names, not ids (ids on hover)
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
    payload = event(
        'customer.subscription.updated',
        subscription('sub_r1', 'active', 1_760_000_000, tenant_id='acme', price='price_pro_m'),
        1_760_000_000,
    )
    e = json.loads(payload)
    site.host_db.webhook_events.insert(
        StripeWebhookEvent(
            event_id=e['id'],
            event_type=e['type'],
            status='failed',
            payload_json=payload,
            event_created=e['created'],
            attempts=1,
            last_error='database was down',
        )
    )
    html = root.get('/admin/webhooks').text
    assert 'badge bad">failed' in html and 'database was down' in html and 'Replay 1 failed event' in html
    r = root.post('/admin/webhooks/replay')
    assert (r.status_code, r.headers['location']) == (303, '/admin/webhooks?replayed=processed%3A1')
    html = root.get(r.headers['location']).text
    assert 'Replayed 1 processed.' in html and 'badge ok">processed' in html
    assert site.host_db.q("select status from core_subscriptions where stripe_sub_id = 'sub_r1'") == [
        dict(status='active')
    ]
    assert site.host_db.q("select details from sys_audit_logs where event_type = 'admin.webhooks_replayed'") == [
        dict(details='{"processed": 1}')
    ]
    r = root.post('/admin/webhooks/replay')
    assert 'There were no failed events to replay.' in root.get(r.headers['location']).text
    r = root.get('/admin/webhooks?replayed=' + quote('<script>:1,processed:x'))  # a hand-made link
    assert r.status_code == 200 and '<script>' not in r.text and 'There were no failed events' in r.text


def test_tenant_overview_on_both_backends(host_db):
    "The one-query tenants table (nested correlated subqueries, string concatenation) on SQLite and PostgreSQL."
    seed_plans(host_db, [dict(id='pro', name='Pro', amount_monthly=1999, stripe_price_monthly='price_pro_m')])
    for tid in ('acme', 'beta', 'a_c'):
        host_db.tenants.insert(TenantCatalog(id=tid, name=tid.title()))
    host_db.subscriptions.insert(
        Subscription(
            tenant_id='acme', status='canceled', plan_tier='legacy', created_at='2026-01-01T00:00:00.000000+00:00'
        )
    )
    host_db.subscriptions.insert(
        Subscription(
            tenant_id='acme',
            status='past_due',
            stripe_price_id='price_pro_m',
            created_at='2026-02-01T00:00:00.000000+00:00',
        )
    )
    host_db.subscriptions.insert(Subscription(tenant_id='beta', status='canceled', plan_tier='legacy'))
    enqueue(host_db, 'tenant.deprovision', tenant_id='beta', dedupe_key=deprovision_key('beta'))
    rows = {r['id']: (r['plan'], r['subscription'], r['deletion']) for r in tenant_overview(host_db)}
    assert rows == {
        'acme': ('pro', 'past_due', None),
        'beta': ('legacy', 'canceled', 'queued'),
        'a_c': (None, None, None),
    }
    assert [r['id'] for r in tenant_overview(host_db, '_')] == ['a_c']  # LIKE wildcards are literal
    assert [r['id'] for r in tenant_overview(host_db, 'ACM')] == ['acme']  # any case, on PostgreSQL too
    suspend_tenant(host_db, 'beta')
    assert [r['id'] for r in tenant_overview(host_db, status='suspended')] == ['beta']
    pages, before = [], ''
    while page := tenant_overview(host_db, limit=2, before=before):
        pages.append([r['id'] for r in page])
        before = tenant_cursor(page[-1])
    assert sum(pages, []) == [r['id'] for r in tenant_overview(host_db)] and len(pages) == 2


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
    site.user('root', is_sys_admin=True)
    site.user('alice')
    site.tenant('acme')
    site.member('root', 'acme', 'owner')
    site.member('alice', 'acme')
    secret, _ = create_api_key(site.host_db, 'acme', 'root', 'automation', 'secret', 'live')
    api = site.client()
    for path in ('/admin', '/admin/users', '/admin/jobs', '/admin/audit', '/admin/webhooks'):
        r = api.get(path, headers={'Authorization': f'Bearer {secret}'})
        # /admin is a tenantless path here: the beforeware refuses a key there, before the admin area's own check
        assert r.status_code == 403 and 'only inside its own tenant' in r.text, path
        assert 'alice@example.com' not in r.text, path
    assert 'alice@example.com' in site.client('root').get('/admin/users').text  # the same admin, signed in, is let in


def test_an_admin_resets_a_users_two_factor_and_ends_their_sessions(site, monkeypatch):
    monkeypatch.setenv('FH_SAAS_SECRET_KEY', 'admin-test-secret-' + 'w' * 40)
    root, alice = admin_world(site)
    assert 'reset-two-factor' not in root.get('/admin/users').text  # alice has none yet
    confirm_setup(site.host_db, 'alice', pyotp.TOTP(begin_setup(site.host_db, 'alice')).now())
    page = root.get('/admin/users').text
    assert 'action="/admin/users/alice/reset-two-factor"' in page and 'badge ok">two-factor' in page
    assert alice.post('/admin/users/alice/reset-two-factor').status_code == 403  # not an admin
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
    site.user('root', is_sys_admin=True)
    site.user('alice')
    site.tenant('acme')
    site.tenant('ops')
    site.member('alice', 'acme', 'owner')
    site.member('root', 'ops', 'owner')
    root = site.client('root', 'ops')
    assert root.post('/admin/impersonate/alice').status_code == 303
    record = site.saas.sessions.load(root.cookies.get(site.saas.sessions.cookie_name))
    assert (record.user_id, record.tenant_id, record.return_tenant_id) == ('alice', None, 'ops')
    root.post('/admin/impersonate/stop')
    record = site.saas.sessions.load(root.cookies.get(site.saas.sessions.cookie_name))
    assert (record.user_id, record.tenant_id, record.return_tenant_id) == ('root', 'ops', None)


def test_a_disabled_user_is_refused_at_once_and_enabling_restores_the_login_but_not_the_keys(site):
    root, alice = admin_world(site)
    key, _ = create_api_key(site.host_db, 'acme', 'alice', 'sync')
    bearer = {'Authorization': f'Bearer {key}'}
    assert alice.get('/billing').status_code == 200 and site.client().get('/billing', headers=bearer).status_code == 200
    page = root.get('/admin/users').text
    assert 'action="/admin/users/alice/disable"' in page and '/admin/users/root/disable' not in page  # not oneself
    assert alice.post('/admin/users/alice/disable').status_code == 403  # not an admin
    r = root.post('/admin/users/alice/disable')
    assert (r.status_code, r.headers['location']) == (303, '/admin/users?done=disabled')
    page = root.get(r.headers['location']).text
    assert 'That user is disabled' in page and 'badge bad">disabled' in page
    assert 'action="/admin/users/alice/enable"' in page and 'their API keys stay revoked' in page
    assert alice.get('/billing').status_code == 303  # the open session: refused at once
    assert site.client().get('/billing', headers=bearer).status_code == 401  # and the key
    assert site.client('alice', 'acme').get('/billing').status_code == 303  # a new session too (is_active)
    assert root.post('/admin/users/alice/disable').headers['location'] == '/admin/users?done=already_disabled'
    r = root.post('/admin/users/alice/enable')
    assert (r.status_code, r.headers['location']) == (303, '/admin/users?done=enabled')
    assert 'Their API keys stay revoked' in root.get(r.headers['location']).text
    assert site.client('alice', 'acme').get('/billing').status_code == 200  # she can sign in again
    assert alice.get('/billing').status_code == 303  # the ended session stays ended
    assert site.client().get('/billing', headers=bearer).status_code == 401
    assert verify_api_key(site.host_db, key) is None
    events = site.host_db.q(
        "select event_type, actor_user_id, target_id, details from sys_audit_logs"
        " where event_type like 'admin.user_%' order by created_at"
    )
    assert events == [
        dict(
            event_type='admin.user_disabled',
            actor_user_id='root',
            target_id='alice',
            details='{"keys_revoked": 1, "signed_out": 1}',
        ),
        dict(event_type='admin.user_enabled', actor_user_id='root', target_id='alice', details='{}'),
    ]


def test_disabling_oneself_another_admin_or_nobody_is_refused_with_the_reason(site):
    root, _ = admin_world(site)
    site.user('ops', is_sys_admin=True)
    site.user('bob')
    site.member('bob', 'acme')
    for target, code, words in (
        ('root', 'self', 'your own account'),
        ('ops', 'sys_admin', 'System admins cannot'),
        ('ghost', 'no_user', 'no such user'),
    ):
        for action in ('disable', 'enable'):
            r = root.post(f'/admin/users/{target}/{action}')
            assert (r.status_code, r.headers['location']) == (303, f'/admin/users?done={code}'), (target, action)
            assert words in root.get(r.headers['location']).text
    assert '/admin/users/ops/disable' not in root.get('/admin/users').text
    assert root.post('/admin/impersonate/bob').status_code == 303
    assert root.post('/admin/users/alice/disable').status_code == 403  # acting as bob: no admin rights
    assert all(site.host_db.global_users[u].is_active for u in ('root', 'ops', 'alice', 'bob'))
    assert site.host_db.q("select count(*) n from sys_audit_logs where event_type like 'admin.user_%'")[0]['n'] == 0


def test_disabling_ends_sessions_and_keys_in_one_transaction_on_both_backends(host_db, race):
    "On SQLite and PostgreSQL: two admins disabling at once disable, sign out and audit once."
    sessions = SessionManager(host_db, 'admin-test-secret-' + 'z' * 40)
    for uid, admin in (('root', True), ('ops', True), ('ann', False)):
        host_db.global_users.insert(GlobalUser(id=uid, email=f'{uid}@example.com', is_sys_admin=admin))
    for tid in ('acme', 'beta'):
        host_db.tenants.insert(TenantCatalog(id=tid, name=tid.title()))
    cookies = [sessions.create('ann', t) for t in ('acme', 'beta')]
    keys = [create_api_key(host_db, t, 'ann', 'sync')[0] for t in ('acme', 'beta')]
    other = create_api_key(host_db, 'acme', 'root', 'mine')[0]
    outcomes = race([lambda a=a: set_user_active(host_db, sessions, 'ann', False, a) for a in ('root', 'ops')])
    assert sorted(outcomes) == [False, True]
    assert [sessions.load(c) for c in cookies] == [None, None]
    assert [verify_api_key(host_db, k) for k in keys] == [None, None]
    assert verify_api_key(host_db, other) is not None and not host_db.global_users['ann'].is_active
    assert host_db.q("select details from sys_audit_logs where event_type = 'admin.user_disabled'") == [
        dict(details='{"keys_revoked": 2, "signed_out": 2}')
    ]
    try:
        set_user_active(host_db, sessions, 'ops', False, 'root')
    except UserRefused as e:
        assert e.code == 'sys_admin'
    else:
        raise AssertionError('another system admin was disabled')


def test_tenants_search_and_status_filter_are_kept_in_the_paging_links(site, monkeypatch):
    root, _ = admin_world(site)
    for tid in ('beta', 'gamma', 'delta', 'omega'):
        site.tenant(tid)
    site.host_db.tenants.update(dict(id='gamma', name='Gamma Labs'))
    for tid in ('beta', 'delta', 'omega'):
        suspend_tenant(site.host_db, tid)

    def listed(url):
        return re.findall(r'<code>(\w+)</code>', root.get(url).text)

    assert listed('/admin?q=ACM') == ['acme'] and listed('/admin?q=labs') == ['gamma']  # id or name, any case
    assert listed('/admin?status=suspended') == ['omega', 'delta', 'beta']
    assert listed('/admin?status=active&q=a') == ['gamma', 'acme']
    assert listed('/admin?status=any') == listed('/admin') == ['omega', 'delta', 'gamma', 'beta', 'acme']
    assert '<option value="suspended" selected>' in root.get('/admin?status=suspended').text
    assert 'No tenants match.' in root.get('/admin?status=deleted').text
    monkeypatch.setattr(AdminPages, 'tenants_per_page', 2)
    seen, url = [], '/admin?status=suspended&q=E'
    for _ in range(4):
        html = root.get(url).text
        seen += re.findall(r'<code>(\w+)</code>', html)
        if not (m := re.search(r'href="(/admin\?[^"]+)">Older', html)):
            break
        url = m.group(1).replace('&amp;', '&')
        assert 'status=suspended' in url and 'q=E' in url
    assert seen == ['omega', 'delta', 'beta']  # no gaps, no repeats
    assert 'href="/admin?q=E&amp;status=suspended">' in root.get(url).text  # back to the newest, filters kept
    for bad, words in (
        ('status=gone', "Unknown tenant status 'gone'"),
        ('before=garbage', 'Bad page position'),
        ('before=2026-01-01T00:00:00%2B00:00', 'Bad page position'),
    ):
        r = root.get('/admin?' + bad)
        assert r.status_code == 400 and words in r.text, bad


def test_the_overview_counts_tenants_by_status_sign_ups_and_monthly_recurring_revenue(site):
    "Starter is $19.99 a month or $199.00 a year, Pro $49.00 a month (pages_helpers.PLANS)."
    root, _ = admin_world(site)  # acme: active on Starter monthly
    site.tenant('beta', 'trialing', 'price_pro_m')  # not revenue yet
    site.tenant('gamma', 'past_due', 'price_starter_y')  # still billed: 19900 / 12 = 1658
    site.tenant('delta', 'active', 'price_pro_m')
    site.tenant('omega', None)
    site.host_db.subscriptions.insert(
        Subscription(tenant_id='omega', status='active', stripe_price_id='price_pro_m', payment_type='one_time')
    )  # not recurring
    suspend_tenant(site.host_db, 'omega')
    long_ago = (datetime.now(timezone.utc) - timedelta(days=31)).isoformat()
    site.user('early', created_at=long_ago)
    html = root.get('/admin?q=a').text
    card = re.search(r'<h2>Overview</h2>.*?</div>\s*</div>\s*</div>', html, re.S).group(0)
    assert '$85.57' in card  # 1999 + 1658 + 4900 cents
    assert re.search(r'Sign-ups, last 30 days</small>\s*<div>\s*<strong>2</strong>', card)  # root, alice
    assert 'href="/admin?q=a&amp;status=active"' in card and 'badge ok">active</span> 4' in card
    assert 'href="/admin?q=a&amp;status=suspended"' in card and 'badge warn">suspended</span> 1' in card


def test_overview_queries_on_both_backends(host_db):
    "Known amounts in two currencies; each live subscription at its plan's price, yearly ones at a twelfth."
    seed_plans(
        host_db,
        [
            dict(
                id='basic',
                name='Basic',
                amount_monthly=1000,
                amount_yearly=10001,
                currency='usd',
                stripe_price_monthly='price_b_m',
                stripe_price_yearly='price_b_y',
            ),
            dict(id='euro', name='Euro', amount_monthly=2500, currency='eur', stripe_price_monthly='price_e_m'),
        ],
    )
    for tid in ('t1', 't2', 't3'):
        host_db.tenants.insert(TenantCatalog(id=tid, name=tid))
    host_db.tenants.update(dict(id='t3', status='deleted'))
    for tid, status, price in (
        ('t1', 'active', 'price_b_m'),
        ('t1', 'past_due', 'price_b_y'),
        ('t2', 'active', 'price_b_y'),
        ('t2', 'active', 'price_e_m'),
        ('t2', 'trialing', 'price_b_m'),
        ('t3', 'canceled', 'price_e_m'),
        ('t3', 'unpaid', 'price_b_m'),
        ('t3', 'incomplete', 'price_b_m'),
    ):
        host_db.subscriptions.insert(
            Subscription(tenant_id=tid, status=status, stripe_price_id=price, payment_type='subscription')
        )
    assert monthly_revenue(host_db) == {'eur': 2500, 'usd': 1000 + (2 * 10001 + 6) // 12}  # 20002 / 12 = 1666.8
    assert monthly_revenue(host_db)['usd'] == 2667
    assert tenants_by_status(host_db) == {'active': 2, 'deleted': 1}
    now = datetime.now(timezone.utc)
    for uid, days in (('a', 1), ('b', 29), ('c', 31), ('d', 400)):
        host_db.global_users.insert(
            GlobalUser(id=uid, email=f'{uid}@example.com', created_at=(now - timedelta(days=days)).isoformat())
        )
    assert signups_since(host_db, now - timedelta(days=30)) == 2
