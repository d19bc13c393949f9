"""Secure by default in the config: no clear text to other hosts, no header injection from settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config.models import load_config
from relay.errors import ConfigError


def _load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "opsrelay.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, env={})


@pytest.mark.parametrize("url", [
    "amqp://opsrelay:secret@rabbit.example.com/",
    "amqp://opsrelay:secret@10.0.0.5:5672/",
])
def test_amqp_password_in_clear_text_to_another_host_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match=r"broker\.url: amqp:// would send the broker password in clear text") as err:
        _load(tmp_path, f'[broker]\nurl = "{url}"\n')
    assert "secret" not in str(err.value)


@pytest.mark.parametrize("url", [
    "amqp://guest:guest@127.0.0.1:5672/",
    "amqp://guest:guest@localhost/",
    "amqps://opsrelay:secret@rabbit.example.com/",
])
def test_amqp_urls_that_keep_the_password_safe_are_accepted(tmp_path: Path, url: str) -> None:
    _load(tmp_path, f'[broker]\nurl = "{url}"\n')


def test_no_verify_ssl_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no_verify_ssl is refused"):
        _load(tmp_path, '[broker]\nurl = "amqps://u:p@rabbit.example.com/?no_verify_ssl=1"\n')


def test_smtp_from_cannot_carry_a_second_header(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"smtp\.from: .*is not a mail address"):
        _load(tmp_path, '[smtp]\nfrom = "alerts@example.com\\r\\nBcc: evil@example.com"\n')


def test_empty_ca_file_means_no_extra_ca(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, '[smtp]\nca_file = ""\n'), env={})
    assert config.smtp.ca_file is None


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "opsrelay.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_sendmail_fast_path_refuses_an_injected_sender_from_the_environment(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    config = _write(tmp_path, f'[broker]\nurl = "sqlite:///{tmp_path / "q" / "queue.db"}"\n')
    injected = "a@example.com\r\nBcc: evil@example.com"
    env = {**os.environ, "OPSRELAY_CONFIG": str(config), "OPSRELAY_SMTP__FROM": injected}
    done = subprocess.run([sys.executable, "-m", "relay.sendmail", "root"], input=b"Subject: x\n\nbody\n",
                          env=env, capture_output=True, timeout=30, check=False)
    assert done.returncode == 78, done.stderr
    assert b"smtp.from" in done.stderr
    assert not (tmp_path / "q" / "queue.db").exists()  # nothing queued
