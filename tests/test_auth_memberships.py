"Memberships under concurrency: a tenant always keeps an owner; an invitation is used once."

import time

import pytest
import sqlalchemy as sa

from fh_saas.api_keys import create_api_key, verify_api_key
from fh_saas.db_host import GlobalUser, TenantCatalog
from fh_saas.mail import MemoryOutbox
from fh_saas.memberships import (
    add_member,
    change_role,
    remove_member,
    transfer_ownership,
    invite,
    accept_invitation,
    decline_invitation,
    cancel_invitation,
    pending_invitations,
    LastOwner,
    MembershipError,
    Roles,
)
from fh_saas.one_time_tokens import InvalidToken


def _owners(db, t):
    return db.q("select count(*) n from core_memberships where tenant_id = :t and role = 'owner' and is_active", t=t)[
        0
    ]['n']


@pytest.fixture
def slow_owner_count(host_db):
    "Widen the race window: every owner count takes 150 ms longer (no barrier: correct code counts one at a time)."

    def slow(conn, cursor, statement, *args):
        if 'count(*)' in statement and 'core_memberships.role' in statement:
            time.sleep(0.15)

    sa.event.listen(host_db.engine, 'after_cursor_execute', slow)
    yield
    sa.event.remove(host_db.engine, 'after_cursor_execute', slow)


@pytest.fixture
def people(host_db):
    for u in ('ann', 'bob', 'cy'):
        host_db.global_users.insert(GlobalUser(id=u, email=f'{u}@example.com'))
    return host_db


@pytest.mark.parametrize('round', range(3))
def test_two_owners_demoting_each_other_keep_one_owner(people, slow_owner_count, race, round):
    db, t = people, f'tenant{round}'
    db.tenants.insert(TenantCatalog(id=t, name=t))
    add_member(db, t, 'ann', 'owner')
    add_member(db, t, 'bob', 'owner')
    results = race(
        [lambda: change_role(db, t, 'ann', 'admin'), lambda: change_role(db, t, 'bob', 'member')], catch=LastOwner
    )
    assert sorted(type(r).__name__ for r in results) == ['LastOwner', 'NoneType']
    assert _owners(db, t) == 1


def test_concurrent_remove_and_demote_keep_one_owner(people, slow_owner_count, race):
    db = people
    db.tenants.insert(TenantCatalog(id='acme', name='Acme'))
    add_member(db, 'acme', 'ann', 'owner')
    add_member(db, 'acme', 'bob', 'owner')
    add_member(db, 'acme', 'cy')
    results = race(
        [
            lambda: remove_member(db, 'acme', 'ann'),
            lambda: remove_member(db, 'acme', 'bob'),
            lambda: transfer_ownership(db, 'acme', 'ann', 'cy'),
        ],
        catch=MembershipError,
    )
    assert _owners(db, 'acme') >= 1
    assert all(r is None or isinstance(r, MembershipError) for r in results)
    audited = db.q(
        "select count(*) n from sys_audit_logs"
        " where event_type in ('membership.removed', 'membership.ownership_transferred')"
    )[0]['n']
    assert audited == sum(r is None for r in results)


def test_invitation_accepted_once_under_concurrency(people, race):
    db, outbox = people, MemoryOutbox()
    db.tenants.insert(TenantCatalog(id='acme', name='Acme'))
    add_member(db, 'acme', 'ann', 'owner')
    invite(db, 'acme', 'bob@example.com', 'member', 'ann', outbox, lambda t: t)
    token = outbox.last_text('bob@example.com').split('\n')[1]
    results = race(
        [lambda: accept_invitation(db, token, 'bob')] * 4 + [lambda: decline_invitation(db, token)], catch=InvalidToken
    )
    assert sum(not isinstance(r, Exception) for r in results) == 1
    assert all(isinstance(r, InvalidToken) for r in results if isinstance(r, Exception))
    assert (
        db.q(
            "select count(*) n from sys_audit_logs where event_type in ('invitation.accepted', 'invitation.declined')"
        )[0]['n']
        == 1
    )


