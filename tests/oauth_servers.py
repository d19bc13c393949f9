"""Real OAuth2 servers for the XOAUTH2 tests and benchmark: a token endpoint and an SMTP server.

:class:`TokenEndpoint` is an HTTP server on 127.0.0.1 (stdlib ``ThreadingHTTPServer`` in a
thread) that speaks ``POST /token`` as RFC 6749 providers do: the ``refresh_token`` grant
(optionally rotating the refresh token, so an unsaved new one breaks the next refresh), the
``client_credentials`` grant, and ``authorization_code`` (a code from :meth:`~TokenEndpoint.new_code`
becomes the refresh token). Access tokens are random and expire after ``lifetime`` seconds, so
a client that caches them too long is caught. It records every request (grant, time, status;
never a secret) and can refuse every grant (400 ``invalid_grant``) or be down (503, or not
listening at all) on cue.

:class:`XOAuth2SmtpServer` is :class:`tests.smtp_server.SmtpServer` (aiosmtpd, trustme TLS,
STARTTLS required, AUTH only over TLS) with SASL XOAUTH2 added through an aiosmtpd handler
method ``auth_XOAUTH2``: a token is good when the endpoint says it is valid and unexpired, for
the configured mailbox only. On a bad token it answers as Gmail does (334 with a base64 JSON
error, the client's empty line, then 535 5.7.8). It can stop offering XOAUTH2 or refuse every
token on cue; both take effect on the next connection. SmtpServer is wrapped, not edited: its
aiosmtpd handler and exclusion list are swapped before the first connection.

No pytest here: ``with TokenEndpoint() as endpoint, XOAuth2SmtpServer(dir, endpoint) as smtp: ...``.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword

from tests.smtp_server import DEFAULT_USER, AuthAttempt, SmtpServer, _Handler

__all__ = [
    "CLIENT_ID",
    "CLIENT_SECRET",
    "SCOPE",
    "Down",
    "TokenEndpoint",
    "TokenRequest",
    "XOAuth2SmtpServer",
]

CLIENT_ID = "opsrelay-test-client"
CLIENT_SECRET = "cs-5d1f0a-not-for-logs"
SCOPE = "https://mail.example.test/.default"
# What Gmail sends base64-encoded in its 334 challenge before the 535.
XOAUTH2_ERROR = {"status": "401", "schemes": "bearer", "scope": "https://mail.example.test/"}


class Down(StrEnum):
    UNAVAILABLE = "503"  # listening, answering 503 temporarily_unavailable
    CLOSED = "closed"  # not listening: connections are refused


@dataclass(frozen=True)
class TokenRequest:
    """One request the endpoint answered: what was asked and what it said, no secret."""

    grant_type: str
    at: float  # time.monotonic()
    status: int
    error: str = ""


class _Refusal(Exception):
    def __init__(self, status: HTTPStatus, error: str) -> None:
        super().__init__(error)
        self.status, self.error = status, error


class TokenEndpoint:
    """An OAuth2 token endpoint on 127.0.0.1; ``start()``/``stop()`` or a ``with`` block. Thread-safe."""

    def __init__(self, *, lifetime: float = 2.0, client_id: str = CLIENT_ID, client_secret: str | None = CLIENT_SECRET,
                 refresh_token: str | None = None, scope: str = SCOPE, rotate: bool = False,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.lifetime, self.client_id, self.client_secret, self.scope = lifetime, client_id, client_secret, scope
        self.rotate, self.host = rotate, host
        self._lock = threading.Lock()
        self._refresh = refresh_token or _random("rt")
        self._issued: dict[str, float] = {}  # access token -> monotonic expiry
        self._refresh_tokens: list[str] = [self._refresh]  # every one ever valid, for leak checks
        self._codes: dict[str, str] = {}
        self._requests: list[TokenRequest] = []
        self._refusing = False
        self._down: Down | None = None
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = port
        self._listen()

    # -- lifecycle ---------------------------------------------------------------------------

    def _listen(self) -> None:
        server = ThreadingHTTPServer((self.host, self.port), _handler_class(self))
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._http = server

    def start(self) -> TokenEndpoint:
        if self._http is None:
            self._listen()
        assert self._http is not None
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"token-endpoint-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            if self._thread is not None:
                self._http.shutdown()
                self._thread.join(5)
            self._http.server_close()
            self._http, self._thread = None, None

    def __enter__(self) -> TokenEndpoint:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/token"

    # -- misbehaviour ------------------------------------------------------------------------

    def refuse(self, refusing: bool = True) -> None:
        """Answer every grant with 400 invalid_grant (a revoked consent, a deleted app)."""
        with self._lock:
            self._refusing = refusing

    def go_down(self, how: Down = Down.CLOSED) -> None:
        """503 to every request, or stop listening on the port (``come_back`` listens on it again)."""
        with self._lock:
            self._down = how
        if how is Down.CLOSED:
            self.stop()

    def come_back(self) -> None:
        with self._lock:
            self._down = None
        if self._http is None:
            self.start()

    def new_code(self) -> str:
        """An authorization code, as the provider's consent page would show it; it yields the refresh token."""
        code = _random("code")
        with self._lock:
            self._codes[code] = self._refresh
        return code

    # -- what happened -----------------------------------------------------------------------

    def valid(self, token: str) -> bool:
        """True for an access token this endpoint issued that has not expired."""
        with self._lock:
            expiry = self._issued.get(token)
        return expiry is not None and time.monotonic() < expiry

    @property
    def requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._requests)

    def granted(self, grant_type: str) -> int:
        """How many ``grant_type`` requests got a token."""
        return sum(1 for r in self.requests if r.grant_type == grant_type and r.status == HTTPStatus.OK)

    @property
    def refresh_token(self) -> str:
        """The refresh token valid now (the latest one, when rotating)."""
        with self._lock:
            return self._refresh

    def secret_values(self) -> list[str]:
        """Everything that must never appear in a log or an output: client secret, every token."""
        with self._lock:
            found = [*self._issued, *self._refresh_tokens, *self._codes]
        return [*found, *([self.client_secret] if self.client_secret else [])]

    @property
    def issued(self) -> list[str]:
        with self._lock:
            return list(self._issued)

    # -- the HTTP side (handler threads) -----------------------------------------------------

    def _answer(self, form: Mapping[str, str]) -> dict[str, Any]:
        """The JSON body of a 200, or _Refusal; called with the lock held."""
        if self._down is Down.UNAVAILABLE:
            raise _Refusal(HTTPStatus.SERVICE_UNAVAILABLE, "temporarily_unavailable")
        grant = form.get("grant_type", "")
        if grant not in ("refresh_token", "client_credentials", "authorization_code"):
            raise _Refusal(HTTPStatus.BAD_REQUEST, "unsupported_grant_type")
        if form.get("client_id") != self.client_id:
            raise _Refusal(HTTPStatus.UNAUTHORIZED, "invalid_client")
        if (self.client_secret is not None or grant == "client_credentials") \
                and form.get("client_secret") != self.client_secret:
            raise _Refusal(HTTPStatus.UNAUTHORIZED, "invalid_client")
        if self._refusing:
            raise _Refusal(HTTPStatus.BAD_REQUEST, "invalid_grant")
        document: dict[str, Any] = {}
        if grant == "refresh_token":
            if form.get("refresh_token") != self._refresh:
                raise _Refusal(HTTPStatus.BAD_REQUEST, "invalid_grant")
            if self.rotate:  # RFC 6749 §6: a new refresh token; the old one stops working
                self._refresh = _random("rt")
                self._refresh_tokens.append(self._refresh)
                document["refresh_token"] = self._refresh
        elif grant == "client_credentials":
            if form.get("scope", "") != self.scope:
                raise _Refusal(HTTPStatus.BAD_REQUEST, "invalid_scope")
        else:
            refresh = self._codes.pop(form.get("code", ""), None)
            if refresh is None:
                raise _Refusal(HTTPStatus.BAD_REQUEST, "invalid_grant")
            document["refresh_token"] = refresh
        token = _random("at")
        self._issued[token] = time.monotonic() + self.lifetime
        return {"access_token": token, "token_type": "Bearer", "expires_in": self.lifetime, **document}

    def _handle(self, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]:
        form = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)) \
            if content_type.split(";")[0].strip().lower() == "application/x-www-form-urlencoded" else {}
        grant = form.get("grant_type", "?")
        with self._lock:
            try:
                if not form:
                    raise _Refusal(HTTPStatus.BAD_REQUEST, "invalid_request")
                status, document = int(HTTPStatus.OK), self._answer(form)
                error = ""
            except _Refusal as refusal:
                status, document, error = int(refusal.status), {"error": refusal.error}, refusal.error
            self._requests.append(TokenRequest(grant, time.monotonic(), status, error))
        return status, document


