"""The account pages through a real FastHTML app wired the way `setup_saas` wires it: a SQLite host
database, server-side sessions, the tenant router on per-tenant SQLite files, the beforeware, and an
in-memory outbox whose links the tests follow. Provisioning runs the real `tenant.provision` job."""

import re, threading
from concurrent.futures import ThreadPoolExecutor

import pyotp
import pytest
from argon2 import PasswordHasher
from fasthtml.common import FastHTML
from starlette.testclient import TestClient

import fh_saas.system_jobs  # noqa: F401 (registers the tenant.provision handler)
from fh_saas import passwords, ui
from fh_saas.api_keys import create_api_key, verify_api_key
from fh_saas.beforeware import AuthResolver, saas_beforeware
from fh_saas.db_host import HostDatabase, jobs_t
from fh_saas.db_tenant import TenantNotFound, TenantUnavailable, suspend_tenant
from fh_saas.jobs import claim, complete, fail, job_handlers, job_scope
from fh_saas.mail import MemoryOutbox, text_part
from fh_saas.memberships import invitations_t, switch_tenant
from fh_saas.pages_api_keys import ApiKeyPages
from fh_saas.pages_auth import AccountPages, AuthPages, session_handle
from fh_saas.pages_tenants import InvitationPages, TeamPages, TenantPages, tenant_members
from fh_saas.passwords import LoginThrottle
from fh_saas.rate_limits import RateLimit
from fh_saas.saas_context import Saas
from fh_saas.sessions import SessionManager, sessions_t, start_impersonation
from fh_saas.tenant_router import TenantRouter
from fh_saas.two_factor import begin_setup, confirm_setup, two_factor_t

FAST = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
SECRET = 'pages-test-secret-' + 'y' * 40
PW = 'correct horse battery'


class App:
    "The test app and the parts the tests inspect."

    def __init__(self, host_db, sessions, router, outbox, app):
        self.host_db, self.sessions, self.router, self.outbox, self.app = host_db, sessions, router, outbox, app

    def client(self) -> TestClient:
        return TestClient(self.app, follow_redirects=False, base_url='https://app.test')

    def signup(self, email, company='Acme Corp', password=PW, client=None, **extra) -> TestClient:
        c = client or self.client()
        r = c.post('/signup', data=dict(email=email, password=password, name='Someone', company=company, **extra))
        assert r.status_code == 303, r.text
        return c

    def owner(self, email, company='Acme Corp') -> TestClient:
        "A client signed up as `email`, working in its newly provisioned tenant."
        c = self.signup(email, company)
        self.provision()
        c.get(f"/tenants/{company.lower().replace(' ', '_')}/status")  # an active first tenant becomes current
        return c

    def provision(self) -> int:
        "Run every queued `tenant.provision` job the way a worker does; the number run."
        n = 0
        while (job := claim(self.host_db, 'test-worker', ['tenant.provision'])) is not None:
            with job_scope(job):
                result = job_handlers['tenant.provision'](job)
            assert complete(self.host_db, job, result)
            n += 1
        return n

    def deprovision(self) -> int:
        "Run every queued `tenant.deprovision` job the way a worker does; the number run."
        n = 0
        while (job := claim(self.host_db, 'test-worker', ['tenant.deprovision'])) is not None:
            with job_scope(job):
                result = job_handlers['tenant.deprovision'](job)
            assert complete(self.host_db, job, result)
            n += 1
        return n

    def link(self, to: str) -> str:
        "The path of the link in the last email sent to `to`."
        body = self.outbox.last_text(to)
        return re.search(r'https://app\.test(/\S+)', body).group(1)


def csrf(page: str) -> str:
    return re.search(r'value="([0-9a-f]{64})" name="csrf"', page).group(1)


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.delenv('FH_SAAS_TENANT_DIR', raising=False)
    host_db = HostDatabase(f"sqlite:///{tmp_path / 'host.db'}")
    sessions = SessionManager(host_db, SECRET)
    router = TenantRouter(host_db, budget=8)
    outbox = MemoryOutbox()
    saas = Saas(host_db, sessions, router, outbox, base_url='https://app.test', home='/')
    resolver = AuthResolver(
        host_db,
        sessions,
        router.tenant_db,
        unavailable=(TenantNotFound, TenantUnavailable),
        rate_limit=RateLimit(1000, 60),
    )
    app = FastHTML(before=saas_beforeware(resolver), hdrs=ui.static_headers(), default_hdrs=False, secret_key=SECRET)
    ui.mount_static(app)
    AuthPages(
        saas, hasher=FAST, throttle=LoginThrottle(per_account=RateLimit(3, 900)), signup_rate=RateLimit(6, 3600)
    ).mount(app)
    AccountPages(saas, hasher=FAST).mount(app)
    for pages in (TenantPages, TeamPages, InvitationPages, ApiKeyPages):
        pages(saas).mount(app)

    @app.get('/')
    def home(auth):
        return f'home of {auth.tenant_id} for {auth.user.email} as {auth.role}'

    @app.get('/api/whoami')
    def whoami(auth):
        return dict(user=auth.user.email, tenant=auth.tenant_id, mode=auth.mode)

    yield App(host_db, sessions, router, outbox, app)
    router.close()
    host_db.close()
    HostDatabase.reset_instance()


def counts(host_db):
    return (host_db.global_users.count, host_db.tenants.count, host_db.memberships.count, host_db.system_jobs.count)


def test_signup_provisions_in_the_background_and_the_status_page_polls_until_home(world):
    page = world.client().get('/signup').text
    for label in ('Email', 'Password', 'Your name', 'Company or team name', 'Create account'):
        assert label in page
    c = world.client()
    r = c.post('/signup', data=dict(email='ann@example.com', password=PW, name='Ann', company='Acme Corp'))
    assert (r.status_code, r.headers['location']) == (303, '/tenants/acme_corp/status')
    assert world.host_db.tenants['acme_corp'].status == 'provisioning'
    assert [(m.user_id, m.role) for m in world.host_db.memberships()] == [(world.host_db.global_users()[0].id, 'owner')]
    job = world.host_db.system_jobs()[0]
    assert (job.job_type, job.tenant_id, job.dedupe_key) == (
        'tenant.provision',
        'acme_corp',
        'tenant.provision:acme_corp',
    )

    full = c.get('/tenants/acme_corp/status')
    assert full.status_code == 200 and '<html' in full.text and 'Setting up Acme Corp' in full.text
    assert 'hx-trigger="every 1s"' in full.text and 'hx-get="/tenants/acme_corp/status"' in full.text
    frag = c.get('/tenants/acme_corp/status', headers={'HX-Request': 'true'})
    assert '<html' not in frag.text and 'every 1s' in frag.text
    assert c.get('/').headers['location'] == '/tenants'  # no usable tenant yet

    assert world.provision() == 1
    assert world.host_db.tenants['acme_corp'].status == 'active'
    done = c.get('/tenants/acme_corp/status', headers={'HX-Request': 'true'})
    assert done.headers['hx-redirect'] == '/'
    assert c.get('/').text == 'home of acme_corp for ann@example.com as owner'
    assert 'every 1s' not in c.get('/tenants/acme_corp/status').text


def test_signup_sends_a_verification_link_that_works_once(world):
    world.signup('ann@example.com')
    link = world.link('ann@example.com')
    assert link.startswith('/verify-email/')
    r = world.client().get(link)
    assert r.status_code == 200 and 'Email confirmed' in r.text
    assert world.host_db.global_users()[0].email_verified_at is not None
    assert world.client().get(link).status_code == 400


