"""`fh-saas` as a developer and an operator meet it: a new project that passes its own test and serves, `.env`
settings, the app's tenant migrations through `--app`, API keys, plans, help for everything, and one line with exit
status 2 (no traceback) for each kind of operator mistake."""

import argparse, json, os, re, secrets, shutil, signal, sqlite3, subprocess, sys, time
from pathlib import Path

import httpx
import pytest

from fh_saas.api_keys import verify_api_key
from fh_saas.cli import main, parser
from fh_saas.db_host import GlobalUser, HostDatabase
from fh_saas.db_tenant import provision_tenant
from fh_saas.memberships import add_member
from pgserver import free_port

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = ('DB_', 'FH_SAAS_', 'STRIPE_', 'SMTP_')
KEY = secrets.token_urlsafe(32)  # the master key of the `here` folder


def clean_env(**settings) -> dict:
    "This environment without any DB_/FH_SAAS_/STRIPE_/SMTP_ setting, this checkout's code, a master key, `settings`."
    env = {k: v for k, v in os.environ.items() if not k.startswith(OUTSIDE)}
    return env | dict(PYTHONPATH=str(ROOT), FH_SAAS_SECRET_KEY=secrets.token_urlsafe(48)) | settings


def fh_saas_cmd(*args) -> list[str]:
    "`fh-saas ARGS` run as the console script runs it: this checkout's code, the current folder not on sys.path (-P)."
    return [sys.executable, '-P', '-m', 'fh_saas.cli', *args]


def fh_saas(*args, cwd, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        fh_saas_cmd(*args),
        cwd=cwd,
        env=clean_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )


def one_line_mistake(stderr: str, starts: str):
    "A mistake is said in one line on stderr, with no traceback."
    assert 'Traceback' not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(starts), stderr


@pytest.fixture
def here(tmp_path, monkeypatch):
    "The current folder is `tmp_path`, with a SQLite host database there and only these DB_/FH_SAAS_ settings."
    saved = dict(os.environ)
    for k in [k for k in os.environ if k.startswith(OUTSIDE)]:
        del os.environ[k]
    os.environ.update(DB_TYPE='SQLITE', DB_NAME=str(tmp_path / 'host.db'), FH_SAAS_SECRET_KEY=KEY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'path', list(sys.path))  # import_app puts the current folder on it
    yield tmp_path
    if HostDatabase._instance is not None:
        HostDatabase._instance.close()
    HostDatabase.reset_instance()
    os.environ.clear()
    os.environ.update(saved)


def tenant_versions(host_file: Path) -> dict:
    with sqlite3.connect(host_file) as c:
        return dict(c.execute('SELECT id, schema_version FROM core_tenants'))


# --- a new project ---------------------------------------------------------------------------------------------


