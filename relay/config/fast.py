"""The keys ``opsrelay-sendmail`` needs, without pydantic (whose import alone costs more than a
whole submission).

The file is found, read and layered by :mod:`relay.config.loader`, and every value checked by
:mod:`relay.config.rules`, as for :func:`relay.config.models.load_config`; only the sendmail
keys are looked at. Keys this view does not use are left for the relay to validate: a
submission is never refused over a subscription's typo.
"""

from __future__ import annotations

import os

from relay.config import loader, rules
from relay.contract.urls import check_broker_url, check_broker_urls, default_queue_url
from relay.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

__all__ = ["DEFAULT_MAILDROP", "SENDMAIL_MODES", "FastConfig", "engine_options", "load", "load_path", "maildrop_of"]

SENDMAIL_MODES = ("queue", "direct")
DEFAULT_PREFIX = "opsrelay"
DEFAULT_CONFIRM_TIMEOUT = 2.0
_SENDMAIL_KEYS = frozenset(("mode", "max_size", "domain", "from_line_override", "senders", "maildrop", "trusted_users"))
DEFAULT_MAILDROP = "/var/spool/opsrelay/maildrop"


def default_host() -> str:
    """The short hostname (``host`` when unset)."""
    return os.uname().nodename.split(".")[0]


def check_mode(value: object) -> str:
    if value not in SENDMAIL_MODES:
        raise ValueError("must be 'queue' or 'direct'")
    return str(value)


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


class FastConfig:
    """The sendmail-relevant part of the config, checked by the rules the models use."""

    __slots__ = ("aliases", "auth", "busy_timeout", "ca_file", "cert_file", "delivery_limit", "domain",
                 "from_line_override", "host", "key_file", "maildrop", "max_size", "mode", "path", "prefix",
                 "queue_type", "senders", "shuffle_urls", "smtp_from", "trusted_users", "url", "urls")

    def __init__(self, data: Mapping[str, Any], path: str) -> None:
        self.path = path
        broker, smtp, sendmail = (_table(data, name, path) for name in ("broker", "smtp", "sendmail"))
        self.host: str = _check(path, "host", data.get("host", default_host()), _text)
        self.urls: tuple[str, ...] = _check(path, "broker.urls", broker.get("urls", []), check_broker_urls)
        self.shuffle_urls: bool = _check(path, "broker.shuffle_urls", broker.get("shuffle_urls", True),
                                         rules.check_bool)
        # As the model: urls gives the first address (both given is refused there).
        self.url: str = self.urls[0] if self.urls else _check(path, "broker.url",
                                                               broker.get("url", default_queue_url()), check_broker_url)
        self.prefix: str = _check(path, "broker.prefix", broker.get("prefix", DEFAULT_PREFIX), rules.check_name)
        self.busy_timeout: float = _check(path, "broker.confirm_timeout",
                                          broker.get("confirm_timeout", DEFAULT_CONFIRM_TIMEOUT), rules.check_duration)
        self.queue_type: str = _check(path, "broker.queue_type", broker.get("queue_type", "classic"),
                                      rules.check_queue_type)
        self.delivery_limit: int = _check(path, "broker.delivery_limit", broker.get("delivery_limit", 20),
                                          rules.check_delivery_limit)
        self.ca_file, self.cert_file, self.key_file = (
            _check(path, f"broker.{key}", broker[key], rules.check_absolute_path) if key in broker else ""
            for key in ("ca_file", "cert_file", "key_file"))
        self.auth: str = _check(path, "broker.auth", broker.get("auth", "plain"), rules.check_broker_auth)
        if self.url.startswith("amqp"):
            _check(path, "broker", None, lambda _: rules.check_broker_tls(
                self.urls or (self.url,), self.ca_file, self.cert_file, self.key_file, self.auth))
        self.smtp_from: str = _check(path, "smtp.from", smtp.get("from", ""), rules.check_sender)
        self.aliases: dict[str, str] = _check(path, "aliases", _table(data, "aliases", path), rules.check_addresses)
        unknown = sorted(set(sendmail) - _SENDMAIL_KEYS)
        if unknown:
            raise ConfigError("unknown key", path=path, key=f"sendmail.{unknown[0]}")
        self.mode: str = _check(path, "sendmail.mode", sendmail.get("mode", SENDMAIL_MODES[0]), check_mode)
        self.max_size: int = _check(path, "sendmail.max_size", sendmail.get("max_size", rules.DEFAULT_MAX_SIZE),
                                    rules.check_size)
        self.domain: str = _check(path, "sendmail.domain", sendmail.get("domain", ""), rules.check_domain) or self.host
        self.from_line_override: bool = _check(path, "sendmail.from_line_override",
                                               sendmail.get("from_line_override", True), rules.check_bool)
        self.senders: dict[str, str] = _check(path, "sendmail.senders", sendmail.get("senders", {}),
                                              rules.check_addresses)
        self.maildrop: str = _check(path, "sendmail.maildrop", sendmail.get("maildrop", DEFAULT_MAILDROP),
                                    rules.check_absolute_path)
        self.trusted_users: tuple[str, ...] = _check(path, "sendmail.trusted_users", sendmail.get("trusted_users", []),
                                                     rules.check_names)

    @property
    def engine_options(self) -> dict[str, Any]:
        return engine_options(self, self.busy_timeout)


def engine_options(broker: Any, confirm_timeout: float) -> dict[str, Any]:
    """What :func:`relay.engines.open_engine` takes besides the URL, from either view of ``[broker]``
    (:class:`relay.config.models.BrokerConfig` or :class:`FastConfig`: the same attribute names)."""
    return {"confirm_timeout": confirm_timeout, "queue_type": broker.queue_type,
            "delivery_limit": broker.delivery_limit, "alternates": broker.urls[1:], "shuffle": broker.shuffle_urls,
            "ca_file": broker.ca_file, "cert_file": broker.cert_file, "key_file": broker.key_file,
            "auth": broker.auth}


def _table(data: Mapping[str, Any], name: str, path: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError("must be a table", path=path, key=name)
    return value


def _check(path: str, key: str, value: object, check: Callable[[Any], Any]) -> Any:
    try:
        return check(value)
    except ValueError as exc:
        raise ConfigError(str(exc), path=path, key=key) from None


def maildrop_of(env: Mapping[str, str]) -> str:
    """The maildrop of a user who cannot read the config: the environment's, else the default."""
    value = loader.env_overrides(env).get("sendmail", {}).get("maildrop", DEFAULT_MAILDROP)
    return _check("(environment)", "sendmail.maildrop", value, rules.check_absolute_path)  # type: ignore[no-any-return]


def load_path(path: str | None, env: Mapping[str, str] | None = None) -> FastConfig:
    """The sendmail view of the config the relay was started with (``(defaults)``: none)."""
    explicit = None if path in (None, "(defaults)") else path
    where, data, _ = loader.read(explicit, env)
    return FastConfig(data, where)


def load(env: Mapping[str, str] | None = None) -> FastConfig:
    """Find, read and layer as :func:`relay.config.models.load_config` does; ConfigError (one line) otherwise.

    No config anywhere is an error here: it means no relay reads any queue, and queuing would strand the mail.
    """
    where, data, _ = loader.read(None, env, required=True, cached=True)
    return FastConfig(data, where)
