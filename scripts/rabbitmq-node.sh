# Sourced by the ensure-rabbitmq*.sh scripts: start one RabbitMQ node and wait for it, boundedly.
#
# Why a file of its own: a node started through `su` gets PAM's soft limit of 1024 open files, and a
# node with more durable queues than that (about 927 after RabbitMQ's reserve) stalls for ever in its
# boot step "recovery". Seen: a CI run hung 90 min on it. So every node starts with the hard limit,
# and every wait has a deadline and prints the node's log tail when it passes.

# rabbit_node_start "ENV=... ENV=..." : the node, detached, as the rabbitmq user.
rabbit_node_start() {
    su -s /bin/sh rabbitmq -c "ulimit -n \"\$(ulimit -Hn)\"; HOME=/var/lib/rabbitmq $1 /usr/sbin/rabbitmq-server -detached"
}

# rabbit_node_await NODE LOGDIR [SECONDS] : 0 once the node has booted; 1 (and its log tail) after SECONDS.
rabbit_node_await() {
    local node="$1" logdir="$2" deadline=$((SECONDS + ${3:-180}))
    while ((SECONDS < deadline)); do
        # await_startup itself waits 300 s by default: keep each try short so the deadline holds.
        if timeout 15 rabbitmqctl -q -n "$node" await_startup --timeout 10 >/dev/null 2>&1; then
            return 0
        fi
        sleep 1
    done
    echo "rabbitmq: $node did not start within ${3:-180} s; the end of its log ($logdir):" >&2
    tail -n 5 "$logdir"/*.log 2>/dev/null | cut -c1-300 >&2 || true
    return 1
}
