"""The account parts under concurrency on PostgreSQL: sign-up (the unique email and the tenant primary key decide, never
a prior check), password changes and signing devices out (the row updates decide), an owner deleting a tenant, and
deleting an account (the tenant's row lock decides: a tenant never loses its last owner)."""

import threading
from functools import partial

import pytest
import sqlalchemy as sa
from argon2 import PasswordHasher

import fh_saas.system_jobs  # noqa: F401 (registers the tenant.deprovision handler)
from fh_saas.db_host import GlobalUser
from fh_saas.jobs import claim, complete, job_handlers, job_scope
from fh_saas.mail import MemoryOutbox
from fh_saas.memberships import MembershipError, SoleOwner, accept_invitation, add_member, change_role, invite
from fh_saas.memberships import transfer_ownership
from fh_saas.one_time_tokens import InvalidToken
from fh_saas.pages_auth import AccountError, AccountRefused, TooManyTenants, create_tenant, delete_account
from fh_saas.pages_auth import end_other_sessions, end_session
from fh_saas.pages_auth import live_sessions, session_handle, sign_up
from fh_saas.pages_tenants import delete_tenant, deleting_tenants
from fh_saas.passwords import LoginFailed, authenticate, change_password, hash_password
from fh_saas.sessions import SessionManager

pytestmark = pytest.mark.postgres
FAST = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
PW = 'correct horse battery'


def test_concurrent_signups_with_one_email_make_one_account(pg_host_db, race):
    email = lambda i: 'Ann@Example.com' if i % 2 else 'ann@example.com'
    out = race(
        [partial(sign_up, pg_host_db, email(i), 'long enough pw', None, f'Co {i}', FAST) for i in range(6)],
        catch=AccountError,
    )
    ok = [o for o in out if isinstance(o, tuple)]
    assert len(ok) == 1 and all(isinstance(o, AccountError) and 'already exists' in str(o) for o in out if o not in ok)
    db = pg_host_db
    assert (db.global_users.count, db.tenants.count, db.memberships.count, db.system_jobs.count) == (1, 1, 1, 1)


def test_concurrent_signups_of_one_company_get_distinct_tenants(pg_host_db, race):
    out = race(
        [partial(sign_up, pg_host_db, f'user{i}@example.com', 'long enough pw', None, 'Acme', FAST) for i in range(6)]
    )
    tids = sorted(o[1] for o in out)
    assert len(set(tids)) == 6 and 'acme' in tids and all(t == 'acme' or t.startswith('acme_') for t in tids)
    owners = pg_host_db.q(
        "select tenant_id, count(*) as n from core_memberships where role = 'owner' group by tenant_id"
    )
    assert sorted(r['tenant_id'] for r in owners) == tids and {r['n'] for r in owners} == {1}
    assert pg_host_db.system_jobs.count == 6


def test_racing_tenant_creations_at_the_cap_give_exactly_one_more_tenant(pg_host_db, race):
    uid, _ = sign_up(pg_host_db, 'ann@example.com', 'long enough pw', None, 'Co 0', FAST)
    for i in (1, 2):
        create_tenant(pg_host_db, uid, f'Co {i}')
    out = race(
        [partial(create_tenant, pg_host_db, uid, f'Racing {i}', max_owned=4) for i in range(8)], catch=TooManyTenants
    )
    assert sum(isinstance(o, str) for o in out) == 1 and sum(isinstance(o, TooManyTenants) for o in out) == 7
    owned = pg_host_db.q("select count(*) as n from core_memberships where user_id = :u and role = 'owner'", u=uid)
    assert owned[0]['n'] == pg_host_db.tenants.count == 4


