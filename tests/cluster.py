"""The three-node RabbitMQ cluster on loopback that scripts/ensure-rabbitmq-cluster.sh starts (``make test``).

Nodes c1, c2, c3 @ this host, AMQP on 5681-5683. A test that needs the cluster fails when ``$CI`` is set
and it is not running, and skips elsewhere, like the single-node tests (tests/brokers.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

__all__ = ["NODES", "Cluster", "require_cluster"]

NODES = {"c1": 5681, "c2": 5682, "c3": 5683}
_BASE = Path("/var/lib/opsrelay-test-cluster")
_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ensure-rabbitmq-cluster.sh"
_HOST = socket.gethostname().split(".")[0]


def _up(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


class Cluster:
    def url(self, node: str) -> str:
        return f"amqp://guest:guest@127.0.0.1:{NODES[node]}/"

    def urls(self, *order: str) -> list[str]:
        return [self.url(n) for n in order or NODES]

    def running(self) -> list[str]:
        return [n for n, port in NODES.items() if _up(port)]

    def ctl(self, *args: str, node: str | None = None) -> str:
        node = node or self.running()[0]
        done = subprocess.run(["rabbitmqctl", "-q", "-n", f"{node}@{_HOST}", *args], capture_output=True,
                              text=True, check=True, timeout=60)
        return done.stdout

    def leader(self, queue: str) -> str:
        """The node (c1, c2 or c3) that leads a quorum queue."""
        rows = json.loads(self.ctl("list_queues", "name", "leader", "--formatter", "json"))
        [leader] = [r["leader"] for r in rows if r["name"] == queue]
        return str(leader).split("@")[0]

    def kill(self, node: str) -> None:
        """SIGKILL the node's Erlang VM: no goodbye to its peers or clients."""
        pid = int((_BASE / node / "pid").read_text().strip())
        os.kill(pid, signal.SIGKILL)

    def restore(self) -> None:
        """Every node running and clustered again (the script is idempotent)."""
        subprocess.run([str(_SCRIPT)], check=True, capture_output=True, timeout=240)


def require_cluster() -> Cluster:
    import pytest

    cluster = Cluster()
    down = [n for n in NODES if n not in cluster.running()]
    if down:
        message = f"the RabbitMQ test cluster is not running (nodes {down} down; make test starts it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return cluster
