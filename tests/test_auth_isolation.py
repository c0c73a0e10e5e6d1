"""Isolation property: whatever users, tenants, memberships, credentials (genuine, tampered, swapped) and paths a
client combines, a request only ever reaches the database of the one tenant its credential entitles it to."""

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from fh_saas.api_keys import create_api_key
from fh_saas.db_host import Membership
from fh_saas.rate_limits import RateLimit
from auth_helpers import make_world

USERS, TENANTS = ['u0', 'u1', 'u2'], ['t0', 't1', 't2']
ROLES = ['viewer', 'member', 'admin', 'owner']


@pytest.fixture
def world(sqlite_host_db, tmp_path):
    w = make_world(sqlite_host_db, tmp_path, rate_limit=RateLimit(10**6, 60))
    for u in USERS:
        w.user(u)
    for t in TENANTS:
        w.tenant(t)
    yield w
    w.tenant_dbs.close()


@dataclass
class Model:
    "What the host database says, kept by the test independently of the code under test."

    members: dict
    tenant_ok: dict
    sub_ok: dict
    user_ok: dict

    def entitled(self, user, tenant) -> bool:
        return (
            self.user_ok[user]
            and self.members.get((user, tenant)) is not None
            and self.tenant_ok[tenant]
            and self.sub_ok[tenant]
        )


def _reset(w, memberships, tenant_ok, sub_ok):
    db = w.host_db
    for table in ('core_memberships', 'auth_sessions', 'auth_api_keys', 'auth_rate_counters'):
        db.q(f"delete from {table}")
    db.q("update core_users set is_active = true")
    for t in TENANTS:
        db.q("update core_tenants set status = :s where id = :t", s='active' if tenant_ok[t] else 'suspended', t=t)
        db.q(
            "update core_subscriptions set status = :s where tenant_id = :t", s='active' if sub_ok[t] else 'unpaid', t=t
        )
    for (u, t), role in memberships.items():
        db.memberships.insert(Membership(user_id=u, tenant_id=t, role=role))
    return Model(dict(memberships), dict(tenant_ok), dict(sub_ok), {u: True for u in USERS})


user, tenant = st.sampled_from(USERS), st.sampled_from(TENANTS)
mostly = st.sampled_from([True, True, True, False])


def events(pairs):
    "Requests (aimed mostly at real memberships, so the allowed path is exercised too) interleaved with changes."
    target = (
        st.one_of(st.sampled_from(pairs), st.sampled_from(pairs), st.tuples(user, tenant))
        if pairs
        else st.tuples(user, tenant)
    )
    request = st.builds(
        lambda ut, spoof, cred, path: dict(kind='request', user=ut[0], tenant=ut[1], spoof=spoof, cred=cred, path=path),
        target,
        tenant,
        st.sampled_from(
            [
                'session',
                'session',
                'session_tampered',
                'session_resigned',
                'key_bearer',
                'key_header',
                'key_wrong_secret',
                'key_mode_flipped',
                'none',
            ]
        ),
        st.sampled_from([('GET', '/notes'), ('POST', '/notes'), ('GET', '/api/notes'), ('GET', '/tenants')]),
    )
    change = st.one_of(
        st.builds(lambda ut: dict(kind='revoke', user=ut[0], tenant=ut[1]), target),
        st.fixed_dictionaries(dict(kind=st.just('suspend'), tenant=tenant)),
        st.fixed_dictionaries(dict(kind=st.just('block'), tenant=tenant)),
        st.fixed_dictionaries(dict(kind=st.just('deactivate'), user=user)),
    )
    return st.lists(st.one_of(request, request, request, request, change), min_size=2, max_size=10)


