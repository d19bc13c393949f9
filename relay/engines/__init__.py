"""Message engines: RabbitMQ (aio-pika) for fleets, SQLite for one host.

The interface is :mod:`relay.engines.base`; :func:`open_engine` imports only the
implementation the URL names, so the listener and sendmail paths never pay for
aio-pika when they run on the embedded queue. This module imports nothing itself:
``relay.engines.sqlite_rows`` stays cheap for the sendmail fast path.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from relay.engines.base import Engine

__all__ = ["open_engine"]


def open_engine(url: str, *, queue_type: str = "classic", delivery_limit: int = 20,
                alternates: Sequence[str] = (), shuffle: bool = True, ca_file: str = "", cert_file: str = "",
                key_file: str = "", auth: str = "plain", **options: float) -> Engine:
    """The engine for ``url``: ``amqp://``/``amqps://`` or ``sqlite:///PATH``.

    ``queue_type``, ``delivery_limit``, the other nodes of a cluster (``alternates``, tried in a random
    order unless ``shuffle`` is false) and the TLS files and login (``auth = "external"``: x509) are
    RabbitMQ's; the embedded queue has one kind and one file.
    """
    from relay.contract.urls import is_amqp, is_sqlite

    if is_amqp(url):
        from relay.engines.amqp import AmqpEngine

        return AmqpEngine(url, queue_type=queue_type, delivery_limit=delivery_limit, alternates=alternates,
                          shuffle=shuffle, ca_file=ca_file, cert_file=cert_file, key_file=key_file, auth=auth,
                          **options)
    if is_sqlite(url):
        from relay.engines.sqlite import SqliteEngine

        return SqliteEngine(url, **options)
    from relay.errors import ConfigError

    raise ConfigError("unsupported broker URL scheme (use amqp://, amqps:// or sqlite:///PATH)", key="broker.url")
