"""relay.delivery.smarthosts.Smarthosts with fake pools, a fake clock and a fake budget, and the
``[smtp]`` / ``[[smtp.fallback]]`` configuration it is built from.

The pools are injected through ``pools=`` (one per smarthost, in order): each fake answers
``transact`` from a script (a SendResult to return, an exception to raise) and records every call,
so each test says exactly which smarthost was asked, in which order, within one ``send``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from relay.config.models import Config, SmtpConfig, load_config
from relay.config.smarthost import SmarthostConfig
from relay.delivery.outcome import OverBudget, Reply, SendResult, ServerInfo, SessionFault
from relay.delivery.smarthosts import Smarthosts
from relay.errors import (
    RelayError,
    SMTPConnectError,
    SMTPQuotaError,
    SMTPSecurityError,
    SMTPTemporaryError,
)

SENDER = "alerts@example.test"
RCPT = "oncall@example.test"
RAW = b"Subject: test\r\n\r\nhello\r\n"
FAILBACK = 300.0


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakePool:
    """An SmtpPool as Smarthosts sees it: ``transact`` answers from ``script``, then accepts all."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.script: deque[SendResult | Exception] = deque()
        self.calls: list[tuple[str, tuple[str, ...], bytes]] = []
        self.checks = 0
        self.closed = False

    def then(self, *outcomes: SendResult | Exception) -> FakePool:
        self.script.extend(outcomes)
        return self

    def fault(self, error: RelayError | None = None) -> SessionFault:
        return SessionFault(self.name, error if error is not None else SMTPConnectError("connection refused"))

    async def transact(self, sender: str, recipients: Sequence[str], raw: bytes) -> SendResult:
        self.calls.append((sender, tuple(recipients), raw))
        outcome = self.script.popleft() if self.script else SendResult(
            tuple(recipients), {}, Reply(250, "2.0.0 OK"), smarthost=self.name)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def check(self) -> ServerInfo:
        self.checks += 1
        if self.name.startswith("down"):
            raise SMTPConnectError("connection refused")
        return ServerInfo(self.name, 25, tls=True, authenticated=True, extensions=())

    async def close(self) -> None:
        self.closed = True


class FakeBudget:
    """``exhausted`` answers from ``spent_until`` (unix time a place frees, per smarthost name)."""

    def __init__(self, spent_until: dict[str, float] | None = None) -> None:
        self.spent_until = dict(spent_until or {})
        self.asked: list[str] = []
        self.spent: list[str] = []

    async def exhausted(self, smarthost: SmarthostConfig) -> float | None:
        self.asked.append(smarthost.name)
        return self.spent_until.get(smarthost.name)

    async def spend(self, smarthost: SmarthostConfig) -> None:
        self.spent.append(smarthost.name)


def smtp(n: int = 2, *, failback: float = FAILBACK, limits: dict[int, int] | None = None,
         **primary: Any) -> SmtpConfig:
    """[smtp] on 127.0.0.1:2525 and n-1 fallbacks on :2526, :2527, ...; ``limits``: index -> max_per_minute."""
    limits = limits or {}
    hosts = [{"host": "127.0.0.1", "port": 2525 + i, "security": "none",
              "max_per_minute": limits.get(i, 0)} for i in range(n)]
    return SmtpConfig.model_validate({**hosts[0], "failback": failback, "fallback": hosts[1:], **primary})


def rig(config: SmtpConfig, clock: Clock | None = None) -> tuple[Smarthosts, list[FakePool], Clock]:
    clock = clock or Clock()
    pools = [FakePool(h.name) for h in config.smarthosts]
    return Smarthosts(config, clock=clock, pools=pools), pools, clock  # type: ignore[arg-type]


def calls(pools: list[FakePool]) -> list[int]:
    return [len(p.calls) for p in pools]


# -- order, fallback within one send, failback ------------------------------------------------------


async def test_a_healthy_primary_takes_every_mail_and_says_so() -> None:
    hosts, pools, _ = rig(smtp(3))
    for _ in range(3):
        result = await hosts.send(SENDER, [RCPT], RAW)
        assert result.smarthost == "127.0.0.1:2525"
        assert result.accepted == (RCPT,)
    assert calls(pools) == [3, 0, 0]
    assert pools[0].calls[0] == (SENDER, (RCPT,), RAW)
    assert hosts.names == ["127.0.0.1:2525", "127.0.0.1:2526", "127.0.0.1:2527"]


