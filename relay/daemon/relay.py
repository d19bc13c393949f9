"""``opsrelay serve``: subscriptions -> render -> outbound -> SMTP delivery.

Two kinds of consumer run side by side on one engine: one per subscription
queue (decode the event, let the subscription's :class:`~relay.notify.notifier.Notifier`
say which mails it makes, render and queue them on outbound, then ack), and the
outbound consumer (send, then apply the pure delivery plan: ack, republish to a
retry queue, or dead-letter, then ack). A stateful subscription (digests,
damping, recovery notices) first takes ownership of its state queue
(:class:`~relay.notify.keeper.StateKeeper`), saves its state before acking each
event, and runs a timer that sends digests and damping summaries when due.
A message is acked only after what replaces it is durable, so a crash at any
point redelivers rather than loses. On stop the consumers stop taking work,
what is in flight finishes (bounded), and the rest returns to its queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from relay.config.models import Config, Subscription
from relay.contract.event import CONTENT_TYPE, decode_event, encode_event, iso_utc, utcnow_iso
from relay.contract.mail import Attempt, OutboundMail, dead_letter, from_message, to_message
from relay.contract.message import Message
from relay.contract.names import (
    dead_queue,
    outbound_queue,
    retry_queue,
    silenced_queue,
    state_queue,
    subscription_queue,
)
from relay.contract.topology import Topology, full_topology
from relay.delivery.budget import EngineBudget, budget_queues, windows
from relay.delivery.outcome import Mailer, OverBudget, SendResult
from relay.delivery.plan import DeadLetter, Decision, Delivered, Hold, Plan, Retry, decide
from relay.engines.base import Delivery, Engine
from relay.errors import BrokerUnavailable, ConfigurationError, MessageDecodeError, PermanentError, RelayError
from relay.maildrop.ingest import Maildrop, watch
from relay.notify.keeper import REFRESH, StateKeeper
from relay.notify.notice import Notice, NoticeKind
from relay.notify.notifier import Notifier
from relay.notify.silence import first_match, silenced_headers
from relay.notify.silence_log import SilenceView
from relay.notify.state import State
from relay.observe.health import Health
from relay.observe.observer import Observer, QueueSample
from relay.render.renderer import Renderer

__all__ = ["Relay", "relay_topology", "retry_delays_ms"]

log = logging.getLogger("opsrelay.relay")
# How long an outbound delivery is held unacked while the sending budget is spent (then it goes
# back to its queue), and how often the budget is looked at meanwhile.
BUDGET_HOLD, BUDGET_POLL, BUDGET_MIN_PAUSE = 600.0, 5.0, 0.2


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def retry_delays_ms(config: Config) -> list[int]:
    """The retry queues' TTLs: one queue per backoff step."""
    return [_ms(step) for step in config.retry.backoff]


def relay_topology(config: Config) -> Topology:
    return full_topology(
        config.broker.prefix,
        [(sub.name, sub.bindings()) for sub in config.subscriptions],
        retry_delays_ms(config),
        [sub.name for sub in config.subscriptions if sub.stateful],
        budget_queues(config.broker.prefix, config.smtp.smarthosts),
    )


