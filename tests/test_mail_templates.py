"""The kit's mail from `MailTemplates`: every kind has a plain-text part and an HTML part made from the same values,
escaped, with the brand at the top and each button's address written out; an app's own templates, passed to
`setup_saas(mail_templates=...)`, are the ones the real flows send over HTTP; the welcome follows a confirmation."""

import html as htmlib
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from fasthtml.common import FastHTML
from starlette.testclient import TestClient

import fh_saas.system_jobs  # noqa: F401 (registers the tenant.provision handler)
from fh_saas import passwords
from fh_saas.app import setup_saas
from fh_saas.billing import BillingPolicy, seed_plans
from fh_saas.db_host import GlobalUser, HostDatabase, Membership
from fh_saas.db_tenant import provision_tenant
from fh_saas.jobs import claim, complete, job_handlers, job_scope
from fh_saas.mail import MAIL_KINDS, MailTemplates, MemoryOutbox, html_part, send_mail, text_part
from fh_saas.passwords import send_email_verification
from fh_saas.sessions import SessionManager
from stripe_helpers import SECRET, event, sign

HOSTILE = '<script>alert(1)</script>'
LINK = 'https://app.test/x/tok?a=1&b=2'
ARGS = dict(
    verify_email=(LINK, timedelta(days=2)),
    password_reset=(LINK, timedelta(hours=1)),
    email_change=(HOSTILE, LINK, timedelta(days=1)),
    email_change_notice=(HOSTILE,),
    signup_taken=(LINK, LINK + '&reset=1'),
    welcome=(LINK,),
    invitation=(HOSTILE, 'member', LINK, timedelta(days=7)),
    payment_failed=(HOSTILE, LINK),
    account_deleted=(),
)
PW = 'correct horse battery'


@pytest.mark.parametrize('kind', MAIL_KINDS)
def test_every_kind_has_a_text_and_an_html_part_escaped_with_the_brand_on_top_and_the_link_written_out(kind):
    assert set(ARGS) == set(MAIL_KINDS)
    outbox = MemoryOutbox()
    send_mail(outbox, 'ann@example.com', getattr(MailTemplates(HOSTILE), kind)(*ARGS[kind]))
    msg = outbox.last_to('ann@example.com')
    assert msg.get_content_type() == 'multipart/alternative'
    assert [p.get_content_type() for p in msg.iter_parts()] == ['text/plain', 'text/html']
    text, html = text_part(msg), html_part(msg)
    assert HOSTILE in text and '<script' not in html and '<link' not in html and htmlib.escape(HOSTILE) in html
    brand = re.search(r'<body[^>]*>\s*<div[^>]*>\s*<p[^>]*>([^<]*)</p>', html).group(1)
    assert htmlib.unescape(brand) == HOSTILE
    if kind not in ('email_change_notice', 'account_deleted'):  # the two that link nowhere
        shown = htmlib.escape(LINK, quote=False)
        assert LINK in text and f'href="{shown}"' in html and f'Or open {shown}' in html


def test_a_subject_with_a_line_break_stays_one_header_line():
    mail = MailTemplates().invitation('Acme\r\nBcc: all@example.com', 'member', LINK, timedelta(days=7))
    outbox = MemoryOutbox()
    send_mail(outbox, 'ann@example.com', mail)
    msg = outbox.last_to('ann@example.com')
    assert msg['Subject'] == 'You are invited to Acme Bcc: all@example.com' and msg['Bcc'] is None


class AcmeMail(MailTemplates):
    "An app's own wording of the messages its users see first."

    def verify_email(self, link, ttl):
        return self.compose(f'{self.brand}: confirm your address', ['Acme wants to know it is you:'], link, 'Yes')

    def welcome(self, link):
        return self.compose(f'{self.brand}: you are in', ['Acme is glad to have you.'], link, 'Start')

    def password_reset(self, link, ttl):
        return self.compose(f'{self.brand}: new password', ['Acme can give you a new password:'], link, 'Reset')

    def invitation(self, tenant, role, link, ttl):
        return self.compose(f'{self.brand}: join {tenant}', [f'Acme asks you to join {tenant}:'], link, 'Join')


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.setenv('FH_SAAS_TENANT_DIR', str(tmp_path / 'tenants'))
    pool = ThreadPoolExecutor(2)
    monkeypatch.setattr(passwords, 'reset_mail_executor', pool)
    host_db, outbox = HostDatabase(f"sqlite:///{tmp_path / 'host.db'}"), MemoryOutbox()
    app = FastHTML(default_hdrs=False, secret_key='a' * 48)
    saas = setup_saas(
        app,
        host_db,
        sessions=SessionManager(host_db, 's' * 48),
        mailer=outbox,
        webhook_secrets=[],
        policy=BillingPolicy(free_plan='free'),
        base_url='https://app.test',
        brand='Acme Cloud',
        mail_templates=AcmeMail,
        dev=False,
    )
    seed_plans(host_db, [dict(id='free', name='Free')])
    yield saas, app, outbox, pool
    pool.shutdown(wait=True)
    saas.router.close()
    host_db.close()
    HostDatabase.reset_instance()


def _link(outbox, to) -> str:
    return re.search(r'https://app\.test(/\S+)', outbox.last_text(to)).group(1)


def _provision(host_db):
    while (job := claim(host_db, 'test-worker', ['tenant.provision'])) is not None:
        with job_scope(job):
            result = job_handlers['tenant.provision'](job)
        assert complete(host_db, job, result)


