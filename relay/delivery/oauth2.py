"""OAuth2 access tokens for SASL XOAUTH2: from a command, or from a token endpoint.

A token is kept in memory and handed out until shortly before it expires (``expires_in``
less ``refresh_margin``; a ``token_command`` token for ``token_lifetime``), or until the
smarthost refused it (:meth:`TokenSource.refused`): then the next call asks again. One
fetch serves every connection that waits for it.

Every failure is a :class:`relay.errors.TokenError` (a configuration fault: delivery is
held, the mail is never dead-lettered). Its text names the source and what went wrong, never
a token, a client secret or a refresh token; the command runs without a shell and gets no
secret in its argv. The endpoint is reached with httpx (a maintained HTTP client with
verified TLS and timeouts, rather than urllib by hand), imported only when a grant is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import ssl
import time
from pathlib import Path
from typing import Any, Protocol

from relay.config.smarthost import Grant, OAuth2Config
from relay.errors import TokenError

__all__ = ["CommandTokens", "EndpointTokens", "TokenSource", "authorization_url", "exchange_code", "token_source",
           "write_private"]

log = logging.getLogger(__name__)
# How long a token request or a token_command may take.
TOKEN_TIMEOUT = 15.0


class TokenSource(Protocol):
    """Where a smarthost connection gets its XOAUTH2 access token."""

    async def token(self) -> str:
        """A token believed valid now; TokenError when none can be had."""

    def refused(self) -> None:
        """The smarthost refused the last token: the next :meth:`token` asks for a new one."""

    @property
    def describe(self) -> str:
        """What ``opsrelay check`` says about the source (no secret)."""


class _CachedTokens:
    """A source's token and when to stop using it: one fetch, behind one lock, serves every waiter."""

    def __init__(self) -> None:
        self._token: str | None = None
        self._until = 0.0
        self._lock = asyncio.Lock()

    def _valid(self) -> str | None:
        return self._token if self._token is not None and time.monotonic() < self._until else None

    async def token(self) -> str:
        if (token := self._valid()) is not None:
            return token
        async with self._lock:
            if (token := self._valid()) is not None:
                return token
            token, seconds = await self._fetch()
            self._token, self._until = token, time.monotonic() + max(0.0, seconds)
            return token

    def refused(self) -> None:
        self._token, self._until = None, 0.0

    async def _fetch(self) -> tuple[str, float]:
        """A new token and how many seconds to use it."""
        raise NotImplementedError


