"""``[metrics]`` of a real ``opsrelay serve`` under a real supervisord: what Prometheus would scrape.

Three crashes become three mails through a real SMTP server (STARTTLS + AUTH) that refuses one
recipient of the first with 550 and the second's DATA once with 451; the scraped text is parsed
with prometheus_client's own parser and every count is exact. Then RabbitMQ stops: ``/-/ready``
turns 503 with a reason within 10 s, and ``/metrics`` still answers within a second.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.brokers import RabbitControl
from tests.e2e.harness import Program, Supervisor, stop_all
from tests.smtp_server import SmtpServer, free_port

pytestmark = [pytest.mark.supervisord, pytest.mark.rabbitmq, pytest.mark.timeout(90)]

ONCALL, LEAD = "oncall@example.test", "lead@example.test"
CRASH = 'sh -c "sleep 1.2; exit 1"'
ONE_SHOT = {"startsecs": 1, "startretries": 0, "autorestart": False}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(url: str, timeout: float = 1.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310 (a loopback http URL)
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


def scrape(base: str) -> Samples:
    status, text = get(f"{base}/metrics")
    assert status == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_metrics_count_exactly_and_ready_follows_the_broker(
        tmp_path: Path, amqp_url: str, prefix: str, smtp_server: SmtpServer, rabbit: RabbitControl) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    sv = Supervisor(tmp_path / "sv", broker_url=amqp_url, prefix=prefix, smtp=smtp_server.client_settings(),
                    subscriptions=[{"name": "crashes", "to": [ONCALL, LEAD]}],
                    programs=[Program("crash", CRASH, ONE_SHOT)], backoff=["300ms"],
                    tables={"metrics": {"listen": f"127.0.0.1:{port}"}})
    try:
        sv.start()
        assert sv.wait_for(lambda: get(f"{base}/-/ready")[0] == 200, 15, what="/-/ready 200")
        smarthost = f"127.0.0.1:{smtp_server.port}"

        smtp_server.reply_to_rcpt(LEAD, "550 5.1.1 no such user", times=1)
        sv.start_program("crash")
        sv.wait_for(lambda: len(smtp_server.received) == 1, 15, what="the first mail (oncall only)")
        smtp_server.reply_to_data("451 4.3.0 try again later", times=1)
        sv.wait_for(lambda: sv.state("crash") == "EXITED", 10, what="the first crash to end")
        sv.start_program("crash")
        sv.wait_for(lambda: len(smtp_server.received) == 2, 15, what="the second mail, after its 451")
        sv.wait_for(lambda: sv.state("crash") == "EXITED", 10, what="the second crash to end")
        sv.start_program("crash")
        sv.wait_for(lambda: len(smtp_server.received) == 3, 15, what="the third mail")

        def settled() -> Samples | None:
            samples = scrape(base)
            done = value(samples, "opsrelay_mails_delivered_total", smarthost=smarthost) == 3
            return samples if done and value(samples, "opsrelay_queue_messages", queue="dead") == 1 else None

        samples = sv.wait_for(settled, 10, what="the counts to settle")
        assert value(samples, "opsrelay_events_total", subscription="crashes") == 3
        assert value(samples, "opsrelay_notices_total", subscription="crashes", kind="event") == 3
        assert value(samples, "opsrelay_delivery_attempts_total", smarthost=smarthost, outcome="delivered") == 3
        assert value(samples, "opsrelay_delivery_attempts_total", smarthost=smarthost, outcome="retry") == 1
        assert value(samples, "opsrelay_delivery_attempts_total", smarthost=smarthost, outcome="dead") == 1
        assert value(samples, "opsrelay_delivery_attempts_total", smarthost=smarthost, outcome="held") is None
        assert value(samples, "opsrelay_dead_letters_total", reason="permanent") == 1
        assert value(samples, "opsrelay_dead_letters_total", reason="attempts") == 0
        assert value(samples, "opsrelay_dead_letters_total", reason="invalid") == 0
        assert value(samples, "opsrelay_smtp_up", smarthost=smarthost) == 1
        assert value(samples, "opsrelay_smtp_send_seconds_count", smarthost=smarthost) == 4
        assert value(samples, "opsrelay_queue_messages", queue="outbound") == 0
        assert value(samples, "opsrelay_queue_messages", queue="retry") == 0
        assert value(samples, "opsrelay_queue_oldest_seconds", queue="dead") is not None
        assert value(samples, "opsrelay_silenced_total", subscription="crashes") == 0
        assert any(name == "opsrelay_build_info" for name, _ in samples)
        labels = " ".join(v for _, ls in samples for _, v in ls)
        assert "@" not in labels  # no address in any label
        assert get(f"{base}/-/healthy") == (200, "OK\n")

        rabbit.stop()
        began = time.monotonic()
        _, reason = sv.wait_for(lambda: (r := get(f"{base}/-/ready"))[0] == 503 and r, 10,
                                     what="/-/ready 503 once the broker is gone")
        print(f"\n/-/ready 503 after {time.monotonic() - began:.1f}s: {reason.strip()}")
        assert reason.strip()
        for _ in range(3):
            began = time.monotonic()
            samples = scrape(base)
            assert time.monotonic() - began < 1.5
            # The last values it read, with their age.
            assert value(samples, "opsrelay_queue_messages", queue="dead") == 1
        assert get(f"{base}/-/healthy")[0] == 200
        rabbit.start()
        sv.wait_for(lambda: get(f"{base}/-/ready")[0] == 200, 60, what="/-/ready 200 once the broker is back")
    finally:
        stop_all([sv], "relay")
