"""`make demo`: supervisord + listener + relay on the embedded queue + a local SMTP sink.

A demo program crashes; the mail it causes is received by a real STARTTLS+AUTH
SMTP server on 127.0.0.1 and printed. Everything runs from ./demo-state and is
stopped at the end. Exit 0 when the mail arrived, 1 otherwise.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.smtp_server import ReceivedMail, SmtpServer  # noqa: E402

STATE = ROOT / "demo-state"
BIN = Path(sys.executable).parent
TIMEOUT = 60.0


def write_config(server: SmtpServer) -> Path:
    settings = server.client_settings()
    config = STATE / "opsrelay.toml"
    config.write_text(f"""\
host = "demo-host"

[broker]
url = "sqlite:///{STATE / 'queue' / 'queue.db'}"

[smtp]
host = "{settings['host']}"
port = {settings['port']}
security = "starttls"
username = "{settings['username']}"
password_file = "{STATE / 'smtp-password'}"
ca_file = "{settings['ca_file']}"
from = "alerts@demo.example"

[retry]
backoff = ["1s", "5s"]

[[subscriptions]]
name = "crashes"
to = ["oncall@demo.example"]
programs = ["*"]
states = ["EXITED", "FATAL"]
unexpected_only = true
""", encoding="utf-8")
    secret = STATE / "smtp-password"
    secret.write_text(str(settings["password"]) + "\n", encoding="utf-8")
    secret.chmod(0o600)
    return config


def write_supervisord_conf(config: Path) -> Path:
    conf = STATE / "supervisord.conf"
    conf.write_text(f"""\
[supervisord]
logfile={STATE / 'supervisord.log'}
pidfile={STATE / 'supervisord.pid'}
childlogdir={STATE}

[unix_http_server]
file={STATE / 'supervisor.sock'}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{STATE / 'supervisor.sock'}

[eventlistener:opsrelay]
command={BIN / 'opsrelay'} listen --config {config}
events=PROCESS_STATE
buffer_size=4096
stderr_logfile={STATE / 'listener.log'}

[program:opsrelay-relay]
command={BIN / 'opsrelay'} serve --config {config}
stopsignal=TERM
redirect_stderr=true
stdout_logfile={STATE / 'relay.log'}

[program:payments-worker]
; The demo's victim: runs a moment, complains on stderr, exits 3 (unexpected).
command=/bin/sh -c "sleep 2; echo 'payments-worker: lost connection to the database' >&2; exit 3"
startsecs=1
autorestart=false
""", encoding="utf-8")
    return conf


def main() -> int:
    # aiosmtpd warns on every AUTH about its own deprecated Session.login_data.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    shutil.rmtree(STATE, ignore_errors=True)
    STATE.mkdir(mode=0o700)
    arrived = threading.Event()

    def show(mail: ReceivedMail) -> None:
        print("\n=== mail received by the SMTP sink "
              f"(TLS: {mail.tls}, AUTH user: {mail.auth_user}) ===")
        print(f"envelope: from <{mail.mail_from}> to {', '.join(mail.rcpt_tos)}\n")
        print(mail.content.decode("utf-8", "replace"))
        arrived.set()

    with SmtpServer(STATE / "smtp", on_receive=show) as server:
        print(f"SMTP sink on 127.0.0.1:{server.port} (STARTTLS + AUTH, trustme CA)")
        config = write_config(server)
        conf = write_supervisord_conf(config)
        print(f"starting supervisord with {conf.name}: listener, relay (embedded queue) and payments-worker")
        sup = subprocess.Popen([str(BIN / "supervisord"), "-n", "-c", str(conf)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        started = time.monotonic()
        try:
            print("payments-worker will crash in about 2 s ...")
            ok = arrived.wait(TIMEOUT)
            if ok:
                print(f"=== crash to mail: {time.monotonic() - started:.1f} s after supervisord started ===")
                time.sleep(1.0)  # let the relay log its delivery
            else:
                print(f"no mail within {TIMEOUT:.0f} s; logs follow", file=sys.stderr)
            for log in ("listener.log", "relay.log"):
                path = STATE / log
                if path.exists():
                    print(f"\n--- {log} ---\n{path.read_text(encoding='utf-8', errors='replace').strip()}")
        finally:
            sup.send_signal(signal.SIGTERM)
            try:
                sup.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(sup.pid, signal.SIGKILL)
                sup.wait()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
