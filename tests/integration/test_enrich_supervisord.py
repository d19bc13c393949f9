"""listeners.enrich against a real supervisord: exit status, signal, spawn error and log tail at event time.

One supervisord for the module, its HTTP servers (unix socket and 127.0.0.1) behind
a username and password. Its eventlistener is the real loop
(``listeners.eventlistener.run``) with the enricher ``make_enricher`` builds from
the environment supervisord gives it (``SUPERVISOR_SERVER_URL``; the credentials
through ``environment=``, as a user would set them); it writes each event it would
publish to a file, which the tests read. Each test starts programs of its own.

The faults (nothing listening, a server that never answers, one that drips its
answer, wrong credentials) are asked directly, with a short ``fetch_timeout``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from listeners.enrich import Call, Deadline, Enricher, Fault, SupervisorRpc, SupervisorUnreachable
from relay.contract.event import Event, decode_event
from tests.waiting import wait_for

pytestmark = [pytest.mark.supervisord, pytest.mark.timeout(60)]

BIN = Path(sysconfig.get_path("scripts"))
T = TypeVar("T")
USER, PASSWORD = "opsrelay", "s3cret pässword"
SLEEP = "sleep 1.2"  # outlives startsecs=1: RUNNING first, so the end is an EXITED event
TRACEBACK = textwrap.dedent("""\
    import sys, time, traceback
    time.sleep(1.2)  # outlives startsecs=1: RUNNING first, so the end is an EXITED event
    print("working on invoice 42", flush=True)
    def charge(invoice):
        raise ValueError(f"invoice {invoice} has no customer \\N{EM DASH} caf\\u00e9")
    try:
        charge(42)
    except ValueError:
        traceback.print_exc()
        sys.exit(3)
""")

LISTENER = textwrap.dedent("""\
    import os, sys
    from listeners.enrich import make_enricher
    from listeners.eventlistener import run, text_streams
    from relay.config.models import load_config
    from relay.contract.event import encode_event

    class FilePublisher:
        def __init__(self, path):
            self.path = path

        def publish(self, event):
            with open(self.path, "ab") as out:
                out.write(encode_event(event) + b"\\n")

    config = load_config(sys.argv[1], env={})
    stdin, stdout = text_streams(sys.stdin.buffer, sys.stdout.buffer)
    sys.exit(run(stdin, stdout, FilePublisher(sys.argv[2]), host="itest", enrich=make_enricher(config, os.environ)))
