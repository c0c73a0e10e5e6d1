"Login, throttling (across processes), rehashing, constant-time misses, reset and verification tokens."

import socket, subprocess, sys, textwrap, threading
from functools import partial
from datetime import timedelta
from email import message_from_string, policy as email_policy
from pathlib import Path

import pytest
import sqlalchemy as sa
from argon2 import PasswordHasher

from fh_saas.db_host import GlobalUser
from fh_saas import passwords
from fh_saas.mail import MailTemplates, MemoryOutbox, SMTPMailer, html_part, send_mail, text_part
from fh_saas.oauth import ExternalIdentity, link_or_create_user
from fh_saas.passwords import (
    authenticate,
    hash_password,
    request_password_reset,
    reset_password,
    LoginFailed,
    LoginThrottle,
    send_email_verification,
    verify_email,
    WeakPassword,
)
from fh_saas.rate_limits import RateLimit
from fh_saas.sessions import SessionManager
from fh_saas.one_time_tokens import InvalidToken
from auth_helpers import make_world, FAST, SECRET
from pgserver import wait_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def world(sqlite_host_db, tmp_path):
    w = make_world(sqlite_host_db, tmp_path, throttle=LoginThrottle(RateLimit(3, 900), RateLimit(5, 900)))
    w.user('ann')
    w.user('bob')
    w.tenant('acme')
    w.member('ann', 'acme')
    yield w
    w.tenant_dbs.close()


def _login(c, who, pw):
    return c.post('/login', data=dict(email=f'{who}@example.com', password=pw))


def test_unknown_email_and_wrong_password_look_the_same_and_are_audited(world):
    c = world.client()
    a, b = _login(c, 'ann', 'wrong password'), _login(c, 'nobody', 'wrong password')
    assert (a.status_code, a.text) == (b.status_code, b.text) == (401, 'wrong email or password')
    rows = world.host_db.audit_logs(where="event_type = 'auth.login_failed'", order_by='created_at')
    assert [(r.target_id, r.ip_address) for r in rows] == [('ann', 'testclient'), (None, 'testclient')]
    assert 'wrong password' not in str([r.details for r in rows])


class CountingHasher(PasswordHasher):
    "A real argon2 hasher that counts verifications."

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.verifies = 0

    def verify(self, h, pw):
        self.verifies += 1
        return super().verify(h, pw)


def test_unknown_user_still_costs_one_argon2_verification(world):
    h = CountingHasher(time_cost=1, memory_cost=8192, parallelism=1)
    world.host_db.global_users.insert(GlobalUser(id='oauth-only', email='o@example.com'))
    for email in ('nobody@example.com', 'o@example.com', 'ann@example.com'):
        with pytest.raises(LoginFailed):
            authenticate(world.host_db, email, 'whatever123', hasher=h)
    assert h.verifies == 3


def test_account_throttle_blocks_even_the_right_password_then_resets(world):
    c = world.client()
    assert [_login(c, 'ann', f'bad{i}xxxx').status_code for i in range(3)] == [401] * 3
    r = _login(c, 'ann', 'correct horse battery')
    assert r.status_code == 429 and 0 < int(r.headers['retry-after']) <= 900
    world.clock.advance(seconds=900)
    assert _login(c, 'ann', 'correct horse battery').status_code == 303


def test_ip_throttle_spans_accounts(world):
    c = world.client()
    codes = [_login(c, who, 'bad password').status_code for who in ('ann', 'bob', 'x1', 'x2', 'x3')]
    assert codes == [401] * 5
    assert _login(c, 'bob', 'correct horse battery').status_code == 429


def test_rehash_when_parameters_change(world):
    stronger = PasswordHasher(time_cost=2, memory_cost=8192, parallelism=1)
    authenticate(world.host_db, 'ann@example.com', 'correct horse battery', hasher=stronger)
    stored = world.host_db.global_users['ann'].password_hash
    assert ',t=2,' in stored and not stronger.check_needs_rehash(stored)
    authenticate(world.host_db, 'ann@example.com', 'correct horse battery', hasher=stronger)
    assert world.host_db.global_users['ann'].password_hash == stored


