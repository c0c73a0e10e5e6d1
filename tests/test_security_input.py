"""Findings of the security review on input, headers and state-changing requests, each checked on the real app:
a guessable master key is refused at start-up."""
import pytest
from fasthtml.common import FastHTML

from fh_saas.app import setup_saas
from fh_saas.db_host import HostDatabase
from fh_saas.dev_mode import SaasConfigError
from fh_saas.mail import MemoryOutbox


@pytest.mark.parametrize('weak', ['k' * 32, 'ab' * 20, '0123' * 10])
def test_a_repetitive_master_key_is_refused_with_how_to_make_one(tmp_path, monkeypatch, weak):
    "A key of one repeated character (or a short repeated pattern) is long enough but not random: setup_saas stops."
    monkeypatch.setenv('FH_SAAS_SECRET_KEY', weak)
    monkeypatch.delenv('FH_SAAS_PREVIOUS_SECRET_KEYS', raising=False)
    host_db = HostDatabase(f"sqlite:///{tmp_path / 'host.db'}")
    try:
        with pytest.raises(SaasConfigError, match='too repetitive') as e:
            setup_saas(FastHTML(default_hdrs=False), host_db, mailer=MemoryOutbox(), webhook_secrets=[])
        assert weak not in str(e.value)
        assert 'python -c "import secrets; print(secrets.token_urlsafe(32))"' in str(e.value)
    finally: host_db.close(); HostDatabase.reset_instance()