def test_an_owners_deletion_racing_the_handover_of_ownership_is_queued_once_by_an_owner_or_refused(
    pg_host_db, race, tmp_path, monkeypatch
):
    monkeypatch.setenv('FH_SAAS_TENANT_DIR', str(tmp_path))
    db = pg_host_db
    ann, tid = sign_up(db, 'ann@example.com', 'long enough pw', None, 'Acme', FAST)
    db.tenants.update(dict(id=tid, status='active'))  # as the provisioning job would leave it
    db.global_users.insert(GlobalUser(id='bob', email='bob@example.com'))
    add_member(db, tid, 'bob', 'admin')
    out = race(
        [
            partial(delete_tenant, db, tid, ann, 'Acme'),
            partial(delete_tenant, db, tid, ann, 'Acme'),
            partial(transfer_ownership, db, tid, ann, 'bob'),
        ],
        catch=MembershipError,
    )
    order = [
        r['event_type']
        for r in db.q(
            "select event_type from sys_audit_logs where event_type in "
            "('tenant.delete_requested', 'membership.ownership_transferred') "
            "order by created_at, id"
        )
    ]
    if order[0] == 'tenant.delete_requested':  # ann was the owner when she deleted it: queued once
        assert sorted(out[:2], key=str) == [False, True] and order.count('tenant.delete_requested') == 1
    else:  # the handover came first: ann is no owner any more
        assert all(isinstance(o, MembershipError) for o in out[:2]) and order == ['membership.ownership_transferred']
    deleting = order[0] == 'tenant.delete_requested'
    assert db.q("select count(*) as n from sys_jobs where job_type = 'tenant.deprovision'")[0]['n'] == deleting
    assert deleting_tenants(db, 'bob') == ([dict(id=tid, name='Acme')] if deleting else [])
    if deleting:
        job = claim(db, 'test-worker', ['tenant.deprovision'])
        with job_scope(job):
            assert complete(db, job, job_handlers['tenant.deprovision'](job))
        assert db.tenants[tid].status == 'deleted' and deleting_tenants(db, 'bob') == []


def ann_with_devices(db, n):
    "Ann, on PostgreSQL, signed in on `n` devices: the session manager and her sessions."
    db.global_users.insert(GlobalUser(id='ann', email='ann@example.com', password_hash=hash_password(PW, FAST)))
    sessions = SessionManager(db, 'pg-account-secret-' + 'z' * 40)
    return sessions, [sessions.load(sessions.create('ann', None, f'10.0.0.{i}', 'Firefox/1 Linux')) for i in range(n)]


def live(sessions):
    return {s.id_hash for s in live_sessions(sessions, 'ann')}


def test_a_password_change_ends_every_other_session_and_keeps_this_one(pg_host_db):
    sessions, (here, *_) = ann_with_devices(pg_host_db, 3)
    change_password(sessions, here, PW, 'a new passphrase', FAST)
    assert live(sessions) == {here.id_hash}
    assert authenticate(pg_host_db, 'ann@example.com', 'a new passphrase', hasher=FAST).id == 'ann'
    (log,) = pg_host_db.audit_logs(where="event_type = 'auth.password_changed'")
    assert (log.actor_user_id, 'passphrase' in log.details) == ('ann', False)


def test_of_password_changes_racing_from_one_old_password_one_wins_and_keeps_its_session(pg_host_db, race):
    sessions, devices = ann_with_devices(pg_host_db, 4)
    out = race(
        [partial(change_password, sessions, d, PW, f'new passphrase {i}', FAST) for i, d in enumerate(devices)],
        catch=LoginFailed,
    )
    won = [i for i, o in enumerate(out) if not isinstance(o, LoginFailed)]
    assert len(won) == 1 and live(sessions) == {devices[won[0]].id_hash}
    assert authenticate(pg_host_db, 'ann@example.com', f'new passphrase {won[0]}', hasher=FAST).id == 'ann'
    assert len(pg_host_db.audit_logs(where="event_type = 'auth.password_changed'")) == 1


def test_two_devices_signing_out_one_session_together_end_it_once(pg_host_db, race):
    sessions, (a, b, lost) = ann_with_devices(pg_host_db, 3)
    out = race([partial(end_session, sessions, d, session_handle(lost.id_hash)) for d in (a, b)] * 2)
    assert sorted(out) == [False, False, False, True] and live(sessions) == {a.id_hash, b.id_hash}
    assert len(pg_host_db.audit_logs(where="event_type = 'account.session_ended'")) == 1


def test_devices_signing_out_every_other_one_together_end_each_session_once(pg_host_db, race):
    sessions, devices = ann_with_devices(pg_host_db, 4)
    out = race([partial(end_other_sessions, sessions, d) for d in devices])
    assert sum(out) == len(devices) - len(live(sessions)) and len(live(sessions)) <= 1
    assert len(pg_host_db.audit_logs(where="event_type = 'account.other_sessions_ended'")) == 4


def co_owners(db):
    "Ann and bob own Acme together, each signed in: `(tenant id, sessions, {user id: session})`."
    ann, tid = sign_up(db, 'ann@example.com', PW, None, 'Acme', FAST)
    db.global_users.insert(GlobalUser(id='bob', email='bob@example.com', password_hash=hash_password(PW, FAST)))
    add_member(db, tid, 'bob', 'owner')
    sessions = SessionManager(db, 'k' * 40)
    return tid, sessions, {u: sessions.load(sessions.create(u)) for u in (ann, 'bob')}


