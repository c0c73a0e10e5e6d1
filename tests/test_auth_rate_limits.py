"""The fixed-window counter: exact under concurrent hits from many threads, and kept even when the caller's transaction
rolls back."""

from datetime import datetime, timezone

import pytest

from argon2 import PasswordHasher

from fh_saas.db_host import GlobalUser
from fh_saas.passwords import LoginFailed, LoginThrottle, LoginThrottled, authenticate, hash_password
from fh_saas.rate_limits import RateLimit, hit, hits_so_far

FAST = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)


@pytest.mark.postgres
def test_exactly_limit_hits_allowed_under_concurrency(pg_host_db, race):
    rule, now = RateLimit(limit=25, window=60), datetime(2026, 5, 1, 10, 0, 30, tzinfo=timezone.utc)

    def worker():
        return [hit(pg_host_db, 'api:acme:live', rule, now) for _ in range(10)]

    decisions = [d for ds in race([worker] * 8) for d in ds]
    assert sum(d.allowed for d in decisions) == 25
    assert sorted(d.hits for d in decisions) == list(range(1, 81))
    assert {d.retry_after for d in decisions if not d.allowed} == {30}
    assert hits_so_far(pg_host_db, 'api:acme:live', rule, now) == 80


class AppError(Exception):
    "An application's own failure, which rolls its transaction back."


@pytest.mark.postgres
def test_a_hit_inside_a_transaction_that_rolls_back_still_counts(pg_host_db):
    rule = RateLimit(limit=1, window=60)
    with pytest.raises(AppError), pg_host_db.transaction():
        assert hit(pg_host_db, 'signup:ip:1.2.3.4', rule).allowed
        raise AppError()
    assert not hit(pg_host_db, 'signup:ip:1.2.3.4', rule).allowed


@pytest.mark.postgres
def test_failed_logins_inside_the_callers_transaction_reach_the_throttle(pg_host_db):
    pg_host_db.global_users.insert(
        GlobalUser(id='ann', email='ann@example.com', password_hash=hash_password('right password', FAST))
    )
    throttle = LoginThrottle(RateLimit(3, 900), RateLimit(50, 900))

    def attempt(password):
        with pg_host_db.transaction():
            return authenticate(pg_host_db, 'ann@example.com', password, '10.0.0.1', throttle=throttle, hasher=FAST)

    for _ in range(3):
        with pytest.raises(LoginFailed) as e:
            attempt('wrong password')
        assert type(e.value) is LoginFailed
    with pytest.raises(LoginThrottled):
        attempt('right password')


def test_on_sqlite_counting_inside_a_transaction_is_refused_clearly(sqlite_host_db):
    "SQLite has one writer and the open transaction holds it: a separate counting transaction could only wait."
    with pytest.raises(RuntimeError, match='outside host_db.transaction'), sqlite_host_db.transaction():
        hit(sqlite_host_db, 'api:acme:live', RateLimit(5, 60))
    assert hit(sqlite_host_db, 'api:acme:live', RateLimit(5, 60)).hits == 1
