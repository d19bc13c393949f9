"""Exchange and queue names, as tiny pure functions (no imports: the sendmail path uses them).

Every name opsrelay gives a broker object is made here, from ``broker.prefix``;
:mod:`relay.contract.topology` builds the layout from them.
"""

from __future__ import annotations

__all__ = [
    "RETRY_INFIX",
    "budget_queue",
    "dead_queue",
    "document_queues",
    "events_exchange",
    "is_retry_queue",
    "lock_queue",
    "outbound_queue",
    "relays_queue",
    "retry_queue",
    "silence_owner_queue",
    "silenced_queue",
    "silences_queue",
    "spool_name",
    "state_queue",
    "submit_exchange",
    "subscription_queue",
    "unrouted_exchange",
    "unrouted_queue",
]

RETRY_INFIX = ".retry."


def events_exchange(prefix: str) -> str:
    return f"{prefix}.events"


def unrouted_exchange(prefix: str) -> str:
    return f"{prefix}.unrouted"


def unrouted_queue(prefix: str) -> str:
    return f"{prefix}.unrouted"


def subscription_queue(prefix: str, name: str) -> str:
    return f"{prefix}.sub.{name}"


def outbound_queue(prefix: str) -> str:
    return f"{prefix}.outbound"


def submit_exchange(prefix: str) -> str:
    """Where sendmail hosts put mail for outbound: an exchange of its own, so that their logins may write
    this one name (RabbitMQ checks publishes against the exchange, and the default one reaches every queue)."""
    return f"{prefix}.submit"


def retry_queue(prefix: str, delay_ms: int) -> str:
    return f"{prefix}{RETRY_INFIX}{delay_ms}ms"


def dead_queue(prefix: str) -> str:
    return f"{prefix}.dead"


def state_queue(prefix: str, name: str) -> str:
    """Where a stateful subscription keeps its digests, damping windows and outages."""
    return f"{prefix}.state.{name}"


def spool_name(prefix: str) -> str:
    """The listener's store-and-forward spool (exchange and queue) in its local embedded engine."""
    return f"{prefix}.spool"


def is_retry_queue(prefix: str, name: str) -> bool:
    return name.startswith(f"{prefix}{RETRY_INFIX}")


def budget_queue(prefix: str, smarthost: str, window: str) -> str:
    """Where a smarthost's sending budget is counted: one message per mail it accepted, each
    expiring after the window (``minute`` or ``day``). ``smarthost`` is ``host:port``."""
    return f"{prefix}.budget.{smarthost.replace(':', '_')}.{window}"


def silences_queue(prefix: str) -> str:
    """The silences: a log of add and expire records every relay reads (relay.notify.silence)."""
    return f"{prefix}.silences"


def silenced_queue(prefix: str) -> str:
    """Events a silence kept from being mailed, until its summary is sent."""
    return f"{prefix}.silenced"


def silence_owner_queue(prefix: str) -> str:
    """Single active: the relay that holds it sends the summaries of silences that ended."""
    return f"{prefix}.silences.owner"


def relays_queue(prefix: str) -> str:
    """The relays' heartbeats (what ``opsrelay status`` shows of each), each expiring after a while."""
    return f"{prefix}.relays"


def lock_queue(queue: str) -> str:
    """An empty queue whose exclusive consumer is the lock on reading ``queue`` as a whole (RabbitMQ)."""
    return f"{queue}.lock"


def document_queues(prefix: str) -> tuple[str, ...]:
    """Queues a running relay always keeps a message in on purpose (its heartbeat, the silences' owner
    document): not work waiting, whatever their depth says."""
    return (relays_queue(prefix), silence_owner_queue(prefix))