def test_an_unconfirmed_user_gets_a_new_verification_link_a_few_times_an_hour(world):
    ann = world.signup('ann@example.com')
    page = ann.get('/account').text
    assert 'not confirmed' in page and 'action="/account/verify-email"' in page
    sent = len(world.outbox.messages)
    assert world.client().post('/account/verify-email').headers['location'].startswith('/login')
    for token in ('', csrf(world.signup('eve@example.com', 'Evil Inc').get('/tenants').text)):
        assert ann.post('/account/verify-email', data=dict(csrf=token)).status_code == 403
    assert len(world.outbox.messages) == sent + 1  # eve's sign-up mail only
    for _ in range(2):
        r = ann.post('/account/verify-email', data=dict(csrf=csrf(page)))
        assert r.status_code == 200 and 'We sent a new confirmation link to ann@example.com' in r.text
    r = ann.post('/account/verify-email', data=dict(csrf=csrf(page)))
    assert r.status_code == 200
    r = ann.post('/account/verify-email', data=dict(csrf=csrf(page)))
    assert r.status_code == 429 and 'Try again in' in r.text and int(r.headers['retry-after']) > 0
    mails = [m for m in world.outbox.messages if m['To'] == 'ann@example.com']
    assert len(mails) == 4 and all(m['Subject'] == 'Confirm your email' for m in mails)
    assert world.client().get(world.link('ann@example.com')).status_code == 200  # the newest link works
    assert world.host_db.global_users(where="email = 'ann@example.com'")[0].email_verified_at is not None


def test_a_confirmed_user_is_sent_nothing(world):
    ann = world.signup('ann@example.com')
    world.client().get(world.link('ann@example.com'))
    page = ann.get('/account').text
    assert '>confirmed<' in page and '/account/verify-email' not in page
    sent = len(world.outbox.messages)
    r = ann.post('/account/verify-email', data=dict(csrf=csrf(ann.get('/tenants').text)))
    assert r.status_code == 200 and 'already confirmed' in r.text and len(world.outbox.messages) == sent


def test_duplicate_email_and_bad_input_write_nothing(world):
    world.signup('ann@example.com')
    before = counts(world.host_db)
    for data, status, message in [
        (dict(email='bob@example.com', password='short', company='Other'), 400, 'longer password'),
        (dict(email='bob@example', password=PW, company='Other'), 400, 'valid email'),
        (dict(email='bob@example.com', password=PW, company='   '), 400, 'Enter a company name'),
    ]:
        r = world.client().post('/signup', data=data)
        assert (r.status_code, message in r.text, 'set-cookie' in r.headers) == (status, True, False), (data, r.text)
        assert 'class="alert bad"' in r.text and data['email'] in r.text  # the form is shown again, filled in
    assert counts(world.host_db) == before


def test_a_sign_up_with_a_taken_email_answers_as_a_new_one_and_mails_the_owner(world, monkeypatch):
    monkeypatch.setattr(AuthPages, 'taken_rate', RateLimit(2, 3600))
    world.signup('ann@example.com', 'Acme Corp')
    link = invite(world, world.owner('cy@example.com', 'Cy Co'), 'ann@example.com')
    before = counts(world.host_db)
    taken = world.client().post(
        '/signup', data=dict(email=' ANN@Example.com', password='another secret', name='X', company='Other Co')
    )
    assert counts(world.host_db) == before and 'set-cookie' not in taken.headers
    new = world.client().post('/signup', data=dict(email='zed@example.com', password=PW, company='Other Co'))
    assert (taken.status_code, taken.headers['location']) == (new.status_code, new.headers['location'])
    assert (new.status_code, new.headers['location']) == (303, '/tenants/other_co/status')
    notice = world.outbox.last_to('ann@example.com')
    body = text_part(notice)
    assert notice['Subject'] == 'Someone tried to sign up with your address' and 'another secret' not in body
    assert 'https://app.test/login' in body and 'https://app.test/password-reset' in body
    invited = world.client().post('/signup', data=dict(email='ann@example.com', password=PW, next=link))
    assert (invited.status_code, invited.headers['location'], 'set-cookie' in invited.headers) == (303, link, False)
    again = world.client().post('/signup', data=dict(email='ann@example.com', password=PW, company='X Co'))
    assert again.status_code == 303
    notices = [m for m in world.outbox.messages if m['Subject'] == 'Someone tried to sign up with your address']
    assert len(notices) == 2  # `taken_rate`: two an hour per address here, however many tries
    assert world.host_db.global_users.count == 3


def test_signups_per_network_address_are_limited(world):
    for i in range(6):
        world.signup(f"user{i}@example.com", f"Company {i}")
    before = counts(world.host_db)
    r = world.client().post('/signup', data=dict(email='late@example.com', password=PW, company='Late'))
    assert r.status_code == 429 and 'Too many sign-ups' in r.text
    assert counts(world.host_db) == before


def test_same_company_name_gets_its_own_tenant_id(world):
    world.signup('ann@example.com', 'Acme Corp')
    r = world.client().post('/signup', data=dict(email='bob@example.com', password=PW, company='Acme Corp'))
    assert re.fullmatch(r'/tenants/acme_corp_[0-9a-f]{6}/status', r.headers['location'])


def test_login_logout_bad_login_and_throttling(world):
    world.signup('ann@example.com')
    world.provision()
    c = world.client()
    assert 'Forgot your password?' in c.get('/login').text
    r = c.post('/login', data=dict(email='ann@example.com', password='wrong password'))
    assert r.status_code == 401 and 'Wrong email or password' in r.text and 'set-cookie' not in r.headers
    r = c.post('/login', data=dict(email='nobody@example.com', password=PW))
    assert r.status_code == 401 and 'Wrong email or password' in r.text
    r = c.post('/login', data=dict(email='ann@example.com', password=PW))
    assert (r.status_code, r.headers['location']) == (303, '/')
    assert c.get('/').text.startswith('home of acme_corp')
    r = c.post('/logout')  # another site's form: no token, still signed in
    assert r.status_code == 403 and 'did not come from this site' in r.text
    assert c.get('/').status_code == 200
    assert 'name="csrf"' in re.search(r'<form[^>]*action="/logout".*?</form>', c.get('/account').text, re.S).group(0)
    r = c.post('/logout', data=dict(csrf=csrf(c.get('/account').text)))
    assert (r.status_code, r.headers['location']) == (303, '/login')
    assert c.get('/').headers['location'] == '/login?next=/'
    for _ in range(3):
        c.post('/login', data=dict(email='ann@example.com', password='wrong password'))
    r = c.post('/login', data=dict(email='ann@example.com', password=PW))
    assert r.status_code == 429 and 'Too many failed attempts' in r.text and int(r.headers['retry-after']) > 0


def test_next_is_followed_only_to_local_paths(world):
    world.signup('ann@example.com')
    world.provision()
    c = world.client()
    r = c.get('/team')
    assert r.headers['location'] == '/login?next=/team'
    assert 'value="/team"' in c.get('/login?next=/team').text
    assert (
        c.post('/login', data=dict(email='ann@example.com', password=PW, next='/team')).headers['location'] == '/team'
    )
    for evil in (
        'https://evil.example/x',
        '//evil.example',
        '/\\evil.example',
        'http:/evil.example',
        ' //evil.example',
    ):
        r = world.client().post('/login', data=dict(email='ann@example.com', password=PW, next=evil))
        assert (r.status_code, r.headers['location']) == (303, '/'), evil
        assert re.search(r'value="" name="next"', world.client().get('/login', params=dict(next=evil)).text), evil


@pytest.fixture
def reset_mails(monkeypatch):
    "Reset mails go out on a pool of this test's own; calling the fixture waits until every one has been handled."
    pool = ThreadPoolExecutor(2)
    monkeypatch.setattr(passwords, 'reset_mail_executor', pool)
    yield lambda: pool.shutdown(wait=True)
    pool.shutdown(wait=True)


def test_password_reset_through_the_emailed_link(world, reset_mails):
    old = world.signup('ann@example.com')
    world.provision()
    same = {
        world.client().post('/password-reset', data=dict(email=e)).text.split('<main')[1]
        for e in ('ann@example.com', 'nobody@example.com')
    }
    reset_mails()
    assert len(same) == 1 and 'If an account exists' in same.pop()
    assert [m['To'] for m in world.outbox.messages if 'Reset' in m['Subject']] == ['ann@example.com']
    link = world.link('ann@example.com')
    c = world.client()
    page = c.get(link)
    assert page.status_code == 200 and page.headers['referrer-policy'] == 'no-referrer' and 'New password' in page.text
    assert c.post(link, data=dict(password='brand new secret', confirm='different one')).status_code == 400
    assert c.post(link, data=dict(password='short', confirm='short')).status_code == 400
    r = c.post(link, data=dict(password='brand new secret', confirm='brand new secret'))
    assert r.status_code == 200 and 'password has been changed' in r.text
    assert c.post(link, data=dict(password='another secret', confirm='another secret')).status_code == 400
    assert old.get('/').headers['location'] == '/login?next=/'  # every old session ended
    assert world.client().post('/login', data=dict(email='ann@example.com', password=PW)).status_code == 401
    login = dict(email='ann@example.com', password='brand new secret')
    assert world.client().post('/login', data=login).status_code == 303


