"""relay.observe: Health and its alerts, the heartbeat format, the Prometheus observer, the HTTP endpoints.

Times are explicit ``now`` values (no sleeping) except where a real clock is what is tested: the
queue collector's bounded wait and the endpoints' thread. The queue collector is read from a real
asyncio loop in a background thread, as the relay's loop is when Prometheus scrapes it.
"""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
from collections.abc import Iterator, Sequence
from importlib import metadata

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from relay.config.models import MetricsConfig, StatusConfig
from relay.config.rules import parse_listen
from relay.errors import MessageDecodeError
from relay.observe.health import Alert, Health, HeldFault, SmarthostHealth
from relay.observe.heartbeat import TTL_MS, Heartbeat, latest
from relay.observe.observer import QueueSample, Sampler
from relay.observe.prom import PromObserver
from relay.observe.server import STALL, MetricsServer

T0 = 1_795_773_600.0  # 2026-11-27 10:00:00 UTC
T0_ISO = "2026-11-27 10:00:00 UTC"
STALE = 60.0

Labels = tuple[tuple[str, str], ...]


# -- Health: the per-smarthost record ----------------------------------------------------


def test_failing_since_is_the_first_failure_and_a_success_clears_it() -> None:
    h = Health()
    h.session("a:25", ok=False, reply="421 4.7.0 try later", now=T0)
    assert h.smarthosts["a:25"] == SmarthostHealth(last_ok=None, last_failure=T0, last_reply="421 4.7.0 try later",
                                                   failing_since=T0)
    h.session("a:25", ok=False, reply="452 4.3.1 full", now=T0 + 30)
    assert h.smarthosts["a:25"] == SmarthostHealth(last_ok=None, last_failure=T0 + 30, last_reply="452 4.3.1 full",
                                                   failing_since=T0)
    h.session("a:25", ok=True, reply="250 ok", now=T0 + 40)
    # The last failure is history and stays; the episode is over.
    assert h.smarthosts["a:25"] == SmarthostHealth(last_ok=T0 + 40, last_failure=T0 + 30,
                                                   last_reply="452 4.3.1 full", failing_since=None)
    h.session("a:25", ok=False, reply="421 again", now=T0 + 50)
    assert h.smarthosts["a:25"].failing_since == T0 + 50


def test_smarthosts_are_recorded_apart() -> None:
    h = Health()
    h.session("a:25", ok=False, reply="421 busy", now=T0)
    h.session("b:25", ok=True, reply="250 ok", now=T0 + 1)
    assert h.smarthosts == {
        "a:25": SmarthostHealth(last_failure=T0, last_reply="421 busy", failing_since=T0),
        "b:25": SmarthostHealth(last_ok=T0 + 1),
    }


def test_hold_is_new_once_per_smarthost_and_fault() -> None:
    h = Health()
    assert h.hold("a:25", "auth", "535 5.7.8 bad credentials", T0) is True
    assert h.hold("a:25", "auth", "535 5.7.8 still bad", T0 + 10) is False
    assert h.hold("a:25", "tls", "certificate verify failed", T0 + 20) is True
    assert h.hold("b:25", "auth", "535 5.7.8 bad credentials", T0 + 30) is True
    # A repeated hold keeps its start and takes the newest reason.
    assert h.held == {
        ("a:25", "auth"): HeldFault(T0, "535 5.7.8 still bad"),
        ("a:25", "tls"): HeldFault(T0 + 20, "certificate verify failed"),
        ("b:25", "auth"): HeldFault(T0 + 30, "535 5.7.8 bad credentials"),
    }
    assert h.held_since() == T0


def test_flowing_ends_every_hold_and_returns_them() -> None:
    h = Health()
    h.hold("a:25", "auth", "535", T0)
    h.hold("b:25", "tls", "bad cert", T0 + 5)
    assert h.flowing() == [("a:25", "auth"), ("b:25", "tls")]
    assert h.held == {}
    assert h.held_since() is None
    assert h.flowing() == []
    # Held again after it flowed: a new hold.
    assert h.hold("a:25", "auth", "535", T0 + 100) is True


