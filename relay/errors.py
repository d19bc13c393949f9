"""The one exception tree of opsrelay.

Each library's exceptions are translated into these at exactly one boundary
(aio-pika in ``relay.engines.amqp``, aiosmtplib in ``relay.delivery.smtp``, TOML and
pydantic in ``relay.config.models``), so the rest of the code decides on our classes::

    RelayError
    ├── TransientError            retry later with backoff (4xx, timeouts, refused connections)
    │   ├── SMTPTemporaryError
    │   ├── SMTPConnectError      (also a builtin ConnectionError)
    │   ├── SMTPTimeoutError      (also a builtin TimeoutError)
    │   └── BrokerUnavailable     (also a builtin ConnectionError)
    ├── PermanentError            dead-letter at once, with the reason (5xx, undecodable message)
    │   ├── SMTPPermanentError
    │   └── MessageDecodeError
    ├── ConfigurationError        our fault or the smarthost's, never the mail's: fail at start,
    │   ├── ConfigError           or during delivery hold the mail and alert, never dead-letter it
    │   │   └── ConfigUnreadable  (the file is there but not ours to read: sendmail uses the maildrop)
    │   ├── SMTPSecurityError     (STARTTLS not offered, certificate refused, AUTH or XOAUTH2 rejected)
    │   ├── TokenError            (the OAuth2 token endpoint or token_command refused or is down)
    │   └── SMTPQuotaError        (the smarthost says our sending quota or rate is used up)
    └── ProtocolError             a peer broke its protocol (supervisord eventlistener stream)
"""

from __future__ import annotations

__all__ = [
    "BrokerUnavailable",
    "ConfigError",
    "ConfigUnreadable",
    "ConfigurationError",
    "MessageDecodeError",
    "PermanentError",
    "PermissionRefused",
    "ProtocolError",
    "RelayError",
    "SMTPConnectError",
    "SMTPPermanentError",
    "SMTPQuotaError",
    "SMTPSecurityError",
    "SMTPTemporaryError",
    "SMTPTimeoutError",
    "TokenError",
    "TransientError",
]


class RelayError(Exception):
    """Root of every error opsrelay raises on purpose."""

    # The smarthost (``host:port``) whose answer this is, when a delivery attempt raised it.
    smarthost: str = ""
    # The other smarthosts that failed in that attempt: (host:port, why).
    passed_over: tuple[tuple[str, str], ...] = ()


class TransientError(RelayError):
    """The same action may succeed later: retry with backoff."""


class PermanentError(RelayError):
    """Retrying cannot help: dead-letter the message with this reason."""


class ConfigurationError(RelayError):
    """Our configuration or the smarthost's setup is wrong, not the message."""


class PermissionRefused(ConfigurationError):
    """The broker refused this login an operation its permissions (configure, write, read) do not grant."""


class ProtocolError(RelayError):
    """A peer sent something its protocol does not allow."""


class SMTPReplyMixin:
    """Carries the server's reply so that dead letters and logs can show it."""

    code: int
    reply: str

    def _set_reply(self, code: int, reply: str) -> None:
        self.code = code
        self.reply = reply


class SMTPTemporaryError(TransientError, SMTPReplyMixin):
    def __init__(self, code: int, reply: str) -> None:
        super().__init__(f"{code} {reply}")
        self._set_reply(code, reply)


class SMTPPermanentError(PermanentError, SMTPReplyMixin):
    def __init__(self, code: int, reply: str) -> None:
        super().__init__(f"{code} {reply}")
        self._set_reply(code, reply)


class SMTPConnectError(TransientError, ConnectionError):
    """The smarthost could not be reached."""


class SMTPTimeoutError(TransientError, TimeoutError):
    """The smarthost did not answer in time."""


class BrokerUnavailable(TransientError, ConnectionError):
    """The broker could not be reached or did not confirm in time."""


class MessageDecodeError(PermanentError, ValueError):
    """A message on a queue is not one we can read; it must not loop."""


class SMTPSecurityError(ConfigurationError):
    """TLS or AUTH could not be set up as configured; nothing was sent."""


class TokenError(ConfigurationError):
    """No OAuth2 access token could be had: the endpoint refused us or is down, the command failed.

    Never the mail's fault: delivery is held until it is fixed. The text never holds a secret.
    """


class SMTPQuotaError(ConfigurationError, SMTPReplyMixin):
    """The smarthost refused mail because our sending quota or rate is used up (not the recipient's fault)."""

    def __init__(self, code: int, reply: str) -> None:
        super().__init__(f"sending quota or rate exceeded: {code} {reply}")
        self._set_reply(code, reply)


class ConfigError(ConfigurationError, ValueError):
    """The configuration file or environment is invalid.

    ``str(err)`` is one line naming the file, the key and the problem.
    """

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        where = ", ".join(part for part in (path, key) if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.path = path
        self.key = key


class ConfigUnreadable(ConfigError):
    """The config file exists but this user may not read it (it holds the relay's secrets)."""
