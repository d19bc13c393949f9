"""The ``opsrelay`` command line: exit codes, one-line config errors, no secrets in output,
``routes``, and ``check --connect`` against a real SMTP server (TLS, AUTH) and RabbitMQ."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from relay.cli.app import app
from tests.smtp_server import DEFAULT_PASSWORD, SmtpServer, free_port

# clean_environment: no OPSRELAY_* from the caller, no config on the search path (the conftest's).
pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("clean_environment")]

EX_CONFIG = 78
OPSRELAY = Path(sys.executable).parent / "opsrelay"
SMTP_PASSWORD = "smtp-pw-3b9d0e"
BROKER_PASSWORD = "broker-pw-71c4aa"

SUBSCRIPTIONS = """
[[subscriptions]]
name = "prog"
to = ["prog@example.com"]
programs = ["group1:prog2"]
states = ["*"]

[[subscriptions]]
name = "glob"
to = ["glob@example.com"]
programs = ["worker_*"]
states = ["STOPPED", "FATAL"]

[[subscriptions]]
name = "fatal"
to = ["fatal@example.com"]
states = ["FATAL"]

[[subscriptions]]
name = "raw"
to = ["raw@example.com"]
patterns = ["proc.db%2Emain.#"]
unexpected_only = false
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def good_config(tmp_path: Path, broker_url: str | None = None, smtp: str | None = None) -> Path:
    url = broker_url or f"amqps://opsrelay:{BROKER_PASSWORD}@rabbit.example.com/"
    smtp = smtp or (f'host = "smtp.example.com"\nusername = "alerts@example.com"\n'
                    f'password = "{SMTP_PASSWORD}"\nfrom = "alerts@example.com"\n')
    return write(tmp_path / "good.toml",
                 f'host = "web1"\n[broker]\nurl = "{url}"\nprefix = "ops"\n[smtp]\n{smtp}\n{SUBSCRIPTIONS}')


def run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def smtp_section(server: SmtpServer, port: int | None = None) -> str:
    return (f'host = "{server.host}"\nport = {port or server.port}\nsecurity = "starttls"\n'
            f'username = "{server.user}"\npassword = "{server.password}"\nca_file = "{server.ca_pem_path}"\n'
            f'helo = "client.test"\ntimeout = "5s"\n')


# -- bad configuration: exit 78, one line ---------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["check"], ["check", "--connect"], ["routes", "proc.a.b.c.FATAL"], ["serve"], ["listen"],
     ["send-test", "a@example.com"]],
)
def test_bad_config_exits_78_with_one_line(tmp_path: Path, command: list[str]) -> None:
    bad = write(tmp_path / "bad.toml", f'[smtp]\nhots = "x"\npassword = "{SMTP_PASSWORD}"\n')
    result = run(*command, "--config", str(bad))
    assert result.exit_code == EX_CONFIG, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert str(bad) in lines[0] and "smtp.hots" in lines[0] and "unknown key" in lines[0]
    assert result.stdout == ""
    assert SMTP_PASSWORD not in result.output


def test_bad_config_found_through_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = write(tmp_path / "env.toml", '[[subscriptions]]\nname = "x"\nto = ["nobody"]\n')
    monkeypatch.setenv("OPSRELAY_CONFIG", str(bad))
    result = run("check")
    assert result.exit_code == EX_CONFIG
    (line,) = result.stderr.splitlines()
    assert str(bad) in line and "subscriptions.0.to" in line and "'nobody'" in line