def test_the_apps_templates_are_sent_by_sign_up_confirmation_reset_and_invitation(site):
    saas, app, outbox, pool = site
    ann = TestClient(app, follow_redirects=False, base_url='https://app.test')
    r = ann.post('/signup', data=dict(email='ann@example.com', password=PW, name='Ann', company='Acme Corp'))
    assert r.status_code == 303
    mail = outbox.last_to('ann@example.com')
    assert mail['Subject'] == 'Acme Cloud: confirm your address' and 'Acme wants to know it is you:' in text_part(mail)
    assert html_part(mail).index('Acme Cloud') < html_part(mail).index('Acme wants')
    link = _link(outbox, 'ann@example.com')
    assert ann.get(link).status_code == 200
    welcome = outbox.last_to('ann@example.com')
    assert welcome['Subject'] == 'Acme Cloud: you are in' and 'https://app.test/' in text_part(welcome)

    assert TestClient(app).post('/password-reset', data=dict(email='ann@example.com')).status_code == 200
    pool.shutdown(wait=True)
    assert outbox.last_to('ann@example.com')['Subject'] == 'Acme Cloud: new password'
    assert _link(outbox, 'ann@example.com').startswith('/password-reset/')

    _provision(saas.host_db)
    ann.get('/tenants/acme_corp/status')
    token = re.search(r'value="([0-9a-f]{64})" name="csrf"', ann.get('/team').text).group(1)
    r = ann.post('/team/invite', data=dict(email='bob@example.com', role='member', csrf=token))
    assert r.status_code == 303 and 'Invitation sent.' in ann.get(r.headers['location']).text
    invitation = outbox.last_to('bob@example.com')
    assert invitation['Subject'] == 'Acme Cloud: join Acme Corp' and 'Acme asks you to join Acme Corp:' in text_part(
        invitation
    )
    assert _link(outbox, 'bob@example.com').startswith('/invitations/')


def test_the_welcome_is_sent_once_whichever_confirmation_link_is_used(site):
    saas, app, outbox, _ = site
    cli = TestClient(app, follow_redirects=False, base_url='https://app.test')
    assert cli.post('/signup', data=dict(email='ann@example.com', password=PW, company='Acme Corp')).status_code == 303
    first = _link(outbox, 'ann@example.com')
    user_id = saas.host_db.global_users()[0].id
    send_email_verification(
        saas.host_db, user_id, outbox, lambda tok: f'https://app.test/verify-email/{tok}', templates=saas.mail
    )
    second = _link(outbox, 'ann@example.com')
    assert first != second and cli.get(first).status_code == 200 and cli.get(second).status_code == 200
    subjects = [m['Subject'] for m in outbox.messages if m['To'] == 'ann@example.com']
    assert subjects == ['Acme Cloud: confirm your address'] * 2 + ['Acme Cloud: you are in']


def test_a_failed_invoice_payment_mails_each_active_owner_once(tmp_path, monkeypatch):
    "Through `setup_saas`'s webhook: owners only, active ones only, and a repeat delivery mails nobody again."
    monkeypatch.setenv('FH_SAAS_TENANT_DIR', str(tmp_path / 'tenants'))
    host_db, outbox = HostDatabase(f"sqlite:///{tmp_path / 'host.db'}"), MemoryOutbox()
    app = FastHTML(default_hdrs=False, secret_key='a' * 48)
    saas = setup_saas(
        app,
        host_db,
        sessions=SessionManager(host_db, 's' * 48),
        mailer=outbox,
        webhook_secrets=[SECRET],
        base_url='https://app.test',
        brand='Acme Cloud',
        dev=False,
    )
    try:
        provision_tenant(host_db, 'beta', '<script>Beta</script>')
        for uid, role, active in [
            ('ann', 'owner', True),
            ('bob', 'owner', True),
            ('cy', 'member', True),
            ('dee', 'owner', False),
        ]:
            host_db.global_users.insert(GlobalUser(id=uid, email=f'{uid}@example.com', is_active=active))
            host_db.memberships.insert(Membership(user_id=uid, tenant_id='beta', role=role))
        inv = dict(
            id='in_1',
            object='invoice',
            customer='cus_1',
            amount_due=900,
            attempt_count=1,
            parent=dict(subscription_details=dict(subscription='sub_1', metadata={'tenant_id': 'beta'})),
        )
        cli, answers = TestClient(app), []
        for body in [event('invoice.payment_failed', inv, 1_760_000_000, 'evt_failed')] * 2 + [
            event('invoice.paid', inv, 1_760_000_100, 'evt_paid')
        ]:
            answers.append(cli.post('/stripe/webhook', content=body, headers={'Stripe-Signature': sign(body)}).json())
        assert answers == [
            dict(status='processed', duplicate=False),
            dict(status='processed', duplicate=True),
            dict(status='processed', duplicate=False),
        ]
        assert sorted(m['To'] for m in outbox.messages) == ['ann@example.com', 'bob@example.com']
        mail = outbox.last_to('ann@example.com')
        assert mail['Subject'] == 'A payment for <script>Beta</script> failed' and '<script' not in html_part(mail)
        assert 'https://app.test/billing' in text_part(mail) and 'Acme Cloud' in html_part(mail)
    finally:
        saas.router.close()
        host_db.close()
        HostDatabase.reset_instance()