class CommandTokens(_CachedTokens):
    """``token_command``: a program that prints an access token (msmtp's passwordeval, without a shell)."""

    def __init__(self, config: OAuth2Config) -> None:
        super().__init__()
        self._argv = shlex.split(config.token_command)
        self._lifetime = config.token_lifetime

    @property
    def describe(self) -> str:
        return f"token_command {self._argv[0]}"

    async def _fetch(self) -> tuple[str, float]:
        return await self._run(), self._lifetime

    async def _run(self) -> str:
        try:
            process = await asyncio.create_subprocess_exec(
                *self._argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL)
        except OSError as exc:
            raise TokenError(f"{self.describe} cannot be run: {exc.strerror or exc}") from None
        try:
            out, _ = await asyncio.wait_for(process.communicate(), TOKEN_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise TokenError(f"{self.describe} printed no token within {TOKEN_TIMEOUT:g}s") from None
        if process.returncode != 0:
            raise TokenError(f"{self.describe} exited with status {process.returncode}")
        token = out.decode("utf-8", "replace").strip()
        if not token or any(c.isspace() for c in token):
            raise TokenError(f"{self.describe} printed no single-word token")
        return token


class EndpointTokens(_CachedTokens):
    """``grant = "refresh_token"`` or ``"client_credentials"`` at ``token_url`` (RFC 6749 §6 and §4.4)."""

    def __init__(self, config: OAuth2Config) -> None:
        assert config.grant is not None
        super().__init__()
        self._config = config
        self._client: Any = None  # httpx.AsyncClient, made on first use

    @property
    def describe(self) -> str:
        return f"{self._config.grant} grant at {self._config.token_url}"

    def _form(self) -> dict[str, str]:
        c = self._config
        form = {"grant_type": str(c.grant), "client_id": c.client_id}
        if c.client_secret is not None:
            form["client_secret"] = c.client_secret.get_secret_value()
        if c.scope:
            form["scope"] = c.scope
        if c.grant is Grant.REFRESH_TOKEN:
            assert c.refresh_token_file is not None
            try:
                form["refresh_token"] = c.refresh_token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise TokenError(f"refresh_token_file {str(c.refresh_token_file)!r} cannot be read: "
                                 f"{exc.strerror or exc} (opsrelay oauth2 login writes it)") from None
        return form

    async def _fetch(self) -> tuple[str, float]:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(verify=_tls(self._config.ca_file), timeout=TOKEN_TIMEOUT,
                                             follow_redirects=False)
        try:
            response = await self._client.post(self._config.token_url, data=self._form(),
                                               headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise TokenError(f"token endpoint {self._config.token_url} unavailable: {type(exc).__name__}"
                             f"{': ' + str(exc) if str(exc) else ''}") from None
        document = _json(response.content)
        if response.status_code != 200:
            # RFC 6749 §5.2: "error" is a code such as invalid_grant; the description may quote input.
            error = document.get("error") if isinstance(document.get("error"), str) else "no error code"
            raise TokenError(f"token endpoint {self._config.token_url} refused the {self._config.grant} grant: "
                             f"HTTP {response.status_code} {error}")
        token = document.get("access_token")
        if not isinstance(token, str) or not token or any(c.isspace() for c in token):
            raise TokenError(f"token endpoint {self._config.token_url} answered without an access_token")
        expires = document.get("expires_in")
        lifetime = float(expires) if isinstance(expires, int | float) and expires > 0 else 3600.0
        renewed = document.get("refresh_token")
        if isinstance(renewed, str) and renewed and self._config.refresh_token_file is not None:
            # Providers may rotate the refresh token (RFC 6749 §6): the old one may stop working.
            try:
                write_private(self._config.refresh_token_file, renewed + "\n")
            except OSError as exc:
                log.error("oauth2: could not write the new refresh token to %s: %s",
                          self._config.refresh_token_file, exc.strerror or exc)
        log.info("oauth2: new access token from %s, valid %ds", self.describe, int(lifetime))
        return token, lifetime - self._config.refresh_margin

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _json(content: bytes) -> dict[str, Any]:
    try:
        document = json.loads(content)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


def _tls(ca_file: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, mode 0600: a temporary file beside it, fsynced,
    renamed over it, the folder fsynced. A crash leaves the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def token_source(config: OAuth2Config) -> CommandTokens | EndpointTokens:
    return CommandTokens(config) if config.token_command else EndpointTokens(config)


def authorization_url(config: OAuth2Config) -> str:
    """Where a person grants opsrelay access once (RFC 6749 §4.1.1), for ``opsrelay oauth2 login``."""
    import urllib.parse

    if not config.auth_url:
        raise TokenError("oauth2 login needs auth_url (the provider's authorization endpoint)")
    query = {"response_type": "code", "client_id": config.client_id, "redirect_uri": config.redirect_uri,
             "scope": config.scope, "access_type": "offline", "prompt": "consent"}
    separator = "&" if "?" in config.auth_url else "?"
    return config.auth_url + separator + urllib.parse.urlencode({k: v for k, v in query.items() if v})


async def exchange_code(config: OAuth2Config, code: str) -> None:
    """Trade the code the person pasted for a refresh token (RFC 6749 §4.1.3) and keep it in
    ``refresh_token_file`` (0600, atomically). TokenError (one line, no secret) otherwise."""
    import httpx

    assert config.refresh_token_file is not None
    form = {"grant_type": "authorization_code", "code": code.strip(), "redirect_uri": config.redirect_uri,
            "client_id": config.client_id}
    if config.client_secret is not None:
        form["client_secret"] = config.client_secret.get_secret_value()
    try:
        async with httpx.AsyncClient(verify=_tls(config.ca_file), timeout=TOKEN_TIMEOUT) as client:
            response = await client.post(config.token_url, data=form, headers={"Accept": "application/json"})
    except httpx.HTTPError as exc:
        raise TokenError(f"token endpoint {config.token_url} unavailable: {type(exc).__name__}") from None
    document = _json(response.content)
    refresh = document.get("refresh_token")
    if response.status_code != 200 or not isinstance(refresh, str) or not refresh:
        error = document.get("error") if isinstance(document.get("error"), str) else "no refresh_token"
        raise TokenError(f"token endpoint {config.token_url} gave no refresh token: HTTP {response.status_code} "
                         f"{error}")
    write_private(config.refresh_token_file, refresh + "\n")