@pytest.mark.parametrize('round', range(3))
def test_an_invitation_is_either_accepted_or_cancelled_never_both(people, race, round):
    db, outbox = people, MemoryOutbox()
    db.tenants.insert(TenantCatalog(id='acme', name='Acme'))
    add_member(db, 'acme', 'ann', 'owner')
    iid = invite(db, 'acme', 'bob@example.com', 'member', 'ann', outbox, lambda t: t)
    token = outbox.last_text('bob@example.com').split('\n')[1]
    accept, cancel = lambda: accept_invitation(db, token, 'bob'), lambda: cancel_invitation(db, 'acme', iid)
    accepted, cancelled = race([accept, cancel], catch=InvalidToken)
    member = not isinstance(accepted, Exception)
    assert member != cancelled and (member or isinstance(accepted, InvalidToken))
    assert len(db.memberships(where="tenant_id = 'acme' and user_id = 'bob'")) == int(member)
    assert pending_invitations(db, 'acme') == []
    events = {r['event_type'] for r in db.q("select event_type from sys_audit_logs where target_id = :i", i=iid)}
    assert events == {'invitation.created', 'invitation.accepted' if member else 'invitation.canceled'}


def test_invitations_are_listed_and_cancelled_within_their_tenant_only(people):
    db, outbox = people, MemoryOutbox()
    for t in ('acme', 'globex'):
        db.tenants.insert(TenantCatalog(id=t, name=t))
    iid = invite(db, 'acme', 'cy@example.com', 'admin', 'ann', outbox, lambda t: t)
    invite(db, 'globex', 'dee@example.com', 'member', 'gone-user', outbox, lambda t: t)
    assert [(r['id'], r['invited_by_email']) for r in pending_invitations(db, 'acme')] == [(iid, 'ann@example.com')]
    assert [(r['email'], r['invited_by_email']) for r in pending_invitations(db, 'globex')] == [
        ('dee@example.com', None)
    ]
    assert not cancel_invitation(db, 'globex', iid) and not cancel_invitation(db, 'acme', 'no-such-id')
    assert cancel_invitation(db, 'acme', iid) and pending_invitations(db, 'acme') == []
    assert len(pending_invitations(db, 'globex')) == 1


def test_invitation_expiry_and_wrong_recipient(people):
    from datetime import datetime, timedelta, timezone

    db, outbox, t0 = people, MemoryOutbox(), datetime(2026, 1, 1, tzinfo=timezone.utc)
    db.tenants.insert(TenantCatalog(id='acme', name='Acme'))
    add_member(db, 'acme', 'ann', 'owner')
    invite(db, 'acme', 'BOB@example.com', 'viewer', 'ann', outbox, lambda t: t, ttl=timedelta(days=1), now=t0)
    token = outbox.last_text('BOB@example.com').split('\n')[1]
    with pytest.raises(InvalidToken):
        accept_invitation(db, token, 'cy', now=t0)
    with pytest.raises(InvalidToken):
        accept_invitation(db, token, 'bob', now=t0 + timedelta(days=2))
    assert accept_invitation(db, token, 'bob', now=t0 + timedelta(hours=1)).role == 'viewer'


def open_invites(db, t='acme'):
    return sorted(r['email'] for r in pending_invitations(db, t))


