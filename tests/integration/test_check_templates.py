"""``opsrelay check`` run as a real process: a template error names the file, the subscription and the line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

EX_CONFIG = 78
OPSRELAY = Path(sys.executable).parent / "opsrelay"

def check(tmp_path: Path, subscription: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "opsrelay.toml"
    head = f'host = "web1"\n[broker]\nurl = "sqlite:///{tmp_path / "queue.db"}"\n'
    path.write_text(head + subscription, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSRELAY_")}
    env["HOME"] = str(tmp_path)
    return subprocess.run([str(OPSRELAY), "check", "--config", str(path)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=30, check=False)


def config_error(tmp_path: Path, subscription: str) -> str:
    proc = check(tmp_path, subscription)
    assert proc.returncode == EX_CONFIG, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"opsrelay: config error: {tmp_path / 'opsrelay.toml'}, subscriptions.pager."), line
    return line


def test_typo_on_line_3_of_a_multi_line_body(tmp_path: Path) -> None:
    line = config_error(tmp_path, '''
[[subscriptions]]
name = "pager"
to = ["oncall@example.com"]
body = """{{ program }} on {{ host }}
{% if log_tail %}{{ log_tail }}{% endif %}
exit: {{ exit_staus }}
"""
''')
    assert "subscriptions.pager.body: line 3: unknown variable 'exit_staus' (did you mean 'exit_status'?)" in line


def test_syntax_error_in_digest_subject(tmp_path: Path) -> None:
    line = config_error(tmp_path, '[[subscriptions]]\nname = "pager"\nto = ["oncall@example.com"]\n'
                                  'group_wait = "5s"\ndigest_subject = "{{ total }} crashes {% if %}"\n')
    assert "subscriptions.pager.digest_subject: line 1: syntax error:" in line


def test_failure_on_the_sample_digest_gives_the_traceback_line(tmp_path: Path) -> None:
    line = config_error(tmp_path, '[[subscriptions]]\nname = "pager"\nto = ["oncall@example.com"]\n'
                                  'digest_body = """{{ total }}\n{% for e in events %}\n{{ e.exit_stats }}\n'
                                  '{% endfor %}"""\n')
    assert "subscriptions.pager.digest_body: line 3: fails on a sample digest notice:" in line
    assert "exit_stats" in line


def test_every_template_field_set_and_valid_passes(tmp_path: Path) -> None:
    proc = check(tmp_path, '''
[[subscriptions]]
name = "pager"
to = ["oncall@example.com"]
subject_prefix = "ACME"
subject = "{{ program }} {{ summary }}"
body = """{{ program }} on {{ host }} {{ summary }} at {{ time }}
{% for note in notes %}{{ note }}
{% endfor %}"""
digest_subject = "{{ programs_text }}: {{ total_text }} ({{ counts_text }})"
digest_body = "{{ events_text }}"
html = "<p>{{ program }}</p>{% if kind == 'digest' %}<pre>{{ events_text }}</pre>{% endif %}"
headers = { X-Team = "ops" }
''')
    assert proc.returncode == 0, proc.stderr
    assert "config ok" in proc.stdout
