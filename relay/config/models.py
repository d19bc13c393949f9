"""Configuration: pydantic models per concern, TOML discovery, environment overrides.

A bad configuration raises :class:`relay.errors.ConfigError` whose text is one
line naming the file, the key and the problem; the CLI turns it into exit 78
(EX_CONFIG). Secrets are ``SecretStr`` and never appear in a repr or a log.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from relay.config.fast import (
    DEFAULT_CONFIRM_TIMEOUT,
    DEFAULT_MAILDROP,
    DEFAULT_PREFIX,
    default_host,
    engine_options,
)
from relay.config.loader import read
from relay.config.rules import (
    DEFAULT_MAX_SIZE,
    check_absolute_path,
    check_address,
    check_broker_auth,
    check_broker_tls,
    check_delivery_limit,
    check_duration,
    check_name,
    check_names,
    check_queue_type,
    check_sender,
    parse_listen,
    parse_size,
)
from relay.config.smarthost import DEFAULT_PORTS, OAuth2Config, Security, SmarthostConfig
from relay.contract.event import STATES
from relay.contract.urls import (
    check_broker_url,
    check_broker_urls,
    default_queue_url,
    default_spool_url,
    is_amqp,
    is_loopback,
    is_sqlite,
    mask_url,
)
from relay.errors import ConfigError
from relay.notify.selector import Selector

__all__ = [
    "DEFAULT_PORTS",
    "BrokerConfig",
    "Config",
    "GroupBy",
    "ListenerConfig",
    "MetricsConfig",
    "OAuth2Config",
    "RetryConfig",
    "Security",
    "SendmailConfig",
    "SendmailMode",
    "SmarthostConfig",
    "SmtpConfig",
    "StatusConfig",
    "Subscription",
    "load_config",
    "ssmtp_notes",
]

# Headers opsrelay writes itself; a subscription's extra headers cannot replace them.
_RESERVED_HEADERS = frozenset({
    "from", "to", "cc", "bcc", "subject", "date", "message-id", "in-reply-to", "references",
    "mime-version", "content-type", "content-transfer-encoding", "sender", "reply-to",
    "x-opsrelay-event", "x-opsrelay-subscription", "x-opsrelay-kind",
})

Duration = Annotated[float, BeforeValidator(check_duration)]
Name = Annotated[str, BeforeValidator(check_name)]
Size = Annotated[int, BeforeValidator(parse_size)]
Address = Annotated[str, BeforeValidator(lambda v: check_address(v) if isinstance(v, str) else v)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class BrokerConfig(_Strict):
    url: str = Field(default_factory=default_queue_url)
    prefix: Name = DEFAULT_PREFIX
    # How long a publisher waits for the broker to confirm before calling it unavailable
    # (with an amqp URL the listener then writes the event to the spool instead).
    confirm_timeout: Duration = DEFAULT_CONFIRM_TIMEOUT
    # Store-and-forward for the listener when the AMQP broker is away: the embedded
    # engine's file, created on first use. Default: spool.db beside the default queue.
    spool: str = Field(default_factory=default_spool_url)
    # RabbitMQ: "classic" (one node) or "quorum" (a cluster: every queue replicated, a message that
    # keeps killing the relay dead-lettered after delivery_limit deliveries). The embedded queue: classic.
    queue_type: Annotated[str, BeforeValidator(check_queue_type)] = "classic"
    delivery_limit: Annotated[int, BeforeValidator(check_delivery_limit)] = 20
    # The nodes of a RabbitMQ cluster, instead of url: each process connects to the first that answers,
    # in a random order (shuffle_urls = false: as listed, e.g. the local node first), and moves to
    # another when its node goes.
    urls: Annotated[tuple[str, ...], BeforeValidator(check_broker_urls)] = ()
    shuffle_urls: bool = True
    # amqps: the CA to verify the broker with (default: the system's), a client certificate and its
    # key, and auth = "external" to log in with that certificate (x509) instead of a password.
    ca_file: Annotated[str, BeforeValidator(check_absolute_path)] = ""
    cert_file: Annotated[str, BeforeValidator(check_absolute_path)] = ""
    key_file: Annotated[str, BeforeValidator(check_absolute_path)] = ""
    auth: Annotated[str, BeforeValidator(check_broker_auth)] = "plain"

    @model_validator(mode="after")
    def _tls_together(self) -> BrokerConfig:
        if is_amqp(self.url):
            check_broker_tls(self.urls or (self.url,), self.ca_file, self.cert_file, self.key_file, self.auth)
        return self

    @model_validator(mode="before")
    @classmethod
    def _urls_or_url(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("urls"):
            if "url" in data:
                raise ValueError("give url or urls, not both")
            urls = data["urls"]
            if isinstance(urls, list | tuple) and urls and isinstance(urls[0], str):
                data = {**data, "url": urls[0]}
        return data

    @model_validator(mode="after")
    def _quorum_is_rabbitmq(self) -> BrokerConfig:
        if self.queue_type == "quorum" and is_sqlite(self.url):
            raise ValueError("queue_type = \"quorum\" is RabbitMQ's; the embedded queue (sqlite://) has one kind")
        return self

    @property
    def engine_options(self) -> dict[str, Any]:
        """What :func:`relay.engines.open_engine` takes besides the URL."""
        return engine_options(self, self.confirm_timeout)

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        # An amqp URL may hold a password: never in a repr or a log line.
        for name, value in super().__repr_args__():
            if name == "urls":
                value = tuple(mask_url(u) for u in value)
            yield name, mask_url(value) if name == "url" else value

    @field_validator("spool")
    @classmethod
    def _spool_is_sqlite(cls, url: str) -> str:
        if not is_sqlite(url):
            raise ValueError("the spool is a sqlite URL: sqlite:/// then an absolute path")
        return check_broker_url(url)

    @field_validator("url", mode="before")
    @classmethod
    def _known_scheme(cls, url: object) -> str:
        return check_broker_url(url)


class SmtpConfig(SmarthostConfig):
    """``[smtp]``: the primary smarthost, what every mail gets (from, pool), and the fallbacks."""

    from_: Annotated[str, BeforeValidator(check_sender)] = Field(default="", alias="from")
    pool_size: int = Field(default=2, ge=1, le=32)
    # An ssmtp.conf (and the revaliases beside it) whose values fill what is unset here;
    # merged in load_config, before validation (see relay.config.ssmtp).
    ssmtp_conf: Path | None = None
    # Tried in order when the one before cannot take mail (down, TLS, AUTH, 421, MAIL FROM refused).
    fallback: tuple[SmarthostConfig, ...] = ()
    # A smarthost that failed is skipped this long, then tried first again.
    failback: Duration = Field(default=300.0, gt=0)
    # Who hears about opsrelay itself (a smarthost refusing us, dead letters); () = the first
    # subscription's recipients.
    admin: tuple[Address, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _fallbacks_inherit_timeout_and_helo(cls, data: object) -> object:
        """A fallback names its own connection; of [smtp] it takes only timeout and helo."""
        if isinstance(data, dict) and isinstance(data.get("fallback"), list | tuple):
            inherited = {k: data[k] for k in ("timeout", "helo") if k in data}
            data = {**data, "fallback": [{**inherited, **f} if isinstance(f, dict) else f for f in data["fallback"]]}
        return data

    @property
    def smarthosts(self) -> tuple[SmarthostConfig, ...]:
        """The primary, then the fallbacks, in the order they are tried."""
        return (self, *self.fallback)


class RetryConfig(_Strict):
    max_attempts: int = Field(default=10, ge=1)
    backoff: tuple[Duration, ...] = Field(default=(30.0, 120.0, 600.0, 1800.0, 3600.0), min_length=1)

    @field_validator("backoff")
    @classmethod
    def _positive(cls, steps: tuple[float, ...]) -> tuple[float, ...]:
        if any(step < 0.001 for step in steps):
            raise ValueError("every backoff step must be at least 1ms")
        return steps




class SendmailMode(StrEnum):
    QUEUE = "queue"
    DIRECT = "direct"


class SendmailConfig(_Strict):
    """``opsrelay-sendmail``. Read on its fast path by relay.config.fast, which must agree with this."""

    # queue: write to the outbound queue and exit, the relay delivers. direct: try the
    # smarthost at once (for hosts without a running relay), queue on any temporary failure.
    mode: SendmailMode = SendmailMode.QUEUE
    # Bytes read from stdin at most: an int, or "25MB" / "10MiB" / "512KB".
    max_size: Size = Field(default=DEFAULT_MAX_SIZE, ge=1)
    # Local names become name@domain (ssmtp's rewriteDomain). "": the top-level host.
    domain: str = ""
    # Keep a From: the message has (ssmtp's FromLineOverride=YES); false: replace it with the envelope sender.
    from_line_override: bool = True
    # Envelope sender per local user (ssmtp's revaliases), after -f and before smtp.from.
    senders: dict[str, Address] = Field(default_factory=dict)
    # Where users who cannot write the queue leave their mail (root's, mode 1733; serve makes it).
    maildrop: Annotated[str, BeforeValidator(check_absolute_path)] = DEFAULT_MAILDROP
    # Users whose -f is taken from the maildrop as given (root's always is); others send as themselves.
    trusted_users: Annotated[tuple[str, ...], BeforeValidator(check_names)] = ()


class GroupBy(StrEnum):
    HOST = "host"
    GROUP = "group"
    PROCESS = "process"
    STATE = "state"


class ListenerConfig(_Strict):
    """``opsrelay listen``: what it asks supervisord's XML-RPC about each crash."""

    # Bytes of the process's stderr (stdout when stderr is empty) put in log_tail for
    # EXITED, FATAL and BACKOFF; 0 turns the fetch off. The most any subscription asks for is fetched.
    log_tail_bytes: Size = Field(default=4096, ge=0, le=1024 * 1024)
    # The bound on all XML-RPC calls for one event (exit status, spawnerr, log tail).
    fetch_timeout: Duration = Field(default=1.0, gt=0, le=30)


