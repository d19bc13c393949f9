"""supervisord's XML-RPC, asked within one deadline (standard library only).

``system.multicall`` over supervisord's unix socket or inet server, HTTP Basic
auth when credentials are given. Not :mod:`supervisor.childutils`' transport:
that cannot hold one overall deadline (a socket timeout bounds each read, so a
server dripping bytes could hold the listener for ever), and it breaks on the
raw control characters supervisord writes into its XML (see :func:`xml_safe`).
"""

from __future__ import annotations

import base64
import http.client
import re
import socket
import time
import urllib.parse
import xmlrpc.client
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from xml.parsers.expat import ExpatError

from relay.errors import TransientError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = ["Call", "Deadline", "Fault", "SupervisorRpc", "SupervisorTimeout", "SupervisorUnreachable", "xml_safe"]

_FAILED = 30  # supervisor.xmlrpc.Faults.FAILED
# XML 1.0 §2.2 allows no C0 control but tab, LF and CR, and not U+FFFE / U+FFFF.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


class SupervisorUnreachable(TransientError, ConnectionError):
    """supervisord's XML-RPC did not answer in time, or not usefully (never leaves the listener)."""


class SupervisorTimeout(SupervisorUnreachable):
    """No answer within the deadline: the costly failure (every event would wait it out)."""


@dataclass(frozen=True, slots=True)
class Call:
    method: str
    params: tuple[str | int, ...]

    def struct(self) -> dict[str, Any]:
        return {"methodName": self.method, "params": list(self.params)}


@dataclass(frozen=True, slots=True)
class Fault:
    """One call's fault inside the multicall."""

    code: int
    text: str

    @property
    def mid_character(self) -> bool:
        """supervisord cut the log inside a UTF-8 character (its strict decode failed at byte 0)."""
        return self.code == _FAILED and "UnicodeDecodeError" in self.text and "position 0:" in self.text


def xml_safe(body: bytes) -> bytes:
    """supervisord's answer with what XML 1.0 forbids made visible: C0 controls as control pictures."""
    text = body.decode("utf-8", "replace")
    return _NOT_XML.sub(lambda m: chr(0x2400 + ord(m[0])) if m[0] < " " else "\ufffd", text).encode("utf-8")


class Deadline:
    """One end time for every wait of one event (connect, send, each read)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self._clock = seconds, clock
        self._end = clock() + seconds

    def remaining(self) -> float:
        left = self._end - self._clock()
        if left <= 0:
            raise TimeoutError(f"no answer within {self.seconds:g} s")
        return left


class _BoundedSocket(socket.socket):
    """A socket whose every wait ends at one deadline, however many reads an answer takes
    (a socket timeout alone bounds each read, so a server dripping bytes could hold us forever)."""

    deadline: Deadline

    def connect(self, address: Any) -> None:
        self.settimeout(self.deadline.remaining())
        super().connect(address)

    def sendall(self, data: ReadableBuffer, flags: int = 0, /) -> None:
        self.settimeout(self.deadline.remaining())
        super().sendall(data, flags)

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0, /) -> int:
        self.settimeout(self.deadline.remaining())
        return super().recv_into(buffer, nbytes, flags)


class _Connection(http.client.HTTPConnection):
    """HTTP over supervisord's unix socket (a path) or inet server (host, port), within a deadline."""

    def __init__(self, target: str | tuple[str, int], deadline: Deadline) -> None:
        if isinstance(target, tuple):
            super().__init__(target[0], target[1])
        else:
            super().__init__("localhost")  # the Host header; the socket is the path
        self._target, self._deadline = target, deadline

    def _socket(self, family: int, kind: int = socket.SOCK_STREAM, proto: int = 0) -> _BoundedSocket:
        sock = _BoundedSocket(family, kind, proto)
        sock.deadline = self._deadline
        return sock

    def connect(self) -> None:
        if isinstance(self._target, str):
            sock = self._socket(socket.AF_UNIX)
            try:
                sock.connect(self._target)
            except BaseException:
                sock.close()
                raise
            self.sock = sock
            return
        error: OSError = OSError(f"no address for {self._target[0]}")
        # getaddrinfo takes no timeout; supervisord's URL names an address or localhost (options.py).
        for family, kind, proto, _, address in socket.getaddrinfo(*self._target, type=socket.SOCK_STREAM):
            sock = self._socket(family, kind, proto)
            try:
                sock.connect(address)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            self.sock = sock
            return
        raise error


def _target(url: str) -> str | tuple[str, int]:
    """``unix:///path`` -> path, ``http://host:port`` -> (host, port), as supervisor.xmlrpc reads them."""
    if url.startswith("unix://"):
        return url[len("unix://") :]
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"SUPERVISOR_SERVER_URL {url!r} is neither unix:// nor http://")
    return parts.hostname, parts.port or 80


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class SupervisorRpc:
    """supervisord's XML-RPC: one ``system.multicall`` per request, on a new connection each time."""

    def __init__(self, url: str | None, username: str = "", password: str = "") -> None:
        self.url = url
        self._headers = {"Content-Type": "text/xml", "Accept": "text/xml"}
        if username or password:
            token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"

    def __repr__(self) -> str:
        return f"SupervisorRpc({self.url!r})"  # never the password

    def multicall(self, calls: Sequence[Call], deadline: Deadline) -> list[object]:
        """Each call's value or :class:`Fault`; SupervisorUnreachable when the request failed as a whole."""
        if not self.url:
            raise SupervisorUnreachable("SUPERVISOR_SERVER_URL is not set (supervisord has no "
                                        "[unix_http_server] or [inet_http_server])")
        try:
            target = _target(self.url)
        except ValueError as exc:
            raise SupervisorUnreachable(str(exc)) from None
        body = xmlrpc.client.dumps(([call.struct() for call in calls],), "system.multicall").encode("utf-8")
        connection = _Connection(target, deadline)
        try:
            connection.request("POST", "/RPC2", body, self._headers)
            response = connection.getresponse()
            data = response.read()
        except TimeoutError:
            raise SupervisorTimeout(f"supervisord did not answer within {deadline.seconds:g} s "
                                        f"({self.url})") from None
        except (OSError, http.client.HTTPException) as exc:
            raise SupervisorUnreachable(f"cannot reach supervisord at {self.url}: "
                                        f"{_one_line(exc) or type(exc).__name__}") from None
        finally:
            connection.close()
        if response.status == 401:
            raise SupervisorUnreachable(f"supervisord at {self.url} refused the credentials (HTTP 401; "
                                        "set SUPERVISOR_USERNAME and SUPERVISOR_PASSWORD in the listener's "
                                        "environment=)")
        if response.status != 200:
            raise SupervisorUnreachable(f"supervisord at {self.url} answered HTTP {response.status} {response.reason}")
        try:
            (results,), _ = xmlrpc.client.loads(xml_safe(data))
        except (ExpatError, xmlrpc.client.Error, ValueError) as exc:
            raise SupervisorUnreachable(f"unreadable answer from supervisord: {_one_line(exc)}") from None
        if not isinstance(results, list) or len(results) != len(calls):
            raise SupervisorUnreachable("unreadable answer from supervisord: not one result per call")
        # supervisor.xmlrpc's multicall gives each value bare, or a fault struct in its place.
        return [Fault(int(r["faultCode"]), _one_line(r.get("faultString", "")))
                if isinstance(r, dict) and "faultCode" in r else r for r in results]
