"""A real supervisord running opsrelay, for the end-to-end tests (no pytest here).

:class:`Supervisor` writes, in a directory of its own, an ``opsrelay.toml`` and a
``supervisord.conf`` that registers ``opsrelay listen`` as the PROCESS_STATE
eventlistener, ``opsrelay serve`` as the program ``relay`` and the test's own
programs, then runs ``supervisord -n`` as a child process::

    with Supervisor(root, broker_url=..., prefix=..., smtp=server.client_settings(),
                    subscriptions=[{"name": "crashes", "to": ["oncall@example.test"]}],
                    programs=[Program("crash", "sh -c 'sleep 1.2; exit 1'")]) as sv:
        sv.start_program("crash")
        sv.wait_for(lambda: server.received, 10, what="a mail")

The test's programs do not start with supervisord (``autostart=false``): the
harness first waits until the relay has declared its subscription queues, since
an event published before its queue is bound goes to ``<prefix>.unrouted`` and
would never become mail.

:meth:`Supervisor.stop` always ends supervisord and every process it started
(SIGTERM, then SIGKILL after a bound) and deletes what the relay declared on
the broker. supervisord puts each child in its own process group (``setpgrp``
in supervisor/process.py), so the harness cannot kill one group: it records
the pid tree through /proc and ends those processes by pid.

Program names: supervisord refuses only a space, ``:`` and ``/`` in a
``[program:x]`` or ``process_name`` (``process_or_group_name`` in
supervisor/datatypes.py), so ``[program:wörker.v2]`` is a valid section. It
reads its config in the locale's encoding, so the harness runs it with
``PYTHONUTF8=1``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sysconfig
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from tests.brokers import delete_topology
from tests.waiting import WaitTimeout, wait_for

__all__ = ["Program", "Supervisor", "stop_all"]

BIN = Path(sysconfig.get_path("scripts"))
T = TypeVar("T")
TomlValue = str | int | float | bool | Path | Sequence[str]

# sun_path is 108 bytes on Linux; a deep pytest tmp_path can exceed it.
_MAX_SOCKET_PATH = 100


@dataclass(frozen=True)
class Program:
    """One ``[program:name]`` section; ``options`` are written as given (``startsecs=1``...)."""

    name: str
    command: str
    options: Mapping[str, str | int | bool] = field(default_factory=dict)


def _toml_value(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string (same escapes, \\uXXXX included).
        return json.dumps(value, ensure_ascii=False)
    return "[" + ", ".join(json.dumps(item, ensure_ascii=False) for item in value) + "]"


def _toml_table(values: Mapping[str, TomlValue]) -> list[str]:
    return [f"{json.dumps(key)} = {_toml_value(value)}" for key, value in values.items()]


def _ini_value(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _proc_start(pid: int) -> str | None:
    """The start time of ``pid`` (field 22 of /proc/pid/stat), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces and parentheses
    return fields[19] if len(fields) > 19 and fields[0] != "Z" else None


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> dict[int, str]:
    """Every live process below ``pid``, with its start time."""
    tree = _children()
    found: dict[int, str] = {}
    todo = list(tree.get(pid, []))
    while todo:
        child = todo.pop()
        start = _proc_start(child)
        if start is not None:
            found[child] = start
        todo.extend(tree.get(child, []))
    return found


