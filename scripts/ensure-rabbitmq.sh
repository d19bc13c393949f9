#!/usr/bin/env bash
# Install Debian's rabbitmq-server when missing and start it when not running. Idempotent.
# Used by `make test` and `.ci/run`; tests reach it on 127.0.0.1:5672 as guest/guest
# (RabbitMQ allows the guest user on loopback only).
set -euo pipefail

if ! command -v rabbitmq-server >/dev/null 2>&1; then
    echo "ensure-rabbitmq: installing rabbitmq-server" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # policy-rc.d may forbid starting services from the package; we start it below.
    apt-get install -y -q rabbitmq-server >/dev/null
fi

if rabbitmqctl -q status >/dev/null 2>&1 || rabbitmq-diagnostics -q check_running >/dev/null 2>&1; then
    exit 0
fi

echo "ensure-rabbitmq: starting rabbitmq-server" >&2
. "$(dirname "$0")/rabbitmq-node.sh"
host="$(hostname -s)"
# No systemd here: start the node detached, as the rabbitmq user.
mkdir -p /var/lib/rabbitmq /var/log/rabbitmq
chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq
rabbit_node_start "RABBITMQ_NODE_IP_ADDRESS=127.0.0.1"
rabbit_node_await "rabbit@$host" /var/log/rabbitmq
echo "ensure-rabbitmq: running" >&2