def _credential(w, ev):
    "Headers for `ev`'s credential, and whether it is genuine."
    u, t, cred = ev['user'], ev['tenant'], ev['cred']
    if cred.startswith('session'):
        cookie = w.sessions.create(u, t)
        if cred == 'session_tampered':  # a middle character: the signature's last one carries padding bits
            sid, sig = cookie.rsplit('.', 1)
            cookie = f"{sid}.{sig[:10]}{'A' if sig[10] != 'A' else 'B'}{sig[11:]}"
        if cred == 'session_resigned':  # a genuine session id under a signature made with another key
            from itsdangerous import Signer

            cookie = Signer('attacker-key-' + 'z' * 40, salt='fh_saas.session').sign(cookie.rsplit('.', 1)[0]).decode()
        return {'Cookie': f'{w.sessions.cookie_name}={cookie}'}, cred == 'session'
    if cred.startswith('key'):
        key, _ = create_api_key(w.host_db, t, u, 'prop', mode='live')
        if cred == 'key_wrong_secret':
            key = key[:-4] + ('abcd' if not key.endswith('abcd') else 'wxyz')
        if cred == 'key_mode_flipped':
            key = key.replace('sk_live_', 'sk_test_', 1)
        return (
            ({'Authorization': f'Bearer {key}'} if cred == 'key_bearer' else {'X-API-Key': key}),
            cred in ('key_bearer', 'key_header'),
        )
    return {}, False


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_request_reaches_another_tenants_database(world, data):
    memberships = data.draw(
        st.dictionaries(st.tuples(user, tenant), st.sampled_from(ROLES), min_size=1, max_size=9), 'memberships'
    )
    tenant_ok = data.draw(st.fixed_dictionaries({t: mostly for t in TENANTS}), 'tenant_ok')
    sub_ok = data.draw(st.fixed_dictionaries({t: mostly for t in TENANTS}), 'sub_ok')
    evs = data.draw(events(sorted(memberships)), 'events')
    w, model = world, _reset(world, memberships, tenant_ok, sub_ok)
    c = w.client()
    for ev in evs:
        if ev['kind'] == 'revoke':
            w.host_db.q(
                "update core_memberships set is_active = false where user_id = :u and tenant_id = :t",
                u=ev['user'],
                t=ev['tenant'],
            )
            model.members.pop((ev['user'], ev['tenant']), None)
        elif ev['kind'] == 'suspend':
            w.host_db.q("update core_tenants set status = 'suspended' where id = :t", t=ev['tenant'])
            model.tenant_ok[ev['tenant']] = False
        elif ev['kind'] == 'block':
            w.host_db.q("update core_subscriptions set status = 'canceled' where tenant_id = :t", t=ev['tenant'])
            model.sub_ok[ev['tenant']] = False
        elif ev['kind'] == 'deactivate':
            w.host_db.q("update core_users set is_active = false where id = :u", u=ev['user'])
            model.user_ok[ev['user']] = False
        else:
            headers, genuine = _credential(w, ev)
            headers |= {'X-Tenant-ID': ev['spoof']}
            method, path = ev['path']
            before = len(w.tenant_dbs.opened)
            r = c.request(
                method,
                f"{path}?tenant_id={ev['spoof']}",
                headers=headers,
                data=dict(body='note', tenant_id=ev['spoof']) if method == 'POST' else None,
            )
            opened = w.tenant_dbs.opened[before:]
            u, t = ev['user'], ev['tenant']
            event(
                f"{'genuine' if genuine else 'forged'} "
                f"{'entitled' if model.entitled(u, t) else 'refused'} -> {r.status_code}"
            )
            is_key = ev['cred'].startswith('key')
            if path == '/tenants' and genuine and not is_key and model.user_ok[u]:
                assert (r.status_code, opened) == (200, []), (ev, r.status_code, r.text)
            elif path == '/tenants' and is_key:  # a key acts inside its own tenant, never on a user's tenants
                assert r.status_code in (401, 403) and opened == [], (ev, r.status_code, r.text, opened)
            elif genuine and model.entitled(u, t):
                assert r.status_code == 200 and opened == [t], (ev, r.status_code, r.text, opened)
                if method == 'GET' and path != '/tenants':
                    assert r.json()['tenant'] == t
            else:
                assert r.status_code != 200 and opened == [], (ev, model, r.status_code, r.text, opened)
    for t in TENANTS:
        rows = w.tenant_dbs.dbs[t].q("select written_for from notes")
        assert {r['written_for'] for r in rows} <= {t}
