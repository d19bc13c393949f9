"""The rules a config value must follow, as plain functions: ValueError with the reason, else the value.

The pydantic models (:mod:`relay.config.models`) and the sendmail fast path
(:mod:`relay.config.fast`) both check through these, so a value cannot be valid in one
and refused by the other. Standard library only, and cheap to import.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "DEFAULT_MAX_SIZE",
    "check_absolute_path",
    "check_address",
    "check_addresses",
    "check_bool",
    "check_domain",
    "check_duration",
    "check_name",
    "check_names",
    "check_sender",
    "check_size",
    "parse_size",
]

# 25 MB as mail providers count it (10^6): a "26 MB" attachment is over it in either unit.
DEFAULT_MAX_SIZE = 25_000_000
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_DOMAIN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-")
# pydantic's lax bool strings, so an environment value reads the same in both views.
_TRUE = frozenset(("1", "on", "t", "true", "y", "yes"))
_FALSE = frozenset(("0", "off", "f", "false", "n", "no"))


def parse_size(value: object) -> int:
    """Bytes from ``25000000``, ``"25MB"`` (10^6), ``"25MiB"`` (2^20), ``"512K"``; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a string like '25MB'")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        number = text.rstrip("kmgib ")
        unit = text[len(number):].strip().removesuffix("b")
        digits = number.replace(".", "", 1)
        if number and digits.isascii() and digits.isdigit() and unit in _SIZE_UNITS:
            return int(float(number) * _SIZE_UNITS[unit])
    raise ValueError(f"{value!r} is not a size (use e.g. 25000000, '25MB', '10MiB', '512KB')")


def check_size(value: object) -> int:
    size = parse_size(value)
    if size < 1:
        raise ValueError("must be at least 1 byte")
    return size


def check_duration(value: object) -> float:
    """Seconds from a number or ``"750ms"``, ``"2m"``, ``"1h30m"``."""
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < float("inf"):
        return float(value)
    from relay.timing import parse_duration  # imports re: only for a string like "750ms"

    return parse_duration(value)  # type: ignore[arg-type]


def check_name(value: object) -> str:
    """A broker prefix or subscription name: it goes into queue names, so letters, digits, '_', '-'."""
    if not isinstance(value, str) or not value or not set(value) <= _NAME_CHARS:
        raise ValueError("must be letters, digits, '_' or '-'")
    return value


def check_address(value: str) -> str:
    """A bare address: it goes into headers and SMTP commands, so no line breaks, spaces or lists."""
    if "@" not in value or any(c in value for c in "\r\n <>,"):
        raise ValueError(f"{value!r} is not a mail address like oncall@example.com")
    return value


def check_sender(value: object) -> str:
    """``smtp.from``: an address or empty, never a second line."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return check_address(value) if value else value


def check_domain(value: object) -> str:
    """A domain name, or empty."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if not set(value) <= _DOMAIN_CHARS:
        raise ValueError(f"{value!r} is not a domain name")
    return value


def check_addresses(value: object) -> dict[str, str]:
    """A table of name = address (``[aliases]``, ``[sendmail.senders]``)."""
    if not isinstance(value, dict):
        raise ValueError("must be a table of name = address")
    for name, address in value.items():
        if not isinstance(address, str):
            raise ValueError(f"{name}: {address!r} is not a mail address like oncall@example.com")
        try:
            check_address(address)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return dict(value)


def check_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError("must be true or false")


def check_absolute_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError("must be an absolute path")
    return value


def check_names(value: object) -> tuple[str, ...]:
    """A list of login names (``sendmail.trusted_users``)."""
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v and v.strip() == v for v in value):
        raise ValueError("must be a list of login names")
    return tuple(value)


def parse_listen(value: object) -> tuple[str, int] | None:
    """``"127.0.0.1:9464"`` / ``"[::1]:9464"`` -> (host, port); ``""`` -> None (off)."""
    if not isinstance(value, str):
        raise ValueError("expected \"HOST:PORT\" or \"\" (off)")
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. \"127.0.0.1:9464\")")
    return host, int(port)



QUEUE_TYPES = ("classic", "quorum")


def check_queue_type(value: object) -> str:
    """broker.queue_type: RabbitMQ's classic queues (one node) or quorum queues (a cluster)."""
    if value not in QUEUE_TYPES:
        raise ValueError(f"must be one of {', '.join(QUEUE_TYPES)}")
    return str(value)


def check_delivery_limit(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
        raise ValueError("must be a whole number from 1 to 1000")
    return value


BROKER_AUTHS = ("plain", "external")


def check_broker_auth(value: object) -> str:
    """broker.auth: "plain" (user and password of the URL) or "external" (the client certificate, x509)."""
    if value not in BROKER_AUTHS:
        raise ValueError(f"must be one of {', '.join(BROKER_AUTHS)}")
    return str(value)


def check_broker_tls(urls: tuple[str, ...], ca_file: str, cert_file: str, key_file: str, auth: str) -> None:
    """The TLS settings of [broker] taken together; ValueError naming what is wrong."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("cert_file and key_file go together (a client certificate and its key)")
    tls = all(u.startswith("amqps://") for u in urls)
    if (ca_file or cert_file) and not tls:
        raise ValueError("ca_file, cert_file and key_file are for amqps:// URLs")
    if auth == "external" and not (tls and cert_file):
        raise ValueError('auth = "external" logs in with the client certificate: it needs amqps:// and cert_file')
