"""The demo's JSON API over real HTTP (the demo served by uvicorn in its own process), with keys minted in its host
database: list, create and delete projects, and every refusal in the one error shape (401, 403, 404, 422, 429)."""

import sqlite3
import time

import httpx
import pytest
from openapi_spec_validator import validate

from fh_saas.api_keys import create_api_key
from fh_saas.db_host import GlobalUser, HostDatabase
from fh_saas.memberships import add_member
from browser_helpers import served_demo

LIMIT = 12  # API calls per minute for each tenant and key mode, set through FH_SAAS_API_RATE_LIMIT


@pytest.fixture(scope='module')
def demo_api(tmp_path_factory):
    "The demo, a live and a test key of its owner, and a key of a viewer."
    folder = tmp_path_factory.mktemp('api-demo')
    with served_demo(folder, FH_SAAS_API_RATE_LIMIT=f'{LIMIT}/60') as base:
        host_db = HostDatabase(f"sqlite:///{folder / 'host.db'}")
        try:
            owner = host_db.global_users(where="email = 'demo@example.com'")[0]
            viewer = host_db.global_users.insert(GlobalUser(email='viewer@example.com'))
            add_member(host_db, 'demo', viewer.id, 'viewer')
            keys = dict(
                live=create_api_key(host_db, 'demo', owner.id, 'live')[0],
                test=create_api_key(host_db, 'demo', owner.id, 'test', mode='test')[0],
                viewer=create_api_key(host_db, 'demo', viewer.id, 'viewer')[0],
            )
        finally:
            host_db.close()
            HostDatabase.reset_instance()
        yield base, keys, folder / 'host.db'


def call(base, method, path, key=None, **kw) -> httpx.Response:
    headers = {'Authorization': f'Bearer {key}'} if key else {}
    return httpx.request(method, f'{base}/api{path}', headers=headers, timeout=10, **kw)


def error(r) -> tuple:
    "The status and error code of a refusal, checking its shape."
    body = r.json()
    assert set(body) == {'error'} and set(body['error']) == {'code', 'message'} and body['error']['message'], body
    return r.status_code, body['error']['code']


def test_a_key_lists_creates_and_deletes_projects(demo_api):
    base, keys, _ = demo_api
    r = call(base, 'POST', '/projects', keys['test'], json=dict(name='Launch plan'))
    assert r.status_code == 201
    project = r.json()
    assert project['name'] == 'Launch plan' and len(project['id']) == 32
    assert project in call(base, 'GET', '/projects', keys['viewer']).json()  # a viewer reads
    assert call(base, 'DELETE', f"/projects/{project['id']}", keys['test']).status_code == 204
    assert project not in call(base, 'GET', '/projects', keys['test']).json()


def test_every_refusal_has_the_one_shape(demo_api):
    base, keys, _ = demo_api
    assert error(call(base, 'GET', '/projects')) == (401, 'unauthenticated')
    assert error(call(base, 'GET', '/projects', 'sk_test_' + 'x' * 40))[0] == 401
    assert error(call(base, 'POST', '/projects', keys['viewer'], json=dict(name='No'))) == (403, 'forbidden')
    assert error(call(base, 'DELETE', '/projects/' + '0' * 32, keys['test'])) == (404, 'not_found')
    assert error(call(base, 'POST', '/projects', keys['test'], json=dict(name=''))) == (422, 'invalid')
    assert error(call(base, 'POST', '/projects', keys['test'], content=b'{"name": ')) == (422, 'invalid')
    assert error(call(base, 'POST', '/projects', keys['test'], json=dict(name='a\x00b'))) == (422, 'invalid')
    assert error(call(base, 'POST', '/projects', keys['test'], json=dict(name='x' * 201))) == (422, 'invalid')


def api_calls_used(host_file) -> int:
    with sqlite3.connect(host_file) as c:
        return c.execute("SELECT coalesce(sum(used), 0) FROM core_quota_usage WHERE quota = 'api_calls'").fetchone()[0]


def test_each_answered_call_counts_one_api_call_and_a_refused_one_none(demo_api):
    base, keys, host_file = demo_api
    before = api_calls_used(host_file)
    assert call(base, 'GET', '/projects', keys['test']).status_code == 200
    assert api_calls_used(host_file) == before + 1
    assert error(call(base, 'POST', '/projects', keys['test'], json=dict(name='')))[0] == 422
    assert error(call(base, 'POST', '/projects', keys['viewer'], json=dict(name='No')))[0] == 403
    assert api_calls_used(host_file) == before + 1


def test_a_browser_session_is_refused_on_the_api(demo_api):
    "A session cookie opens the pages, never the API, so no cross-site form can call it."
    base, _, _ = demo_api
    with httpx.Client(base_url=base, timeout=10) as browser:
        login = dict(email='demo@example.com', password='demo password 1234')
        assert browser.post('/login', data=login).status_code == 303
        assert browser.get('/projects').status_code == 200
        assert error(browser.get('/api/projects'))[0] == 401


def start_of_a_window(window: int, needs: float = 10):
    "Wait, if the current fixed window (they start at multiples of `window` seconds) has under `needs` seconds left."
    left = window - time.time() % window
    if left < needs:
        time.sleep(left + 0.1)


def test_the_rate_limit_answers_429_with_retry_after_per_key_mode(demo_api):
    base, keys, _ = demo_api
    start_of_a_window(60)  # so the LIMIT + 1 calls count in one window
    codes = [call(base, 'GET', '/projects', keys['live']).status_code for _ in range(LIMIT + 1)]
    assert codes[-1] == 429 and set(codes[:-1]) <= {200, 429}
    r = call(base, 'GET', '/projects', keys['live'])
    assert error(r) == (429, 'rate_limited') and 1 <= int(r.headers['retry-after']) <= 60
    assert call(base, 'GET', '/projects', keys['test']).status_code == 200  # the test mode counts apart


def test_the_openapi_document_is_valid_and_describes_the_projects(demo_api):
    base, _, _ = demo_api
    doc = httpx.get(f'{base}/api/openapi.json', timeout=10).json()
    validate(doc)  # OpenAPI 3.1, checked by openapi-spec-validator
    assert doc['openapi'] == '3.1.0'
    assert {(p, m) for p, ops in doc['paths'].items() for m in ops} == {
        ('/api/projects', 'get'),
        ('/api/projects', 'post'),
        ('/api/projects/{project_id}', 'delete'),
    }
    assert 'Create a project' in httpx.get(f'{base}/api/docs', timeout=10).text