def test_dead_letters_are_counted() -> None:
    h = Health()
    h.dead_letter(T0)
    h.dead_letter(T0 + 7)
    assert (h.dead_letters, h.last_dead_letter) == (2, T0 + 7)


def test_to_doc() -> None:
    h = Health()
    h.session("a:25", ok=False, reply="421 busy", now=T0)
    h.hold("a:25", "auth", "535 bad", T0 + 1)
    h.dead_letter(T0 + 2)
    assert h.to_doc() == {
        "smarthosts": {"a:25": {"last_ok": None, "last_failure": T0, "last_reply": "421 busy",
                                "failing_since": T0}},
        "held": [{"smarthost": "a:25", "fault": "auth", "since": T0 + 1, "reason": "535 bad"}],
        "dead_letters": 1,
        "last_dead_letter": T0 + 2,
    }
    assert Health().to_doc() == {"smarthosts": {}, "held": [], "dead_letters": 0, "last_dead_letter": None}


# -- Health: due_alerts ---------------------------------------------------------------------

HELD_A = Alert(f"held/a:25/auth/{T0}", f"delivery held since {T0_ISO} by a:25 (auth): 535 5.7.8 bad credentials",
               mail=False)
REFUSED_B = Alert(f"refused/b:25/{T0}", f"smarthost b:25 refused us since {T0_ISO}: 421 4.7.0 try later", mail=True)


def stuck() -> Health:
    """a:25 held for bad credentials, b:25 refusing us, both since T0; nothing dead."""
    h = Health()
    h.hold("a:25", "auth", "535 5.7.8 bad credentials", T0)
    h.session("b:25", ok=False, reply="421 4.7.0 try later", now=T0)
    h.session("b:25", ok=False, reply="421 4.7.0 try later", now=T0 + 20)
    return h


def test_no_alert_before_stale_after() -> None:
    h = stuck()
    assert h.due_alerts(T0, STALE) == []
    assert h.due_alerts(T0 + STALE - 1, STALE) == []
    # Nothing was said: the next call is not rate limited.
    assert h.due_alerts(T0 + STALE, STALE) == [HELD_A, REFUSED_B]


def test_alerts_once_stale() -> None:
    h = stuck()
    alerts = h.due_alerts(T0 + STALE, STALE)
    assert alerts == [HELD_A, REFUSED_B]
    refused = alerts[1]
    assert "refused us since" in refused.text and "421 4.7.0 try later" in refused.text
    assert [a.mail for a in alerts] == [False, True]


def test_only_faults_older_than_stale_after_alert() -> None:
    h = stuck()
    h.hold("c:25", "tls", "bad cert", T0 + 30)
    h.session("d:25", ok=False, reply="554 no", now=T0 + 30)
    assert h.due_alerts(T0 + STALE, STALE) == [HELD_A, REFUSED_B]


def test_a_smarthost_that_recovered_does_not_alert() -> None:
    h = stuck()
    h.session("b:25", ok=True, reply="250 ok", now=T0 + 50)
    assert h.due_alerts(T0 + STALE, STALE) == [HELD_A]


def test_new_dead_letters_alert_at_once() -> None:
    h = Health()
    h.dead_letter(T0)
    assert h.due_alerts(T0, STALE) == [Alert("dead/1", "1 new dead letter (opsrelay dlq list)", mail=False)]


def test_alerts_are_rate_limited_to_one_round_per_stale_after() -> None:
    h = stuck()
    assert h.due_alerts(T0 + STALE, STALE) == [HELD_A, REFUSED_B]
    h.dead_letter(T0 + STALE + 5)
    # Within stale_after of the last round: nothing, even with a new dead letter.
    assert h.due_alerts(T0 + STALE + 10, STALE) == []
    assert h.due_alerts(T0 + 2 * STALE - 1, STALE) == []
    # Another stale_after later: all again, with the dead letter the quiet call held back.
    dead_1 = Alert("dead/1", "1 new dead letter (opsrelay dlq list)", mail=False)
    assert h.due_alerts(T0 + 2 * STALE, STALE) == [HELD_A, REFUSED_B, dead_1]
    # The dead letters said once are not said again.
    assert h.due_alerts(T0 + 3 * STALE, STALE) == [HELD_A, REFUSED_B]
    h.dead_letter(T0 + 3 * STALE + 1)
    h.dead_letter(T0 + 3 * STALE + 2)
    dead_3 = Alert("dead/3", "2 new dead letters (opsrelay dlq list)", mail=False)
    assert h.due_alerts(T0 + 4 * STALE, STALE) == [HELD_A, REFUSED_B, dead_3]