class Subscription(_Strict):
    name: Name
    to: tuple[Address, ...] = Field(min_length=1)
    patterns: tuple[str, ...] = ()
    programs: tuple[str, ...] = ("*",)
    hosts: tuple[str, ...] = ("*",)
    # Crashes by default, as crashmail: an unexpected exit, or a program that gave up starting.
    states: tuple[str, ...] = ("EXITED", "FATAL")
    unexpected_only: bool = True
    subject: str | None = None
    body: str | None = None
    # An HTML alternative part, rendered like body (Jinja2 autoescapes it).
    html: str | None = None
    # Templates of a digest mail (several events in one); built-in ones when unset.
    digest_subject: str | None = None
    digest_body: str | None = None
    # Put before every subject, as crashmail's -o ("ACME: worker crashed ...").
    subject_prefix: str = ""
    # Added to every mail of this subscription; values are encoded, names must be plain tokens.
    headers: dict[str, str] = Field(default_factory=dict)
    # The log tail shown in this subscription's mails, at most (None: listener.log_tail_bytes).
    log_tail_bytes: Size | None = Field(default=None, ge=0, le=1024 * 1024)
    # Digests: events of one group (same values of group_by) wait group_wait before the
    # first mail, then a group gets at most one mail every group_interval. Both 0: one mail per event.
    group_by: tuple[GroupBy, ...] = ()
    group_wait: Duration = Field(default=0.0, ge=0)
    group_interval: Duration = Field(default=0.0, ge=0)
    # Flap damping: at most this many mails per process per hour, then one summary of the rest.
    max_mails_per_hour: int | None = Field(default=None, ge=1)
    # The window max_mails_per_hour counts in (an hour; shorter only to try the setting out).
    damping_window: Duration = Field(default=3600.0, gt=0)
    # A "recovered" mail, threaded under the first crash mail, when the process is RUNNING again.
    send_resolved: bool = False

    @field_validator("headers")
    @classmethod
    def _header_names(cls, headers: dict[str, str]) -> dict[str, str]:
        for name in headers:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,75}", name):
                raise ValueError(f"header name {name!r} is not a plain token (letters, digits, '-')")
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by opsrelay and cannot be overridden")
        return headers

    @property
    def grouped(self) -> bool:
        return self.group_wait > 0 or self.group_interval > 0

    @property
    def stateful(self) -> bool:
        """Keeps state between events (digests, damping, recovery), in its own state queue."""
        return self.grouped or self.max_mails_per_hour is not None or self.send_resolved

    @field_validator("states")
    @classmethod
    def _known_states(cls, states: tuple[str, ...]) -> tuple[str, ...]:
        upper = tuple(s.upper() for s in states)
        unknown = [s for s in upper if s not in STATES and s != "*"]
        if unknown:
            raise ValueError(f"unknown state {unknown[0]!r} (one of {', '.join(STATES)})")
        return STATES if "*" in upper else upper

    @field_validator("patterns")
    @classmethod
    def _pattern_size(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for p in patterns:
            if len(p.encode("utf-8")) > 255:
                raise ValueError("a pattern is at most 255 bytes (AMQP shortstr)")
        return patterns

    @property
    def selector(self) -> Selector:
        return Selector(self.programs, self.hosts, self.states, self.unexpected_only)

    @property
    def recovery_selector(self) -> Selector:
        """The RUNNING events a recovery notice needs, for the programs this subscription watches."""
        return Selector(self.programs, self.hosts, ("RUNNING",), False)

    def bindings(self) -> tuple[str, ...]:
        bindings = self.patterns or self.selector.bindings()
        if self.send_resolved and not self.patterns:
            bindings = tuple(dict.fromkeys((*bindings, *self.recovery_selector.bindings())))
        return bindings

    def accepts(self, event: Any) -> bool:
        """The residual filter after the broker's bindings (globs inside a word, unexpected_only)."""
        if self.patterns:
            return not (self.unexpected_only and event.expected is True)
        return self.selector.accepts(event)

    def watches_recovery(self, event: Any) -> bool:
        """A RUNNING event that may end an outage this subscription mailed about."""
        if not self.send_resolved or event.state != "RUNNING":
            return False
        return True if self.patterns else self.recovery_selector.accepts(event)


class MetricsConfig(_Strict):
    """``[metrics]``: Prometheus metrics and health on HTTP, served by ``opsrelay serve``."""

    # "" (off) or HOST:PORT; an address other hosts can reach needs allow_remote = true.
    listen: str = ""
    # The endpoints have no authentication: reachable from elsewhere only when asked for.
    allow_remote: bool = False

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @model_validator(mode="after")
    def _loopback_unless_allowed(self) -> MetricsConfig:
        address = self.address
        if address is not None and not is_loopback(address[0]) and not self.allow_remote:
            raise ValueError(f"listen = {self.listen!r} is reachable from other hosts and the endpoints have no "
                             "authentication; set metrics.allow_remote = true to mean it")
        return self

    @property
    def address(self) -> tuple[str, int] | None:
        return parse_listen(self.listen)


class StatusConfig(_Strict):
    """``[status]``: when ``opsrelay status`` and the relay's alerts about itself call mail stuck."""

    # Mail held, or waiting longer than this, is "not flowing": status exits 1, the relay logs an
    # ERROR line this often and mails [smtp] admin through a smarthost that works.
    stale_after: Duration = Field(default=900.0, gt=0)


class Config(_Strict):
    host: str = Field(default_factory=default_host, min_length=1)
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    smtp: SmtpConfig = Field(default_factory=SmtpConfig)
    aliases: dict[str, Address] = Field(default_factory=dict)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    subscriptions: tuple[Subscription, ...] = ()
    sendmail: SendmailConfig = Field(default_factory=SendmailConfig)
    listener: ListenerConfig = Field(default_factory=ListenerConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    status: StatusConfig = Field(default_factory=StatusConfig)
    # The file this was read from ("(defaults)" without one), for errors found after loading.
    _source: str = PrivateAttr(default="(defaults)")

    @property
    def source(self) -> str:
        return self._source

    @property
    def admins(self) -> tuple[str, ...]:
        """Who the relay's mails about itself go to: smtp.admin, else the first subscription's recipients."""
        return self.smtp.admin or (self.subscriptions[0].to if self.subscriptions else ())

    @property
    def log_tail_bytes(self) -> int:
        """What the listener fetches: the most any subscription shows (0: none)."""
        if self.listener.log_tail_bytes == 0:
            return 0
        wanted = [s.log_tail_bytes for s in self.subscriptions if s.log_tail_bytes is not None]
        return max([self.listener.log_tail_bytes, *wanted])

    @field_validator("subscriptions")
    @classmethod
    def _unique_names(cls, subs: tuple[Subscription, ...]) -> tuple[Subscription, ...]:
        names = [s.name for s in subs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"subscription name {dupes[0]!r} is used twice")
        return subs


def _one_line(exc: ValidationError) -> tuple[str, str]:
    first = exc.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    key = key.replace("from_", "from")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    more = exc.error_count() - 1
    return key, message + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def ssmtp_notes(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> list[str]:
    """What the config took from (and left of) smtp.ssmtp_conf, one line each, for ``opsrelay check``."""
    return read(path, env)[2]


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read, merge the environment over the file (and both over smtp.ssmtp_conf), validate.

    Raises ConfigError (one line).
    """
    where, data, _ = read(path, env)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        key, message = _one_line(exc)
        raise ConfigError(message, path=where, key=key) from None
    config._source = where
    return config
