"""What supervisord knows about a crash at event time: exit status, signal, spawn error, log tail.

For PROCESS_STATE_EXITED, _FATAL and _BACKOFF the listener asks supervisord's
XML-RPC interface in one ``system.multicall``, bounded by
``listener.fetch_timeout`` for all of it: ``getProcessInfo``, the tails of the
process's stderr and stdout logs, and the tail of supervisord's own log. Whatever
fails, the event goes out, with a line in ``notes`` saying what is missing and why.
The server is ``$SUPERVISOR_SERVER_URL`` (supervisord sets it for its children);
``$SUPERVISOR_USERNAME`` / ``$SUPERVISOR_PASSWORD`` are sent as HTTP Basic auth
(supervisord does not set those: give them with ``environment=`` in the
``[eventlistener:x]`` section when its server has credentials).

Why supervisord's own log too (supervisor/process.py, 4.x):

* ``spawn()`` resets ``exitstatus`` and ``spawnerr``, and a program with
  ``autorestart`` is respawned in the loop turn after its exit, usually before the
  listener gets the event. The exit stays in the log: ``spawned: 'NAME' with pid
  P`` then ``exited: NAME (exit status 3; not expected)``, found by the event's
  pid, so never another run's.
* ``finish()`` stores -1 for a process killed by a signal (``decode_wait_status``)
  and None after an exit too quick for ``startsecs`` (BACKOFF); ``getProcessInfo``
  reports None as 0. Only the log line names the signal, or a BACKOFF's code.

Quirks of the wire handled here:

* supervisord decodes log bytes strictly as UTF-8 (``compat.as_string``): a tail
  that starts inside a character is a FAILED fault naming UnicodeDecodeError at
  position 0, so it is asked again 1-3 bytes shorter.
* it writes control characters (a coloured log's ESC) raw into its XML, which
  XML 1.0 forbids and expat refuses: they become Unicode control pictures
  (ESC -> U+241B) before parsing, and ANSI colour sequences leave the tail.
* ``tailProcessStderrLog`` answers an empty tail, not NO_FILE, for a log that is
  not kept (``redirect_stderr=true``, ``stderr_logfile=NONE``): then stdout is used.

Standard library only (the listener's fast path). The decisions are pure
(:func:`plan`, :func:`exit_facts`, :func:`choose_tail`, :func:`enriched`);
:class:`Enricher` does the IO through :mod:`listeners.supervisor_rpc`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from listeners.supervisor_rpc import (
    Call,
    Deadline,
    Fault,
    SupervisorRpc,
    SupervisorTimeout,
    SupervisorUnreachable,
    xml_safe,
)
from relay.contract.event import Event

if TYPE_CHECKING:

    from relay.config.models import Config

__all__ = [
    "MAIN_LOG_BYTES",
    "QUIET",
    "Call",
    "Deadline",
    "Enricher",
    "ExitFacts",
    "Fault",
    "Fetched",
    "LogTail",
    "ProcessInfo",
    "SupervisorRpc",
    "SupervisorUnreachable",
    "choose_tail",
    "enriched",
    "exit_cause",
    "exit_facts",
    "make_enricher",
    "parse_cause",
    "plan",
    "shorter",
    "trim_tail",
    "unreachable",
    "wants",
    "xml_safe",
]

log = logging.getLogger("opsrelay.listener")

ENRICHED_STATES = frozenset({"EXITED", "FATAL", "BACKOFF"})
# After supervisord did not answer in time, how long events go out without asking.
QUIET = 30.0
# How much of supervisord's own log is searched for the exit line (~350 lines).
MAIN_LOG_BYTES = 32 * 1024
_TOO_QUICKLY = "Exited too quickly"  # the spawnerr finish() sets for a BACKOFF after an exit
_ANSI = re.compile("\u241b\\[[0-9;?]*[ -/]*[@-~]")  # ECMA-48 CSI, once ESC became U+241B
# supervisor/loggers.py: "%(asctime)s,%(msecs)03d %(levelname)s %(message)s".
_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ (.*)")
_STATUS = re.compile(r"exit status (\d+)")
_SIGNAL = re.compile(r"terminated by (SIG\w+|signal \d+)( \(core dumped\))?")


# -- what is asked and what came back -----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ProcessInfo:
    statename: str
    exitstatus: int  # 0 also when supervisord has None (never exited, or BACKOFF)
    spawnerr: str
    stdout_logfile: str  # "" when not kept (NONE, syslog)
    stderr_logfile: str  # "" also with redirect_stderr=true


@dataclass(frozen=True, slots=True)
class LogTail:
    text: str
    overflow: bool  # the log is longer than the tail: its first line may be a fragment


@dataclass(frozen=True, slots=True)
class Fetched:
    info: ProcessInfo | Fault
    stderr: LogTail | Fault | None  # None: not asked (log_tail_bytes = 0)
    stdout: LogTail | Fault | None
    log: str | Fault  # the tail of supervisord's own log


@dataclass(frozen=True, slots=True)
class ExitFacts:
    exit_status: int | None = None
    signal: str | None = None
    spawnerr: str | None = None
    notes: tuple[str, ...] = ()


# -- pure decisions -----------------------------------------------------------------------------

def wants(event: Event) -> bool:
    """A process crash worth asking about (not supervisord's own state, not RUNNING and the like)."""
    return not event.is_supervisor and event.state in ENRICHED_STATES


def plan(event: Event, tail_bytes: int) -> tuple[Call, ...]:
    """The multicall for one event: process info, [stderr and stdout tails,] supervisord's log tail."""
    name = f"{event.group}:{event.process}"  # unambiguous even when a group holds same-named processes
    tails = (Call("supervisor.tailProcessStderrLog", (name, 0, tail_bytes)),
             Call("supervisor.tailProcessStdoutLog", (name, 0, tail_bytes))) if tail_bytes > 0 else ()
    return (Call("supervisor.getProcessInfo", (name,)), *tails, Call("supervisor.readLog", (-MAIN_LOG_BYTES, 0)))


def shorter(call: Call) -> tuple[Call, ...]:
    """The same read 1, 2 and 3 bytes shorter: one starts on a character (UTF-8 has <= 3 continuation bytes)."""
    if call.method == "supervisor.readLog":
        start = int(call.params[0])  # negative: that many bytes from the end
        return tuple(Call(call.method, (start + cut, 0)) for cut in (1, 2, 3))
    name, offset, length = call.params
    return tuple(Call(call.method, (name, offset, int(length) - cut)) for cut in (1, 2, 3))


def trim_tail(text: str, *, overflow: bool) -> str | None:
    """Whole lines of a log tail without terminal colours; None when nothing is left.

    When the log is longer than the tail (``overflow``) the first line is a fragment
    and goes, unless it is all there is.
    """
    text = _ANSI.sub("", text)
    if overflow:
        _, newline, rest = text.partition("\n")
        if newline and rest.strip():
            text = rest
    text = text.strip("\n").rstrip()
    return text if text.strip() else None


def _messages(log_text: str) -> list[str]:
    return [m[1] for m in map(_LOG_LINE.fullmatch, log_text.splitlines()) if m]


def exit_cause(log_text: str, process: str, pid: int | None) -> str | None:
    """What supervisord's log says of an exit: ``exit status 3``, ``terminated by SIGKILL``, ...

    With ``pid``: the first exit of ``process`` after ``spawned: 'process' with pid P``,
    that run's even after a respawn. Without: the last exit of ``process`` in the log.
    """
    spawned, exited = f"spawned: '{process}' with pid {pid}", f"exited: {process} ("
    armed, found = pid is None, None
    for message in _messages(log_text):
        if message == spawned:
            armed = True
        elif armed and message.startswith(exited) and message.endswith(")"):
            # process.py: "exited: %s (%s)" % (name, msg + "; expected" or "; not expected")
            body = message[len(exited) : -1]
            cause, sep, _ = body.rpartition("; ")
            found = cause if sep else body
            if pid is not None:
                return found
    return found


def parse_cause(cause: str) -> ExitFacts:
    """decode_wait_status's text (supervisor/options.py) -> exit status, or signal name."""
    if status := _STATUS.fullmatch(cause):
        return ExitFacts(exit_status=int(status[1]))
    if signal := _SIGNAL.fullmatch(cause):
        return ExitFacts(signal=signal[1], notes=("core dumped",) if signal[2] else ())
    return ExitFacts(notes=(f"exit status unavailable: supervisord says {cause!r}",))


def _log_where(log_text: str | Fault) -> str:
    if isinstance(log_text, Fault):
        return f"supervisord's log, which it could not read ({log_text.text})"
    return f"the last {MAIN_LOG_BYTES // 1024} KiB of supervisord's log"


def exit_facts(event: Event, fetched: Fetched) -> ExitFacts:
    """Exit status or signal, and for BACKOFF/FATAL the spawn error, as far as they are known.

    Nothing is reported that may belong to a later run: when the process has moved on
    (its state is no longer the event's) and the log does not name the event's run, a
    note says the value is missing instead.
    """
    info, log_text = fetched.info, fetched.log
    text = log_text if isinstance(log_text, str) else ""
    current = info if isinstance(info, ProcessInfo) and info.statename == event.state else None
    if isinstance(info, Fault):
        moved = f"supervisord could not say ({info.text})"
    else:
        moved = f"{event.program} was already {info.statename} when supervisord was asked"
    if event.state == "EXITED":
        cause = exit_cause(text, event.process, event.pid) if event.pid else None
        if cause is None and current is not None:
            if current.exitstatus != -1:
                return ExitFacts(exit_status=current.exitstatus)
            # -1: killed by a signal; no run since (state unchanged), so the last exit line is this one.
            cause = exit_cause(text, event.process, None)
            if cause is None:
                return ExitFacts(notes=(f"killed by a signal, but which one is not in {_log_where(log_text)}",))
        if cause is None:
            return ExitFacts(notes=(f"exit status unavailable: {moved}, and its exit is not in "
                                    f"{_log_where(log_text)}",))
        return parse_cause(cause)
    if current is None:
        return ExitFacts(notes=(f"exit status and spawn error unavailable: {moved}",))
    spawnerr = current.spawnerr or None
    if not (spawnerr or "").startswith(_TOO_QUICKLY):
        return ExitFacts(spawnerr=spawnerr)  # it never ran (can't find command, ...): no exit to report
    cause = exit_cause(text, event.process, None)
    if cause is None:
        return ExitFacts(spawnerr=spawnerr, notes=(f"exit status unavailable: not in {_log_where(log_text)}",))
    return replace(parse_cause(cause), spawnerr=spawnerr)


def choose_tail(event: Event, fetched: Fetched) -> tuple[str | None, tuple[str, ...]]:
    """stderr's tail, else stdout's (stderr empty, not kept or redirected); else why there is none."""
    if fetched.stderr is None:
        return None, ()
    faults = []
    for tail in (fetched.stderr, fetched.stdout):
        if isinstance(tail, Fault):
            faults.append(tail.text)
        elif tail is not None and (text := trim_tail(tail.text, overflow=tail.overflow)):
            return text, ()
    if faults:
        return None, (f"log tail unavailable: supervisord could not read the log ({faults[0]})",)
    info = fetched.info
    if isinstance(info, ProcessInfo) and not info.stderr_logfile and not info.stdout_logfile:
        return None, (f"log tail unavailable: supervisord keeps no log of {event.program} "
                      "(stdout_logfile and stderr_logfile are NONE or syslog)",)
    return None, (f"no log tail: {event.program} wrote nothing to stderr or stdout",)


def enriched(event: Event, fetched: Fetched) -> Event:
    facts = exit_facts(event, fetched)
    tail, tail_notes = choose_tail(event, fetched)
    return replace(event, exit_status=facts.exit_status, signal=facts.signal, spawnerr=facts.spawnerr,
                   log_tail=tail, notes=(*event.notes, *tail_notes, *facts.notes))


def unreachable(event: Event, reason: str, *, logs: bool) -> Event:
    """The event as it goes out when supervisord could not be asked at all."""
    what = "exit status" if event.state == "EXITED" else "exit status and spawn error"
    notes = ((f"log tail unavailable: {reason}",) if logs else ()) + (f"{what} unavailable: {reason}",)
    return replace(event, notes=(*event.notes, *notes))


def _fetched(calls: Sequence[Call], results: Sequence[Any]) -> Fetched:
    by_method: dict[str, Any] = {call.method: result for call, result in zip(calls, results, strict=True)}

    def tail(method: str) -> LogTail | Fault | None:
        if method not in by_method:
            return None
        value = by_method[method]
        if isinstance(value, Fault):
            return value
        # [bytes as text, next offset, overflow]
        if isinstance(value, list) and len(value) == 3 and isinstance(value[0], str):
            return LogTail(value[0], bool(value[2]))
        return Fault(0, f"unexpected answer to {method}")

    raw = by_method["supervisor.getProcessInfo"]
    info: ProcessInfo | Fault = raw if isinstance(raw, Fault) else Fault(0, "unexpected answer to getProcessInfo")
    if isinstance(raw, dict):
        with contextlib.suppress(TypeError, KeyError, ValueError):
            info = ProcessInfo(str(raw["statename"]), int(raw["exitstatus"]), str(raw["spawnerr"]),
                               str(raw["stdout_logfile"]), str(raw["stderr_logfile"]))
    main = by_method["supervisor.readLog"]
    if not isinstance(main, Fault | str):
        main = Fault(0, "unexpected answer to supervisor.readLog")
    return Fetched(info, tail("supervisor.tailProcessStderrLog"), tail("supervisor.tailProcessStdoutLog"), main)


class Enricher:
    """Adds exit status, signal, spawn error and log tail to crash events.

    Never raises and never waits past ``timeout`` (all calls of one event together).
    """

    def __init__(self, rpc: SupervisorRpc, *, tail_bytes: int, timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rpc, self.tail_bytes, self.timeout = rpc, tail_bytes, timeout
        self._clock = clock
        self._quiet_until = -float("inf")
        self._quiet_reason = ""

    def __call__(self, event: Event) -> Event:
        if not wants(event):
            return event
        if self._clock() < self._quiet_until:
            # supervisord did not answer a moment ago: in a crash loop every event would wait the
            # whole timeout out while supervisord's buffer fills; ask again after QUIET seconds.
            return unreachable(event, f"not asked: {self._quiet_reason} moments ago", logs=self.tail_bytes > 0)
        deadline = Deadline(self.timeout)
        calls = plan(event, self.tail_bytes)
        try:
            results = self.rpc.multicall(calls, deadline)
            results = self._again_shorter(calls, results, deadline)
            return enriched(event, _fetched(calls, results))
        except SupervisorTimeout as exc:
            self._quiet_until, self._quiet_reason = self._clock() + QUIET, str(exc)
            log.warning("%s %s: %s; not asking again for %gs", event.program, event.state, exc, QUIET)
            return unreachable(event, str(exc), logs=self.tail_bytes > 0)
        except SupervisorUnreachable as exc:
            log.warning("%s %s: %s", event.program, event.state, exc)
            return unreachable(event, str(exc), logs=self.tail_bytes > 0)
        except Exception as exc:
            # A bug here must cost the enrichment, never the event.
            log.exception("enriching %s %s", event.program, event.state)
            return unreachable(event, f"the listener failed to ask ({type(exc).__name__}, see its log)",
                               logs=self.tail_bytes > 0)

    def _again_shorter(self, calls: Sequence[Call], results: list[object], deadline: Deadline) -> list[object]:
        """Reads supervisord cut inside a character, asked again 1-3 bytes shorter (one more request)."""
        cut = [i for i, result in enumerate(results) if isinstance(result, Fault) and result.mid_character]
        if not cut:
            return results
        try:
            answers = self.rpc.multicall([c for i in cut for c in shorter(calls[i])], deadline)
        except SupervisorUnreachable as exc:
            log.warning("asking again for a log cut inside a character: %s", exc)
            return results
        results = list(results)
        for n, i in enumerate(cut):
            tries = answers[3 * n : 3 * n + 3]
            results[i] = next((a for a in tries if not isinstance(a, Fault)), tries[-1])
        return results


def make_enricher(config: Config, env: Mapping[str, str]) -> Enricher | None:
    """What ``opsrelay listen`` enriches with; None when supervisord did not start it (nobody to ask)."""
    if not env.get("SUPERVISOR_ENABLED"):
        return None
    rpc = SupervisorRpc(env.get("SUPERVISOR_SERVER_URL") or None, env.get("SUPERVISOR_USERNAME", ""),
                        env.get("SUPERVISOR_PASSWORD", ""))
    return Enricher(rpc, tail_bytes=config.log_tail_bytes, timeout=config.listener.fetch_timeout)