def test_the_reset_page_answers_before_a_slow_mail_server_for_any_address(world, reset_mails, monkeypatch):
    world.signup('ann@example.com')
    release, send = threading.Event(), world.outbox.send

    def held_send(to, subject, body, html=None):
        release.wait(5)
        send(to, subject, body, html)

    monkeypatch.setattr(world.outbox, 'send', held_send)
    for email in ('ann@example.com', 'nobody@example.com'):
        assert world.client().post('/password-reset', data=dict(email=email)).status_code == 200
    assert not any('Reset' in m['Subject'] for m in world.outbox.messages)  # both answered while the mail waits
    release.set()
    reset_mails()
    assert [m['To'] for m in world.outbox.messages if 'Reset' in m['Subject']] == ['ann@example.com']


def test_password_reset_mails_are_rate_limited_per_address(world, reset_mails):
    world.signup('ann@example.com')
    for _ in range(5):
        assert world.client().post('/password-reset', data=dict(email='Ann@Example.com')).status_code == 200
    reset_mails()
    assert sum('Reset' in m['Subject'] for m in world.outbox.messages) == 3


def invite(world, owner: TestClient, email: str, role='member') -> str:
    page = owner.get('/team').text
    r = owner.post('/team/invite', data=dict(email=email, role=role, csrf=csrf(page)))
    assert (r.status_code, r.headers.get('location')) == (303, '/team?done=invited'), r.text  # reload sends nothing
    assert 'Invitation sent.' in owner.get(r.headers['location']).text
    return world.link(email)


def test_invited_user_accepts_sees_the_tenant_and_switches(world):
    ann = world.signup('ann@example.com', 'Acme Corp')
    bob = world.signup('bob@example.com', 'Bob Co')
    world.provision()
    assert ann.get('/tenants/acme_corp/status').headers['location'] == '/'
    assert bob.get('/tenants/bob_co/status').headers['location'] == '/'
    link = invite(world, ann, 'bob@example.com')
    anon = world.client().get(link)
    assert 'Log in to accept' in anon.text and 'Acme Corp' in anon.text
    assert world.client().post(f'{link}/accept').headers['location'] == f'/login?next={link}'
    assert 'Accept invitation' in bob.get(link).text
    r = bob.post(f'{link}/accept')
    assert (r.status_code, r.headers['location']) == (303, '/')
    assert bob.get('/').text == 'home of acme_corp for bob@example.com as member'
    assert bob.post(f'{link}/accept').status_code == 400  # single use
    tenants = bob.get('/tenants').text
    assert 'Acme Corp' in tenants and 'Bob Co' in tenants
    r = bob.post('/tenants/switch', data=dict(tenant_id='bob_co', csrf=csrf(tenants)))
    assert (r.status_code, r.headers['location']) == (303, '/')
    assert bob.get('/').text == 'home of bob_co for bob@example.com as owner'
    world.signup('eve@example.com', 'Evil Inc')
    world.provision()
    r = bob.post('/tenants/switch', data=dict(tenant_id='evil_inc', csrf=csrf(tenants)))
    assert r.status_code == 403 and 'not an active member' in r.text
    assert bob.get('/').text.startswith('home of bob_co')


def test_new_user_signs_up_from_an_invitation_without_a_tenant_of_their_own(world):
    ann = world.owner('ann@example.com')
    link = invite(world, ann, 'carol@example.com')
    form = world.client().get(f'/signup?next={link}').text
    assert 'Company or team name' not in form and f'value="{link}"' in form
    carol = world.client()
    r = carol.post('/signup', data=dict(email='carol@example.com', password=PW, next=link))
    assert r.headers['location'] == link
    assert carol.post(f'{link}/accept').headers['location'] == '/'
    assert carol.get('/').text == 'home of acme_corp for carol@example.com as member'
    assert world.host_db.tenants.count == 1


def test_an_invitation_prefills_sign_up_and_confirms_the_address_it_was_sent_to(world):
    ann = world.owner('ann@example.com')
    link = invite(world, ann, 'Dan@Example.com')
    page = world.client().get(link).text
    signup = re.search(r'href="(/signup\?[^"]+)"', page).group(1).replace('&amp;', '&')
    assert 'value="dan@example.com"' in world.client().get(signup).text  # the address is filled in
    sent = len(world.outbox.messages)
    dan = world.client()
    assert dan.post('/signup', data=dict(email='dan@example.com', password=PW, next=link)).headers['location'] == link
    assert len(world.outbox.messages) == sent  # no confirmation mail to follow
    assert dan.post(f'{link}/accept').headers['location'] == '/'  # one click
    assert world.host_db.global_users(where="email = 'dan@example.com'")[0].email_verified_at
    # signing up from an invitation with another address is confirmed by mail, as any sign-up
    link = invite(world, ann, 'erin@example.com')
    world.client().post('/signup', data=dict(email='erin.other@example.com', password=PW, next=link))
    assert 'Confirm your address' in world.outbox.last_text('erin.other@example.com')


def test_invitation_for_someone_else_cannot_be_accepted_and_decline_works(world):
    ann = world.owner('ann@example.com')
    link = invite(world, ann, 'bob@example.com')
    eve = world.signup('eve@example.com', 'Evil Inc')
    assert 'but this invitation is for bob@example.com' in eve.get(link).text
    assert eve.post(f'{link}/accept').status_code == 400
    assert 'You declined' in world.client().post(f'{link}/decline').text
    assert world.client().get(link).status_code == 404
    assert world.client().get('/invitations/not-a-token').status_code == 404


def test_a_disabled_account_cannot_accept(world):
    ann = world.owner('ann@example.com')
    link = invite(world, ann, 'bob@example.com')
    bob = world.signup('bob@example.com', 'Bob Co')
    world.host_db.q("update core_users set is_active = false where email = 'bob@example.com'")
    assert 'Log in to accept' in bob.get(link).text
    assert bob.post(f'{link}/accept').headers['location'] == f'/login?next={link}'
    assert world.host_db.memberships.count == 2


def logged_in_member(world, role='member'):
    "Ann owns acme_corp (active, current); bob is a `role` there. Both clients."
    ann = world.owner('ann@example.com')
    link = invite(world, ann, 'bob@example.com', role)
    bob = world.client()
    bob.post('/signup', data=dict(email='bob@example.com', password=PW, next=link))
    bob.post(f'{link}/accept')
    return ann, bob


def bob_id(world):
    return next(u.id for u in world.host_db.global_users() if u.email == 'bob@example.com')


def ann_id(world):
    return next(u.id for u in world.host_db.global_users() if u.email == 'ann@example.com')


def test_non_admin_cannot_invite_or_manage(world):
    ann, bob = logged_in_member(world)
    page = bob.get('/team').text
    assert 'ann@example.com' in page and 'Send invitation' not in page and 'Only admins and owners' in page
    token, sent = csrf(bob.get('/tenants').text), len(world.outbox.messages)
    r = bob.post('/team/invite', data=dict(email='mallory@example.com', role='admin', csrf=token))
    assert r.status_code == 403 and 'class="alert bad"' in r.text
    ann_id = next(u.id for u in world.host_db.global_users() if u.email == 'ann@example.com')
    assert bob.post('/team/remove', data=dict(user_id=ann_id, csrf=token)).status_code == 403
    assert len(world.outbox.messages) == sent
    with world.host_db.transaction() as conn:
        assert conn.execute(invitations_t.select()).all()[-1].email == 'bob@example.com'


def invitation_id(world, email):
    with world.host_db.transaction() as conn:
        return conn.execute(invitations_t.select().where(invitations_t.c.email == email)).one().id


