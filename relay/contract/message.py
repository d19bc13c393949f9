"""A message as both engines carry it: body, id, content type, headers, routing key.

The wire unit of every queue (events, mail, dead letters, state); engines map it to an
AMQP message or a queue row, and nothing else in it depends on an engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["HeaderValue", "Message"]

HeaderValue = str | int | bool | None


@dataclass(frozen=True, slots=True)
class Message:
    body: bytes
    message_id: str
    content_type: str = "application/octet-stream"
    headers: Mapping[str, HeaderValue] = field(default_factory=dict)
    # Set on consumption: the key the message was published with.
    routing_key: str = ""
