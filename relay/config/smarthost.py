"""A smarthost's connection settings: ``[smtp]``, each ``[[smtp.fallback]]``, and their ``oauth2`` tables.

With ``oauth2`` the AUTH mechanism is SASL XOAUTH2 with an access token from one of three
sources (a command, the refresh-token grant, the client-credentials grant), and no password
may be set. Token URLs are https (verified) except to a loopback address. Secrets are
``SecretStr`` and read from files at load; none of them reaches a repr, a log or argv.
"""

from __future__ import annotations

import shlex
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, model_validator

from relay.config.rules import check_duration
from relay.contract.urls import is_loopback

__all__ = ["DEFAULT_PORTS", "Grant", "OAuth2Config", "Security", "SmarthostConfig", "read_secret"]

Duration = Annotated[float, BeforeValidator(check_duration)]


class Security(StrEnum):
    STARTTLS = "starttls"
    TLS = "tls"
    NONE = "none"


DEFAULT_PORTS = {Security.STARTTLS: 587, Security.TLS: 465, Security.NONE: 25}


class Grant(StrEnum):
    REFRESH_TOKEN = "refresh_token"  # noqa: S105 - the grant's name (RFC 6749 §6), not a secret
    CLIENT_CREDENTIALS = "client_credentials"


def empty_is_none(value: object) -> object:
    """``ca_file = ""`` means no extra CA, as in the design's example."""
    return None if value == "" else value


def read_secret(path: Path, what: str) -> SecretStr:
    """A secret from its file, without the trailing newline; ValueError (one line) otherwise."""
    try:
        return SecretStr(path.read_text(encoding="utf-8").rstrip("\r\n"))
    except OSError as exc:
        raise ValueError(f"{what} {str(path)!r} cannot be read: {exc.strerror or exc}") from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class OAuth2Config(_Strict):
    """Where the XOAUTH2 access token comes from: ``token_command``, or a ``grant`` at ``token_url``."""

    # (a) A command (no shell) that prints an access token on stdout, like msmtp's passwordeval.
    token_command: str = ""
    # A token_command token is asked for again after this long, or at once when it was refused.
    token_lifetime: Duration = Field(default=3000.0, gt=0)
    # (b) refresh_token (Gmail, delegated Microsoft 365) or (c) client_credentials (Microsoft 365 app-only).
    grant: Grant | None = None
    token_url: str = ""
    client_id: str = ""
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    refresh_token_file: Path | None = None
    scope: str = ""
    # Only for the authorization-code flow of `opsrelay oauth2 login` (refresh_token grant).
    auth_url: str = ""
    redirect_uri: str = "urn:ietf:wg:oauth:2.0:oob"
    # Refresh this long before expires_in says the token ends.
    refresh_margin: Duration = Field(default=60.0, ge=0)
    # An extra trust anchor for the token endpoint (the system's CAs stay trusted).
    ca_file: Annotated[Path | None, BeforeValidator(empty_is_none)] = None

    @model_validator(mode="after")
    def _one_source(self) -> OAuth2Config:
        if bool(self.token_command) == (self.grant is not None):
            raise ValueError("set either token_command or grant (refresh_token or client_credentials)")
        if self.token_command:
            try:
                if not shlex.split(self.token_command):
                    raise ValueError("token_command is empty")
            except ValueError as exc:
                raise ValueError(f"token_command cannot be split into words: {exc}") from None
            return self
        if not self.token_url or not self.client_id:
            raise ValueError(f"grant = '{self.grant}' needs token_url and client_id")
        check_token_url(self.token_url, "token_url")
        if self.auth_url:
            check_token_url(self.auth_url, "auth_url")
        if self.client_secret is not None and self.client_secret_file is not None:
            raise ValueError("set either client_secret or client_secret_file, not both")
        if self.client_secret_file is not None:
            object.__setattr__(self, "client_secret", read_secret(self.client_secret_file, "client_secret_file"))
        if self.grant is Grant.CLIENT_CREDENTIALS and self.client_secret is None:
            raise ValueError("grant = 'client_credentials' needs client_secret or client_secret_file")
        if self.grant is Grant.REFRESH_TOKEN and self.refresh_token_file is None:
            raise ValueError("grant = 'refresh_token' needs refresh_token_file (opsrelay oauth2 login writes it)")
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ValueError(f"ca_file {str(self.ca_file)!r} does not exist")
        return self

    @property
    def source(self) -> str:
        """What ``opsrelay check`` says the token comes from (no secret in it)."""
        if self.token_command:
            return f"token_command {shlex.split(self.token_command)[0]}"
        return f"{self.grant} grant at {self.token_url}"


def check_token_url(url: str, key: str) -> str:
    """https (verified), or http only to a loopback address: a secret goes in the request body."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and is_loopback(parts.hostname or ""):
        return url
    raise ValueError(f"{key} must be https:// (http:// only to a loopback address), got {url!r}")


class SmarthostConfig(_Strict):
    """How to reach and authenticate to one smarthost."""

    host: str = "localhost"
    port: int | None = Field(default=None, ge=1, le=65535)
    security: Security = Security.STARTTLS
    username: str = ""
    password: SecretStr | None = None
    password_file: Path | None = None
    oauth2: OAuth2Config | None = None
    ca_file: Annotated[Path | None, BeforeValidator(empty_is_none)] = None
    timeout: Duration = 30.0
    helo: str | None = None
    # Sending budget of this smarthost, in messages it accepted (0: no limit), shared by every relay.
    max_per_minute: int = Field(default=0, ge=0)
    max_per_day: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _credentials(self) -> SmarthostConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set either password or password_file, not both")
        if self.oauth2 is not None:
            if self.password is not None or self.password_file is not None:
                raise ValueError("with [oauth2] AUTH is XOAUTH2: set no password or password_file")
            if not self.username:
                raise ValueError("with [oauth2] username is the mailbox XOAUTH2 authenticates as: set it")
        if self.password_file is not None:
            object.__setattr__(self, "password", read_secret(self.password_file, "password_file"))
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ValueError(f"ca_file {str(self.ca_file)!r} does not exist")
        # No mail and no credentials over clear text: 'none' only to a relay on this host.
        if self.security is Security.NONE and not is_loopback(self.host):
            raise ValueError("security = 'none' would send mail (and any password) in clear text to "
                             f"{self.host!r}; use starttls or tls ('none' is only for a loopback host)")
        return self

    @property
    def effective_port(self) -> int:
        return self.port or DEFAULT_PORTS[self.security]

    @property
    def name(self) -> str:
        """``host:port``: how logs, metrics, the history and budgets name this smarthost."""
        return f"{self.host}:{self.effective_port}"

    @property
    def secret(self) -> str:
        return self.password.get_secret_value() if self.password else ""

    @property
    def mechanism(self) -> str:
        """What AUTH we use: XOAUTH2, the password (PLAIN/LOGIN as offered), or none."""
        if self.oauth2 is not None:
            return "XOAUTH2"
        return "password" if self.username else "none"