def test_admins_see_pending_invitations_and_cancel_one_whose_link_then_fails(world):
    ann = world.owner('ann@example.com')
    link = invite(world, ann, 'carol@example.com', 'admin')
    page = ann.get('/team').text
    assert 'Pending invitations' in page and 'carol@example.com' in page and 'ann@example.com</td>' in page
    iid = invitation_id(world, 'carol@example.com')
    assert f'action="/team/invitations/{iid}/cancel"' in page
    with world.host_db.transaction() as conn:
        token_hash = conn.execute(invitations_t.select()).one().token_hash
    assert token_hash not in page and link.rsplit('/', 1)[1] not in page
    r = ann.post(f'/team/invitations/{iid}/cancel', data=dict(csrf=csrf(page)))
    assert r.status_code == 303 and (page := ann.get(r.headers['location']).text)
    assert 'Invitation cancelled' in page and 'Pending invitations' not in page
    logs = world.host_db.audit_logs(where="target_id = :i", where_args=dict(i=iid))
    assert [a.event_type for a in logs][-1] == 'invitation.canceled'
    assert world.client().get(link).status_code == 404
    carol = world.client()
    carol.post('/signup', data=dict(email='carol@example.com', password=PW, next=link))
    assert carol.post(f'{link}/accept').status_code == 400 and world.host_db.memberships.count == 1
    assert ann.post(f'/team/invitations/{iid}/cancel', data=dict(csrf=csrf(page))).status_code == 400


def test_invitations_are_cancelled_only_by_their_tenants_admins_with_the_form_token(world):
    ann, bob = logged_in_member(world)
    invite(world, ann, 'carol@example.com')
    eve = world.owner('eve@example.com', 'Evil Inc')
    invite(world, eve, 'dan@example.com')
    carol_inv = invitation_id(world, 'carol@example.com')
    assert 'carol@example.com' not in eve.get('/team').text and 'carol@example.com' not in bob.get('/team').text
    r = eve.post(f'/team/invitations/{carol_inv}/cancel', data=dict(csrf=csrf(eve.get('/team').text)))
    assert r.status_code == 400 and 'no open invitation' in r.text
    r = bob.post(f'/team/invitations/{carol_inv}/cancel', data=dict(csrf=csrf(bob.get('/tenants').text)))
    assert r.status_code == 403
    for token in ('', csrf(eve.get('/team').text)):
        r = ann.post(f'/team/invitations/{carol_inv}/cancel', data=dict(csrf=token))
        assert r.status_code == 403 and 'did not come from this site' in r.text
    assert 'carol@example.com' in ann.get('/team').text


def test_roles_last_owner_transfer_and_removal(world):
    ann, bob = logged_in_member(world)
    ann_id = next(u.id for u in world.host_db.global_users() if u.email == 'ann@example.com')
    page = ann.get('/team').text
    assert 'Make owner' in page and 'Change role' in page
    token = csrf(page)
    r = ann.post('/team/invite', data=dict(email='x@example.com', role='owner', csrf=token))
    assert r.status_code == 400 and 'transfer ownership' in r.text
    r = ann.post('/team/role', data=dict(user_id=ann_id, role='admin', csrf=token))
    assert r.status_code == 409 and 'must keep at least one owner' in r.text
    r = ann.post('/team/role', data=dict(user_id=bob_id(world), role='admin', csrf=token))
    assert r.status_code == 303 and 'Role changed' in ann.get(r.headers['location']).text
    assert bob.get('/').text.endswith('as admin')
    r = bob.post('/team/role', data=dict(user_id=ann_id, role='member', csrf=csrf(bob.get('/team').text)))
    assert r.status_code == 400 and 'Only an owner can change an owner' in r.text
    r = ann.post('/team/transfer', data=dict(user_id=bob_id(world), csrf=token))
    assert r.status_code == 303 and 'Ownership transferred' in ann.get(r.headers['location']).text
    assert (ann.get('/').text.endswith('as admin'), bob.get('/').text.endswith('as owner')) == (True, True)
    r = bob.post('/team/remove', data=dict(user_id=ann_id, csrf=csrf(bob.get('/team').text)))
    assert r.status_code == 303 and 'Member removed' in bob.get(r.headers['location']).text
    assert ann.get('/').headers['location'] == '/tenants'


def test_the_only_owner_cannot_leave_the_tenant_ownerless(world):
    ann, bob = logged_in_member(world, role='admin')
    page = bob.get('/team').text
    ann_id = next(u.id for u in world.host_db.global_users() if u.email == 'ann@example.com')
    assert 'Make owner' not in page
    r = bob.post('/team/remove', data=dict(user_id=ann_id, csrf=csrf(page)))
    assert r.status_code == 400 and 'Only an owner can change an owner' in r.text
    ann_token = csrf(ann.get('/team').text)
    r = ann.post('/team/transfer', data=dict(user_id=ann_id, csrf=ann_token))
    assert r.status_code == 400 and 'another member' in r.text
    assert ann.get('/').text.endswith('as owner')


def test_an_owner_deletes_the_tenant_by_typing_its_name_and_its_members_lose_it(world):
    ann, bob = logged_in_member(world)
    page = ann.get('/team').text
    assert 'action="/team/delete"' in page and 'data-confirm="Delete Acme Corp and all its data for good?"' in page
    assert 'action="/team/delete"' not in bob.get('/team').text  # owners only
    r = bob.post('/team/delete', data=dict(name='Acme Corp', csrf=csrf(bob.get('/team').text)))
    assert r.status_code == 403
    assert ann.post('/team/delete', data=dict(name='Acme Corp')).status_code == 403  # no form token
    r = ann.post('/team/delete', data=dict(name='acme corp', csrf=csrf(page)))
    assert r.status_code == 400 and 'Nothing has been deleted' in r.text and 'class="alert bad"' in r.text
    assert (world.host_db.tenants['acme_corp'].status, world.deprovision()) == ('active', 0)
    r = ann.post('/team/delete', data=dict(name=' Acme Corp ', csrf=csrf(page)))
    assert (r.status_code, r.headers['location']) == (303, '/tenants?done=deleting')
    listed = ann.get(r.headers['location']).text
    assert 'The tenant is being deleted' in listed and 'Being deleted' in listed and 'Suspended' not in listed
    assert [(e.actor_user_id, e.target_id) for e in events(world, 'tenant.delete_requested')] == [
        (ann_id(world), 'acme_corp')
    ]
    assert bob.get('/').headers['location'] == '/tenants' and ann.get('/team').headers['location'] == '/tenants'
    assert 'Being deleted' in bob.get('/tenants').text
    assert world.deprovision() == 1 and world.host_db.tenants['acme_corp'].status == 'deleted'
    assert 'Acme Corp' not in ann.get('/tenants').text and bob.get('/').headers['location'] == '/tenants'


def test_api_key_shown_once_authenticates_and_revokes(world):
    ann = world.owner('ann@example.com')
    page = ann.get('/api-keys')
    assert page.headers['cache-control'] == 'no-store' and 'No keys yet' in page.text
    r = ann.post('/api-keys', data=dict(name='CI deploys', mode='test', csrf=csrf(page.text)))
    secret = re.search(r'<div class="secret">(sk_test_[0-9a-f]{16}_[A-Za-z0-9_-]{43})</div>', r.text).group(1)
    assert 'shown only once' in r.text and r.headers['cache-control'] == 'no-store'
    listing = ann.get('/api-keys').text
    key_id = secret.split('_')[2]
    assert secret not in listing and f'sk_test_{key_id}_…' in listing and 'CI deploys' in listing
    api = world.client()
    who = api.get('/api/whoami', headers={'Authorization': f'Bearer {secret}'})
    assert who.json() == dict(user='ann@example.com', tenant='acme_corp', mode='test')
    assert (
        api.post(
            '/api-keys',
            data=dict(name='minted by a key', csrf=csrf(listing)),
            headers={'Authorization': f'Bearer {secret}'},
        ).status_code
        == 403
    )
    r = ann.post(f'/api-keys/{key_id}/revoke', data=dict(csrf=csrf(listing)))
    assert r.status_code == 200 and 'Key revoked' in r.text and 'revoked' in r.text
    assert api.get('/api/whoami', headers={'Authorization': f'Bearer {secret}'}).status_code == 401
    assert ann.post(f'/api-keys/{key_id}/revoke', data=dict(csrf=csrf(listing))).status_code == 404
    assert ann.post('/api-keys', data=dict(name=' ', mode='test', csrf=csrf(listing))).status_code == 400
    assert ann.post('/api-keys', data=dict(name='k', mode='prod', csrf=csrf(listing))).status_code == 400
    assert len(world.host_db.q("select key_id from auth_api_keys")) == 1


