"""The relay's Mailer: the smarthosts of ``[smtp]`` and ``[[smtp.fallback]]``, tried in order.

A fault of the session (connection refused or timed out, TLS, STARTTLS missing, AUTH or the
XOAUTH2 token refused, 421, MAIL FROM refused, a quota reply that refused the whole mail) moves
the mail to the next smarthost within the same attempt: no backoff step is waited for. A
verdict on the mail (a recipient refused, a reply to the end of DATA) is not moved: delivered
recipients are never mailed twice, and a 5xx to a recipient is a dead letter whichever
smarthost said it; a quota reply to some recipients while others were taken holds just those.

A smarthost that failed is tried after the others for ``smtp.failback``, then first again.
One whose sending budget is spent is passed over until it frees (:mod:`relay.delivery.budget`);
when that is all that stops the mail, :class:`~relay.delivery.outcome.OverBudget` says until when.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

from relay.config.models import SmtpConfig
from relay.delivery.budget import windows
from relay.delivery.outcome import Budget, OverBudget, SendResult, ServerInfo, SessionFault
from relay.delivery.smtp import SmtpPool
from relay.errors import SMTPConnectError

__all__ = ["Smarthosts"]

log = logging.getLogger("opsrelay.relay")


class Smarthosts:
    """An ordered set of smarthost pools with failback; a :class:`~relay.delivery.outcome.Mailer`."""

    def __init__(self, config: SmtpConfig, *, clock: Callable[[], float] = time.monotonic,
                 pools: Sequence[SmtpPool] | None = None) -> None:
        self._hosts = config.smarthosts
        self._pools = list(pools) if pools is not None else [
            SmtpPool(host, pool_size=config.pool_size) for host in self._hosts]
        self._failback = config.failback
        self._clock = clock
        self._down_until: dict[str, float] = {}
        # Counting a budget and sending under it is one step per smarthost in this relay.
        self._budget_locks = {h.name: asyncio.Lock() for h in self._hosts if windows(h)}

    @property
    def names(self) -> list[str]:
        return [h.name for h in self._hosts]

    def order(self) -> list[int]:
        """Indexes in the order to try: healthy ones as configured, then those that failed lately."""
        now = self._clock()
        up = [i for i, h in enumerate(self._hosts) if self._down_until.get(h.name, 0.0) <= now]
        return up + [i for i in range(len(self._hosts)) if i not in up]

    async def send(self, sender: str, recipients: Sequence[str], raw: bytes, *,
                   budget: Budget | None = None) -> SendResult:
        last: SessionFault | None = None
        failed: list[tuple[str, str]] = []  # the session faults before ``last``
        waits: list[tuple[float, str]] = []
        sequence = self.order()
        for index in sequence:
            host, pool = self._hosts[index], self._pools[index]
            try:
                if budget is not None and host.name in self._budget_locks:
                    async with self._budget_locks[host.name]:
                        frees = await budget.exhausted(host)
                        if frees is not None:
                            waits.append((frees, host.name))
                            continue
                        result = await pool.transact(sender, recipients, raw)
                        if result.accepted:
                            await budget.spend(host)
                else:
                    result = await pool.transact(sender, recipients, raw)
            except SessionFault as fault:
                if last is not None:
                    failed.append((last.smarthost, str(last.error)))
                last = fault
                self._down_until[host.name] = self._clock() + self._failback
                log.warning("relay: smarthost %s cannot take mail (%s)%s", host.name, fault.error,
                            "; trying the next one" if index != sequence[-1] else "")
                continue
            self._down_until.pop(host.name, None)
            if last is not None:
                failed.append((last.smarthost, str(last.error)))
            return dataclasses.replace(result, passed_over=tuple(failed)) if failed else result
        if waits:
            raise OverBudget(min(t for t, _ in waits), [name for _, name in waits])
        if last is None:
            raise SMTPConnectError("no smarthost is configured")
        last.error.smarthost = last.smarthost
        last.error.passed_over = tuple(failed)
        raise last.error

    async def check(self) -> ServerInfo:
        """``opsrelay check --connect`` on the primary (:meth:`check_all` for every smarthost)."""
        return await self._pools[0].check()

    async def check_all(self) -> list[tuple[str, ServerInfo | Exception]]:
        results: list[tuple[str, ServerInfo | Exception]] = []
        for host, pool in zip(self._hosts, self._pools, strict=True):
            try:
                results.append((host.name, await pool.check()))
            except Exception as exc:  # a RelayError, reported per smarthost
                results.append((host.name, exc))
        return results

    async def close(self) -> None:
        for pool in self._pools:
            await pool.close()
