#!/usr/bin/env bash
# A three-node RabbitMQ cluster on loopback for the fleet tests, beside the single node of
# ensure-rabbitmq.sh: nodes c1, c2, c3 @ this host on AMQP ports 5681-5683 (Erlang distribution on
# 25681-25683), each with its own data and log folder under /var/lib/opsrelay-test-cluster, joined
# with `rabbitmqctl join_cluster`. Idempotent: a node already running is left alone, a member already
# joined is not joined again. Needs root (runs the nodes as the rabbitmq user, with its cookie).
set -euo pipefail

scripts="$(cd "$(dirname "$0")" && pwd)"
"$scripts/ensure-rabbitmq.sh"   # the package, and the default node the other tests use
. "$scripts/rabbitmq-node.sh"

host="$(hostname -s)"
base=/var/lib/opsrelay-test-cluster
mkdir -p "$base"
chown rabbitmq:rabbitmq "$base"

ctl() { rabbitmqctl -q -n "$1@$host" "${@:2}"; }

running() { ctl "$1" status >/dev/null 2>&1; }

start_node() {
    local name="$1" port="$2"
    if running "$name"; then
        return 0
    fi
    echo "ensure-rabbitmq-cluster: starting $name@$host on 127.0.0.1:$port" >&2
    mkdir -p "$base/$name/mnesia" "$base/$name/log"
    chown -R rabbitmq:rabbitmq "$base/$name"
    rabbit_node_start "RABBITMQ_NODENAME=$name@$host \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=$port RABBITMQ_DIST_PORT=$((port + 20000)) \
        RABBITMQ_MNESIA_BASE=$base/$name/mnesia RABBITMQ_LOG_BASE=$base/$name/log \
        RABBITMQ_PID_FILE=$base/$name/pid RABBITMQ_ENABLED_PLUGINS_FILE=$base/$name/enabled_plugins"
}

await_node() { rabbit_node_await "$1@$host" "$base/$1/log"; }

start_node c1 5681
start_node c2 5682
start_node c3 5683
for node in c1 c2 c3; do await_node "$node"; done

for node in c2 c3; do
    if ctl c1 cluster_status --formatter json | grep -q "\"$node@$host\""; then
        continue
    fi
    echo "ensure-rabbitmq-cluster: joining $node@$host to c1@$host" >&2
    ctl "$node" stop_app >/dev/null 2>&1
    ctl "$node" reset >/dev/null 2>&1
    ctl "$node" join_cluster "c1@$host" >/dev/null 2>&1
    ctl "$node" start_app >/dev/null 2>&1
    await_node "$node"
done
echo "ensure-rabbitmq-cluster: c1, c2, c3 @ $host running and clustered (5681-5683)" >&2