def test_missing_config_file_exits_78(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    result = run("check", "--config", str(missing))
    assert result.exit_code == EX_CONFIG
    (line,) = result.stderr.splitlines()
    assert str(missing) in line and "no such file" in line


def test_template_syntax_error_exits_78(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", '[[subscriptions]]\nname = "pager"\nto = ["a@example.com"]\n'
                                      'body = "one\\n{% if %}\\n"\n')
    result = run("check", "--config", str(path))
    assert result.exit_code == EX_CONFIG
    (line,) = result.stderr.splitlines()
    assert "subscriptions.pager.body" in line and "line 2" in line


def test_template_typo_fails_check(tmp_path: Path) -> None:
    """`check` exists to catch a broken config before an outage: an undefined variable is one."""
    path = write(tmp_path / "t.toml", '[[subscriptions]]\nname = "pager"\nto = ["a@example.com"]\n'
                                      'subject = "{{ hots }} down"\n')
    result = run("check", "--config", str(path))
    assert result.exit_code == EX_CONFIG, result.output
    assert "pager" in result.stderr and "hots" in result.stderr


def test_real_process_exit_code_and_stderr(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.toml", "[retry]\nbackoff = []\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSRELAY_")}
    env["HOME"] = str(tmp_path)
    proc = subprocess.run([str(OPSRELAY), "check", "--config", str(bad)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=30, check=False)
    assert proc.returncode == EX_CONFIG
    assert proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert str(bad) in line and "retry.backoff" in line
    good = good_config(tmp_path)
    proc = subprocess.run([str(OPSRELAY), "check", "--config", str(good)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "config ok" in proc.stdout


# -- check ---------------------------------------------------------------------------------


def test_check_good_config_prints_no_password(tmp_path: Path) -> None:
    result = run("check", "--config", str(good_config(tmp_path)))
    assert result.exit_code == 0, result.output
    assert SMTP_PASSWORD not in result.output and BROKER_PASSWORD not in result.output
    assert "config ok: host web1" in result.stdout
    assert "amqps://opsrelay:******@rabbit.example.com/" in result.stdout
    assert "smtp.example.com:587 (starttls, AUTH as alerts@example.com)" in result.stdout
    assert "subscription prog -> prog@example.com: proc.*.group1.prog2.STOPPED" in result.stdout
    assert result.stderr == ""


def test_check_json(tmp_path: Path) -> None:
    result = run("check", "--config", str(good_config(tmp_path)), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert SMTP_PASSWORD not in result.stdout and BROKER_PASSWORD not in result.stdout
    assert report["host"] == "web1"
    assert report["subscriptions"]["fatal"] == {"to": ["fatal@example.com"], "bindings": ["proc.*.*.*.FATAL"]}
    assert report["subscriptions"]["raw"]["bindings"] == ["proc.db%2Emain.#"]
    assert "connect" not in report


def test_check_password_from_environment_is_not_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "c.toml", '[smtp]\nusername = "u@example.com"\npassword_file = "/nonexistent"\n')
    monkeypatch.setenv("OPSRELAY_SMTP__PASSWORD", "env-pw-55e0")
    result = run("check", "--config", str(path), "--json")
    assert result.exit_code == 0, result.output
    assert "env-pw-55e0" not in result.output


# -- routes --------------------------------------------------------------------------------


def reached(result: Result) -> dict[str, list[str]]:
    assert result.exit_code == 0, result.output
    return {r["subscription"]: r["bindings"] for r in json.loads(result.stdout) if r["reached"]}


def test_routes_names_the_subscriptions_reached(tmp_path: Path) -> None:
    config = str(good_config(tmp_path))
    result = run("routes", "proc.web1.group1.prog2.FATAL", "--config", config)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines == [
        "proc.web1.group1.prog2.FATAL -> prog (binding proc.*.group1.prog2.FATAL)",
        "proc.web1.group1.prog2.FATAL -> fatal (binding proc.*.*.*.FATAL)",
    ]


@pytest.mark.parametrize(
    ("key", "subs"),
    [
        ("proc.web1.group1.prog2.FATAL", {"prog", "fatal"}),
        ("proc.web2.workers.worker_03.FATAL", {"glob", "fatal"}),
        ("proc.web2.workers.worker_03.STOPPED", {"glob"}),
        ("proc.web2.workers.xworker_03.STOPPED", set()),  # bound to glob, filtered out
        ("proc.db%2Emain.pg.postgres.RUNNING", {"raw"}),
        ("proc.db.main.pg.postgres.RUNNING", set()),  # six words: not the host db.main
        ("proc.web1.group1.prog2.RUNNING", {"prog"}),
    ],
)
def test_routes_json(tmp_path: Path, key: str, subs: set[str]) -> None:
    assert set(reached(run("routes", key, "--config", str(good_config(tmp_path)), "--json"))) == subs


def test_routes_unrouted_key(tmp_path: Path) -> None:
    result = run("routes", "proc.web1.app.app.RUNNING", "--config", str(good_config(tmp_path)))
    assert result.exit_code == 0
    assert result.stdout.strip() == "proc.web1.app.app.RUNNING: no subscription (kept in ops.unrouted)"


def test_routes_says_a_running_only_serves_recovery_notices(tmp_path: Path) -> None:
    config = write(tmp_path / "resolved.toml", 'host = "web1"\n[[subscriptions]]\nname = "crashes"\n'
                   'to = ["oncall@example.com"]\nsend_resolved = true\n')
    result = run("routes", "proc.web1.app.app.RUNNING", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert result.stdout == ("proc.web1.app.app.RUNNING -> crashes (binding proc.*.*.*.RUNNING, "
                             "recovery notices only)\n")
    [row] = json.loads(run("routes", "proc.web1.app.app.EXITED", "--config", str(config), "--json").stdout)
    assert (row["reached"], row["recovery_only"]) == (True, False)


def test_routes_filtered_key_is_not_reported_as_unrouted(tmp_path: Path) -> None:
    """glob's binding takes this key (proc.*.*.*.STOPPED), so RabbitMQ never hands it to the
    alternate exchange: it reaches glob's queue and is dropped by the residual filter there."""
    result = run("routes", "proc.web2.workers.xworker_03.STOPPED", "--config", str(good_config(tmp_path)))
    assert result.exit_code == 0
    assert "unrouted" not in result.stdout, result.stdout
    assert "glob" in result.stdout


# -- check --connect -----------------------------------------------------------------------


@pytest.mark.rabbitmq
def test_check_connect_succeeds(tmp_path: Path, smtp_server: SmtpServer, amqp_url: str, prefix: str) -> None:
    config = write(tmp_path / "c.toml", f'[broker]\nurl = "{amqp_url}"\nprefix = "{prefix}"\n'
                                        f"[smtp]\n{smtp_section(smtp_server)}")
    result = run("check", "--connect", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "  broker: ok" in result.stdout
    assert f"  smtp: ok: {smtp_server.host}:{smtp_server.port}, tls=yes, auth=yes" in result.stdout
    assert DEFAULT_PASSWORD not in result.output
    assert [a.success for a in smtp_server.auth_attempts] == [True]
    assert smtp_server.received == []  # no mail
    assert "STARTTLS" in smtp_server.connections[0].commands


@pytest.mark.rabbitmq
def test_check_connect_json(tmp_path: Path, smtp_server: SmtpServer, amqp_url: str, prefix: str) -> None:
    config = write(tmp_path / "c.toml", f'[broker]\nurl = "{amqp_url}"\nprefix = "{prefix}"\n'
                                        f"[smtp]\n{smtp_section(smtp_server)}")
    result = run("check", "--connect", "--json", "--config", str(config))
    assert result.exit_code == 0, result.output
    connect = json.loads(result.stdout)["connect"]
    assert connect["broker"] == "ok"
    assert connect["smtp"].startswith("ok:")


@pytest.mark.rabbitmq
def test_check_connect_closed_smtp_port_fails(tmp_path: Path, smtp_server: SmtpServer, amqp_url: str,
                                              prefix: str) -> None:
    closed = free_port()
    config = write(tmp_path / "c.toml", f'[broker]\nurl = "{amqp_url}"\nprefix = "{prefix}"\n'
                                        f"[smtp]\n{smtp_section(smtp_server, port=closed)}")
    result = run("check", "--connect", "--config", str(config))
    assert result.exit_code != 0
    assert "  broker: ok" in result.stdout
    assert "  smtp: FAILED" in result.stdout
    assert DEFAULT_PASSWORD not in result.output


def test_check_connect_unreachable_broker_fails(tmp_path: Path, smtp_server: SmtpServer) -> None:
    url = f"amqp://guest:{BROKER_PASSWORD}@127.0.0.1:{free_port()}/"
    config = write(tmp_path / "c.toml", f'[broker]\nurl = "{url}"\n[smtp]\n{smtp_section(smtp_server)}')
    result = run("check", "--connect", "--config", str(config))
    assert result.exit_code != 0
    assert "  broker: FAILED" in result.stdout
    assert "  smtp: ok" in result.stdout
    assert BROKER_PASSWORD not in result.output