def test_first_mail_once_per_episode() -> None:
    h = stuck()
    h.dead_letter(T0)
    held, refused, dead = h.due_alerts(T0 + STALE, STALE)
    assert h.first_mail(held) is False  # mail=False: the log line only
    assert h.first_mail(refused) is True
    assert h.first_mail(refused) is False
    assert h.first_mail(dead) is False  # dead letters: the log line only (the issue mails about smarthosts)
    # The same episodes in a later round: logged, not mailed again.
    again = h.due_alerts(T0 + 2 * STALE, STALE)
    assert again == [HELD_A, REFUSED_B]
    assert [h.first_mail(a) for a in again] == [False, False]
    # b:25 recovers and fails again: a new episode, a new mail.
    h.session("b:25", ok=True, reply="250 ok", now=T0 + 2 * STALE + 1)
    h.session("b:25", ok=False, reply="421 down", now=T0 + 2 * STALE + 2)
    [_, refused_again] = h.due_alerts(T0 + 4 * STALE, STALE)
    assert refused_again.key == f"refused/b:25/{T0 + 2 * STALE + 2}"
    assert h.first_mail(refused_again) is True


# -- Heartbeat ------------------------------------------------------------------------------


def beat(id: str = "web1:4242:ab12", *, host: str = "web1", pid: int = 4242, at: float = T0) -> Heartbeat:
    return Heartbeat(id=id, host=host, pid=pid, at=at, started=T0 - 3600, version="0.1.0",
                     owned=("web", "db"), health=stuck().to_doc())


def test_heartbeat_round_trip() -> None:
    original = beat()
    body = original.encode()
    assert isinstance(body, bytes)
    decoded = Heartbeat.decode(body)
    assert decoded == original
    assert decoded.owned == ("web", "db")
    assert decoded.health["smarthosts"]["b:25"]["failing_since"] == T0
    bare = Heartbeat("h:1:x", "h", 1, T0, T0, "0.1.0")
    assert Heartbeat.decode(bare.encode()) == bare


def _beat_doc() -> str:
    return beat().encode().decode()


@pytest.mark.parametrize("body", [
    b"not json",
    b"\xff\xfe",
    b"[]",
    b"null",
    _beat_doc().replace('"v":1', '"v":2').encode(),
    _beat_doc().replace('"v":1,', "").encode(),
    _beat_doc().replace('"pid":4242,', "").encode(),
    _beat_doc().replace('"pid":4242', '"pid":"many"').encode(),
    _beat_doc().replace('"health":{', '"gone":{').encode(),
], ids=["not-json", "not-utf8", "list", "null", "v2", "no-v", "no-pid", "pid-not-int", "no-health"])
def test_heartbeat_decode_errors(body: bytes) -> None:
    with pytest.raises(MessageDecodeError):
        Heartbeat.decode(body)


def test_wrong_version_says_so() -> None:
    with pytest.raises(MessageDecodeError, match="not a v1 heartbeat"):
        Heartbeat.decode(_beat_doc().replace('"v":1', '"v":2').encode())