""")

PROGRAMS = {
    "exit3": {"command": f"{sys.executable} {{root}}/crash_job.py", "startsecs": 1, "autorestart": "false",
              "exitcodes": "0"},
    "killed": {"command": f"sh -c '{SLEEP}; kill -9 $$'", "startsecs": 1, "autorestart": "false"},
    "looping": {"command": f"sh -c 'echo round >&2; {SLEEP}; exit 5'", "startsecs": 1, "autorestart": "true"},
    # startProcess refuses a missing command (NO_FILE); supervisord's own start records it as spawnerr.
    "missing": {"command": "/nonexistent/opsrelay-missing-command", "startretries": 0, "autostart": "true"},
    # startsecs=3: an exit reaped a loop turn late must still count as too quick (see test_crash_mail).
    "quick": {"command": "sh -c 'echo quick death >&2; exit 2'", "startsecs": 3, "startretries": 1},
    "redirected": {"command": f"{sys.executable} {{root}}/crash_job.py", "startsecs": 1, "autorestart": "false",
                   "redirect_stderr": "true"},
    "stdoutonly": {"command": f"sh -c 'echo only on stdout; {SLEEP}; exit 4'", "startsecs": 1,
                   "autorestart": "false"},
    "nologs": {"command": f"sh -c 'echo lost >&2; {SLEEP}; exit 6'", "startsecs": 1, "autorestart": "false",
               "stdout_logfile": "NONE", "stderr_logfile": "NONE"},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Supervisord:
    """supervisord with the enriching listener and :data:`PROGRAMS` (none started), in a short directory."""

    def __init__(self) -> None:
        # sun_path is 108 bytes: a pytest tmp_path can be longer.
        self.root = Path(tempfile.mkdtemp(prefix="enr-"))
        self.socket = self.root / "sv.sock"
        self.port = free_port()
        self.events_path = self.root / "events.jsonl"
        self.log_path = self.root / "supervisord.log"
        (self.root / "crash_job.py").write_text(TRACEBACK, encoding="utf-8")
        (self.root / "listener.py").write_text(LISTENER, encoding="utf-8")
        (self.root / "opsrelay.toml").write_text('host = "itest"\n\n[listener]\nlog_tail_bytes = 4096\n'
                                                 'fetch_timeout = "3s"\n', encoding="utf-8")
        programs = "".join(
            f"[program:{name}]\n" + "".join(f"{k}={str(v).format(root=self.root)}\n"
                                             for k, v in {"autostart": "false", **options}.items()) + "\n"
            for name, options in PROGRAMS.items())
        self.conf = self.root / "supervisord.conf"
        self.conf.write_text(
            f"[unix_http_server]\nfile={self.socket}\nchmod=0700\nusername={USER}\npassword={PASSWORD}\n\n"
            f"[inet_http_server]\nport=127.0.0.1:{self.port}\nusername={USER}\npassword={PASSWORD}\n\n"
            f"[supervisord]\nlogfile={self.log_path}\npidfile={self.root / 'sv.pid'}\nchildlogdir={self.root}\n"
            "nodaemon=true\nsilent=true\nloglevel=info\n\n"
            "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory=supervisor.rpcinterface:"
            "make_main_rpcinterface\n\n"
            f"[eventlistener:enricher]\ncommand={sys.executable} {self.root / 'listener.py'} "
            f"{self.root / 'opsrelay.toml'} {self.events_path}\n"
            "events=PROCESS_STATE,SUPERVISOR_STATE_CHANGE\nbuffer_size=1024\nautorestart=true\n"
            # supervisord passes only SUPERVISOR_SERVER_URL; credentials are the user's to give.
            f'environment=SUPERVISOR_USERNAME="{USER}",SUPERVISOR_PASSWORD="{PASSWORD}"\n'
            f"stderr_logfile={self.root / 'listener.log'}\n\n{programs}",
            encoding="utf-8")
        env = {**os.environ, "PYTHONUTF8": "1", "LC_ALL": "C.UTF-8"}
        self.proc = subprocess.Popen([str(BIN / "supervisord"), "-n", "-c", str(self.conf)], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     cwd=self.root, start_new_session=True)
        self.rpc = SupervisorRpc(f"unix://{self.socket}", USER, PASSWORD)
        try:
            self.wait_for(self._answers, 15, "supervisord to answer")
        except BaseException:
            self.stop()
            raise

    def call(self, method: str, *params: str | int | bool) -> Any:
        """One XML-RPC call (through the enricher's own client); a fault fails the test."""
        [result] = self.rpc.multicall([Call(method, params)], Deadline(10.0))
        assert not isinstance(result, Fault), (method, params, result)
        return result

    def _answers(self) -> bool:
        with contextlib.suppress(SupervisorUnreachable):
            return bool(self.call("supervisor.getState"))
        return False

    def diagnostics(self) -> str:
        texts = [f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in
                 (self.log_path, self.root / "listener.log", self.events_path) if p.exists()]
        return "\n".join(texts)

    def wait_for(self, check: Callable[[], T], timeout: float, what: str) -> T:
        """:func:`tests.waiting.wait_for`, with the logs in the error; it ends at once if supervisord exited."""

        def checked() -> T:
            value = check()
            if not value and self.proc.poll() is not None:
                raise AssertionError(f"supervisord exited with {self.proc.returncode} while waiting for {what}\n"
                                     f"{self.diagnostics()}")
            return value

        return wait_for(checked, timeout, what=what, diagnostics=self.diagnostics)

    def events(self) -> list[Event]:
        try:
            lines = self.events_path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        return [decode_event(line) for line in lines if line]

    def event(self, process: str, state: str, timeout: float = 20.0) -> Event:
        def found() -> Event | None:
            return next((e for e in self.events() if e.process == process and e.state == state), None)

        event = self.wait_for(found, timeout, f"a {state} event of {process}")
        assert event is not None
        return event

    def start(self, name: str) -> None:
        self.call("supervisor.startProcess", name, False)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def sv() -> Iterator[Supervisord]:
    supervisord = Supervisord()
    try:
        yield supervisord
    finally:
        supervisord.stop()


def exited(name: str, pid: int | None = None) -> Event:
    """An EXITED event as the listener would build it."""
    return Event(host="itest", group=name, process=name, event="PROCESS_STATE_EXITED", state="EXITED", pid=pid,
                 expected=False)


# -- at event time, through the listener ------------------------------------------------------

def test_supervisord_running_is_published_unenriched(sv: Supervisord) -> None:
    event = sv.wait_for(lambda: next((e for e in sv.events() if e.is_supervisor), None), 15,
                        "SUPERVISOR_STATE_CHANGE_RUNNING")
    assert event is not None
    assert (event.event, event.state, event.group, event.process) == (
        "SUPERVISOR_STATE_CHANGE_RUNNING", "RUNNING", "", "")
    assert (event.exit_status, event.signal, event.log_tail, event.notes) == (None, None, None, ())


def test_exit_status_and_traceback(sv: Supervisord) -> None:
    sv.start("exit3")
    event = sv.event("exit3", "EXITED")
    assert (event.exit_status, event.signal, event.spawnerr, event.expected) == (3, None, None, False)
    assert event.notes == ()
    assert event.log_tail is not None
    lines = event.log_tail.splitlines()
    assert lines[0] == "Traceback (most recent call last):", event.log_tail
    assert lines[-1] == "ValueError: invoice 42 has no customer \u2014 café"
    assert '    charge(42)' in lines
    assert "working on invoice 42" not in event.log_tail  # stdout: stderr had something


def test_killed_by_sigkill_names_the_signal(sv: Supervisord) -> None:
    sv.start("killed")
    event = sv.event("killed", "EXITED")
    assert (event.exit_status, event.signal) == (None, "SIGKILL")
    assert event.notes == ("no log tail: killed wrote nothing to stderr or stdout",)


def test_a_respawned_process_keeps_its_own_exit_status(sv: Supervisord) -> None:
    # autorestart=true: supervisord respawns it right after the exit, before the listener asks,
    # which resets exitstatus (getProcessInfo would say 0); the log still has this pid's exit.
    sv.start("looping")
    event = sv.event("looping", "EXITED")
    sv.call("supervisor.stopProcess", "looping", False)
    assert (event.exit_status, event.signal, event.notes) == (5, None, ())
    assert event.log_tail is not None and event.log_tail.splitlines()[-1] == "round"


def test_a_missing_command_is_fatal_with_its_spawn_error(sv: Supervisord) -> None:
    fatal = sv.event("missing", "FATAL")
    assert fatal.spawnerr == "can't find command '/nonexistent/opsrelay-missing-command'"
    assert (fatal.exit_status, fatal.signal, fatal.log_tail) == (None, None, None)
    assert fatal.notes == ("no log tail: missing wrote nothing to stderr or stdout",)
    backoff = sv.event("missing", "BACKOFF")  # went out too, whatever supervisord said by then
    assert backoff.exit_status is None


def test_exited_too_quickly_gives_backoff_and_fatal_their_code(sv: Supervisord) -> None:
    sv.start("quick")
    fatal = sv.event("quick", "FATAL")
    assert (fatal.exit_status, fatal.signal) == (2, None)
    assert fatal.spawnerr == "Exited too quickly (process log may have details)"
    assert fatal.log_tail == "quick death\nquick death"  # both tries
    assert fatal.notes == ()
    first = sv.event("quick", "BACKOFF")
    # Asked within its 1 s of backoff it is current; later, a note instead of another try's values.
    assert (first.exit_status, first.spawnerr, first.notes) == (2, fatal.spawnerr, ()) or (
        first.exit_status is None and len(first.notes) == 1
        and first.notes[0].startswith("exit status and spawn error unavailable: quick was already ")), first


def test_redirected_stderr_comes_from_stdout(sv: Supervisord) -> None:
    sv.start("redirected")
    event = sv.event("redirected", "EXITED")
    assert event.exit_status == 3 and event.notes == ()
    assert event.log_tail is not None
    assert event.log_tail.startswith("working on invoice 42\nTraceback (most recent call last):")
    assert event.log_tail.endswith("ValueError: invoice 42 has no customer \u2014 café")


def test_empty_stderr_falls_back_to_stdout(sv: Supervisord) -> None:
    sv.start("stdoutonly")
    event = sv.event("stdoutonly", "EXITED")
    assert (event.exit_status, event.log_tail, event.notes) == (4, "only on stdout", ())


def test_no_logs_kept_says_so(sv: Supervisord) -> None:
    sv.start("nologs")
    event = sv.event("nologs", "EXITED")
    assert (event.exit_status, event.log_tail) == (6, None)
    assert event.notes == ("log tail unavailable: supervisord keeps no log of nologs (stdout_logfile and "
                           "stderr_logfile are NONE or syslog)",)


# -- asked directly: credentials and faults ---------------------------------------------------

def test_inet_server_with_credentials(sv: Supervisord) -> None:
    if sv.call("supervisor.getProcessInfo", "exit3")["statename"] == "STOPPED":  # run alone
        sv.start("exit3")
    sv.event("exit3", "EXITED")
    url = f"http://127.0.0.1:{sv.port}"
    # No pid: getProcessInfo (still EXITED, autorestart=false) says 3.
    got = Enricher(SupervisorRpc(url, USER, PASSWORD), tail_bytes=200, timeout=3.0)(exited("exit3"))
    assert got.exit_status == 3 and got.notes == ()
    assert got.log_tail is not None and got.log_tail.endswith("café")
    assert len(got.log_tail.encode("utf-8")) <= 200


@pytest.mark.parametrize("where", ["unix", "inet"])
@pytest.mark.parametrize("password", [None, "wrong"])
def test_wrong_or_missing_credentials_are_a_note(sv: Supervisord, where: str, password: str | None) -> None:
    url = f"unix://{sv.socket}" if where == "unix" else f"http://127.0.0.1:{sv.port}"
    rpc = SupervisorRpc(url, USER if password else "", password or "")
    got = Enricher(rpc, tail_bytes=100, timeout=3.0)(exited("exit3", 1))
    reason = (f"supervisord at {url} refused the credentials (HTTP 401; set SUPERVISOR_USERNAME and "
              "SUPERVISOR_PASSWORD in the listener's environment=)")
    assert got.notes == (f"log tail unavailable: {reason}", f"exit status unavailable: {reason}")
    assert (got.exit_status, got.log_tail) == (None, None)


def test_nothing_listening_is_a_note(tmp_path: Path) -> None:
    url = f"unix://{tmp_path / 'gone.sock'}"
    began = time.monotonic()
    got = Enricher(SupervisorRpc(url), tail_bytes=4096, timeout=1.0)(exited("a", 7))
    assert time.monotonic() - began < 0.5
    assert got.notes[0].startswith(f"log tail unavailable: cannot reach supervisord at {url}: ")
    assert "No such file or directory" in got.notes[0]
    closed = f"http://127.0.0.1:{free_port()}"
    got = Enricher(SupervisorRpc(closed), tail_bytes=0, timeout=1.0)(exited("a", 7))
    assert len(got.notes) == 1 and got.notes[0].startswith(f"exit status unavailable: cannot reach supervisord at "
                                                           f"{closed}: ")
    assert "refused" in got.notes[0]


class StuckServer:
    """A unix socket server that accepts and then sends ``drip`` one byte at a time, every ``every`` seconds."""

    def __init__(self, path: Path, drip: bytes = b"", every: float = 0.05) -> None:
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen()
        self.drip, self.every, self.stopped = drip, every, threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.listener.accept()
            with conn:
                for byte in self.drip:
                    if self.stopped.wait(self.every):
                        return
                    conn.sendall(bytes([byte]))
                self.stopped.wait()

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()
        self.thread.join(2)


@pytest.mark.parametrize("drip", [b"", b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000],
                         ids=["silent", "dripping"])
def test_the_time_bound_holds_for_all_calls_of_an_event(drip: bytes) -> None:
    path = Path(tempfile.mkdtemp(prefix="enr-stuck-")) / "s.sock"
    server = StuckServer(path, drip)
    try:
        began = time.monotonic()
        got = Enricher(SupervisorRpc(f"unix://{path}"), tail_bytes=4096, timeout=0.4)(exited("a", 7))
        took = time.monotonic() - began
    finally:
        server.close()
        shutil.rmtree(path.parent, ignore_errors=True)
    assert 0.35 < took < 0.9, took
    reason = f"supervisord did not answer within 0.4 s (unix://{path})"
    assert got.notes == (f"log tail unavailable: {reason}", f"exit status unavailable: {reason}")