def test_reset_link_single_use_expiring_and_only_hash_stored(world):
    outbox = MemoryOutbox()
    request_password_reset(
        world.host_db, 'ann@example.com', outbox, lambda t: f'https://x/reset?t={t}', now=world.clock()
    ).result(timeout=10)
    token = outbox.last_text('ann@example.com').split('t=')[1].split()[0]
    assert token not in str(world.host_db.q("select * from auth_one_time_tokens"))
    with pytest.raises(WeakPassword):
        reset_password(world.sessions, token, 'short', FAST)
    world.clock.advance(minutes=59)
    assert reset_password(world.sessions, token, 'brand new password', FAST) == 'ann'
    with pytest.raises(InvalidToken):
        reset_password(world.sessions, token, 'another password', FAST)
    request_password_reset(world.host_db, 'ann@example.com', outbox, lambda t: t, now=world.clock()).result(timeout=10)
    late = outbox.last_text('ann@example.com').split('\n')[1]
    world.clock.advance(minutes=61)
    with pytest.raises(InvalidToken):
        reset_password(world.sessions, late, 'another password', FAST)
    events = [r.event_type for r in world.host_db.audit_logs(order_by='created_at')]
    assert events.count('auth.password_reset') == 1 and events.count('auth.password_reset_requested') == 2


def test_email_verification_single_use(world):
    outbox = MemoryOutbox()
    send_email_verification(world.host_db, 'bob', outbox, lambda t: t)
    token = outbox.last_text('bob@example.com').split('\n')[1]
    assert verify_email(world.host_db, token) == 'bob' and world.host_db.global_users['bob'].email_verified_at
    with pytest.raises(InvalidToken):
        verify_email(world.host_db, token)


@pytest.mark.postgres
def test_reset_token_used_once_under_concurrency(pg_host_db, race):
    host_db = pg_host_db
    host_db.global_users.insert(
        GlobalUser(id='ann', email='ann@example.com', password_hash=hash_password('old password', FAST))
    )
    sessions, outbox = SessionManager(host_db, SECRET), MemoryOutbox()
    request_password_reset(host_db, 'ann@example.com', outbox, lambda t: t).result(timeout=10)
    token = outbox.last_text('ann@example.com').split('\n')[1]
    results = race(
        [partial(reset_password, sessions, token, f'new password {i}', FAST) for i in range(8)], catch=InvalidToken
    )
    assert sum(r == 'ann' for r in results) == 1
    assert host_db.q("select count(*) n from sys_audit_logs where event_type = 'auth.password_reset'")[0]['n'] == 1


WORKER = textwrap.dedent('''
    import sys
    from argon2 import PasswordHasher
    from fh_saas.db_host import HostDatabase
    from fh_saas.passwords import authenticate, LoginThrottle, LoginThrottled, LoginFailed
    from fh_saas.rate_limits import RateLimit
    db = HostDatabase(sys.argv[1])
    throttle, fast = (LoginThrottle(RateLimit(7, 900), RateLimit(1000, 900)),
                      PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1))
    counted = 0
    for _ in range(10):
        try: authenticate(db, 'ann@example.com', 'wrong password', '192.0.2.1', throttle=throttle, hasher=fast)
        except LoginThrottled: pass
        except LoginFailed: counted += 1
    print(counted)
''')


@pytest.mark.postgres
def test_login_throttle_holds_across_worker_processes(pg_host_db, pg_url):
    "Three processes guess 10 times each; exactly `per_account.limit` guesses get a password check in total."
    pg_host_db.global_users.insert(
        GlobalUser(id='ann', email='ann@example.com', password_hash=hash_password('right password', FAST))
    )
    procs = [
        subprocess.Popen(
            [sys.executable, '-c', WORKER, pg_url],
            stdout=subprocess.PIPE,
            text=True,
            env={'PYTHONPATH': str(ROOT), 'PATH': '/usr/bin:/bin'},
        )
        for _ in range(3)
    ]
    counted = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert sum(counted) == 7, counted


@pytest.mark.postgres
@pytest.mark.parametrize('password', ['right password', 'wrong password'])
def test_a_login_is_two_host_transactions(pg_host_db, password):
    "The throttle counts and the account in one, then the login (or the failure), its audit row and the session."
    pg_host_db.global_users.insert(
        GlobalUser(id='ann', email='ann@example.com', password_hash=hash_password('right password', FAST))
    )
    sessions, ended = SessionManager(pg_host_db, SECRET), []
    for end in ('commit', 'rollback'):
        sa.event.listen(pg_host_db.engine, end, lambda conn: ended.append(1))
    try:
        user, cookie = passwords.login(sessions, 'ann@example.com', password, '10.0.0.1', hasher=FAST)
    except LoginFailed:
        user = cookie = None
    assert len(ended) == 2
    assert (user is not None and sessions.load(cookie).user_id == user.id) == (password == 'right password')
    events = [r.event_type for r in pg_host_db.audit_logs(order_by='created_at')]
    assert events == ['auth.login' if password == 'right password' else 'auth.login_failed']