@pytest.mark.parametrize("error", [
    SMTPConnectError("connection refused"),
    SMTPSecurityError("TLS with the smarthost failed: certificate verify failed"),
    SMTPSecurityError("AUTH rejected: 535 5.7.8 credentials invalid"),
    SMTPTemporaryError(421, "4.3.2 service shutting down"),
    SMTPQuotaError(550, "5.4.5 Daily user sending limit exceeded"),
], ids=["refused", "tls", "auth", "421", "quota"])
async def test_a_session_fault_moves_the_mail_to_the_next_smarthost_in_the_same_send(error: RelayError) -> None:
    hosts, pools, _ = rig(smtp(2))
    pools[0].then(pools[0].fault(error))
    result = await hosts.send(SENDER, [RCPT, "second@example.test"], RAW)
    assert result.smarthost == "127.0.0.1:2526"
    assert result.accepted == (RCPT, "second@example.test")
    assert calls(pools) == [1, 1]
    assert pools[1].calls[0] == (SENDER, (RCPT, "second@example.test"), RAW), "the same mail, whole"


async def test_a_smarthost_that_failed_is_tried_after_the_others_until_failback() -> None:
    hosts, pools, clock = rig(smtp(3))
    pools[0].then(pools[0].fault())
    assert (await hosts.send(SENDER, [RCPT], RAW)).smarthost == "127.0.0.1:2526"
    assert hosts.order() == [1, 2, 0]

    clock.now += FAILBACK - 0.001
    assert hosts.order() == [1, 2, 0]
    assert (await hosts.send(SENDER, [RCPT], RAW)).smarthost == "127.0.0.1:2526"
    assert calls(pools) == [1, 2, 0], "the failed primary was not asked within the failback window"

    clock.now += 0.001  # failback seconds after the fault: first again
    assert hosts.order() == [0, 1, 2]
    assert (await hosts.send(SENDER, [RCPT], RAW)).smarthost == "127.0.0.1:2525"
    assert calls(pools) == [2, 2, 0]


async def test_a_primary_that_fails_again_after_failback_is_passed_over_for_another_window() -> None:
    hosts, pools, clock = rig(smtp(2))
    pools[0].then(pools[0].fault(), pools[0].fault())
    await hosts.send(SENDER, [RCPT], RAW)
    clock.now += FAILBACK
    result = await hosts.send(SENDER, [RCPT], RAW)  # primary tried first again, fails, fallback takes it
    assert result.smarthost == "127.0.0.1:2526"
    assert calls(pools) == [2, 2]
    clock.now += FAILBACK - 1
    assert hosts.order() == [1, 0], "the window counts from the second fault"
    clock.now += 1
    assert hosts.order() == [0, 1]


async def test_a_failed_fallback_goes_behind_the_others_too() -> None:
    hosts, pools, _ = rig(smtp(3))
    pools[0].then(pools[0].fault())
    pools[1].then(pools[1].fault())
    assert (await hosts.send(SENDER, [RCPT], RAW)).smarthost == "127.0.0.1:2527"
    assert calls(pools) == [1, 1, 1]
    assert hosts.order() == [2, 0, 1]


async def test_a_recovered_smarthost_is_not_held_back_by_an_old_fault() -> None:
    """After failback the primary succeeds: it is first from then on, whatever the clock does."""
    hosts, pools, clock = rig(smtp(2))
    pools[0].then(pools[0].fault())
    await hosts.send(SENDER, [RCPT], RAW)
    clock.now += FAILBACK
    assert (await hosts.send(SENDER, [RCPT], RAW)).smarthost == "127.0.0.1:2525"
    clock.now -= 2 * FAILBACK  # a clock step backwards must not bring the old fault back
    assert hosts.order() == [0, 1]


# -- verdicts on the mail are not moved ----------------------------------------------------------------


