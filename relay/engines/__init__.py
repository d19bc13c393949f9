"""Message engines: RabbitMQ (aio-pika) for fleets, SQLite for one host.

``open_engine(url)`` imports only the engine the URL names, so the listener and
sendmail paths never pay for aio-pika when they run on the embedded queue.
"""

from __future__ import annotations

from relay.engines.base import Delivery, Engine, Message, open_engine

__all__ = ["Delivery", "Engine", "Message", "open_engine"]