class Supervisor:
    """supervisord + ``opsrelay listen`` + ``opsrelay serve`` + the test's programs, in ``root``."""

    def __init__(self, root: Path, *, broker_url: str, prefix: str, smtp: Mapping[str, object],
                 subscriptions: Sequence[Mapping[str, TomlValue]], programs: Sequence[Program] = (),
                 host: str = "e2ehost", backoff: Sequence[str] = ("200ms",), max_attempts: int = 3,
                 listener_events: str = "PROCESS_STATE,TICK_5",
                 tables: Mapping[str, Mapping[str, TomlValue]] | None = None) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.broker_url, self.prefix, self.host = broker_url, prefix, host
        self.listener_events = listener_events
        self.programs = list(programs)
        self.config_path = root / "opsrelay.toml"
        self.conf_path = root / "supervisord.conf"
        self.logdir = root / "logs"
        self.logdir.mkdir(exist_ok=True)
        self.listener_log_path = self.logdir / "listener.log"
        self.relay_log_path = self.logdir / "relay.log"
        self.supervisord_log_path = self.logdir / "supervisord.log"
        self._short_dir: Path | None = None
        self.socket_path = root / "supervisor.sock"
        if len(str(self.socket_path)) > _MAX_SOCKET_PATH:
            self._short_dir = Path(tempfile.mkdtemp(prefix="e2esv-"))
            self.socket_path = self._short_dir / "supervisor.sock"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("OPSRELAY_")}
        self.env.update(PYTHONUTF8="1", PYTHONUNBUFFERED="1", LC_ALL="C.UTF-8")
        self._process: subprocess.Popen[bytes] | None = None
        self._known: dict[int, str] = {}
        self.returncode: int | None = None  # supervisord's, once stopped
        self.killed: list[int] = []  # pids the harness had to SIGKILL
        self.tables = dict(tables or {})  # more of opsrelay.toml: {"metrics": {"listen": ...}}
        self._write_opsrelay_toml(smtp, subscriptions, backoff, max_attempts)
        self._write_supervisord_conf()

    # -- configuration -------------------------------------------------------------------------

    def _write_opsrelay_toml(self, smtp: Mapping[str, object], subscriptions: Sequence[Mapping[str, TomlValue]],
                             backoff: Sequence[str], max_attempts: int) -> None:
        smtp_values: dict[str, TomlValue] = {}
        for key, value in smtp.items():
            if value is None:
                continue
            assert isinstance(value, str | int | float | bool | Path), f"smtp.{key}: {value!r}"
            smtp_values[key] = value
        lines = [f"host = {_toml_value(self.host)}", "", "[broker]",
                 *_toml_table({"url": self.broker_url, "prefix": self.prefix,
                                            "spool": f"sqlite:///{self.root / 'spool.db'}"}), "", "[smtp]",
                 *_toml_table(smtp_values), "", "[retry]",
                 *_toml_table({"max_attempts": max_attempts, "backoff": list(backoff)})]
        for name, table in self.tables.items():
            lines += ["", f"[{name}]", *_toml_table(table)]
        for sub in subscriptions:
            lines += ["", "[[subscriptions]]", *_toml_table(sub)]
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _write_supervisord_conf(self) -> None:
        sections = [*self._supervisord_sections(), *self._opsrelay_sections(), *self._program_sections()]
        self.conf_path.write_text("\n".join(sections), encoding="utf-8")

    def _supervisord_sections(self) -> list[str]:
        return [
            "[unix_http_server]", f"file={self.socket_path}", "chmod=0700", "",
            "[supervisord]", f"logfile={self.supervisord_log_path}", f"pidfile={self.root / 'supervisord.pid'}",
            f"childlogdir={self.logdir}", "nodaemon=true", "silent=true", "loglevel=info",
            f"identifier=e2e-{self.prefix}", "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory=supervisor.rpcinterface:make_main_rpcinterface", "",
            "[supervisorctl]", f"serverurl=unix://{self.socket_path}", "",
        ]

    def _opsrelay_sections(self) -> list[str]:
        """The listener and the relay, as supervisord.conf.example registers them (a subclass may differ)."""
        opsrelay = BIN / "opsrelay"
        return [
            "[eventlistener:opsrelay]",
            f"command={opsrelay} listen --config {self.config_path}",
            f"events={self.listener_events}",
            # The default buffer of 10 drops the oldest events on a burst (see supervisord.conf.example).
            "buffer_size=1024", "autorestart=true", "stopwaitsecs=5",
            f"stderr_logfile={self.listener_log_path}", "",
            "[program:relay]",
            f"command={opsrelay} serve --config {self.config_path}",
            "autorestart=true", "startsecs=1", "stopwaitsecs=5", "redirect_stderr=true",
            f"stdout_logfile={self.relay_log_path}", "",
        ]

    def _program_sections(self) -> list[str]:
        sections: list[str] = []
        for program in self.programs:
            # stopasgroup/killasgroup: a shell's children go with it.
            options: dict[str, str | int | bool] = {"autostart": False, "stopwaitsecs": 5, "stopasgroup": True,
                                                    "killasgroup": True, **program.options}
            sections += [f"[program:{program.name}]", f"command={program.command}",
                         *(f"{key}={_ini_value(value)}" for key, value in options.items()), ""]
        return sections

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> Supervisor:
        """Run supervisord and wait until the relay consumes (its queues are bound)."""
        out = (self.logdir / "supervisord.out").open("wb")
        try:
            self._process = subprocess.Popen(
                [str(BIN / "supervisord"), "-n", "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                cwd=self.root, start_new_session=True,
            )
        finally:
            out.close()
        # The listener needs no wait: supervisord buffers its events until it is READY.
        self.wait_for(lambda: "relay: consuming" in self.relay_log(), timeout,
                      what="the relay to declare its queues and consume")
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """End supervisord and everything below it, whatever state they are in; then clean the broker.

        Raises RuntimeError when a process survived SIGKILL (it should never happen).
        """
        process, self._process = self._process, None
        try:
            if process is not None:
                self._remember_children(process.pid)
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)  # supervisord stops every program, then exits
                    try:
                        process.wait(timeout)
                    except subprocess.TimeoutExpired:
                        self.killed.append(process.pid)
                        process.kill()
                        process.wait(5.0)
                self.returncode = process.returncode
                self._kill_leftovers()
            self._delete_broker_objects()
        finally:
            if self._short_dir is not None:
                shutil.rmtree(self._short_dir, ignore_errors=True)

    def __enter__(self) -> Supervisor:
        try:
            return self.start()
        except BaseException as exc:
            try:
                self.stop()
            except Exception as cleanup:  # the reason start failed stays the error raised
                exc.add_note(f"and stopping failed too: {cleanup!r}")
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _remember_children(self, pid: int) -> None:
        self._known.update(_descendants(pid))

    def _alive(self) -> list[int]:
        return [pid for pid, start in self._known.items() if _proc_start(pid) == start]

    def _kill_leftovers(self) -> None:
        for pid in self._alive():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.killed.append(pid)
        # Children of supervisord were reaped by it; anything reparented is reaped by init.
        try:
            wait_for(lambda: not self._alive(), 5.0, what="killed processes to go")
        except WaitTimeout:
            raise RuntimeError(f"processes survived SIGKILL: {self._alive()}") from None

    def declare_relay_queues(self) -> None:
        """Declare what ``opsrelay serve`` declares, as on a broker where the relay ran before.

        For an event supervisord sends at its own start (SUPERVISOR_STATE_CHANGE_RUNNING): the
        listener may publish it before the relay has bound its queues, and then it lands in
        ``<prefix>.unrouted`` (:meth:`stop` deletes these with the rest).
        """
        from relay.config.models import load_config
        from relay.daemon.relay import relay_topology
        from relay.engines import open_engine

        config = load_config(self.config_path, env={})

        async def declare() -> None:
            async with open_engine(config.broker.url) as engine:
                await engine.declare(relay_topology(config))

        asyncio.run(declare())

    def leftovers(self) -> list[int]:
        """Pids started under supervisord that are still alive (empty after :meth:`stop`)."""
        return self._alive()

    def _delete_broker_objects(self) -> None:
        """Delete what the listener and the relay declared under this prefix."""
        if self.broker_url.startswith("sqlite:"):
            return  # the embedded queue lives in the test's own directory
        from relay.config.models import load_config
        from relay.contract.topology import event_topology
        from relay.daemon.relay import relay_topology

        topology = relay_topology(load_config(self.config_path, env={})) + event_topology(self.prefix)
        asyncio.run(delete_topology(self.broker_url, topology))

    # -- supervisorctl -------------------------------------------------------------------------

    def ctl(self, *args: str, check: bool = False, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """Run ``supervisorctl -c <conf> args...``; its exit status is not checked unless ``check``."""
        result = subprocess.run(
            [str(BIN / "supervisorctl"), "-c", str(self.conf_path), *args],
            capture_output=True, text=True, encoding="utf-8", errors="replace", env=self.env,
            timeout=timeout, check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"supervisorctl {' '.join(args)} exited {result.returncode}: "
                               f"{result.stdout}{result.stderr}")
        return result

    def status(self) -> dict[str, str]:
        """``supervisorctl status`` as name -> state; empty while supervisord does not answer."""
        # Exit status 3 when some process is not running (LSB): not an error here.
        result = self.ctl("status")
        states: dict[str, str] = {}
        for line in result.stdout.splitlines():
            words = line.split(None, 2)  # names never hold spaces (supervisor/datatypes.py)
            if len(words) >= 2 and words[1].isupper():
                states[words[0]] = words[1]
        return states

    def state(self, name: str) -> str | None:
        return self.status().get(name)

    def start_program(self, name: str) -> subprocess.CompletedProcess[str]:
        """``supervisorctl start``: returns when the program is RUNNING, or failed (not checked)."""
        return self.ctl("start", name)

    # -- logs and waiting ----------------------------------------------------------------------

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def listener_log(self) -> str:
        return self._read(self.listener_log_path)

    def relay_log(self) -> str:
        return self._read(self.relay_log_path)

    def supervisord_log(self) -> str:
        return self._read(self.supervisord_log_path)

    def diagnostics(self, lines: int = 25) -> str:
        def tail(title: str, text: str) -> str:
            return f"--- {title} (last {lines} lines)\n" + "\n".join(text.splitlines()[-lines:])

        return "\n".join([tail("supervisord log", self.supervisord_log()),
                          tail("listener stderr", self.listener_log()),
                          tail("relay log", self.relay_log())])

    def wait_for(self, predicate: Callable[[], T], timeout: float, *, interval: float = 0.05,
                 what: str = "the condition") -> T:
        """:func:`tests.waiting.wait_for`, with the logs in the error when it times out (or supervisord died)."""

        def check() -> T:
            if self._process is not None:
                # A program's child may outlive it (reparented): know it while it is still ours.
                self._remember_children(self._process.pid)
            value = predicate()
            if not value and self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"supervisord exited with {self._process.returncode} while waiting for "
                                   f"{what}\n{self._read(self.logdir / 'supervisord.out')}\n{self.diagnostics()}")
            return value

        return wait_for(check, timeout, interval=interval, what=what, diagnostics=self.diagnostics)


def stop_all(started: Sequence[Supervisor], program: str) -> None:
    """Stop every supervisord (newest first) and check each ended cleanly: no process outlived it, none had
    to be killed, supervisord exited 0 and ``program`` (the one running the relay) exited 0 on its SIGTERM."""
    for sv in reversed(started):
        sv.stop()
    for sv in started:
        assert sv.leftovers() == [], "processes outlived supervisord"
        # DESIGN.md: on SIGTERM the relay finishes what is in flight and exits 0; nothing had to be killed.
        assert sv.returncode == 0 and sv.killed == [], (sv.returncode, sv.killed, sv.supervisord_log())
        assert f"stopped: {program} (exit status 0)" in sv.supervisord_log(), sv.supervisord_log()