async def test_a_refused_recipient_is_the_answer_and_is_not_sent_to_the_fallback() -> None:
    hosts, pools, _ = rig(smtp(2))
    refusal = SendResult((), {RCPT: Reply(550, "5.1.1 no such user")}, None, smarthost="127.0.0.1:2525")
    pools[0].then(refusal)
    result = await hosts.send(SENDER, [RCPT], RAW)
    assert result is refusal
    assert calls(pools) == [1, 0]
    assert hosts.order() == [0, 1], "a recipient's refusal is no fault of the smarthost"


async def test_a_partly_refused_mail_is_the_answer_and_the_refused_are_not_sent_elsewhere() -> None:
    hosts, pools, _ = rig(smtp(2))
    partial = SendResult((RCPT,), {"busy@example.test": Reply(451, "4.2.1 mailbox busy")},
                         Reply(250, "2.0.0 OK"), smarthost="127.0.0.1:2525")
    pools[0].then(partial)
    assert await hosts.send(SENDER, [RCPT, "busy@example.test"], RAW) is partial
    assert calls(pools) == [1, 0]


@pytest.mark.parametrize("error", [
    SMTPTemporaryError(451, "4.3.0 try again later"),
    SMTPConnectError("the smarthost closed the connection after DATA"),
], ids=["451-after-data", "lost-after-data"])
async def test_a_failure_that_is_not_a_session_fault_is_raised_and_not_moved(error: Exception) -> None:
    hosts, pools, _ = rig(smtp(2))
    pools[0].then(error)
    with pytest.raises(type(error)) as raised:
        await hosts.send(SENDER, [RCPT], RAW)
    assert raised.value is error
    assert calls(pools) == [1, 0], "the server may have taken the mail: never sent again elsewhere"
    assert hosts.order() == [0, 1]


async def test_when_every_smarthost_fails_the_last_error_is_raised_naming_its_smarthost() -> None:
    hosts, pools, _ = rig(smtp(3))
    last = SMTPSecurityError("TLS with the smarthost failed: certificate verify failed")
    pools[0].then(pools[0].fault())
    pools[1].then(pools[1].fault(SMTPQuotaError(550, "5.4.5 Daily user sending limit exceeded")))
    pools[2].then(pools[2].fault(last))
    with pytest.raises(SMTPSecurityError) as raised:
        await hosts.send(SENDER, [RCPT], RAW)
    assert raised.value is last
    assert raised.value.smarthost == "127.0.0.1:2527"
    assert calls(pools) == [1, 1, 1]
    assert hosts.order() == [0, 1, 2], "all down: configured order"


async def test_when_a_lone_primary_fails_its_error_names_it() -> None:
    hosts, pools, _ = rig(smtp(1))
    pools[0].then(pools[0].fault())
    with pytest.raises(SMTPConnectError) as raised:
        await hosts.send(SENDER, [RCPT], RAW)
    assert raised.value.smarthost == "127.0.0.1:2525"


# -- sending budgets ------------------------------------------------------------------------------


async def test_every_budget_spent_is_over_budget_until_the_first_place_frees() -> None:
    hosts, pools, _ = rig(smtp(2, limits={0: 5, 1: 5}))
    budget = FakeBudget({"127.0.0.1:2525": 2000.0, "127.0.0.1:2526": 1500.0})
    with pytest.raises(OverBudget) as raised:
        await hosts.send(SENDER, [RCPT], RAW, budget=budget)
    assert raised.value.until == 1500.0
    assert raised.value.smarthosts == ("127.0.0.1:2525", "127.0.0.1:2526")
    assert "127.0.0.1:2525, 127.0.0.1:2526" in str(raised.value)
    assert calls(pools) == [0, 0], "nothing was sent"
    assert budget.spent == []
    assert hosts.order() == [0, 1], "a spent budget is not a fault"


async def test_a_spent_primary_is_passed_over_and_the_fallback_spends_its_own_budget() -> None:
    hosts, pools, _ = rig(smtp(2, limits={0: 5, 1: 5}))
    budget = FakeBudget({"127.0.0.1:2525": 2000.0})
    result = await hosts.send(SENDER, [RCPT], RAW, budget=budget)
    assert result.smarthost == "127.0.0.1:2526"
    assert calls(pools) == [0, 1]
    assert budget.spent == ["127.0.0.1:2526"]

    del budget.spent_until["127.0.0.1:2525"]  # the window moved on
    assert (await hosts.send(SENDER, [RCPT], RAW, budget=budget)).smarthost == "127.0.0.1:2525"
    assert budget.spent == ["127.0.0.1:2526", "127.0.0.1:2525"]