class _SMTPSink(threading.Thread):
    "A minimal SMTP server (just enough of RFC 5321 for smtplib) that keeps the last message."

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))
        self.sock.listen(1)
        self.port, self.data, self.rcpt = self.sock.getsockname()[1], None, []

    def run(self):
        conn, _ = self.sock.accept()
        f = conn.makefile('rwb')

        def reply(s):
            f.write(s.encode() + b'\r\n')
            f.flush()

        reply('220 sink')
        while line := f.readline().decode().rstrip('\r\n'):
            cmd = line[:4].upper()
            if cmd in ('EHLO', 'HELO'):
                reply('250 sink')
            elif cmd == 'RCPT':
                self.rcpt.append(line)
                reply('250 ok')
            elif cmd == 'DATA':
                reply('354 go')
                lines = []
                while (ln := f.readline().decode()) not in ('.\r\n', ''):
                    lines.append(ln)
                self.data = ''.join(lines)
                reply('250 queued')
            elif cmd == 'QUIT':
                reply('221 bye')
                break
            else:
                reply('250 ok')
        conn.close()
        self.sock.close()


def test_smtp_mailer_delivers():
    sink = _SMTPSink()
    sink.start()
    SMTPMailer('127.0.0.1', sink.port, sender='app@example.com', starttls=False).send(
        'ann@example.com', 'Hi', 'link: https://x/y'
    )
    sink.join(10)
    assert 'ann@example.com' in sink.rcpt[0] and 'Subject: Hi' in sink.data and 'link: https://x/y' in sink.data


def test_smtp_mailer_delivers_a_template_as_text_then_html():
    sink = _SMTPSink()
    sink.start()
    mail = MailTemplates('Acme').invitation('<b>Beta</b>', 'member', 'https://x/invitations/tok', timedelta(days=7))
    send_mail(SMTPMailer('127.0.0.1', sink.port, sender='app@example.com', starttls=False), 'ann@example.com', mail)
    sink.join(10)
    msg = message_from_string(sink.data.replace('\r\n', '\n'), policy=email_policy.default)  # as a client reads it
    assert msg.get_content_type() == 'multipart/alternative' and msg['Subject'] == 'You are invited to <b>Beta</b>'
    assert [p.get_content_type() for p in msg.iter_parts()] == ['text/plain', 'text/html']
    assert text_part(msg) == mail.text
    assert text_part(msg).startswith('Join <b>Beta</b> as member:\nhttps://x/invitations/tok\n')
    assert '&lt;b&gt;Beta&lt;/b&gt;' in html_part(msg) and 'Or open https://x/invitations/tok' in html_part(msg)


def test_a_password_reset_spends_every_other_open_reset_link(world):
    outbox, link = MemoryOutbox(), lambda tok: f'/password-reset/{tok}'
    tokens = []
    for _ in range(2):
        request_password_reset(world.host_db, 'ann@example.com', outbox, link).result(timeout=10)
        tokens.append(outbox.last_text('ann@example.com').split('/password-reset/')[1].split()[0])
    reset_password(world.sessions, tokens[0], 'a brand new password', FAST)
    with pytest.raises(InvalidToken):
        reset_password(world.sessions, tokens[1], 'the leaked link wins', FAST)
    assert authenticate(world.host_db, 'ann@example.com', 'a brand new password', hasher=FAST)


def test_the_audit_log_keeps_no_password_typed_into_the_email_field(world):
    c = world.client()
    c.post('/login', data=dict(email='hunter2 my secret', password='x'))
    c.post('/login', data=dict(email='ann@example.com', password='x'))
    details = [
        r.details for r in world.host_db.audit_logs(where="event_type = 'auth.login_failed'", order_by='created_at')
    ]
    assert 'hunter2' not in str(details) and '[not an email address]' in details[0] and 'ann@example.com' in details[1]


@pytest.mark.parametrize("stored", ["", None])
def test_an_account_without_a_password_never_matches(stored):
    from fh_saas.passwords import verify_password

    assert verify_password(stored, "fh_saas-no-such-user", FAST) == (False, None)
    assert verify_password(stored, "", FAST) == (False, None)


class HeldMailer:
    "A real outbox whose sends wait until `release` is set (a slow SMTP server), recording the thread they ran on."

    def __init__(self):
        self.outbox, self.release, self.threads = MemoryOutbox(), threading.Event(), []

    def send(self, to, subject, body, html=None):
        self.threads.append(threading.get_ident())
        self.release.wait(5)
        self.outbox.send(to, subject, body, html)


@pytest.mark.parametrize('email', ['ann@example.com', 'nobody@example.com'])
def test_a_reset_request_does_the_same_work_whether_or_not_the_account_exists(world, email):
    "The caller's thread only hands the request over: no query, no token, no mail on it, so its time tells nothing."
    caller, statements, mailer = threading.get_ident(), [], HeldMailer()

    def on_caller_thread(*_):
        if threading.get_ident() == caller:
            statements.append(1)

    sa.event.listen(world.host_db.engine, 'before_cursor_execute', on_caller_thread)
    try:
        done = request_password_reset(world.host_db, email, mailer, lambda t: f'https://x/reset?t={t}')
        assert statements == []
        # returned while the mail server holds the send
        if email.startswith('ann'):
            assert not done.done()
    finally:
        sa.event.remove(world.host_db.engine, 'before_cursor_execute', on_caller_thread)
    mailer.release.set()
    done.result(timeout=10)
    assert [m['To'] for m in mailer.outbox.messages] == ([email] if email.startswith('ann') else [])
    assert caller not in mailer.threads


