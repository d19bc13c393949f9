"""``[broker]``'s fleet settings read alike by both config views, and what the AMQP engine makes of them."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from relay.config.fast import load_path
from relay.config.models import Config
from relay.engines.amqp import AmqpEngine
from relay.errors import ConfigError

NODES = ["amqp://guest:guest@127.0.0.1:5681/", "amqp://guest:guest@127.0.0.1:5682/",
         "amqp://guest:guest@127.0.0.1:5683/"]


def write(tmp_path: Path, broker: str) -> Path:
    path = tmp_path / "opsrelay.toml"
    path.write_text(f"[broker]\n{broker}\n", encoding="utf-8")
    return path


def test_urls_give_the_first_address_and_the_others_in_both_views(tmp_path: Path) -> None:
    path = write(tmp_path, f"urls = {NODES!r}\nshuffle_urls = false\nqueue_type = \"quorum\"\ndelivery_limit = 7")
    model = Config.model_validate({"broker": {"urls": NODES, "shuffle_urls": False, "queue_type": "quorum",
                                              "delivery_limit": 7}}).broker
    fast = load_path(str(path))
    assert model.url == fast.url == NODES[0]
    assert model.engine_options == {**fast.engine_options, "confirm_timeout": model.confirm_timeout}
    assert model.engine_options["alternates"] == tuple(NODES[1:]) and model.engine_options["shuffle"] is False
    assert (model.engine_options["queue_type"], model.engine_options["delivery_limit"]) == ("quorum", 7)


def test_url_and_urls_together_are_refused_and_urls_must_be_amqp(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="give url or urls, not both"):
        Config.model_validate({"broker": {"url": NODES[0], "urls": NODES}})
    with pytest.raises(ValidationError, match=r"amqp:// or amqps://"):
        Config.model_validate({"broker": {"urls": ["sqlite:////tmp/q.db"]}})
    with pytest.raises(ConfigError, match=r"broker\.urls"):
        load_path(str(write(tmp_path, 'urls = ["sqlite:////tmp/q.db"]')))


def test_quorum_is_rabbitmq_only() -> None:
    with pytest.raises(ValidationError, match="RabbitMQ's"):
        Config.model_validate({"broker": {"url": "sqlite:////tmp/q.db", "queue_type": "quorum"}})


def test_the_engine_keeps_the_order_unless_it_shuffles() -> None:
    assert AmqpEngine(NODES[0], alternates=NODES[1:], shuffle=False).addresses == NODES
    orders = {tuple(AmqpEngine(NODES[0], alternates=NODES[1:]).addresses) for _ in range(60)}
    assert all(sorted(order) == sorted(NODES) for order in orders)
    assert len(orders) > 1  # 60 draws of 6 orders: all alike has odds of 6 ** -59
    assert AmqpEngine(NODES[0]).failover() is False and AmqpEngine(NODES[0], alternates=NODES[1:]).failover()


def test_tls_settings_reach_the_connection_url_only_for_amqps() -> None:
    tls = AmqpEngine("amqps://127.0.0.1:5691/", ca_file="/ca.pem", cert_file="/c.pem", key_file="/c.key",
                     auth="external")
    dialled = tls._dial("amqps://127.0.0.1:5691/")
    assert dialled == ("amqps://127.0.0.1:5691/?cafile=%2Fca.pem&certfile=%2Fc.pem&keyfile=%2Fc.key&auth=external")
    assert AmqpEngine(NODES[0], ca_file="/ca.pem")._dial(NODES[0]) == NODES[0]