def test_latest_keeps_the_newest_per_relay_within_ttl_sorted_by_host_then_pid() -> None:
    now = T0 + 100
    web_old = beat("web1:7:a", host="web1", pid=7, at=T0 + 80)
    web_new = beat("web1:7:a", host="web1", pid=7, at=T0 + 95)
    db_10 = beat("db1:10:b", host="db1", pid=10, at=T0 + 90)
    db_9 = beat("db1:9:c", host="db1", pid=9, at=now - 30)  # exactly ttl old: still alive
    gone = beat("app1:1:d", host="app1", pid=1, at=now - 30.5)
    # The newer beat first: the older one after it must not replace it.
    assert latest([web_new, db_10, web_old, gone, db_9], now, ttl=30) == [db_9, db_10, web_new]
    assert latest([], now, ttl=30) == []


def test_latest_default_ttl_is_the_queue_ttl() -> None:
    now = T0 + 1000
    alive = beat("a:1:x", host="a", pid=1, at=now - TTL_MS / 1000)
    dead = beat("b:1:x", host="b", pid=1, at=now - TTL_MS / 1000 - 0.001)
    assert latest([alive, dead], now) == [alive]


# -- PromObserver ---------------------------------------------------------------------------


def scrape(observer: PromObserver) -> dict[str, dict[Labels, float]]:
    """sample name -> labels -> value, as Prometheus would parse the exposition (no _created samples)."""
    out: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(generate_latest(observer.registry).decode()):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_a_fresh_observer_has_its_series_at_zero() -> None:
    got = scrape(PromObserver(["web", "db"]))
    assert got["opsrelay_events_total"] == {(("subscription", "web"),): 0.0, (("subscription", "db"),): 0.0}
    assert got["opsrelay_silenced_total"] == {(("subscription", "web"),): 0.0, (("subscription", "db"),): 0.0}
    assert got["opsrelay_dead_letters_total"] == {
        (("reason", "permanent"),): 0.0, (("reason", "attempts"),): 0.0, (("reason", "invalid"),): 0.0}
    assert got["opsrelay_build_info"] == {(("version", metadata.version("opsrelay")),): 1.0}
    for name in ("opsrelay_notices_total", "opsrelay_delivery_attempts_total", "opsrelay_mails_delivered_total",
                 "opsrelay_smtp_up", "opsrelay_held", "opsrelay_smtp_send_seconds_count",
                 "opsrelay_queue_messages", "opsrelay_queue_oldest_seconds", "opsrelay_queue_sample_age_seconds"):
        assert name not in got, name


def test_hooks_count_exactly_what_was_reported() -> None:
    obs = PromObserver(["web", "db"])
    obs.event("web")
    obs.event("web")
    obs.notice("web", "event")
    obs.notice("web", "digest")
    obs.notice("web", "event")
    obs.silenced("db")
    obs.attempt("a:25", "delivered")
    obs.attempt("a:25", "retry")
    obs.attempt("a:25", "retry")
    obs.attempt("b:25", "held")
    obs.delivered("a:25")
    obs.dead_letter("permanent")
    obs.session("a:25", ok=True, seconds=0.03)
    obs.session("b:25", ok=True)
    obs.session("b:25", ok=False, seconds=0.5)
    obs.held("b:25", "auth", on=True)
    obs.held("b:25", "tls", on=True)
    obs.held("b:25", "tls", on=False)

    got = scrape(obs)
    assert got["opsrelay_events_total"] == {(("subscription", "web"),): 2.0, (("subscription", "db"),): 0.0}
    assert got["opsrelay_notices_total"] == {
        (("kind", "event"), ("subscription", "web")): 2.0, (("kind", "digest"), ("subscription", "web")): 1.0}
    assert got["opsrelay_silenced_total"] == {(("subscription", "web"),): 0.0, (("subscription", "db"),): 1.0}
    assert got["opsrelay_delivery_attempts_total"] == {
        (("outcome", "delivered"), ("smarthost", "a:25")): 1.0,
        (("outcome", "retry"), ("smarthost", "a:25")): 2.0,
        (("outcome", "held"), ("smarthost", "b:25")): 1.0,
    }
    assert got["opsrelay_mails_delivered_total"] == {(("smarthost", "a:25"),): 1.0}
    assert got["opsrelay_dead_letters_total"] == {
        (("reason", "permanent"),): 1.0, (("reason", "attempts"),): 0.0, (("reason", "invalid"),): 0.0}
    assert got["opsrelay_smtp_up"] == {(("smarthost", "a:25"),): 1.0, (("smarthost", "b:25"),): 0.0}
    assert got["opsrelay_held"] == {(("fault", "auth"), ("smarthost", "b:25")): 1.0,
                                    (("fault", "tls"), ("smarthost", "b:25")): 0.0}
    # A session without its duration sets smtp_up only.
    assert got["opsrelay_smtp_send_seconds_count"] == {(("smarthost", "a:25"),): 1.0, (("smarthost", "b:25"),): 1.0}
    assert got["opsrelay_smtp_send_seconds_sum"] == {(("smarthost", "a:25"),): 0.03, (("smarthost", "b:25"),): 0.5}
    buckets = got["opsrelay_smtp_send_seconds_bucket"]
    assert buckets[(("le", "0.025"), ("smarthost", "a:25"))] == 0.0
    assert buckets[(("le", "0.05"), ("smarthost", "a:25"))] == 1.0
    assert buckets[(("le", "0.25"), ("smarthost", "b:25"))] == 0.0
    assert buckets[(("le", "0.5"), ("smarthost", "b:25"))] == 1.0
    assert buckets[(("le", "+Inf"), ("smarthost", "b:25"))] == 1.0