def test_a_failed_reset_mail_is_logged_without_the_link(world, caplog):
    class Down:
        def send(self, to, subject, body, html=None):
            raise ConnectionRefusedError("smtp is down")

    done = request_password_reset(world.host_db, 'ann@example.com', Down(), lambda t: f'https://x/reset?t={t}')
    with pytest.raises(ConnectionRefusedError):
        done.result(timeout=10)
    assert wait_for(lambda: 'password reset' in caplog.text)  # the done-callback may run just after result()
    assert 'password reset' in caplog.text and 'smtp is down' in caplog.text and 'reset?t=' not in caplog.text


@pytest.mark.parametrize('moment', ['after_the_password_check', 'after_the_login'])
def test_a_claim_by_the_emails_owner_racing_a_password_login_leaves_the_squatter_no_session(
    host_db, monkeypatch, moment
):
    """Mallory registered victim@corp.com unconfirmed; the victim's verified OAuth sign-in claims it while Mallory logs
    in. The login records itself and opens its session in one transaction under the user row's lock, so a claim
    comes either before it (the password no longer matches) or after it (and ends the session it opened)."""
    host_db.global_users.insert(
        GlobalUser(id='squat', email='victim@corp.com', password_hash=hash_password('mallory pw 123', FAST))
    )
    sessions = SessionManager(host_db, SECRET)
    claim = lambda: link_or_create_user(sessions, ExternalIdentity('google', 'victim-sub', 'victim@corp.com', True))
    if moment == 'after_the_password_check':
        check = passwords.verify_password
        monkeypatch.setattr(passwords, 'verify_password', lambda *a: (check(*a), claim())[0])
        with pytest.raises(LoginFailed):
            passwords.login(sessions, 'victim@corp.com', 'mallory pw 123', hasher=FAST)
    else:
        _, cookie = passwords.login(sessions, 'victim@corp.com', 'mallory pw 123', hasher=FAST)
        claim()
        assert sessions.load(cookie) is None
    live = host_db.q("select count(*) n from auth_sessions where user_id = 'squat' and revoked_at is null")[0]['n']
    assert live == 0 and host_db.global_users['squat'].password_hash is None


def test_an_email_is_one_address_in_any_letter_case_and_unicode_form(host_db):
    "Sign-up, login, reset, invitations, OAuth linking and admin search agree on who `Émile@` is, on both backends."
    from fh_saas.memberships import accept_invitation, add_member, invite
    from fh_saas.pages_admin import admin_users
    from fh_saas.pages_auth import AccountError, sign_up

    uid, tid = sign_up(host_db, ' Émile@Example.COM ', 'correct horse', None, 'Émile Co', FAST)
    assert host_db.global_users[uid].email == 'émile@example.com'
    with pytest.raises(AccountError):
        sign_up(host_db, 'émile@example.com', 'correct horse', None, None, FAST)
    for typed in ('ÉMILE@example.com', 'émile@EXAMPLE.com', 'E\u0301mile@example.com'):  # decomposed É too
        assert authenticate(host_db, typed, 'correct horse', hasher=FAST).id == uid, typed
    outbox = MemoryOutbox()
    request_password_reset(host_db, 'ÉMILE@EXAMPLE.COM', outbox, lambda t: t).result()
    assert [m['To'] for m in outbox.messages] == ['émile@example.com']
    host_db.global_users.insert(GlobalUser(id='zoe', email='zoe@example.com'))
    host_db.tenants.insert(dict(id='other', name='Other'))
    add_member(host_db, 'other', 'zoe', 'owner')
    invite(host_db, 'other', 'ÉMILE@example.com', 'member', 'zoe', outbox, lambda t: t)
    token = outbox.last_text('ÉMILE@example.com').split('\n')[1]
    assert accept_invitation(host_db, token, uid).tenant_id == 'other'
    sessions = SessionManager(host_db, SECRET)
    assert link_or_create_user(sessions, ExternalIdentity('google', 'g-1', 'Émile@example.com', True)).id == uid
    assert link_or_create_user(sessions, ExternalIdentity('github', 'h-2', 'ZOÉ@x.io', True)).email == 'zoé@x.io'
    assert [r['id'] for r in admin_users(host_db, 'ÉMILE')] == [uid]
    assert host_db.global_users.count == 3