def test_a_new_project_passes_its_own_test_and_serves(tmp_path):
    r = fh_saas('new', 'demoapp', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    project = tmp_path / 'demoapp'
    assert {p.name for p in project.iterdir()} == {'app.py', 'test_app.py', '.env.example', '.gitignore', 'README.md'}
    key = re.search(r'^FH_SAAS_SECRET_KEY=(\S+)$', (project / '.env.example').read_text(), re.M).group(1)
    assert len(key) == 64
    assert 'register_tenant_migration(4' in (project / 'app.py').read_text()
    if ruff := shutil.which('ruff'):  # the starter is written in this repository's style
        lint = subprocess.run(
            [
                ruff,
                'check',
                '--isolated',
                '--no-cache',
                '--line-length',
                '120',
                '--select',
                'E,F,W,B',
                '--ignore',
                'E701,E702,E401,E731',
                str(project),
            ],
            capture_output=True,
            text=True,
        )
        assert lint.returncode == 0, lint.stdout

    t = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider'],
        cwd=project,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert t.returncode == 0 and '1 passed' in t.stdout, t.stdout[-3000:] + t.stderr[-3000:]

    port = free_port()
    proc = subprocess.Popen(
        fh_saas_cmd('serve', 'app:app', '--port', str(port)),
        cwd=project,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline, status = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/login", timeout=2).status_code
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            break
        log = proc.stdout.read() if proc.poll() is not None else ''
        assert status == 200, f"fh-saas serve answered {status}:\n{log}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def test_new_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / 'taken').mkdir()
    (tmp_path / 'taken' / 'app.py').write_text('mine')
    r = fh_saas('new', 'taken', cwd=tmp_path)
    assert r.returncode == 2
    one_line_mistake(r.stderr, 'fh-saas new: taken already exists and is not empty')
    assert [p.name for p in (tmp_path / 'taken').iterdir()] == ['app.py']
    assert (tmp_path / 'taken' / 'app.py').read_text() == 'mine'
    (tmp_path / 'empty').mkdir()
    assert fh_saas('new', 'empty', cwd=tmp_path).returncode == 0 and (tmp_path / 'empty' / 'app.py').exists()


# --- the app's tenant migrations -----------------------------------------------------------------------------------

APP_MODULE = """from fh_saas.tenant_migrations import register_tenant_migration
register_tenant_migration(4, 'notes', "CREATE TABLE notes (id VARCHAR(32) PRIMARY KEY, body TEXT NOT NULL)")
"""


def test_migrate_with_the_app_brings_its_tenants_to_the_apps_version(tmp_path):
    (tmp_path / 'mod.py').write_text(APP_MODULE)
    host = tmp_path / 'host.db'
    env = clean_env(DB_TYPE='SQLITE', DB_NAME=str(host))
    for tid in ('acme', 'beta'):
        assert fh_saas('tenants', 'create', tid, cwd=tmp_path, env=env).returncode == 0
    assert tenant_versions(host) == {'acme': 3, 'beta': 3}  # made before the app's migrations were known
    r = fh_saas('migrate', cwd=tmp_path, env=env)
    assert r.stdout.splitlines()[-1] == 'migrated 0 tenant(s) to v3, 0 failed'

    r = fh_saas('migrate', '--app', 'mod', cwd=tmp_path, env=env)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == 'migrated 2 tenant(s) to v4, 0 failed', r.stderr
    assert tenant_versions(host) == {'acme': 4, 'beta': 4}
    with sqlite3.connect(tmp_path / 'tenants' / 'acme.db') as c:
        assert c.execute("SELECT count(*) FROM sqlite_master WHERE name = 'notes'").fetchone() == (1,)

    (tmp_path / '.env').write_text('FH_SAAS_APP=mod:register_tenant_migration\n')  # the app named in .env
    assert fh_saas('tenants', 'create', 'gamma', cwd=tmp_path, env=env).returncode == 0
    assert tenant_versions(host)['gamma'] == 4  # born at the app's version
    r = fh_saas('migrate', cwd=tmp_path, env=env | dict(FH_SAAS_APP=''))  # the environment wins over .env
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == 'migrated 0 tenant(s) to v3, 0 failed'
    assert '3 tenant(s) are above v3' in r.stderr and '--app MODULE' in r.stderr


def test_the_worker_takes_the_app_too():
    w = parser().parse_args(['worker', '--app', 'mod', '--concurrency', '2'])
    assert (w.app_module, w.concurrency) == ('mod', 2)


# --- settings from .env --------------------------------------------------------------------------------------------


def test_env_files_are_read_without_overriding(here, capsys):
    os.environ.pop('DB_NAME')
    (here / '.env').write_text("DB_NAME=from_dotenv.db\nFH_SAAS_SECRET_KEY=not-this-one\n")
    assert main(['tenants', 'list']) == 0 and (here / 'from_dotenv.db').exists()
    assert os.environ['FH_SAAS_SECRET_KEY'] == KEY
    HostDatabase._instance.close()
    HostDatabase.reset_instance()
    del os.environ['DB_NAME']
    (here / 'other.env').write_text("DB_NAME=from_other.db\n")
    assert main(['--env-file', 'other.env', 'tenants', 'list']) == 0
    assert (here / 'from_other.db').exists() and os.environ['DB_NAME'] == 'from_other.db'  # instead of .env


# --- API keys and plans --------------------------------------------------------------------------------------------


def test_keys_create_prints_the_key_once(here, capsys):
    host_db = HostDatabase.from_env()
    provision_tenant(host_db, 'acme', 'Acme')
    ann = host_db.global_users.insert(GlobalUser(email='ann@example.com'))
    bob = host_db.global_users.insert(GlobalUser(email='bob@example.com'))
    add_member(host_db, 'acme', ann.id, 'owner')
    add_member(host_db, 'acme', bob.id, 'member')

    assert main(['keys', 'create', 'acme', '--name', 'CI deploys']) == 0
    out, err = capsys.readouterr()
    assert re.fullmatch(r'sk_test_[0-9a-f]{16}_[\w-]{43}\n', out)
    key = verify_api_key(host_db, out.strip())
    assert (key.tenant_id, key.created_by, key.name, key.mode) == ('acme', ann.id, 'CI deploys', 'test')
    assert f'key {key.key_id} (test) for acme, acting as ann@example.com' in err

    assert main(['keys', 'create', 'acme', '--mode', 'live', '--user', 'BOB@example.com']) == 0
    raw = capsys.readouterr().out.strip()
    assert raw.startswith('sk_live_') and verify_api_key(host_db, raw).created_by == bob.id

    assert main(['keys', 'list', 'acme']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == '2 key(s)' and raw not in '\n'.join(lines) and 'CI deploys' in lines[1]
    assert main(['keys', 'revoke', 'acme', key.key_id]) == 0 and verify_api_key(host_db, out.strip()) is None
    capsys.readouterr()
    assert main(['keys', 'revoke', 'acme', key.key_id]) == 2
    one_line_mistake(capsys.readouterr().err, f"fh-saas keys: acme has no unrevoked key '{key.key_id}'")


def test_plans_list_shows_features_and_quotas(here, capsys):
    plans = [
        dict(
            id='starter',
            name='Starter',
            amount_monthly=1999,
            amount_yearly=19900,
            trial_days=14,
            features=['api'],
            quotas={'exports': 100},
            sort_order=1,
        ),
        dict(
            id='pro',
            name='Pro',
            amount_monthly=4900,
            trial_days=0,
            features=['api', 'sso'],
            quotas={'exports': None, 'seats': 10},
            sort_order=2,
        ),
    ]
    (here / 'plans.json').write_text(json.dumps(plans))
    assert main(['plans', 'seed', 'plans.json']) == 0
    capsys.readouterr()
    assert main(['plans', 'list']) == 0
    assert capsys.readouterr().out.splitlines() == [
        'starter          Starter              19.99 USD/month or 199.00 USD/year, 14-day trial',
        '  features: api',
        '  quotas:   exports 100/month',
        'pro              Pro                  49.00 USD/month',
        '  features: api, sso',
        '  quotas:   exports unlimited, seats 10/month',
        '2 plan(s) on sale',
    ]


# --- help ----------------------------------------------------------------------------------------------------------


def commands(p: argparse.ArgumentParser, path=()):
    "Every (sub)command path of `p`, checking on the way that each command and option has help text."
    for a in p._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in a._choices_actions}
            for name, sub in a.choices.items():
                assert helps.get(name) and sub.description, f"fh-saas {' '.join(path + (name,))} has no help"
                yield path + (name,)
                yield from commands(sub, path + (name,))
        else:
            assert a.help, f"fh-saas {' '.join(path)}: {a.option_strings or a.dest} has no help"


def test_every_command_and_option_has_help(capsys):
    paths = list(commands(parser()))
    assert {'new', 'serve', 'keys', 'migrate'} <= {p[0] for p in paths} and ('keys', 'create') in paths
    for path in paths:
        with pytest.raises(SystemExit) as e:
            main([*path, '--help'])
        assert e.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: fh-saas {' '.join(path)}")


def test_python_m_fh_saas_cli_is_the_command(tmp_path):
    r = fh_saas('--help', cwd=tmp_path)
    assert r.returncode == 0 and 'exit status: 0 done' in r.stdout and '--env-file PATH' in r.stdout
    r = fh_saas(cwd=tmp_path)
    assert r.returncode == 2 and 'usage: fh-saas' in r.stderr


# --- mistakes: one line, exit 2 ------------------------------------------------------------------------------------

MISTAKES = [
    (['tenants', 'resume', 'nobody'], {}, "fh-saas tenants: no tenant 'nobody'"),
    (['tenants', 'create', 'Bad;Id'], {}, "fh-saas tenants: "),
    (['keys', 'create', 'nobody'], {}, "fh-saas keys: no tenant 'nobody'"),
    (['migrate', '--tenant', 'nobody'], {}, "fh-saas migrate: unknown tenant ids: 'nobody'"),
    (['tenants', 'list'], dict(DB_TYPE='POSTGRESQL'), "fh-saas tenants: DB_PASS is required when DB_TYPE is "),
    (['plans', 'list'], dict(DB_TYPE='ORACLE'), "fh-saas plans: DB_TYPE='ORACLE' is not supported"),
    (
        ['tenants', 'list'],
        dict(DB_TYPE='POSTGRESQL', DB_PASS='pw', DB_HOST='127.0.0.1', DB_PORT='FREE_PORT'),
        "fh-saas tenants: cannot reach the host database at 127.0.0.1:",
    ),
    (['migrate', '--app', 'no_such_app'], {}, "fh-saas migrate: no module 'no_such_app' in "),
    (['tenants', 'create', 'acme'], dict(FH_SAAS_APP='no_such_app'), "fh-saas tenants: no module 'no_such_app' in "),
    (['serve', 'no_such_app:app'], {}, "fh-saas serve: no module 'no_such_app' in "),
    (['plans', 'seed', 'missing.json'], {}, "fh-saas plans: cannot read missing.json: No such file or directory"),
    (['plans', 'seed', 'not-json.json'], {}, "fh-saas plans: not-json.json is not JSON: "),
    (['plans', 'seed', 'object.json'], {}, "fh-saas plans: object.json must hold a JSON list of plans"),
    (['plans', 'seed', 'bad-plan.json'], {}, "fh-saas plans: plan 'cheap': amount_monthly must be a non-negative"),
    (['--env-file', 'missing.env', 'tenants', 'list'], {}, "fh-saas tenants: --env-file missing.env: no such file"),
    (['users', 'create-admin', 'root@example.com'], dict(FH_SAAS_ADMIN_PASSWORD='short'), "fh-saas users: "),
    (['new', 'no good'], {}, "fh-saas new: 'no good' is not a project name"),
]


@pytest.mark.parametrize('argv,settings,says', MISTAKES, ids=[' '.join(a + list(s)) for a, s, _ in MISTAKES])
def test_an_operator_mistake_is_one_line_and_exit_2(here, capsys, argv, settings, says):
    (here / 'not-json.json').write_text('[{"id": "pro",')
    (here / 'object.json').write_text('{"id": "pro", "name": "Pro"}')
    (here / 'bad-plan.json').write_text(json.dumps([dict(id='cheap', name='Cheap', amount_monthly=-5)]))
    os.environ.update({k: str(free_port()) if v == 'FREE_PORT' else v for k, v in settings.items()})
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ''
    one_line_mistake(err, says)


def test_a_password_without_a_terminal_is_asked_for_by_name(tmp_path):
    "No TTY and no password variable: say which variable to set (getpass would end in a traceback)."
    env = clean_env(DB_TYPE='SQLITE', DB_NAME=str(tmp_path / 'host.db'))
    r = fh_saas('users', 'create-admin', 'root@example.com', cwd=tmp_path, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 2
    one_line_mistake(r.stderr, 'fh-saas users: set FH_SAAS_ADMIN_PASSWORD, or run this in a terminal to be asked')
    r = fh_saas(
        'tenants', 'add-server', 'db2', '--host', 'db2.internal', cwd=tmp_path, env=env, stdin=subprocess.DEVNULL
    )
    assert r.returncode == 2
    one_line_mistake(r.stderr, 'fh-saas tenants: set FH_SAAS_SERVER_PASSWORD')
    r = fh_saas(
        'users',
        'create-admin',
        'root@example.com',
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        env=env | dict(FH_SAAS_ADMIN_PASSWORD='correct horse battery staple'),
    )
    assert (r.returncode, r.stdout) == (0, 'system admin root@example.com created\n')


def test_doctor_names_what_a_fh_saas_0_9_database_breaks_and_repairs_it(tmp_path):
    "A host database written by fh-saas 0.9.14 opens; `doctor` names the case-duplicate accounts, then adds the rule."
    shutil.copy(ROOT / 'tests' / 'fixtures' / 'fh_saas_0_9_14.db', tmp_path / 'host.db')
    env = clean_env(DB_TYPE='SQLITE', DB_NAME=str(tmp_path / 'host.db'))
    found = fh_saas('doctor', cwd=tmp_path, env=env)
    assert found.returncode == 1 and 'users u-ann, u-ann2 share the email ann@example.com' in found.stdout
    with sqlite3.connect(tmp_path / 'host.db') as c:
        c.execute("UPDATE core_users SET email = 'ann.work@example.com' WHERE id = 'u-ann2'")
    repaired = fh_saas('doctor', '--repair', cwd=tmp_path, env=env)
    assert repaired.returncode == 0 and 'keeps every integrity rule' in repaired.stdout, repaired.stdout
    with sqlite3.connect(tmp_path / 'host.db') as c, pytest.raises(sqlite3.IntegrityError):
        c.execute("INSERT INTO core_users (id, email) VALUES ('u-x', 'ANN@example.com')")
