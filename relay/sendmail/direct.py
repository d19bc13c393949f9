"""``sendmail.mode = "direct"``: the relay's first attempt at a submission, made here and now.

:meth:`relay.daemon.relay.Relay.deliver` sends and applies its plan, as the relay's outbound
consumer does: delivered; a temporary failure or a held delivery goes to the retry queue with
the relay's backoff; a permanent refusal to the dead-letter queue. The queue is connected and
declared first, so a mail that fails is never left with nowhere to go; if it cannot be,
nothing is sent and we exit 75.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from relay.config.models import Config, load_config
from relay.contract.mail import OutboundMail, to_message
from relay.contract.names import outbound_queue
from relay.daemon.relay import Relay, iso_utc_of, relay_topology
from relay.delivery.outcome import OverBudget
from relay.delivery.plan import DeadLetter, Delivered, Hold, Plan, Retry
from relay.delivery.smarthosts import Smarthosts
from relay.engines import open_engine
from relay.errors import ConfigurationError, RelayError
from relay.sendmail.exits import EX_CONFIG, EX_OK, EX_TEMPFAIL
from relay.sendmail.outbound import ORIGIN, quiet_logging

__all__ = ["deliver_now"]


async def _attempt(config: Config, mail: OutboundMail) -> Plan | OverBudget:
    engine = open_engine(config.broker.url, **config.broker.engine_options)
    mailer = Smarthosts(config.smtp)
    try:
        await engine.connect()
        await engine.declare(relay_topology(config))
        try:
            return await Relay(config, engine, mailer).deliver(mail)
        except OverBudget as over:
            # Every smarthost's budget is spent: the mail waits on outbound, in order, for the relay.
            await engine.send(outbound_queue(config.broker.prefix), to_message(mail))
            return over
    finally:
        await mailer.close()
        await engine.close()


def deliver_now(sender: str, recipients: Sequence[str], raw: bytes, message_id: str,
                say: Callable[[str], None], *, verbose: bool) -> int:
    """Deliver or queue ``raw``; one line per recipient group that was not delivered (all with ``verbose``)."""
    quiet_logging()
    try:
        config = load_config()
    except ConfigurationError as exc:
        say(f"config error: {exc}")
        return EX_CONFIG
    mail = OutboundMail(sender=sender, recipients=tuple(recipients), raw=raw, message_id=message_id, origin=ORIGIN)
    try:
        plan = asyncio.run(_attempt(config, mail))
    except ConfigurationError as exc:
        say(f"config error: {exc}")
        return EX_CONFIG
    except RelayError as exc:
        say(f"cannot queue the mail ({exc}); nothing was queued")
        return EX_TEMPFAIL
    if isinstance(plan, OverBudget):
        say(f"{plan} until {iso_utc_of(plan.until)}; queued {message_id} for the relay")
        return EX_OK
    for decision in plan:
        rcpts = ", ".join(decision.recipients)
        if isinstance(decision, Delivered):
            if verbose:
                say(f"delivered {message_id} to {rcpts}: {decision.reply}")
        elif isinstance(decision, Retry):
            say(f"not delivered to {rcpts} yet ({decision.reason}); queued, retry in {decision.delay:g}s")
        elif isinstance(decision, Hold):
            say(f"delivery to {rcpts} held ({decision.fault}); queued, retry in {decision.delay:g}s")
        elif isinstance(decision, DeadLetter):
            say(f"not delivered to {rcpts}: {decision.reason}; kept in {config.broker.prefix}.dead "
                "(opsrelay dlq list)")
    return EX_OK