def owners(db, tid):
    return db.q("select user_id from core_memberships where tenant_id = :t and role = 'owner' and is_active", t=tid)


def deletion(sessions, record, email):
    return partial(delete_account, sessions, record, PW, email, None, MemoryOutbox(), hasher=FAST)


def test_co_owners_deleting_their_accounts_at_once_leave_the_tenant_one_of_them(pg_host_db, race):
    tid, sessions, rec = co_owners(pg_host_db)
    ann = next(u for u in rec if u != 'bob')
    out = race(
        [deletion(sessions, rec[ann], 'ann@example.com'), deletion(sessions, rec['bob'], 'bob@example.com')],
        catch=(SoleOwner, AccountRefused),
    )
    done = [o for o in out if isinstance(o, str)]
    assert len(done) == 1 and len(owners(pg_host_db, tid)) == 1
    refused = next(o for o in out if not isinstance(o, str))
    assert isinstance(refused, SoleOwner) or refused.code == 'delete_sole_owner'
    assert pg_host_db.q("select count(*) as n from sys_audit_logs where event_type = 'account.deleted'")[0]['n'] == 1


@pytest.mark.parametrize('step_down', ['demoted', 'hands over'])
def test_an_account_deletion_racing_the_other_owner_stepping_down_keeps_one_owner(pg_host_db, race, step_down):
    "Bob stops being an owner (demoting himself, or handing ownership to ann) while ann deletes her account."
    tid, sessions, rec = co_owners(pg_host_db)
    ann = next(u for u in rec if u != 'bob')
    other = (
        partial(change_role, pg_host_db, tid, 'bob', 'admin')
        if step_down == 'demoted'
        else partial(transfer_ownership, pg_host_db, tid, 'bob', ann)
    )
    out = race([deletion(sessions, rec[ann], 'ann@example.com'), other], catch=(AccountRefused, MembershipError))
    deleted, stepped_down = isinstance(out[0], str), out[1] is None
    assert deleted != stepped_down  # exactly one of the two went through
    assert [r['user_id'] for r in owners(pg_host_db, tid)] == (['bob'] if deleted else [ann])


def test_a_tenant_created_while_its_owner_deletes_the_account_is_refused_or_blocks_the_deletion(pg_host_db, race):
    tid, sessions, rec = co_owners(pg_host_db)
    out = race(
        [deletion(sessions, rec['bob'], 'bob@example.com'), partial(create_tenant, pg_host_db, 'bob', 'Bobs')],
        catch=(AccountRefused, MembershipError, AccountError),
    )
    deleted, created = isinstance(out[0], str), isinstance(out[1], str)
    assert deleted != created  # one of the two went through, never both
    orphans = pg_host_db.q(
        "select t.id from core_tenants t where not exists (select 1 from core_memberships m "
        "join core_users u on u.id = m.user_id where m.tenant_id = t.id and m.role = 'owner' "
        "and m.is_active and u.is_active)"
    )
    assert orphans == [] and pg_host_db.tenants.count == (1 if deleted else 2)


def lock_waiters(db) -> int:
    return db.q(
        "select count(*) as n from pg_stat_activity where wait_event_type = 'Lock' and datname = current_database()"
    )[0]['n']


def test_an_invitation_accepted_while_the_account_is_being_deleted_waits_for_it_and_is_refused(pg_host_db):
    co_owners(pg_host_db)
    other, _ = sign_up(pg_host_db, 'cy@example.com', PW, None, 'Globex', FAST)
    outbox = MemoryOutbox()
    invite(pg_host_db, 'globex', 'bob@example.com', 'member', other, outbox, str)
    token = outbox.last_text('bob@example.com').split('\n')[1]
    out = {}

    def accept():
        try:
            out['result'] = accept_invitation(pg_host_db, token, 'bob')
        except InvalidToken as e:
            out['result'] = e

    with pg_host_db.engine.connect() as deleting:  # what delete_account does to bob's row, not yet committed
        deleting.execute(sa.text("select id from core_users where id = 'bob' for update"))
        deleting.execute(
            sa.text("update core_users set is_active = false, email = 'deleted-bob@invalid' where id = 'bob'")
        )
        joining = threading.Thread(target=accept)
        joining.start()
        while joining.is_alive() and lock_waiters(pg_host_db) == 0:
            joining.join(0.02)
        deleting.commit()
    joining.join()
    assert isinstance(out['result'], InvalidToken)
    assert (
        pg_host_db.q(
            "select tenant_id from core_memberships where user_id = 'bob' and is_active and tenant_id = 'globex'"
        )
        == []
    )
