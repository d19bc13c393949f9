"""Which publisher ``opsrelay listen`` uses for a config.

With an AMQP broker, a :class:`listeners.spool.SpoolingPublisher` (store-and-forward while
the broker is away); with the embedded engine, the plain
:class:`listeners.publish.EnginePublisher` (the queue is a local fsynced file already, a
spool would only copy it).
"""

from __future__ import annotations

from listeners.publish import EnginePublisher, ListenerPublisher
from listeners.spool import Spool, SpoolingPublisher
from relay.config.models import Config
from relay.contract.urls import is_sqlite

__all__ = ["make_publisher"]


def make_publisher(config: Config) -> ListenerPublisher:
    """The publisher ``opsrelay listen`` uses for this config."""
    broker = config.broker
    upstream = EnginePublisher(broker.url, broker.prefix, options=broker.engine_options)
    if is_sqlite(broker.url):
        return upstream
    return SpoolingPublisher(upstream, Spool(broker.spool, broker.prefix), confirm_timeout=broker.confirm_timeout)