async def test_the_budget_is_spent_only_when_the_smarthost_accepted_something() -> None:
    hosts, pools, _ = rig(smtp(1, limits={0: 5}))
    budget = FakeBudget()
    pools[0].then(
        SendResult((), {RCPT: Reply(550, "5.1.1 no such user")}, None, smarthost="127.0.0.1:2525"),
        SMTPTemporaryError(451, "4.3.0 try again later"),
        pools[0].fault(),
        SendResult((RCPT,), {"x@example.test": Reply(550, "5.1.1 no such user")}, Reply(250, "OK"),
                   smarthost="127.0.0.1:2525"),
    )
    await hosts.send(SENDER, [RCPT], RAW, budget=budget)
    assert budget.spent == [], "everyone refused: nothing was sent"
    with pytest.raises(SMTPTemporaryError):
        await hosts.send(SENDER, [RCPT], RAW, budget=budget)
    with pytest.raises(SMTPConnectError):
        await hosts.send(SENDER, [RCPT], RAW, budget=budget)
    assert budget.spent == [], "a failed transaction sent nothing"
    await hosts.send(SENDER, [RCPT, "x@example.test"], RAW, budget=budget)
    assert budget.spent == ["127.0.0.1:2525"], "one mail accepted (for one of two recipients): one place"


async def test_only_smarthosts_with_a_budget_ask_for_it() -> None:
    hosts, pools, _ = rig(smtp(2, limits={1: 5}))
    budget = FakeBudget()
    await hosts.send(SENDER, [RCPT], RAW, budget=budget)
    assert budget.asked == [] and budget.spent == [], "the primary has no limit"
    pools[0].then(pools[0].fault())
    await hosts.send(SENDER, [RCPT], RAW, budget=budget)
    assert budget.asked == ["127.0.0.1:2526"]
    assert budget.spent == ["127.0.0.1:2526"]


async def test_a_spent_budget_and_a_faulty_other_smarthost_wait_for_the_budget() -> None:
    """The budget frees at a known time; the fault of the other one is not the mail's to be held for."""
    hosts, pools, _ = rig(smtp(2, limits={0: 5}))
    budget = FakeBudget({"127.0.0.1:2525": 1234.0})
    pools[1].then(pools[1].fault())
    with pytest.raises(OverBudget) as raised:
        await hosts.send(SENDER, [RCPT], RAW, budget=budget)
    assert (raised.value.until, raised.value.smarthosts) == (1234.0, ("127.0.0.1:2525",))
    assert calls(pools) == [0, 1]


# -- check and close ------------------------------------------------------------------------------


async def test_check_all_reports_each_smarthost_and_close_closes_every_pool() -> None:
    config = smtp(2)
    pools = [FakePool("127.0.0.1:2525"), FakePool("down:2526")]
    hosts = Smarthosts(config, clock=Clock(), pools=pools)  # type: ignore[arg-type]
    assert (await hosts.check()).host == "127.0.0.1:2525"
    results = await hosts.check_all()
    assert [name for name, _ in results] == ["127.0.0.1:2525", "127.0.0.1:2526"]
    assert isinstance(results[0][1], ServerInfo)
    assert isinstance(results[1][1], SMTPConnectError)
    await hosts.close()
    assert all(p.closed for p in pools)


# -- configuration ----------------------------------------------------------------------------------


