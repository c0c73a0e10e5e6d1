"""Imported by a test worker (`--import slow_steps`): pause provisioning after one step, so a test can kill it there.

`FH_SAAS_TEST_PAUSE_AFTER` names the step (`role`, `database`, `grants`); on reaching it the worker
creates the file `FH_SAAS_TEST_PAUSE_SIGNAL` and sleeps for `FH_SAAS_TEST_PAUSE_SECONDS` (default 60).
"""

import os, time
from pathlib import Path

from fh_saas import db_tenant

_step, _signal = os.environ['FH_SAAS_TEST_PAUSE_AFTER'], Path(os.environ['FH_SAAS_TEST_PAUSE_SIGNAL'])
_real = db_tenant._after_step


def _after_step(action: str, step: str):
    _real(action, step)
    if (action, step) == ('provision', _step):
        _signal.touch()
        time.sleep(float(os.environ.get('FH_SAAS_TEST_PAUSE_SECONDS', '60')))


db_tenant._after_step = _after_step