def _random(kind: str) -> str:
    return f"{kind}-{secrets.token_urlsafe(18)}"


def _handler_class(endpoint: TokenEndpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "token-endpoint/1"

        def do_POST(self) -> None:
            if self.path.split("?")[0] != "/token":
                self._send(HTTPStatus.NOT_FOUND, {"error": "not_found"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            status, document = endpoint._handle(self.headers.get("Content-Type", ""), self.rfile.read(length))
            self._send(status, document)

        def do_GET(self) -> None:
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "invalid_request"})

        def _send(self, status: int, document: Mapping[str, Any]) -> None:
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet; the endpoint records what matters in TokenEndpoint.requests

    return Handler


# -- the SMTP server ---------------------------------------------------------------------------


def parse_xoauth2(blob: bytes) -> tuple[str, str] | None:
    """(user, token) from the decoded ``user=U\\x01auth=Bearer T\\x01\\x01``, or None if malformed."""
    text = blob.decode("utf-8", "replace")
    if not text.endswith("\x01\x01"):
        return None
    fields = dict(part.split("=", 1) for part in text[:-2].split("\x01") if "=" in part)
    auth = fields.get("auth", "")
    if "user" not in fields or not auth.startswith("Bearer "):
        return None
    return fields["user"], auth.removeprefix("Bearer ")


class _XOAuth2Handler(_Handler):
    """SmtpServer's hooks plus SASL XOAUTH2 (aiosmtpd calls ``auth_XOAUTH2(server, args)``)."""

    owner: XOAuth2SmtpServer

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = base64.b64decode(args[1].encode(), validate=True)
            except binascii.Error:
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        assert isinstance(blob, bytes)
        parsed = parse_xoauth2(blob)
        user, token = parsed if parsed is not None else ("", "")
        ok = parsed is not None and self.owner.accepts(user, token)
        self.owner.record_auth(server, user, ok)
        if ok:
            return AuthResult(success=True, auth_data=LoginPassword(user.encode(), b""))
        # Gmail's way: a JSON error as a 334 challenge, the client answers an empty line, then 535.
        answer = await server.challenge_auth(json.dumps(XOAUTH2_ERROR))
        if answer is MISSING:
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message="535 5.7.8 Username and Password not accepted")


