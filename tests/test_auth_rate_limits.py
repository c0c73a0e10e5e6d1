"The fixed-window counter on PostgreSQL: exact under concurrent hits from many threads, each with its own connection."
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pytest

from fh_saas.rate_limits import RateLimit, hit, hits_so_far


@pytest.mark.postgres
def test_exactly_limit_hits_allowed_under_concurrency(pg_host_db):
    rule, now = RateLimit(limit=25, window=60), datetime(2026, 5, 1, 10, 0, 30, tzinfo=timezone.utc)
    barrier = threading.Barrier(8)
    def worker(_):
        barrier.wait()
        return [hit(pg_host_db, 'api:acme:live', rule, now) for _ in range(10)]
    with ThreadPoolExecutor(8) as ex: decisions = [d for ds in ex.map(worker, range(8)) for d in ds]
    assert sum(d.allowed for d in decisions) == 25
    assert sorted(d.hits for d in decisions) == list(range(1, 81))
    assert {d.retry_after for d in decisions if not d.allowed} == {30}
    assert hits_so_far(pg_host_db, 'api:acme:live', rule, now) == 80
