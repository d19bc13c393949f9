"""Broker URLs: the one parser of their scheme, and how they are shown.

``amqp://`` / ``amqps://`` name a RabbitMQ broker; ``sqlite:///PATH`` the embedded queue
(SQLAlchemy's convention: three slashes then the path, so an absolute path gives four).
Standard library only, and cheap to import: the sendmail fast path reads its URL here.
"""

from __future__ import annotations

import os

__all__ = [
    "AMQP_SCHEMES",
    "SCHEMES",
    "check_broker_url",
    "check_broker_urls",
    "default_queue_url",
    "default_spool_url",
    "is_amqp",
    "is_loopback",
    "is_sqlite",
    "mask_url",
    "scheme",
    "sqlite_path",
    "url_user",
]

AMQP_SCHEMES = ("amqp", "amqps")
SCHEMES = (*AMQP_SCHEMES, "sqlite")


def scheme(url: str) -> str:
    """The URL's scheme, lower case (``""`` when it has none)."""
    name, sep, _ = url.partition(":")
    return name.lower() if sep else ""


def is_sqlite(url: str) -> bool:
    return scheme(url) == "sqlite"


def is_amqp(url: str) -> bool:
    return scheme(url) in AMQP_SCHEMES


def sqlite_path(url: str) -> str:
    """The file of ``sqlite:///PATH``; ValueError for anything else (``:memory:`` included)."""
    name, sep, path = url.partition(":///")
    if name.lower() != "sqlite" or not sep or not path or path == ":memory:":
        raise ValueError(f"expected sqlite:////absolute/path/queue.db, got {url!r}")
    return os.path.abspath(path)


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1): clear text may go there."""
    if host == "localhost":
        return True
    import ipaddress  # only when a URL names a host: not on the sendmail path

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_broker_url(url: object) -> str:
    """The URL if opsrelay can use it; ValueError with the reason otherwise.

    No credentials over clear text: ``amqp://`` with a password only to a broker on this
    host, and no option that turns certificate verification off.
    """
    if not isinstance(url, str) or not url:
        raise ValueError("must be a non-empty string")
    name = scheme(url)
    if name not in SCHEMES:
        raise ValueError("must start with amqp://, amqps:// or sqlite:/// (then an absolute path)")
    if name == "sqlite":
        if not url.startswith("sqlite:////"):
            raise ValueError("a sqlite URL is sqlite:/// then an absolute path, "
                             "e.g. sqlite:////var/lib/opsrelay/queue.db")
        return url
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if "no_verify_ssl" in urllib.parse.parse_qs(parts.query):
        raise ValueError("no_verify_ssl is refused: the broker's certificate is always verified")
    if name == "amqp" and parts.password and not is_loopback(parts.hostname or ""):
        raise ValueError(f"amqp:// would send the broker password in clear text to {parts.hostname!r}; "
                         "use amqps://")
    return url


def default_queue_url() -> str:
    """root: /var/lib/opsrelay/queue.db; anyone else: $XDG_STATE_HOME/opsrelay/queue.db."""
    if os.geteuid() == 0:
        return "sqlite:////var/lib/opsrelay/queue.db"
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return f"sqlite:///{os.path.join(os.path.abspath(state), 'opsrelay', 'queue.db')}"


def default_spool_url() -> str:
    """The listener's store-and-forward spool: spool.db beside the default queue."""
    return default_queue_url().replace("queue.db", "spool.db")


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``******``, for logs and ``opsrelay check``."""
    name, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{name}://{user}:******@{hostpart}"


def url_user(url: str) -> str:
    """The login name of a URL (``""`` when it has none), for messages that must not show the password."""
    _, sep, rest = url.partition("://")
    userinfo, at, _ = rest.rpartition("@")
    return userinfo.split(":", 1)[0] if sep and at else ""


def check_broker_urls(urls: object) -> tuple[str, ...]:
    """``broker.urls``: the AMQP addresses of a cluster's nodes, each as :func:`check_broker_url` wants."""
    if not isinstance(urls, list | tuple):
        raise ValueError("must be a list of amqp:// or amqps:// URLs")
    checked = tuple(check_broker_url(u) for u in urls)
    if any(not is_amqp(u) for u in checked):
        raise ValueError("the nodes of a cluster are amqp:// or amqps:// URLs")
    return checked