class XOAuth2SmtpServer(SmtpServer):
    """SmtpServer whose AUTH is XOAUTH2 (and PLAIN/LOGIN only with ``password_auth``).

    ``endpoint`` decides whether a token is good; ``mailbox`` is the only user accepted.
    """

    def __init__(self, state_dir: str | Path, endpoint: TokenEndpoint, *, mailbox: str = DEFAULT_USER,
                 offer_xoauth2: bool = True, password_auth: bool = False, **options: Any) -> None:
        mechanisms: Iterable[str] = ("PLAIN", "LOGIN") if password_auth else ()
        super().__init__(state_dir, user=mailbox, auth_mechanisms=mechanisms, **options)
        self.endpoint = endpoint
        self._refuse_tokens = False
        # SmtpServer is wrapped, not edited: aiosmtpd makes each session's SMTP from these two.
        self._controller.handler = _XOAuth2Handler(self)
        self._password_excluded = list(self._controller.SMTP_kwargs.get("auth_exclude_mechanism") or [])
        self.offer_xoauth2(offer_xoauth2)

    def client_settings(self, **overrides: object) -> dict[str, object]:
        """``[smtp]`` settings that reach this server as the mailbox, with no password (add ``oauth2``)."""
        settings = super().client_settings()
        del settings["password"]
        settings.update(overrides)
        return settings

    def offer_xoauth2(self, offered: bool = True) -> None:
        """Advertise XOAUTH2 in EHLO (or not), from the next connection on."""
        excluded = self._password_excluded + ([] if offered else ["XOAUTH2"])
        self._controller.SMTP_kwargs["auth_exclude_mechanism"] = excluded

    def refuse_tokens(self, refusing: bool = True) -> None:
        """Answer every XOAUTH2 attempt with 535, whatever the token (a mailbox without SMTP AUTH)."""
        with self._lock:
            self._refuse_tokens = refusing

    def accepts(self, user: str, token: str) -> bool:
        with self._lock:
            refusing = self._refuse_tokens
        return not refusing and user == self.user and self.endpoint.valid(token)

    def record_auth(self, server: SMTP, user: str, ok: bool) -> None:
        with self._lock:
            self._auth.append(AuthAttempt(self._connection(server).number, "XOAUTH2", user, ok))

    @property
    def xoauth2_attempts(self) -> list[AuthAttempt]:
        return [a for a in self.auth_attempts if a.mechanism == "XOAUTH2"]
