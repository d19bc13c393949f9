"""A real SMTP server for the tests, the end-to-end suite and the demo.

aiosmtpd on 127.0.0.1 (a free port), in its own thread: STARTTLS with a trustme
certificate for "localhost" and 127.0.0.1, AUTH PLAIN/LOGIN with one known user,
offered only over TLS. It records every mail (envelope, raw bytes, the AUTH user,
whether the session was encrypted), every connection with its commands, and every
AUTH attempt, and can misbehave on purpose:

- ``tls=TlsMode.NONE``: no STARTTLS at all, yet AUTH offered in clear and mail accepted
  without it (a client that fails closed sends neither);
- ``tls=TlsMode.IMPLICIT``: TLS from the first byte (smtps, port 465 style);
- ``reply_to_rcpt(address, "550 5.1.1 no such user", times=None)`` (or ``rcpt_replies={...}``);
- ``reply_to_data("451 4.3.0 try later", times=3, delay=0.0)`` (or ``data_replies=[...]``);
- ``drop_connections()``: close every connection, as a server does to idle clients;
- ``ca=`` another trustme CA, ``cert_names=`` other names: certificates a client must refuse.

No pytest here: ``with SmtpServer(tmp_path) as server: ...``, or
``python -m tests.smtp_server --port 2525 --state-dir /tmp/smtp`` for the demo
(writes ca.pem there and prints each mail as it arrives).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import ssl
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.waiting import wait_until

__all__ = [
    "DEFAULT_PASSWORD",
    "DEFAULT_USER",
    "AuthAttempt",
    "Connection",
    "ReceivedMail",
    "SmtpServer",
    "TlsMode",
]

DEFAULT_USER = "relay@example.test"
DEFAULT_PASSWORD = "pw-4a7e9c-not-for-logs"
AUTH_REQUIRED = "530 5.7.0 Authentication required"


class TlsMode(StrEnum):
    STARTTLS = "starttls"
    IMPLICIT = "tls"
    NONE = "none"


@dataclass(frozen=True)
class ReceivedMail:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    auth_user: str | None
    tls: bool
    connection: int


@dataclass(frozen=True)
class AuthAttempt:
    connection: int
    mechanism: str
    user: str
    success: bool


@dataclass
class Connection:
    number: int
    commands: list[str] = field(default_factory=list)


@dataclass
class _Scripted:
    reply: str
    times: int | None  # None: for ever
    delay: float = 0.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _is_tls(server: SMTP) -> bool:
    transport = server.transport
    return transport is not None and transport.get_extra_info("sslcontext") is not None


class _Controller(Controller):
    def factory(self) -> SMTP:
        # Our own loop: without it aiosmtpd probes for one under warnings.catch_warnings(),
        # which is not thread-safe against the test thread's warning filters.
        return SMTP(self.handler, loop=self.loop, **self.SMTP_kwargs)


class SmtpServer:
    """One SMTP server; ``start()``/``stop()`` or a ``with`` block. Thread-safe to inspect."""

    def __init__(self, state_dir: str | Path, *, user: str = DEFAULT_USER, password: str = DEFAULT_PASSWORD,
                 tls: TlsMode = TlsMode.STARTTLS, require_auth: bool | None = None,
                 auth_mechanisms: Iterable[str] = ("PLAIN", "LOGIN"), ca: trustme.CA | None = None,
                 cert_names: Iterable[str] = ("localhost", "127.0.0.1"), host: str = "127.0.0.1",
                 port: int = 0, rcpt_replies: Mapping[str, str] | None = None, data_replies: Iterable[str] = (),
                 on_receive: Callable[[ReceivedMail], None] | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.user, self.password, self.tls, self.host = user, password, tls, host
        self.port = port or free_port(host)
        # In clear-text mode the trap is a server that would take mail without AUTH.
        self.require_auth = (tls is not TlsMode.NONE) if require_auth is None else require_auth
        self.ca = ca or trustme.CA()
        self.ca_pem_path = self.state_dir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem_path))
        self._server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(*cert_names).configure_cert(self._server_ssl)
        self._on_receive = on_receive
        self._lock = threading.RLock()
        self._received: list[ReceivedMail] = []
        self._auth: list[AuthAttempt] = []
        self._connections: dict[SMTP, Connection] = {}
        self._max_concurrent = 0
        self._data_attempts = 0
        self._rcpt_rules: dict[str, _Scripted] = {}
        self._data_script: deque[_Scripted] = deque()
        for address, reply in (rcpt_replies or {}).items():
            self.reply_to_rcpt(address, reply)
        self._data_script.extend(_Scripted(reply, 1) for reply in data_replies)
        offered = {m.upper() for m in auth_mechanisms}
        kwargs: dict[str, Any] = {
            "server_hostname": "localhost",
            "authenticator": self._authenticate,
            "auth_exclude_mechanism": [m for m in ("PLAIN", "LOGIN") if m not in offered],
            "decode_data": False,
        }
        if tls is TlsMode.STARTTLS:
            kwargs.update(tls_context=self._server_ssl, require_starttls=True, auth_require_tls=True)
        elif tls is TlsMode.IMPLICIT:
            # aiosmtpd counts only STARTTLS as TLS for auth_require_tls; here every byte is TLS.
            kwargs.update(ssl_context=self._server_ssl, auth_require_tls=False)
        else:
            kwargs.update(require_starttls=False, auth_require_tls=False)
        self._controller = _Controller(_Handler(self), hostname=host, port=self.port, **kwargs)
        self._running = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> SmtpServer:
        self._controller.start()
        self._running = True
        return self

    def stop(self) -> None:
        if self._running:
            self._running = False
            try:
                self._close_all_within(5.0)
            finally:
                self._controller.stop()

    def __enter__(self) -> SmtpServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def client_settings(self, **overrides: object) -> dict[str, object]:
        """Keyword arguments for ``relay.config.SmtpConfig`` that reach this server."""
        settings: dict[str, object] = {
            "host": self.host, "port": self.port, "security": self.tls.value,
            "username": self.user, "password": self.password, "ca_file": self.ca_pem_path,
            "helo": "client.test", "timeout": 5.0,
        }
        settings.update(overrides)
        return settings

    # -- what happened -----------------------------------------------------------------------

    @property
    def received(self) -> list[ReceivedMail]:
        with self._lock:
            return list(self._received)

    @property
    def auth_attempts(self) -> list[AuthAttempt]:
        with self._lock:
            return list(self._auth)

    @property
    def connections(self) -> list[Connection]:
        with self._lock:
            return [Connection(c.number, list(c.commands)) for c in self._connections.values()]

    @property
    def max_concurrent(self) -> int:
        with self._lock:
            return self._max_concurrent

    @property
    def data_attempts(self) -> int:
        """DATA commands that reached the end of the message, accepted or not."""
        with self._lock:
            return self._data_attempts

    # -- misbehaviour ------------------------------------------------------------------------

    def reply_to_rcpt(self, address: str, reply: str, times: int | None = None) -> None:
        """Answer RCPT TO:<address> with ``reply``, for ever or only the first ``times`` times."""
        with self._lock:
            self._rcpt_rules[address.lower()] = _Scripted(reply, times)

    def reply_to_data(self, reply: str, times: int = 1, delay: float = 0.0) -> None:
        """Answer the end of DATA of the next ``times`` mails with ``reply``, after ``delay`` s."""
        with self._lock:
            self._data_script.extend(_Scripted(reply, 1, delay) for _ in range(times))

    def drop_connections(self, timeout: float = 5.0) -> None:
        """Close every connection from the server side, and wait until they are gone.

        This blocks the caller's event loop on purpose: the client learns of the close
        only when it next uses the connection, as with a server that timed it out.
        """
        self._close_all_within(timeout)

    def _close_all_within(self, timeout: float) -> None:
        # The wait inside fails first, saying what it waited for; the margin is for the hand-over.
        future = asyncio.run_coroutine_threadsafe(self._close_all(timeout), self._controller.loop)
        future.result(timeout + 5.0)

    # -- inside the server's thread ----------------------------------------------------------

    async def _close_all(self, within: float) -> None:
        live = [s for s in self._connections if s.transport is not None]
        for server in live:
            if isinstance(server.transport, asyncio.Transport):
                server.transport.abort()
        # connection_lost arrives a few loop turns later (TLS: two layers)
        await wait_until(lambda: all(s.transport is None for s in live), within,
                         what=f"the server's {len(live)} connection(s) to close", interval=0.005)

    def _connection(self, server: SMTP) -> Connection:
        with self._lock:
            conn = self._connections.get(server)
            if conn is None:
                conn = self._connections[server] = Connection(len(self._connections) + 1)
                live = sum(1 for s in self._connections if s.transport is not None)
                self._max_concurrent = max(self._max_concurrent, live)
            return conn

    def _note(self, server: SMTP, command: str) -> Connection:
        conn = self._connection(server)
        with self._lock:
            conn.commands.append(command)
        return conn

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        user = auth_data.login.decode("utf-8", "replace")
        ok = user == self.user and auth_data.password == self.password.encode("utf-8")
        with self._lock:
            self._auth.append(AuthAttempt(self._connection(server).number, mechanism, user, ok))
        # handled=False: aiosmtpd then answers "535 5.7.8 Authentication credentials invalid".
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


class _Handler:
    """aiosmtpd's hooks. A class of its own: aiosmtpd takes every ``handle_*`` and ``auth_*``
    member of its handler (``auth_attempts`` would become an AUTH mechanism)."""

    def __init__(self, owner: SmtpServer) -> None:
        self.owner = owner

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        self.owner._note(server, "EHLO")
        session.host_name = hostname  # aiosmtpd leaves this to an EHLO hook
        return responses

    def handle_STARTTLS(self, server: SMTP, session: Session, envelope: Envelope) -> bool:
        self.owner._note(server, "STARTTLS")
        return True

    async def handle_AUTH(self, server: SMTP, session: Session, envelope: Envelope, args: list[str]) -> Any:
        self.owner._note(server, f"AUTH {args[0].upper()}")  # never the credentials
        return MISSING  # aiosmtpd's own PLAIN/LOGIN then run self._authenticate

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> Any:
        self.owner._note(server, "MAIL")
        if self.owner.require_auth and not session.authenticated:
            return AUTH_REQUIRED
        return MISSING

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        self.owner._note(server, "RCPT")
        if self.owner.require_auth and not session.authenticated:
            return AUTH_REQUIRED
        with self.owner._lock:
            rule = self.owner._rcpt_rules.get(address.lower())
            if rule is not None and rule.times is not None:
                rule.times -= 1
                if rule.times < 0:
                    rule = None
        if rule is not None:
            return rule.reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> Any:
        self.owner._note(server, "RSET")
        return MISSING

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> Any:
        self.owner._note(server, "QUIT")
        return MISSING

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        conn = self.owner._note(server, "DATA")
        with self.owner._lock:
            self.owner._data_attempts += 1
            scripted = self.owner._data_script.popleft() if self.owner._data_script else None
        if scripted is not None and scripted.delay:
            await asyncio.sleep(scripted.delay)  # a slow server, on cue: the reply is held this long
        if scripted is not None and not scripted.reply.startswith("2"):
            return scripted.reply
        auth = session.auth_data if session.authenticated else None
        mail = ReceivedMail(
            mail_from=str(envelope.mail_from), rcpt_tos=tuple(envelope.rcpt_tos),
            content=bytes(envelope.original_content or b""),
            auth_user=auth.login.decode("utf-8", "replace") if isinstance(auth, LoginPassword) else None,
            tls=_is_tls(server), connection=conn.number,
        )
        with self.owner._lock:
            self.owner._received.append(mail)
        if self.owner._on_receive is not None:
            self.owner._on_receive(mail)
        return scripted.reply if scripted is not None else "250 2.0.0 OK queued"


def _print_mail(mail: ReceivedMail) -> None:
    print(f"--- mail from <{mail.mail_from}> to {', '.join(mail.rcpt_tos)} "
          f"(connection {mail.connection}, tls={mail.tls}, user={mail.auth_user})")
    print(mail.content.decode("utf-8", "replace").rstrip("\r\n").replace("\r\n", "\n"))
    print("--- end", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.smtp_server", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0: a free port (printed)")
    parser.add_argument("--state-dir", required=True, type=Path, help="ca.pem is written here")
    parser.add_argument("--user", default=DEFAULT_USER)
    parser.add_argument("--password", default=DEFAULT_PASSWORD)
    parser.add_argument("--tls", choices=[m.value for m in TlsMode], default=TlsMode.STARTTLS.value)
    args = parser.parse_args(argv)
    # aiosmtpd warns on every AUTH about its own deprecated Session.login_data.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with SmtpServer(args.state_dir, user=args.user, password=args.password, tls=TlsMode(args.tls),
                    port=args.port, on_receive=_print_mail) as server:
        print(f"listening on {server.host}:{server.port} ({server.tls.value}); "
              f"user {server.user!r}; CA {server.ca_pem_path}", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