def test_an_api_key_acts_only_inside_its_own_tenant(world):
    ann = world.owner('ann@example.com')
    ann.post('/tenants', data=dict(company='Second Shop', csrf=csrf(ann.get('/tenants').text)))
    world.provision()
    secret, _ = create_api_key(world.host_db, 'acme_corp', ann_id(world), 'CI', 'secret', 'test')
    api, key = world.client(), {'Authorization': f'Bearer {secret}'}
    assert api.get('/api/whoami', headers=key).json()['tenant'] == 'acme_corp'
    for path in ('/tenants', '/tenants/second_shop/status', '/tenants/acme_corp/status', '/account'):
        r = api.get(path, headers=key)
        assert r.status_code == 403 and r.json()['error']['code'] == 'forbidden', path
        assert 'only inside its own tenant' in r.json()['error']['message'] and 'Second Shop' not in r.text, path
    assert 'Second Shop' in ann.get('/tenants').text


def test_members_see_keys_but_cannot_create_them(world):
    ann, bob = logged_in_member(world)
    page = bob.get('/api-keys').text
    assert 'Create key' not in page and 'Only admins and owners' in page
    r = bob.post('/api-keys', data=dict(name='mine', mode='live', csrf=csrf(bob.get('/tenants').text)))
    assert r.status_code == 403 and len(world.host_db.q("select key_id from auth_api_keys")) == 0


def test_changes_without_this_sessions_form_token_are_refused(world):
    ann = world.owner('ann@example.com')
    other = world.signup('eve@example.com', 'Evil Inc')
    foreign = csrf(other.get('/tenants').text)
    for path, data in [
        ('/tenants/switch', dict(tenant_id='acme_corp')),
        ('/tenants', dict(company='Sneaky')),
        ('/api-keys', dict(name='k', mode='live')),
        ('/team/invite', dict(email='m@example.com', role='admin')),
    ]:
        for token in ('', foreign, 'é' * 64):
            r = ann.post(path, data=dict(data, csrf=token))
            assert r.status_code == 403 and 'did not come from this site' in r.text, (path, token)
    assert world.host_db.tenants.count == 2 and len(world.host_db.q("select key_id from auth_api_keys")) == 0


def test_tenants_page_creates_another_tenant(world):
    ann = world.owner('ann@example.com')
    page = ann.get('/tenants').text
    assert 'current' in page and 'Create tenant' in page
    r = ann.post('/tenants', data=dict(company='Second Shop', csrf=csrf(page)))
    assert r.headers['location'] == '/tenants/second_shop/status'
    assert 'Being set up' in ann.get('/tenants').text
    assert ann.post('/tenants', data=dict(company='', csrf=csrf(page))).status_code == 400
    world.provision()
    done = ann.get('/tenants/second_shop/status', headers={'HX-Request': 'true'}).text
    assert 'Second Shop is ready' in done and 'every 1s' not in done  # acme stays current: offered, not switched
    assert ann.get('/').text.startswith('home of acme_corp')


def test_one_user_owns_a_capped_number_of_tenants(world, monkeypatch):
    monkeypatch.setattr(TenantPages, 'max_owned', 2)
    ann = world.owner('ann@example.com')
    token = csrf(ann.get('/tenants').text)
    assert ann.post('/tenants', data=dict(company='Second Shop', csrf=token)).status_code == 303
    before = counts(world.host_db)
    r = ann.post('/tenants', data=dict(company='Third Shop', csrf=token))
    assert r.status_code == 403 and 'You already own 2 tenants' in r.text and 'class="alert bad"' in r.text
    assert counts(world.host_db) == before
    ann_id_ = ann_id(world)
    world.host_db.q("update core_memberships set role = 'admin' where tenant_id = 'second_shop'")
    assert ann.post('/tenants', data=dict(company='Third Shop', csrf=token)).status_code == 303  # owns one again
    world.host_db.global_users.update(dict(id=ann_id_, is_sys_admin=True))
    assert ann.post('/tenants', data=dict(company='Fourth Shop', csrf=token)).status_code == 303  # no cap for admins


def test_tenant_creation_is_rate_limited_per_user(world, monkeypatch):
    monkeypatch.setattr(TenantPages, 'create_rate', RateLimit(2, 3600))
    ann, eve = world.owner('ann@example.com'), world.owner('eve@example.com', 'Evil Inc')
    token = csrf(ann.get('/tenants').text)
    for i in range(2):
        assert ann.post('/tenants', data=dict(company=f'Shop {i}', csrf=token)).status_code == 303
    before = counts(world.host_db)
    r = ann.post('/tenants', data=dict(company='Shop 2', csrf=token))
    assert r.status_code == 429 and 'Try again in' in r.text and int(r.headers['retry-after']) > 0
    assert counts(world.host_db) == before
    assert eve.post('/tenants', data=dict(company='Eve Two', csrf=csrf(eve.get('/tenants').text))).status_code == 303


def test_status_page_is_for_members_only_and_reports_a_failed_job(world):
    ann = world.signup('ann@example.com')
    eve = world.signup('eve@example.com', 'Evil Inc')
    assert eve.get('/tenants/acme_corp/status').status_code == 404
    assert eve.get('/tenants/no_such/status').status_code == 404
    job = claim(world.host_db, 'test-worker', ['tenant.provision'])
    while job.tenant_id != 'acme_corp':
        fail(world.host_db, job, 'not this one', retry=False)
        job = claim(world.host_db, 'test-worker', ['tenant.provision'])
    assert 'Creating the database' in ann.get('/tenants/acme_corp/status').text
    fail(world.host_db, job, 'disk full', retry=False)
    page = ann.get('/tenants/acme_corp/status', headers={'HX-Request': 'true'}).text
    assert 'Setting up this tenant failed' in page and 'every 1s' not in page and 'disk full' not in page
    with world.host_db.transaction() as conn:
        assert conn.execute(jobs_t.select().where(jobs_t.c.tenant_id == 'acme_corp')).one().status == 'dead'


def test_public_forms_refuse_posts_started_by_another_site(world):
    "Login CSRF: another site's form must not sign the visitor in (or up) as someone else, nor send reset mail."
    world.signup('ann@example.com')
    before = (world.host_db.global_users.count, len(world.outbox.messages))
    for headers in (
        {'Sec-Fetch-Site': 'cross-site'},
        {'Sec-Fetch-Site': 'same-site'},
        {'Origin': 'https://evil.example'},
        {'Origin': 'null'},
    ):
        c = world.client()
        for path, data in [
            ('/login', dict(email='ann@example.com', password=PW)),
            ('/signup', dict(email='eve@example.com', password=PW, company='Evil Inc')),
            ('/password-reset', dict(email='ann@example.com')),
        ]:
            r = c.post(path, data=data, headers=headers)
            assert r.status_code == 403 and 'did not come from this site' in r.text and 'set-cookie' not in r.headers, (
                path,
                headers,
            )
    assert (world.host_db.global_users.count, len(world.outbox.messages)) == before
    for headers in (
        {'Sec-Fetch-Site': 'same-origin', 'Origin': 'https://app.test'},
        {'Origin': 'https://app.test'},
        {},
    ):
        r = world.client().post('/login', data=dict(email='ann@example.com', password=PW), headers=headers)
        assert r.status_code == 303 and 'fh_saas_session=' in r.headers['set-cookie'], headers


def test_the_session_cookie_is_secure_when_the_site_is_https_even_behind_a_plain_http_proxy(world):
    world.signup('ann@example.com')
    client = TestClient(world.app, follow_redirects=False, base_url='http://app.internal')
    r = client.post('/login', data=dict(email='ann@example.com', password=PW))
    assert r.status_code == 303 and 'secure' in r.headers['set-cookie'].lower().split('; ')


