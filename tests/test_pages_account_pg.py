"Sign-up under concurrency on PostgreSQL: the unique email and the tenant primary key decide, never a prior check."
from functools import partial

import pytest
from argon2 import PasswordHasher

from fh_saas.pages_auth import AccountError, sign_up

pytestmark = pytest.mark.postgres
FAST = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)


def test_concurrent_signups_with_one_email_make_one_account(pg_host_db, race):
    email = lambda i: 'Ann@Example.com' if i % 2 else 'ann@example.com'
    out = race([partial(sign_up, pg_host_db, email(i), 'long enough pw', None, f'Co {i}', FAST) for i in range(6)],
               catch=AccountError)
    ok = [o for o in out if isinstance(o, tuple)]
    assert len(ok) == 1 and all(isinstance(o, AccountError) and 'already exists' in str(o) for o in out if o not in ok)
    db = pg_host_db
    assert (db.global_users.count, db.tenants.count, db.memberships.count, db.system_jobs.count) == (1, 1, 1, 1)


def test_concurrent_signups_of_one_company_get_distinct_tenants(pg_host_db, race):
    out = race([partial(sign_up, pg_host_db, f'user{i}@example.com', 'long enough pw', None, 'Acme', FAST)
                for i in range(6)])
    tids = sorted(o[1] for o in out)
    assert len(set(tids)) == 6 and 'acme' in tids and all(t == 'acme' or t.startswith('acme_') for t in tids)
    owners = pg_host_db.q("select tenant_id, count(*) as n from core_memberships where role = 'owner' "
                          "group by tenant_id")
    assert sorted(r['tenant_id'] for r in owners) == tids and {r['n'] for r in owners} == {1}
    assert pg_host_db.system_jobs.count == 6
