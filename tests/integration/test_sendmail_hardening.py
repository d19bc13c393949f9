"""The sendmail path strands nothing and copies no secret; engine lock files are testable by other users."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from relay.engines.sqlite_wake import RunDir


def _sendmail(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "relay.sendmail", *args], input=b"Subject: x\n\nbody\n",
                          env=env, capture_output=True, timeout=30, check=False)


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSRELAY_")}
    env.update(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "cache"),
               XDG_STATE_HOME=str(tmp_path / "state"))
    return env


def test_without_any_config_sendmail_refuses_instead_of_queuing_where_no_relay_reads(tmp_path: Path) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    env = _clean_env(tmp_path)
    done = subprocess.run([sys.executable, "-m", "relay.sendmail", "root"], input=b"Subject: x\n\nbody\n",
                          env=env, capture_output=True, timeout=30, check=False, cwd=work)
    if Path("/etc/opsrelay/opsrelay.toml").exists():  # a machine with a system config finds that one
        return
    assert done.returncode == 78, done.stderr
    assert b"no opsrelay.toml found" in done.stderr
    assert not (tmp_path / "state").exists()


def test_the_config_cache_holds_no_smtp_password(tmp_path: Path) -> None:
    config = tmp_path / "opsrelay.toml"
    config.write_text(f'[broker]\nurl = "sqlite:///{tmp_path / "q" / "queue.db"}"\n'
                      '[smtp]\nhost = "smtp.example.com"\npassword = "pw-cache-secret"\n', encoding="utf-8")
    env = {**_clean_env(tmp_path), "OPSRELAY_CONFIG": str(config)}
    done = _sendmail(env, "ops@example.com")
    assert done.returncode == 0, done.stderr
    cached = list((tmp_path / "cache").rglob("*.marshal"))
    assert cached, "the parsed config is cached"
    for path in cached:
        assert b"pw-cache-secret" not in path.read_bytes()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_liveness_lock_files_can_be_tested_by_another_user(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path / "queue.db.run"))
    fd = run.hold("abc123")
    try:
        mode = stat.S_IMODE((tmp_path / "queue.db.run" / "abc123.lock").stat().st_mode)
        assert mode == 0o644
        assert run.is_gone("abc123") is False  # held by us: alive
    finally:
        run.let_go("abc123", fd)
    assert run.is_gone("abc123") is True