def test_an_invitation_whose_mail_fails_is_not_kept_and_a_bad_address_stores_nothing(world, monkeypatch):
    ann = world.owner('ann@example.com')
    token = csrf(ann.get('/team').text)
    r = ann.post('/team/invite', data=dict(email='bob@example.com\r\nBcc: all@example.com', role='member', csrf=token))
    assert r.status_code == 400 and 'not an email address' in r.text

    def down(to, subject, body, html=None):
        raise ConnectionRefusedError('SMTP server down')

    monkeypatch.setattr(world.outbox, 'send', down)
    r = ann.post('/team/invite', data=dict(email='bob@example.com', role='member', csrf=token))
    assert r.status_code == 503 and 'could not be sent' in r.text
    assert world.host_db.q("select count(*) n from auth_invitations")[0]['n'] == 0
    assert 'Pending invitations' not in ann.get('/team').text


def test_an_impersonating_admin_cannot_mint_an_api_key_that_outlasts_the_impersonation(world):
    world.owner('ann@example.com')
    ann_id = next(u.id for u in world.host_db.global_users() if u.email == 'ann@example.com')
    world.host_db.global_users.insert(dict(id='root', email='root@example.com', is_sys_admin=True))
    cookie = world.sessions.create('root')
    switch_tenant(world.sessions, start_impersonation(world.sessions, world.sessions.load(cookie), ann_id), 'acme_corp')
    admin = world.client()
    admin.cookies.set(world.sessions.cookie_name, cookie)
    page = admin.get('/api-keys')
    assert page.status_code == 200
    r = admin.post('/api-keys', data=dict(name='backdoor', mode='live', csrf=csrf(page.text)))
    assert r.status_code == 403 and 'while impersonating' in r.text
    assert len(world.host_db.q("select key_id from auth_api_keys")) == 0


def test_an_impersonating_admin_cannot_invite_create_tenants_or_change_roles(world):
    ann, bob = logged_in_member(world)
    world.host_db.global_users.insert(dict(id='root', email='root@example.com', is_sys_admin=True))
    cookie = world.sessions.create('root')
    switch_tenant(
        world.sessions, start_impersonation(world.sessions, world.sessions.load(cookie), ann_id(world)), 'acme_corp'
    )
    admin = world.client()
    admin.cookies.set(world.sessions.cookie_name, cookie)
    token, before, sent = csrf(admin.get('/team').text), counts(world.host_db), len(world.outbox.messages)
    for path, data in [
        ('/team/invite', dict(email='root@example.com', role='admin')),
        ('/team/role', dict(user_id=bob_id(world), role='admin')),
        ('/team/transfer', dict(user_id=bob_id(world))),
        ('/team/delete', dict(name='Acme Corp')),
        ('/tenants', dict(company='Backdoor Ltd')),
    ]:
        r = admin.post(path, data=dict(data, csrf=token))
        assert r.status_code == 403 and 'while impersonating' in r.text and 'class="alert bad"' in r.text, path
    assert (counts(world.host_db), len(world.outbox.messages)) == (before, sent)
    assert world.host_db.q("select count(*) n from auth_invitations where email = 'root@example.com'")[0]['n'] == 0
    roles = sorted((m.user_id == ann_id(world), m.role) for m in world.host_db.memberships())
    assert roles == [(False, 'member'), (True, 'owner')]


# --- the account page: name, password, sessions -----------------------------------------------------------------
FIREFOX = 'Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0'
IPHONE = 'Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Version/17.0 Mobile/15E148 Safari/604.1'


def user_id(world, email):
    return world.host_db.global_users(where="email = :e", where_args=dict(e=email))[0].id


def events(world, kind):
    return world.host_db.audit_logs(where="event_type = :t", where_args=dict(t=kind))


def device(world, email, agent, password=PW) -> TestClient:
    "Another browser of `email`'s, logged in."
    c = world.client()
    c.headers['user-agent'] = agent
    assert c.post('/login', data=dict(email=email, password=password)).status_code == 303
    return c


def live_hashes(world, email):
    c = sessions_t.c
    with world.host_db.transaction() as conn:
        return {
            r.id_hash
            for r in conn.execute(sessions_t.select().where(c.user_id == user_id(world, email), c.revoked_at.is_(None)))
        }


def after(client, r):
    "The page `r` redirected to, which says how the change went."
    assert r.status_code == 303 and r.headers['location'].startswith('/account?done='), (r.status_code, r.text)
    return client.get(r.headers['location']).text


def test_the_account_page_has_the_name_and_password_forms_and_the_devices_signed_in(world):
    ann = world.signup('ann@example.com')
    device(world, 'ann@example.com', FIREFOX)
    r = ann.get('/account')
    assert r.headers['cache-control'] == 'no-store'
    for part in (
        'action="/account/name"',
        'value="Someone"',
        'maxlength="200"',
        'action="/account/password"',
        'name="current"',
        'autocomplete="current-password"',
        'action="/account/sessions/end-others"',
        'this device',
        'Firefox on Linux',
        'testclient',
    ):
        assert part in r.text, part
    assert len(re.findall(r'\d{4}-\d\d-\d\d \d\d:\d\d UTC', r.text)) == 4
    assert not any(h in r.text for h in live_hashes(world, 'ann@example.com'))  # sessions named by handle only
    assert ann.get('/account?done=<script>').status_code == 200  # an unknown code says nothing


def test_a_name_change_is_trimmed_saved_audited_and_said_after_the_redirect(world):
    ann = world.signup('ann@example.com')
    token = csrf(ann.get('/account').text)
    page = after(ann, ann.post('/account/name', data=dict(name='  Ann  Smith\u00e9 ', csrf=token)))
    assert 'Your name has been saved.' in page and 'value="Ann  Smithé"' in page
    uid = user_id(world, 'ann@example.com')
    assert world.host_db.global_users[uid].name == 'Ann  Smithé'
    (log,) = events(world, 'account.name_changed')
    assert (log.target_id, log.actor_user_id, 'Ann  Smith' in log.details) == (uid, uid, True)
    after(ann, ann.post('/account/name', data=dict(name='n' * 200, csrf=csrf(page))))
    assert world.host_db.global_users[uid].name == 'n' * 200


@pytest.mark.parametrize(
    'form, says',
    [
        (dict(), 'Enter your name.'),
        (dict(name=''), 'Enter your name.'),
        (dict(name=' \t '), 'Enter your name.'),
        (dict(name='n' * 201), 'at most 200 characters'),
        (dict(name='x' * 100_000), 'at most 200 characters'),
        (dict(name='Ann\x00Smith'), 'control characters'),
        (dict(name='Ann\r\nBcc: x'), 'control characters'),
        (dict(name='Ann\x1b[31m'), 'control characters'),
    ],
)
def test_a_refused_name_says_why_and_changes_nothing(world, form, says):
    ann = world.signup('ann@example.com')
    page = after(ann, ann.post('/account/name', data=dict(form, csrf=csrf(ann.get('/account').text))))
    assert says in page and 'class="alert bad"' in page
    assert world.host_db.global_users[user_id(world, 'ann@example.com')].name == 'Someone'
    assert events(world, 'account.name_changed') == []


def test_a_password_change_keeps_this_session_ends_the_others_and_is_audited(world):
    ann = world.signup('ann@example.com')
    phone = device(world, 'ann@example.com', IPHONE)
    new = 'a brand new passphrase'
    page = after(
        ann,
        ann.post(
            '/account/password', data=dict(current=PW, password=new, confirm=new, csrf=csrf(ann.get('/account').text))
        ),
    )
    assert 'Your password has been changed. Every other device has been signed out.' in page
    assert 'Safari on iPhone' not in page and 'this device' in page
    assert phone.get('/account').headers['location'].startswith('/login')
    assert len(live_hashes(world, 'ann@example.com')) == 1
    assert world.client().post('/login', data=dict(email='ann@example.com', password=PW)).status_code == 401
    device(world, 'ann@example.com', FIREFOX, new)
    uid = user_id(world, 'ann@example.com')
    (log,) = events(world, 'auth.password_changed')
    assert (log.target_id, log.actor_user_id) == (uid, uid) and new not in log.details and PW not in log.details