class Relay:
    def __init__(self, config: Config, engine: Engine, mailer: Mailer, *,
                 renderer: Renderer | None = None, grace: float = 30.0, hold_back: float = 5.0,
                 maildrop: Maildrop | None = None, observer: Observer | None = None,
                 health: Health | None = None) -> None:
        self.config = config
        # Metrics and readiness (a no-op Observer when [metrics] is off); health feeds status and alerts.
        self.observer = observer or Observer()
        self.health = health or Health()
        self.silences = SilenceView(engine, config.broker.prefix)
        self.retry_delays_ms = retry_delays_ms(config)
        # Ingested beside the consumers, into this engine's outbound queue (relay.maildrop).
        self.maildrop = maildrop
        self.engine = engine
        self.mailer = mailer
        # Counted in the broker when a smarthost has max_per_minute / max_per_day.
        self.budget = EngineBudget(engine, config.broker.prefix) if any(
            windows(h) for h in config.smtp.smarthosts) else None
        self.renderer = renderer or Renderer(config)
        self.grace = grace
        self.hold_back = hold_back
        self.prefix = config.broker.prefix
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.stop_requested = asyncio.Event()  # wakes what waits (a budget, the self-watch) at once on stop
        self._notifiers = {sub.name: Notifier(sub, config.host) for sub in config.subscriptions}
        # A stateless subscription's state (recent counts) lives here only; a stateful one's in its keeper.
        self._states = {sub.name: State() for sub in config.subscriptions if not sub.stateful}
        self._keepers: dict[str, StateKeeper] = {}
        self._locks = {sub.name: asyncio.Lock() for sub in config.subscriptions}
        self._changed = {sub.name: asyncio.Event() for sub in config.subscriptions}
        self._subscribed: list[asyncio.Event] = []

    def _all_subscribed(self) -> bool:
        """Every consumer started so far has its queue (a standby of a stateful subscription counts once its
        state queue stands by; its events' consumer joins when it takes over)."""
        expected = 1 + sum(not sub.stateful for sub in self.config.subscriptions)
        return len(self._subscribed) >= expected and all(e.is_set() for e in self._subscribed)

    @property
    def owned(self) -> set[str]:
        """The stateful subscriptions this relay owns (others stand by for them)."""
        return set(self._keepers)

    async def run(self, stop: asyncio.Event) -> None:
        from relay.daemon.selfwatch import SelfWatch
        from relay.daemon.silencing import SilenceOwner
        from relay.ops.stats import queue_samples

        await self.engine.declare(relay_topology(self.config))
        await self._warn_abandoned_state()
        consumers = [
            asyncio.create_task(self._run_stateful(sub) if sub.stateful else
                                self._consume(subscription_queue(self.prefix, sub.name),
                                              self._handler_for(sub), concurrency=4),
                                name=f"sub:{sub.name}")
            for sub in self.config.subscriptions
        ]
        consumers.append(asyncio.create_task(
            self._consume(outbound_queue(self.prefix), self.handle_mail,
                          concurrency=self.config.smtp.pool_size), name="outbound"))
        if self.maildrop is not None:
            consumers.append(asyncio.create_task(watch(self.maildrop, self.engine, stop), name="maildrop"))
        consumers.append(asyncio.create_task(SelfWatch(self).run(self._all_subscribed), name="self-watch"))
        consumers.append(asyncio.create_task(SilenceOwner(self).run(), name="silences"))

        async def sample() -> Sequence[QueueSample]:
            samples = await queue_samples(self.engine, self.prefix, self.retry_delays_ms,
                                          [sub.name for sub in self.config.subscriptions])
            if self.maildrop is not None:
                samples.append(QueueSample("maildrop", *self.maildrop.waiting()))
            return samples

        self.observer.sample_queues(sample)
        log.info("relay: consuming %d subscription(s) and %s%s", len(self.config.subscriptions),
                 outbound_queue(self.prefix), f"; ingesting {self.maildrop.folder}" if self.maildrop else "")
        stopping = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopping, *consumers], return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stopping}:
                task.result()  # a consumer that died takes the relay down (and its supervisor restarts it)
        finally:
            stopping.cancel()
            # A scrape must not reach an engine that is being closed (it would reconnect it).
            self.observer.sample_queues(None)
            self.observer.ready("stopping")
            # Finish what is in flight while its consumers (and so its leases / channels) are
            # still open, so that its ack lands; only then close them, which returns the rest.
            self._stopping = True
            self.stop_requested.set()
            await self._drain()
            for task in consumers:
                task.cancel()
            await asyncio.gather(*consumers, return_exceptions=True)

    async def _drain(self) -> None:
        if not self._inflight:
            return
        log.info("relay: finishing %d delivery(ies) in flight", len(self._inflight))
        _, pending = await asyncio.wait(self._inflight, timeout=self.grace)
        for task in pending:
            # Not acked: the broker hands it to the next relay.
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _warn_abandoned_state(self) -> None:
        """A subscription that had digests, damping or recovery and no longer has: say what it left."""
        for sub in self.config.subscriptions:
            if sub.stateful:
                continue
            queue = state_queue(self.prefix, sub.name)
            try:
                saved = await self.engine.depth(queue)
            except ConfigurationError:
                continue  # never had state
            if saved:
                log.warning("relay: %s: %s holds state saved when this subscription had digests, damping or "
                            "recovery notices (pending digests, open outages); it is ignored now: turn them "
                            "back on to use it, or delete the queue", sub.name, queue)

    async def _run_stateful(self, sub: Subscription) -> None:
        """Own the subscription's state queue, then consume its events and run its timer."""
        keeper = StateKeeper(self.engine, state_queue(self.prefix, sub.name))
        tasks = [asyncio.create_task(keeper.run(), name=f"state:{sub.name}")]
        try:
            loaded = asyncio.create_task(keeper.loaded.wait())
            done, _ = await asyncio.wait([tasks[0], loaded], return_when=asyncio.FIRST_COMPLETED)
            if loaded not in done:
                loaded.cancel()
                tasks[0].result()
                return
            self._keepers[sub.name] = keeper
            tasks.append(asyncio.create_task(self._consume(
                subscription_queue(self.prefix, sub.name), self._handler_for(sub), concurrency=4)))
            tasks.append(asyncio.create_task(self._timer(sub, keeper)))
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _timer(self, sub: Subscription, keeper: StateKeeper) -> None:
        """Send digests and damping summaries when due; rewrite an unchanged state now and then."""
        notifier, changed = self._notifiers[sub.name], self._changed[sub.name]
        while True:
            due = notifier.next_due(keeper.state)
            wait = REFRESH if due is None else min(REFRESH, max(0.0, due - time.time()))
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), wait)
            if self._stopping:
                return
            async with self._locks[sub.name]:
                try:
                    notices = notifier.on_timer(keeper.state, time.time())
                    for notice in notices:
                        await self.queue_or_dead_letter(sub, notice)
                    if notices or keeper.stale():
                        await keeper.save()
                except BaseException:
                    self._restore(keeper)  # the digests stay pending for the next relay or turn
                    raise

    def _handler_for(self, sub: Subscription) -> Callable[[Delivery], Awaitable[None]]:
        async def handle(delivery: Delivery) -> None:
            await self.handle_event(sub, delivery)

        return handle

    async def _consume(self, queue: str, handler: Callable[[Delivery], Awaitable[None]], *,
                       concurrency: int) -> None:
        slots = asyncio.Semaphore(concurrency)
        subscribed = asyncio.Event()
        self._subscribed.append(subscribed)
        async for delivery in self.engine.consume(queue, prefetch=concurrency * 2, subscribed=subscribed):
            await slots.acquire()
            if self._stopping:
                # Not started: left unsettled, it returns to its queue when the consumer closes.
                slots.release()
                continue
            task = asyncio.create_task(self._settle(queue, handler, delivery))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            task.add_done_callback(lambda _: slots.release())

    async def _settle(self, queue: str, handler: Callable[[Delivery], Awaitable[None]],
                      delivery: Delivery) -> None:
        """Run ``handler``; whatever it raises, the delivery ends settled or left for redelivery."""
        message_id = delivery.message.message_id or "(no id)"
        try:
            await handler(delivery)
        except PermanentError as exc:
            # An event we could read but not render can be replayed once the template is fixed.
            readable_event = queue != outbound_queue(self.prefix) and not isinstance(exc, MessageDecodeError)
            await self._dead_letter(queue, delivery, str(exc), "event" if readable_event else "invalid")
        except BrokerUnavailable as exc:
            # The broker went away mid-way: leave it unacked, it comes back.
            log.error("relay: %s: %s; message %s left for redelivery", queue, exc, message_id)
            with contextlib.suppress(RelayError):
                await delivery.reject(requeue=True)
        except RelayError as exc:
            # Our topology or config, not the message: hold it back a while instead of spinning.
            log.error("relay: %s: %s; message %s requeued in %gs", queue, exc, message_id, self.hold_back)
            await asyncio.sleep(self.hold_back)
            with contextlib.suppress(RelayError):
                await delivery.reject(requeue=True)
        except Exception as exc:
            # A bug of ours must neither lose the message nor wedge the consumer's prefetch window.
            log.exception("relay: %s: unexpected error on message %s", queue, message_id)
            await self._dead_letter(queue, delivery, f"unexpected error: {exc!r}", "invalid")

    async def _dead_letter(self, queue: str, delivery: Delivery, reason: str, kind: str) -> None:
        log.error("relay: %s: message %s cannot be handled, dead-lettered: %s",
                  queue, delivery.message.message_id or "(no id)", reason)
        try:
            await self.engine.send(dead_queue(self.prefix),
                                   dead_letter(delivery.message, reason=reason, source=queue, kind=kind))
            self._dead_lettered("invalid")
            await delivery.ack()
        except RelayError as exc:
            log.error("relay: %s: could not dead-letter %s (%s); left for redelivery",
                      queue, delivery.message.message_id, exc)
            with contextlib.suppress(RelayError):
                await delivery.reject(requeue=True)

    async def handle_event(self, sub: Subscription, delivery: Delivery) -> None:
        event = decode_event(delivery.message.body)
        self.observer.event(sub.name)
        if not (sub.accepts(event) or sub.watches_recovery(event)):
            log.debug("relay: %s: event %s filtered out", sub.name, event.id)
            await delivery.ack()
            return
        silence = first_match((await self.silences.current()).values(), event, sub.name, time.time())
        if silence is not None:
            # Kept for the summary when the silence ends; never seen by the notifier, so no outage
            # opens and no recovery notice follows for it.
            message = delivery.message
            await self.engine.send(silenced_queue(self.prefix), Message(
                message.body, message.message_id, message.content_type, silenced_headers(silence.id, sub.name)))
            self.observer.silenced(sub.name)
            log.info("relay: %s: event %s (%s %s) silenced by %s", sub.name, event.id, event.program, event.state,
                     silence.id)
            await delivery.ack()
            return
        keeper = self._keepers.get(sub.name)
        # A stateful subscription's events take turns and its state is saved before the ack; a
        # stateless one's notifier only counts recent events, synchronously: no turn to take.
        async with self._locks[sub.name] if keeper is not None else contextlib.nullcontext():
            state = self._state(sub)  # read under the lock: a failed turn may have replaced it
            try:
                notices = self._notifiers[sub.name].on_event(state, event, time.time())
                for notice in notices:
                    await self._queue_notice(sub, notice)
                if keeper is not None:
                    await keeper.save()  # a crash after this redelivers the event, and it is seen
            except BaseException:
                # Nothing of an event that failed half-way stays: its redelivery starts afresh
                # and must not look like a duplicate.
                if keeper is not None:
                    self._restore(keeper)
                else:
                    state.forget(event.id)
                raise
        if not notices:
            log.info("relay: %s: event %s (%s %s) kept for a digest or held by damping",
                     sub.name, event.id, event.program, event.state)
        self._changed[sub.name].set()
        await delivery.ack()

    def _state(self, sub: Subscription) -> State:
        keeper = self._keepers.get(sub.name)
        return keeper.state if keeper is not None else self._states[sub.name]

    def _restore(self, keeper: StateKeeper) -> None:
        """Back to the state as last saved: a turn that failed half-way leaves nothing behind."""
        keeper.state = State.loads(keeper.saved)

    async def queue_or_dead_letter(self, sub: Subscription, notice: Notice) -> None:
        """A digest or summary whose template fails on these events: its events go to dead letters.

        Raising would leave the digest pending, failing again on every turn and every restart.
        """
        try:
            await self._queue_notice(sub, notice)
        except PermanentError as exc:
            source = subscription_queue(self.prefix, sub.name)
            log.error("relay: %s: %s of %d event(s) cannot be rendered, its %d listed event(s) dead-lettered "
                      "(replayable once the template is fixed): %s", sub.name, notice.kind.value, notice.total,
                      len(notice.events), exc)
            for event in notice.events:
                message = Message(encode_event(event), event.id, CONTENT_TYPE)
                await self.engine.send(dead_queue(self.prefix),
                                       dead_letter(message, reason=str(exc), source=source, kind="event"))
                self._dead_lettered("invalid")
                if sub.name in self._states or sub.name in self._keepers:
                    self._state(sub).forget(event.id)  # a replay must not look like a duplicate

    async def _queue_notice(self, sub: Subscription, notice: Notice) -> None:
        mail = self.renderer.render_notice(sub, notice)
        await self.engine.send(outbound_queue(self.prefix), to_message(mail))
        self.observer.notice(sub.name, notice.kind.value)
        what = (f"event {notice.first.id}" if notice.kind is NoticeKind.EVENT
                else f"{notice.kind.value} of {notice.total} event(s)")
        log.info("relay: %s: %s (%s %s) queued as mail %s to %d recipient(s)",
                 sub.name, what, notice.last.program, notice.last.state, mail.message_id, len(mail.recipients))

    async def handle_mail(self, delivery: Delivery) -> None:
        mail = from_message(delivery.message)
        waited = 0.0
        while True:
            try:
                await self.deliver(mail)
                break
            except OverBudget as over:
                # The mail waits where it is, in order, no attempt spent. Held at most
                # BUDGET_HOLD at a time (RabbitMQ's consumer_timeout is 30 min), then it goes
                # back to its place in the queue and the next turn waits again.
                if waited >= BUDGET_HOLD or self._stopping:
                    await delivery.reject(requeue=True)
                    return
                if not waited:
                    log.info("relay: mail %s %s until %s", mail.message_id, over, iso_utc_of(over.until))
                # At least a moment: the broker drops an expired counter a little after its time.
                pause = min(max(BUDGET_MIN_PAUSE, over.until - time.time()), BUDGET_POLL, BUDGET_HOLD - waited)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_requested.wait(), pause)
                waited += pause
        await delivery.ack()

    async def deliver(self, mail: OutboundMail) -> Plan:
        """One attempt at ``mail``; what did not go is durably in a retry or dead-letter queue on return.

        The outbound consumer calls this, and so does ``sendmail.mode = "direct"``, which reports the plan.
        """
        attempt = mail.attempts + 1
        outcome: SendResult | RelayError
        began = time.monotonic()
        try:
            if self.budget is None:
                outcome = await self.mailer.send(mail.sender, mail.recipients, mail.raw)
            else:
                outcome = await self.mailer.send(mail.sender, mail.recipients, mail.raw, budget=self.budget)
        except RelayError as exc:
            outcome = exc
        # The metrics' label; the history names only who answered ("" for a mailer that does not say).
        label = outcome.smarthost or self.config.smtp.name
        self._sessions(outcome, label, time.monotonic() - began)
        plan = decide(outcome, mail.recipients, attempt, self.config.retry, holds=mail.holds)
        for decision in plan:
            await self._apply(mail, attempt, decision, outcome.smarthost, label=label)
        return plan

    def _sessions(self, outcome: SendResult | RelayError, smarthost: str, seconds: float) -> None:
        """What the attempt says of each smarthost it tried: ``opsrelay_smtp_up``, status, the alerts."""
        now = time.time()
        for name, why in outcome.passed_over:
            self.observer.session(name, ok=False)
            self.health.session(name, ok=False, reply=why, now=now)
        # A SendResult is a session that worked, whatever it said of each recipient.
        ok = not isinstance(outcome, RelayError)
        self.observer.session(smarthost, ok=ok, seconds=seconds)
        self.health.session(smarthost, ok=ok, reply="" if ok else str(outcome), now=now)

    def _dead_lettered(self, reason: str) -> None:
        self.observer.dead_letter(reason)
        self.health.dead_letter(time.time())

    async def _apply(self, mail: OutboundMail, attempt: int, decision: Decision, smarthost: str = "", *,
                     label: str = "") -> None:
        rcpts = decision.recipients
        what = f"mail {mail.message_id} attempt {attempt} to {len(rcpts)} recipient(s)"
        if isinstance(decision, Delivered):
            log.info("relay: %s delivered: %s", what, decision.reply)
            self.observer.attempt(label, "delivered")
            self.observer.delivered(label)
            for held_at, fault in self.health.flowing():
                self.observer.held(held_at, fault, on=False)
            return
        if isinstance(decision, Retry):
            self.observer.attempt(label, "retry")
            log.warning("relay: %s failed for now (%s); retry in %gs", what, decision.reason, decision.delay)
            later = mail.after(Attempt(utcnow_iso(), decision.reason, rcpts, smarthost), recipients=rcpts)
            await self.engine.send(retry_queue(self.prefix, _ms(decision.delay)), to_message(later))
        elif isinstance(decision, Hold):
            self.observer.attempt(label, "held")
            if self.health.hold(label, decision.kind.value, decision.fault, time.time()):
                self.observer.held(label, decision.kind.value, on=True)
            log.error("relay: DELIVERY HELD: %s; mail %s waits, retry in %gs (fix the smarthost or config)",
                      decision.fault, mail.message_id, decision.delay)
            later = mail.after(Attempt(utcnow_iso(), f"held: {decision.fault}", rcpts, smarthost),
                               recipients=rcpts, held=True)
            await self.engine.send(retry_queue(self.prefix, _ms(decision.delay)),
                                   to_message(later, held=decision.fault))
        else:
            assert isinstance(decision, DeadLetter)
            self.observer.attempt(label, "dead")
            log.error("relay: %s dead-lettered: %s", what, decision.reason)
            final = mail.after(Attempt(utcnow_iso(), decision.reason, rcpts, smarthost), recipients=rcpts)
            await self.engine.send(dead_queue(self.prefix), dead_letter(
                to_message(final), reason=decision.reason, source=outbound_queue(self.prefix), kind="mail"))
            self._dead_lettered("attempts" if decision.exhausted else "permanent")




def iso_utc_of(unix: float) -> str:
    """A unix time as the ISO form events and the history use."""
    from datetime import UTC, datetime

    return iso_utc(datetime.fromtimestamp(unix, UTC))