def test_who_loses_the_right_to_invite_loses_the_invitations_they_sent(people):
    db, outbox = people, MemoryOutbox()
    for t in ('acme', 'globex'):
        db.tenants.insert(TenantCatalog(id=t, name=t))
    for user, role in (('ann', 'owner'), ('bob', 'admin'), ('cy', 'admin')):
        add_member(db, 'acme', user, role)
    add_member(db, 'globex', 'bob', 'owner')
    send = lambda t, email, by: invite(db, t, email, 'admin', by, outbox, lambda tok: tok)
    send('acme', 'bob.again@example.com', 'bob')
    send('acme', 'cy.two@example.com', 'cy')
    send('acme', 'by.ann@example.com', 'ann')
    send('globex', 'bob.globex@example.com', 'bob')
    token = outbox.last_text('bob.again@example.com').split('\n')[1]
    with pytest.raises(LastOwner):
        remove_member(db, 'acme', 'ann')  # refused: nothing is cancelled
    change_role(db, 'acme', 'cy', 'admin')  # still an inviter: nothing is cancelled
    assert open_invites(db) == ['bob.again@example.com', 'by.ann@example.com', 'cy.two@example.com']
    remove_member(db, 'acme', 'bob')
    assert open_invites(db) == ['by.ann@example.com', 'cy.two@example.com']
    assert open_invites(db, 'globex') == ['bob.globex@example.com']  # another tenant's are his to keep
    db.global_users.insert(GlobalUser(id='bob2', email='bob.again@example.com'))
    with pytest.raises(InvalidToken):
        accept_invitation(db, token, 'bob2')
    change_role(db, 'acme', 'cy', 'member')
    assert open_invites(db) == ['by.ann@example.com']
    transfer_ownership(db, 'acme', 'ann', 'cy', demote_to='member')
    assert open_invites(db) == []
    reasons = [
        r['details']
        for r in db.q("select details from sys_audit_logs where event_type = 'invitation.canceled' order by created_at")
    ]
    assert [('member_removed' in d, 'demoted' in d) for d in reasons] == [(True, False), (False, True), (False, True)]
    assert db.memberships(where="user_id = 'bob2'") == []


def test_an_invitation_whose_sender_can_no_longer_invite_is_refused_at_accept(people):
    "Belt and braces for invitations made before their sender lost the right to invite (no cancellation then)."
    db, outbox = people, MemoryOutbox()
    db.tenants.insert(TenantCatalog(id='acme', name='Acme'))
    add_member(db, 'acme', 'ann', 'owner')
    add_member(db, 'acme', 'bob', 'admin')
    tokens = {}
    for email in ('cy@example.com', 'cy2@example.com'):
        invite(db, 'acme', email, 'admin', 'bob', outbox, lambda tok: tok)
        tokens[email] = outbox.last_text(email).split('\n')[1]
    db.global_users.insert(GlobalUser(id='cy2', email='cy2@example.com'))
    db.q("update core_memberships set role = 'member' where user_id = 'bob'")
    with pytest.raises(InvalidToken, match='can no longer invite'):
        accept_invitation(db, tokens['cy@example.com'], 'cy')
    db.q("update core_memberships set role = 'admin', is_active = false where user_id = 'bob'")
    with pytest.raises(InvalidToken, match='can no longer invite'):
        accept_invitation(db, tokens['cy2@example.com'], 'cy2')
    assert db.memberships(where="user_id in ('cy', 'cy2')") == [] and len(pending_invitations(db, 'acme')) == 2
    db.q("update core_memberships set is_active = true where user_id = 'bob'")
    assert accept_invitation(db, tokens['cy@example.com'], 'cy').role == 'admin'


def test_removed_member_can_be_reinvited_and_custom_roles(people):
    db, roles = people, Roles(('guest', 'editor', 'boss'))
    db.tenants.insert(TenantCatalog(id='acme', name='Acme'))
    add_member(db, 'acme', 'ann', 'boss', roles=roles)
    add_member(db, 'acme', 'bob', 'editor', roles=roles)
    with pytest.raises(ValueError, match='unknown role'):
        change_role(db, 'acme', 'bob', 'owner', roles=roles)
    with pytest.raises(LastOwner):
        change_role(db, 'acme', 'ann', 'guest', roles=roles)
    remove_member(db, 'acme', 'bob', roles=roles)
    assert add_member(db, 'acme', 'bob', 'guest', roles=roles).is_active
    assert db.q("select count(*) n from core_memberships where user_id = 'bob'")[0]['n'] == 1