def test_a_fallback_inherits_only_timeout_and_helo_from_smtp(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read here\n")
    config = SmtpConfig.model_validate({
        "host": "smtp.example.test", "port": 587, "username": "relay@example.test", "password": "s3cret",
        "ca_file": str(ca), "timeout": 7, "helo": "relay.example.test", "max_per_minute": 5,
        "max_per_day": 100, "from": "alerts@example.test",
        "fallback": [{"host": "backup.example.test"},
                     {"host": "127.0.0.1", "port": 2526, "security": "none", "timeout": 3, "helo": "other.test"}],
    })
    first, second = config.fallback
    assert (first.timeout, first.helo) == (7.0, "relay.example.test")
    assert first.username == "" and first.password is None and first.ca_file is None
    assert (first.max_per_minute, first.max_per_day) == (0, 0)
    assert first.security.value == "starttls" and first.name == "backup.example.test:587"
    assert first.oauth2 is None
    assert (second.timeout, second.helo) == (3.0, "other.test"), "its own values win"
    assert second.name == "127.0.0.1:2526"
    assert [h.name for h in config.smarthosts] == ["smtp.example.test:587", "backup.example.test:587",
                                                   "127.0.0.1:2526"]
    assert not hasattr(first, "from_") and not hasattr(first, "fallback"), "a fallback is a plain smarthost"


def test_failback_defaults_to_five_minutes_and_takes_a_duration() -> None:
    assert smtp(1, failback=FAILBACK).failback == 300.0
    assert SmtpConfig.model_validate({"host": "127.0.0.1", "security": "none"}).failback == 300.0
    assert SmtpConfig.model_validate({"host": "127.0.0.1", "security": "none", "failback": "1s"}).failback == 1.0
    assert SmtpConfig.model_validate({"host": "127.0.0.1", "security": "none", "failback": "2m"}).failback == 120.0
    with pytest.raises(ValidationError):
        SmtpConfig.model_validate({"host": "127.0.0.1", "security": "none", "failback": 0})


@pytest.mark.parametrize("where", ["smtp", "fallback"])
@pytest.mark.parametrize("secret", ["password", "password_file"])
def test_oauth2_with_a_password_is_refused(tmp_path: Path, where: str, secret: str) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    host = {"host": "smtp.example.test", "username": "relay@example.test",
            "oauth2": {"token_command": "/usr/local/bin/get-token --account relay"},
            secret: "s3cret" if secret == "password" else str(pw)}
    data = {**host} if where == "smtp" else {"host": "127.0.0.1", "security": "none", "fallback": [host]}
    with pytest.raises(ValidationError, match="with \\[oauth2\\] AUTH is XOAUTH2: set no password"):
        SmtpConfig.model_validate(data)


def test_a_fallback_is_validated_as_a_smarthost_of_its_own() -> None:
    with pytest.raises(ValidationError, match="clear text"):
        SmtpConfig.model_validate({"host": "127.0.0.1", "security": "none",
                                   "fallback": [{"host": "backup.example.test", "security": "none"}]})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        SmtpConfig.model_validate({"host": "127.0.0.1", "security": "none",
                                   "fallback": [{"host": "backup.example.test", "from": "x@example.test"}]})


def test_fallbacks_are_read_from_smtp_fallback_tables_in_order(tmp_path: Path) -> None:
    path = tmp_path / "opsrelay.toml"
    path.write_text(
        'host = "web1"\n[broker]\nurl = "sqlite:///' + str(tmp_path) + '/queue.db"\n'
        '[smtp]\nhost = "127.0.0.1"\nport = 2525\nsecurity = "none"\nfrom = "alerts@example.test"\n'
        'timeout = "9s"\nfailback = "90s"\nmax_per_minute = 20\n'
        '[[smtp.fallback]]\nhost = "127.0.0.1"\nport = 2526\nsecurity = "none"\nmax_per_day = 500\n'
        '[[smtp.fallback]]\nhost = "backup.example.test"\nsecurity = "tls"\n'
        '[[subscriptions]]\nname = "crashes"\nto = ["oncall@example.test"]\n', encoding="utf-8")
    config: Config = load_config(path, env={})
    assert [h.name for h in config.smtp.smarthosts] == ["127.0.0.1:2525", "127.0.0.1:2526",
                                                        "backup.example.test:465"]
    assert config.smtp.failback == 90.0
    assert [h.timeout for h in config.smtp.smarthosts] == [9.0, 9.0, 9.0]
    assert [(h.max_per_minute, h.max_per_day) for h in config.smtp.smarthosts] == [(20, 0), (0, 500), (0, 0)]