def test_observers_keep_apart() -> None:
    one, two = PromObserver(["web"]), PromObserver(["web"])
    one.event("web")
    assert scrape(one)["opsrelay_events_total"] == {(("subscription", "web"),): 1.0}
    assert scrape(two)["opsrelay_events_total"] == {(("subscription", "web"),): 0.0}


def test_ready_and_healthy_state() -> None:
    obs = PromObserver()
    assert obs.not_ready == "starting"
    obs.ready(None)
    assert obs.not_ready is None
    obs.ready("broker gone")
    assert obs.not_ready == "broker gone"
    assert obs.healthy(STALL) is True


# -- the queue collector, read on a loop in another thread ------------------------------------


class CountingSampler:
    """Answers ``samples``; while ``gate`` is set it first waits for the gate (a broker that is slow)."""

    def __init__(self, samples: Sequence[QueueSample]) -> None:
        self.samples = samples
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.error: Exception | None = None

    async def __call__(self) -> Sequence[QueueSample]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.samples


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A running loop in a thread of its own, as the relay's loop is to the metrics thread."""
    running = asyncio.new_event_loop()
    thread = threading.Thread(target=running.run_forever, name="test-loop", daemon=True)
    thread.start()
    yield running

    async def cancel_the_rest() -> None:
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(cancel_the_rest(), running).result(5)
    running.call_soon_threadsafe(running.stop)
    thread.join(5)
    assert not thread.is_alive()
    running.close()


def point(observer: PromObserver, loop: asyncio.AbstractEventLoop, sampler: Sampler | None) -> None:
    """observer.sample_queues(sampler) from the loop, as the relay calls it."""

    async def on_loop() -> None:
        observer.sample_queues(sampler)

    asyncio.run_coroutine_threadsafe(on_loop(), loop).result(5)


def release(loop: asyncio.AbstractEventLoop, gate: asyncio.Event) -> None:
    loop.call_soon_threadsafe(gate.set)


WEB = QueueSample("opsrelay.web", 3, 12.5)
RETRY = QueueSample("opsrelay.retry.30s", 0, None)


def queues(got: dict[str, dict[Labels, float]]) -> tuple[dict[Labels, float], dict[Labels, float]]:
    return got.get("opsrelay_queue_messages", {}), got.get("opsrelay_queue_oldest_seconds", {})


def age(got: dict[str, dict[Labels, float]]) -> float:
    [value] = got["opsrelay_queue_sample_age_seconds"].values()
    return value