@pytest.mark.parametrize(
    'form, says',
    [
        (
            dict(current='wrong password', password='a new passphrase', confirm='a new passphrase'),
            'The current password is wrong.',
        ),
        (dict(password='a new passphrase', confirm='a new passphrase'), 'The current password is wrong.'),
        (
            dict(current=PW + '\x00', password='a new passphrase', confirm='a new passphrase'),
            'The current password is wrong.',
        ),
        (dict(current=PW, password='a new passphrase', confirm='a new passphrasE'), 'The two new passwords differ.'),
        (dict(current=PW, password='a new passphrase'), 'The two new passwords differ.'),
        (dict(current=PW, password='short', confirm='short'), 'Choose a new password of 8 to 1024 characters.'),
        (dict(current=PW, password='p' * 1025, confirm='p' * 1025), 'Choose a new password of 8 to 1024 characters.'),
        (dict(current=PW), 'Choose a new password of 8 to 1024 characters.'),
        (dict(), 'Choose a new password of 8 to 1024 characters.'),
    ],
)
def test_a_refused_password_change_says_why_and_changes_nothing(world, form, says):
    ann = world.signup('ann@example.com')
    phone = device(world, 'ann@example.com', IPHONE)
    page = after(ann, ann.post('/account/password', data=dict(form, csrf=csrf(ann.get('/account').text))))
    assert says in page and 'class="alert bad"' in page and 'Safari on iPhone' in page
    assert phone.get('/account').status_code == 200
    assert events(world, 'auth.password_changed') == []
    device(world, 'ann@example.com', FIREFOX)  # the old password still works


def test_guessing_the_current_password_is_throttled_like_a_login(world):
    "A stolen session cannot try passwords without end: after 5 wrong ones even the right one is refused a while."
    ann = world.signup('ann@example.com')

    def change(current):
        return after(
            ann,
            ann.post(
                '/account/password',
                data=dict(
                    current=current,
                    password='a new passphrase',
                    confirm='a new passphrase',
                    csrf=csrf(ann.get('/account').text),
                ),
            ),
        )

    assert all('The current password is wrong.' in change(f'guess {i}') for i in range(5))
    assert 'Too many wrong passwords.' in change(PW)
    assert events(world, 'auth.password_changed') == []
    device(world, 'ann@example.com', FIREFOX)  # the old password still works


def test_a_new_password_with_a_nul_byte_is_a_password_like_any_other(world):
    ann = world.signup('ann@example.com')
    new = 'with\x00a nul byte'
    page = after(
        ann,
        ann.post(
            '/account/password', data=dict(current=PW, password=new, confirm=new, csrf=csrf(ann.get('/account').text))
        ),
    )
    assert 'Your password has been changed.' in page
    device(world, 'ann@example.com', FIREFOX, new)


def test_one_device_is_signed_out_and_then_every_other_one(world):
    ann = world.signup('ann@example.com')
    phone, laptop = device(world, 'ann@example.com', IPHONE), device(world, 'ann@example.com', FIREFOX)
    phone_hash = world.sessions.id_hash(phone.cookies.get(world.sessions.cookie_name))
    page = ann.get('/account').text
    assert f'value="{session_handle(phone_hash)}"' in page
    page = after(ann, ann.post('/account/sessions/end', data=dict(handle=session_handle(phone_hash), csrf=csrf(page))))
    assert 'That device has been signed out.' in page and 'Safari on iPhone' not in page and 'Firefox on Linux' in page
    assert phone.get('/account').headers['location'].startswith('/login') and laptop.get('/account').status_code == 200
    uid = user_id(world, 'ann@example.com')
    assert [(a.target_id, a.actor_user_id) for a in events(world, 'account.session_ended')] == [(uid, uid)]
    assert phone_hash not in events(world, 'account.session_ended')[0].details
    page = after(ann, ann.post('/account/sessions/end-others', data=dict(csrf=csrf(page))))
    assert 'Every other device has been signed out.' in page and 'Firefox on Linux' not in page
    assert 'action="/account/sessions/end-others"' not in page  # nothing left to sign out
    assert laptop.get('/account').headers['location'].startswith('/login') and ann.get('/account').status_code == 200
    assert [a.details for a in events(world, 'account.other_sessions_ended')] == ['{"ended": 1}']


def test_signing_out_a_session_that_is_not_ones_own_other_one_is_a_404(world):
    ann = world.signup('ann@example.com')
    eve = world.signup('eve@example.com', 'Evil Inc')
    eve_hash = world.sessions.id_hash(eve.cookies.get(world.sessions.cookie_name))
    ann_hash = world.sessions.id_hash(ann.cookies.get(world.sessions.cookie_name))
    token = csrf(ann.get('/account').text)
    for handle in (
        session_handle(eve_hash),
        eve_hash,
        session_handle(ann_hash),
        '',
        'é' * 32,
        'a\x00b',
        'h' * 100_000,
        None,
    ):
        r = ann.post('/account/sessions/end', data=dict(csrf=token, **({} if handle is None else dict(handle=handle))))
        assert r.status_code == 404 and 'None of your other devices' in r.text, handle
        assert 'Traceback' not in r.text and eve_hash not in r.text
    assert eve.get('/account').status_code == 200 and ann.get('/account').status_code == 200
    assert events(world, 'account.session_ended') == []


@pytest.mark.parametrize(
    'path, data',
    [
        ('/account/name', dict(name='Mallory')),
        ('/account/password', dict(current=PW, password='hijacked pw', confirm='hijacked pw')),
        ('/account/sessions/end-others', dict()),
    ],
)
def test_account_changes_without_this_sessions_form_token_are_refused(world, path, data):
    ann = world.signup('ann@example.com')
    phone = device(world, 'ann@example.com', IPHONE)
    foreign = csrf(world.signup('eve@example.com', 'Evil Inc').get('/account').text)
    for form in (dict(data), dict(data, csrf=''), dict(data, csrf=foreign), dict(data, csrf='é\x00' * 40)):
        r = ann.post(path, data=form)
        assert r.status_code == 403 and 'did not come from this site' in r.text, form
    assert world.client().post(path, data=data).headers['location'].startswith('/login')
    assert world.host_db.global_users[user_id(world, 'ann@example.com')].name == 'Someone'
    assert phone.get('/account').status_code == 200
    device(world, 'ann@example.com', FIREFOX)


def test_a_tenant_is_renamed_by_its_admins_and_left_by_anyone_but_its_only_owner(world):
    ann = world.owner('ann@example.com', 'Acme Corp')
    bob = world.signup('bob@example.com', 'Bob Co')
    world.provision()
    bob.post(invite(world, ann, 'bob@example.com') + '/accept')
    page = ann.get('/team').text
    r = ann.post('/team/rename', data=dict(name='  Acme   Ltd ', csrf=csrf(page)))
    assert (r.status_code, r.headers['location']) == (303, '/team?done=renamed')
    assert 'The tenant has its new name.' in ann.get('/team?done=renamed').text
    assert world.host_db.tenants['acme_corp'].name == 'Acme Ltd' and 'Acme Ltd' in bob.get('/tenants').text
    for bad, says in (('   ', 'Enter a company or team name'), ('x' * 101, 'at most 100 characters')):
        r = ann.post('/team/rename', data=dict(name=bad, csrf=csrf(page)))
        assert r.status_code == 400 and says in r.text, bad
    member_page = bob.get('/team').text
    assert 'action="/team/rename"' not in member_page
    assert bob.post('/team/rename', data=dict(name='Mine now', csrf=csrf(member_page))).status_code == 403
    assert world.host_db.tenants['acme_corp'].name == 'Acme Ltd'
    # the only owner may not leave; a member may, and is back on the tenants page, told so
    r = ann.post('/team/leave', data=dict(csrf=csrf(page)))
    assert (r.status_code, r.headers['location']) == (303, '/team?done=last_owner')
    assert 'make someone else owner before you leave' in ann.get('/team?done=last_owner').text
    assert ann.post('/team/leave').status_code == 403  # no form token: nothing happens
    r = bob.post('/team/leave', data=dict(csrf=csrf(member_page)))
    assert (r.status_code, r.headers['location']) == (303, '/tenants?done=left')
    assert 'You have left the tenant' in bob.get('/tenants?done=left').text
    assert bob.get('/team').status_code == 303  # no longer a member of Acme
    assert [m['email'] for m in tenant_members(world.host_db, 'acme_corp')] == ['ann@example.com']