def test_removing_a_member_revokes_their_api_keys_for_that_tenant_only(people):
    db = people
    for t in ('acme', 'globex'):
        db.tenants.insert(TenantCatalog(id=t, name=t))
    add_member(db, 'acme', 'ann', 'owner')
    add_member(db, 'acme', 'bob', 'admin')
    add_member(db, 'globex', 'bob', 'owner')
    bobs = [create_api_key(db, 'acme', 'bob', f'bob {i}')[0] for i in range(2)]
    anns, bob_globex = create_api_key(db, 'acme', 'ann', 'ann')[0], create_api_key(db, 'globex', 'bob', 'bob')[0]
    remove_member(db, 'acme', 'bob')
    assert [verify_api_key(db, k) for k in bobs] == [None, None]
    assert verify_api_key(db, anns).created_by == 'ann' and verify_api_key(db, bob_globex).tenant_id == 'globex'
    add_member(db, 'acme', 'bob', 'admin')
    assert [verify_api_key(db, k) for k in bobs] == [None, None]  # coming back does not revive them
    revoked = db.q(
        "select target_id, details from sys_audit_logs where event_type = 'api_key.revoked' and tenant_id = 'acme'"
    )
    assert sorted(r['target_id'] for r in revoked) == sorted(k.split('_')[2] for k in bobs)
    assert all('member_removed' in str(r['details']) for r in revoked)


def test_a_refused_removal_revokes_no_key(people):
    db = people
    db.tenants.insert(TenantCatalog(id='acme', name='acme'))
    add_member(db, 'acme', 'ann', 'owner')
    key = create_api_key(db, 'acme', 'ann', 'ann')[0]
    with pytest.raises(LastOwner):
        remove_member(db, 'acme', 'ann')
    assert verify_api_key(db, key).created_by == 'ann'


def test_racing_adds_of_one_member_give_one_membership_and_a_clear_error(people, race):
    """Every add reads 'not a member yet' before any inserts; the unique index decides, and the losers get
    MembershipError."""
    db = people
    db.tenants.insert(TenantCatalog(id='acme', name='Acme'))

    def slow(conn, cursor, statement, *args):
        # a wider window, not a barrier: on SQLite the adds cannot overlap at all
        if statement.lstrip().upper().startswith('SELECT') and 'FROM core_memberships' in statement:
            time.sleep(0.15)

    sa.event.listen(db.engine, 'after_cursor_execute', slow)
    try:
        results = race([lambda: add_member(db, 'acme', 'cy', 'member')] * 4, catch=MembershipError)
    finally:
        sa.event.remove(db.engine, 'after_cursor_execute', slow)
    assert sorted(type(r).__name__ for r in results) == ['Membership'] + ['MembershipError'] * 3
    assert db.q("select count(*) n from core_memberships where tenant_id = 'acme' and user_id = 'cy'")[0]['n'] == 1


def test_the_invitations_upgrade_stores_their_addresses_normalised(people):
    "Invitations made before emails were normalised (component v1) are accepted by the account of their address."
    from fh_saas.memberships import invitations_component, invitations_t

    db, outbox = people, MemoryOutbox()
    db.tenants.insert(TenantCatalog(id='acme', name='Acme'))
    add_member(db, 'acme', 'ann', 'owner')
    invite(db, 'acme', 'bob@example.com', 'member', 'ann', outbox, lambda t: t)
    token = outbox.last_text('bob@example.com').split('\n')[1]
    db.q("update auth_invitations set email = 'BOB@Ｅxample.com'")
    db.q("update sys_schema_versions set version = 1 where component = 'invitations'")
    assert invitations_component.upgrade(db.engine) == 2
    with db.transaction() as conn:
        assert conn.execute(sa.select(invitations_t.c.email)).scalar() == 'bob@example.com'
    assert accept_invitation(db, token, 'bob').tenant_id == 'acme'