def test_a_scrape_reads_the_queues_on_the_loop(loop: asyncio.AbstractEventLoop) -> None:
    obs = PromObserver(sample_timeout=0.2)
    sampler = CountingSampler([WEB, RETRY])
    point(obs, loop, sampler)
    assert sampler.calls == 0  # read when scraped, not before
    got = scrape(obs)
    assert sampler.calls == 1
    assert queues(got) == ({(("queue", "opsrelay.web"),): 3.0, (("queue", "opsrelay.retry.30s"),): 0.0},
                           {(("queue", "opsrelay.web"),): 12.5, (("queue", "opsrelay.retry.30s"),): 0.0})
    assert 0.0 <= age(got) < 1.0
    sampler.samples = [QueueSample("opsrelay.web", 5, 20.0)]
    got = scrape(obs)
    assert sampler.calls == 2
    assert queues(got) == ({(("queue", "opsrelay.web"),): 5.0}, {(("queue", "opsrelay.web"),): 20.0})


def test_a_slow_sampler_cannot_hold_a_scrape(loop: asyncio.AbstractEventLoop) -> None:
    obs = PromObserver(sample_timeout=0.2)
    sampler = CountingSampler([WEB])
    point(obs, loop, sampler)
    before = scrape(obs)
    expected = queues(before)
    assert expected == ({(("queue", "opsrelay.web"),): 3.0}, {(("queue", "opsrelay.web"),): 12.5})

    gate = sampler.gate = asyncio.Event()
    sampler.samples = [QueueSample("opsrelay.web", 99, 1.0)]
    started = time.monotonic()
    got = scrape(obs)
    elapsed = time.monotonic() - started
    assert 0.15 <= elapsed < 1.0, elapsed
    assert sampler.calls == 2
    assert queues(got) == expected  # the last values it gave ...
    assert age(got) >= 0.15  # ... and how old they are

    # A scrape during the slow read waits on that read, it does not start another.
    got = scrape(obs)
    assert sampler.calls == 2
    assert queues(got) == expected

    release(loop, gate)
    sampler.gate = None
    got = scrape(obs)
    assert queues(got) == ({(("queue", "opsrelay.web"),): 99.0}, {(("queue", "opsrelay.web"),): 1.0})
    assert age(got) < 1.0


def test_a_failing_sampler_leaves_the_last_values(loop: asyncio.AbstractEventLoop) -> None:
    obs = PromObserver(sample_timeout=0.2)
    sampler = CountingSampler([WEB])
    point(obs, loop, sampler)
    expected = queues(scrape(obs))
    sampler.error = ConnectionError("broker gone")
    got = scrape(obs)
    assert sampler.calls == 2
    assert queues(got) == expected
    assert "opsrelay_queue_sample_age_seconds" in got
    # The failed read is over: the next scrape tries again.
    sampler.error = None
    sampler.samples = [RETRY]
    got = scrape(obs)
    assert sampler.calls == 3
    assert queues(got) == ({(("queue", "opsrelay.retry.30s"),): 0.0}, {(("queue", "opsrelay.retry.30s"),): 0.0})


def test_sample_queues_none_stops_reading(loop: asyncio.AbstractEventLoop) -> None:
    obs = PromObserver(sample_timeout=0.2)
    sampler = CountingSampler([WEB])
    point(obs, loop, sampler)
    expected = queues(scrape(obs))
    assert sampler.calls == 1
    point(obs, loop, None)
    got = scrape(obs)
    got = scrape(obs)
    assert sampler.calls == 1
    # What was last read stays, with its age: nothing newer is known.
    assert queues(got) == expected
    assert "opsrelay_queue_sample_age_seconds" in got


def test_no_sampler_no_queue_samples() -> None:
    obs = PromObserver(sample_timeout=0.2)
    obs.sample_queues(None)  # no loop needed to say "no relay"
    got = scrape(obs)
    assert queues(got) == ({}, {})
    assert "opsrelay_queue_sample_age_seconds" not in got


# -- MetricsServer --------------------------------------------------------------------------


@pytest.fixture
def served() -> Iterator[MetricsServer]:
    server = MetricsServer(PromObserver(["web"]), "127.0.0.1", 0)
    server.start()
    yield server
    server.close()


def get(server: MetricsServer, path: str) -> tuple[int, str, str]:
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read().decode()
    finally:
        conn.close()