def test_members_of_a_suspended_tenant_are_told_why_it_is_gone_and_whom_to_ask(world):
    ann = world.owner('ann@example.com', 'Acme Corp')
    bob = world.signup('bob@example.com', 'Bob Co')
    world.provision()
    bob.post(invite(world, ann, 'bob@example.com') + '/accept')
    suspend_tenant(world.host_db, 'acme_corp')
    assert bob.get('/').headers['location'] == '/tenants'
    page = bob.get('/tenants').text
    card = page[page.index('Suspended') :]
    assert 'Acme Corp' in card and '(your current tenant)' in card and 'ann@example.com' in card
    assert 'action="/tenants/switch"' in page and 'Bob Co' in page  # his own tenant is still there to switch to


def test_the_top_bar_switches_between_a_users_tenants(world):
    ann = world.owner('ann@example.com', 'Acme Corp')
    bob = world.owner('bob@example.com', 'Bob Co')
    bob.post(invite(world, ann, 'bob@example.com') + '/accept')  # now in Acme
    page = bob.get('/tenants').text
    assert 'title="Switch tenant"' in page and 'hx-get="/tenants/menu"' in page
    menu = bob.get('/tenants/menu', headers={'HX-Request': 'true'}).text
    assert '<html' not in menu and 'Bob Co' in menu and 'Acme Corp' not in menu  # the others, not the current one
    r = bob.post('/tenants/switch', data=dict(tenant_id='bob_co', csrf=csrf(menu)))
    assert r.status_code == 303 and bob.get('/').text == 'home of bob_co for bob@example.com as owner'
    assert 'Acme Corp' in bob.get('/tenants/menu', headers={'HX-Request': 'true'}).text
    assert world.client().get('/tenants/menu').status_code == 303  # signed out: to the login page


def test_an_email_change_takes_effect_only_from_the_new_address_and_the_old_one_is_told(world):
    ann = world.owner('ann@example.com', 'Acme Corp')
    world.signup('bob@example.com', 'Bob Co')
    page = ann.get('/account').text

    def change(**form):
        return ann.post('/account/email', data=dict(csrf=csrf(page), **form)).headers['location']

    assert change(email='ann@new.example', password='wrong password') == '/account?done=email_password_wrong'
    assert change(email='not an address', password=PW) == '/account?done=email_invalid'
    assert change(email='ANN@example.com', password=PW) == '/account?done=email_same'
    assert change(email='Bob@Example.com', password=PW) == '/account?done=email_taken'
    assert change(email=' Ann@New.Example ', password=PW) == '/account?done=email_change_sent'
    assert 'We sent a link to the new address' in ann.get('/account?done=email_change_sent').text
    assert world.host_db.global_users(where="email = 'ann@example.com'")  # unchanged until the link
    assert 'ann@new.example' in world.outbox.last_text('ann@example.com')
    link = world.link('ann@new.example')
    assert link.startswith('/verify-email/new-address/')
    r = world.client().get(link)  # opened anywhere, signed in or not
    assert r.status_code == 200 and 'Your account now uses this address' in r.text
    user = world.host_db.global_users(where="email = 'ann@new.example'")[0]
    assert user.email_verified_at and world.client().get(link).status_code == 400  # single use
    r = world.client().post('/login', data=dict(email='ann@new.example', password=PW))
    assert r.status_code == 303 and r.headers['location'] != '/login'
    assert ann.post('/account/email', data=dict(email='x@y.example', password=PW)).status_code == 403  # no token


def test_an_email_change_whose_address_was_taken_meanwhile_changes_nothing(world):
    ann = world.owner('ann@example.com', 'Acme Corp')
    page = ann.get('/account').text
    ann.post('/account/email', data=dict(csrf=csrf(page), email='shared@example.com', password=PW))
    link = world.link('shared@example.com')
    world.signup('shared@example.com', 'Other Co')  # someone signs up with it first
    r = world.client().get(link)
    assert r.status_code == 409 and 'Another account took that address' in r.text
    assert world.host_db.global_users(where="email = 'ann@example.com'")


# --- deleting the account ---------------------------------------------------------------------------------------
def delete_me(client, **form):
    "Post the account page's deletion form; where it redirected."
    page = client.get('/account').text
    return client.post('/account/delete', data=dict(csrf=csrf(page), **form)).headers['location']


def test_the_only_owner_is_told_the_way_out_and_a_deleted_account_is_anonymised_everywhere(world):
    ann, bob = logged_in_member(world)
    uid = ann_id(world)
    key, _ = create_api_key(world.host_db, 'acme_corp', uid, 'deploy')
    invite(world, ann, 'cy@example.com')
    page = ann.get('/account').text
    assert 'action="/account/delete"' in page and 'data-confirm="Delete your account for good?"' in page
    assert 'You are the only owner of Acme Corp' in page and 'make someone else owner on its team page' in page
    mine = dict(password=PW, email='ann@example.com')
    assert delete_me(ann, **mine) == '/account?done=delete_sole_owner'
    assert 'Your account has not been deleted' in ann.get('/account?done=delete_sole_owner').text
    ann.post('/team/transfer', data=dict(user_id=bob_id(world), csrf=csrf(ann.get('/team').text)))  # the way out
    assert 'You are the only owner' not in ann.get('/account').text
    assert delete_me(ann, password=PW, email='bob@example.com') == '/account?done=delete_email'
    assert delete_me(ann, password='wrong password', email='ann@example.com') == '/account?done=delete_password_wrong'
    assert ann.post('/account/delete', data=mine).status_code == 403  # no form token
    assert world.host_db.global_users[uid].is_active and verify_api_key(world.host_db, key) is not None
    r = ann.post(
        '/account/delete', data=dict(csrf=csrf(ann.get('/account').text), password=PW, email=' Ann@Example.com')
    )
    assert (r.status_code, r.headers['location']) == (303, '/login?done=account_deleted')
    cleared = r.headers['set-cookie'].lower()
    assert cleared.startswith(world.sessions.cookie_name.lower() + '=') and 'max-age=0' in cleared
    assert 'Your account has been deleted' in world.client().get(r.headers['location']).text
    gone = world.host_db.global_users[uid]
    assert (gone.email, gone.name, gone.password_hash, gone.is_active) == (f'deleted-{uid}@invalid', None, None, False)
    assert not any(m.is_active for m in world.host_db.memberships() if m.user_id == uid)
    assert verify_api_key(world.host_db, key) is None
    assert (
        world.host_db.q("select email from auth_invitations where invited_by = :u and accepted_at is null", u=uid) == []
    )  # cy's was cancelled
    assert [e.actor_user_id for e in events(world, 'account.deleted')] == [uid]
    assert 'have been deleted' in world.outbox.last_text('ann@example.com')
    assert ann.get('/account').status_code == 303  # every session ended
    assert world.client().post('/login', data=dict(email='ann@example.com', password=PW)).status_code == 401
    assert [m['user_id'] for m in tenant_members(world.host_db, 'acme_corp')] == [bob_id(world)]
    world.signup('ann@example.com', 'Ann Again')  # the address is free


def test_with_two_factor_sign_in_deleting_the_account_takes_a_code_and_never_an_impersonator(world):
    ann, bob = logged_in_member(world)
    uid = bob_id(world)
    codes = confirm_setup(world.host_db, uid, pyotp.TOTP(begin_setup(world.host_db, uid)).now())
    assert 'Code from your app, or a recovery code' in bob.get('/account').text
    world.host_db.global_users.insert(dict(id='root', email='root@example.com', is_sys_admin=True))
    cookie = world.sessions.create('root')
    start_impersonation(world.sessions, world.sessions.load(cookie), uid)
    admin = world.client()
    admin.cookies.set(world.sessions.cookie_name, cookie)
    form = dict(password=PW, email='bob@example.com', code=codes[0])
    assert delete_me(admin, **form) == '/account?done=delete_impersonating'
    assert delete_me(bob, password=PW, email='bob@example.com', code='000000') == '/account?done=delete_code'
    assert world.host_db.global_users[uid].is_active
    assert delete_me(bob, **form) == '/login?done=account_deleted'
    assert not world.host_db.global_users[uid].is_active
    with world.host_db.transaction() as conn:
        assert conn.execute(two_factor_t.select().where(two_factor_t.c.user_id == uid)).first() is None
    assert ann.get('/').text.endswith('as owner')  # the tenant goes on