def test_server_listens_where_asked(served: MetricsServer) -> None:
    host, port = served.address
    assert host == "127.0.0.1"
    assert 0 < port < 65536


def test_ready(served: MetricsServer) -> None:
    assert get(served, "/-/ready") == (503, "text/plain; charset=utf-8", "starting\n")
    served.observer.ready(None)
    assert get(served, "/-/ready") == (200, "text/plain; charset=utf-8", "OK\n")
    served.observer.ready("broker gone")
    assert get(served, "/-/ready") == (503, "text/plain; charset=utf-8", "broker gone\n")


def test_healthy_follows_the_heartbeat(served: MetricsServer) -> None:
    served.observer.heartbeat()
    assert get(served, "/-/healthy") == (200, "text/plain; charset=utf-8", "OK\n")
    # A loop silent for longer than STALL is wedged (set the last beat back rather than wait 10 s).
    served.observer._beat = time.monotonic() - STALL - 1
    assert get(served, "/-/healthy") == (503, "text/plain; charset=utf-8",
                                         "the relay's loop has not run for 10s\n")
    served.observer.heartbeat()
    assert get(served, "/-/healthy")[0] == 200


def test_unknown_path(served: MetricsServer) -> None:
    assert get(served, "/nope") == (404, "text/plain; charset=utf-8", "not found: /metrics, /-/healthy, /-/ready\n")


@pytest.mark.parametrize("path", ["/metrics", "/"])
def test_metrics(served: MetricsServer, path: str) -> None:
    served.observer.event("web")
    status, content_type, body = get(served, path)
    assert status == 200
    assert content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body)}
    [events] = [s for s in families["opsrelay_events"].samples if s.name == "opsrelay_events_total"]
    assert (events.labels, events.value) == ({"subscription": "web"}, 1.0)
    assert "opsrelay_build_info" in families


# -- MetricsConfig / parse_listen ---------------------------------------------------------------


def test_metrics_off_by_default() -> None:
    assert MetricsConfig().address is None
    assert MetricsConfig(listen="").address is None


@pytest.mark.parametrize(("listen", "address"), [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)),
    ("[::1]:9464", ("::1", 9464)),
    ("localhost:9464", ("localhost", 9464)),
    ("127.0.0.2:1", ("127.0.0.2", 1)),
    ("127.0.0.1:65535", ("127.0.0.1", 65535)),
])
def test_loopback_listen(listen: str, address: tuple[str, int]) -> None:
    assert MetricsConfig(listen=listen).address == address


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "[::]:9464", "192.0.2.1:9464", "metrics.example:9464"])
def test_remote_listen_needs_allow_remote(listen: str) -> None:
    with pytest.raises(ValidationError, match="allow_remote"):
        MetricsConfig(listen=listen)


def test_allow_remote() -> None:
    assert MetricsConfig(listen="0.0.0.0:9464", allow_remote=True).address == ("0.0.0.0", 9464)
    assert MetricsConfig(listen="[::]:9464", allow_remote=True).address == ("::", 9464)


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1:", ":9464",
                                    "127.0.0.1", "127.0.0.1:-1", "127.0.0.1:port"])
def test_bad_listen_is_refused(listen: str) -> None:
    with pytest.raises(ValidationError, match="is not HOST:PORT"):
        MetricsConfig(listen=listen, allow_remote=True)


def test_metrics_config_is_strict() -> None:
    with pytest.raises(ValidationError):
        MetricsConfig(listen=9464)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        MetricsConfig(listen="127.0.0.1:9464", port=9464)  # type: ignore[call-arg]


def test_parse_listen() -> None:
    assert parse_listen("") is None
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen(9464)
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        parse_listen("127.0.0.1:99999")


def test_status_stale_after() -> None:
    assert StatusConfig().stale_after == 900.0
    assert StatusConfig(stale_after="15m").stale_after == 900.0
    assert StatusConfig(stale_after=30).stale_after == 30.0
    with pytest.raises(ValidationError):
        StatusConfig(stale_after=0)
