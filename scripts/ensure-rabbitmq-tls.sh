#!/usr/bin/env bash
# A RabbitMQ node with TLS for the broker-TLS tests, beside the others: t1 @ this host, AMQP over
# TLS on 127.0.0.1:5691 (plain AMQP on 5690 for the tests' own set-up), certificate checked with
# verify_peer, EXTERNAL (x509) login from the client certificate's CN. Test certificates (a CA, the
# node's for 127.0.0.1/localhost, a client's with CN opsrelay-x509, and a second, untrusted CA) are
# made once under /var/lib/opsrelay-test-tls. Idempotent. Needs root.
set -euo pipefail

scripts="$(cd "$(dirname "$0")" && pwd)"
"$scripts/ensure-rabbitmq.sh"
. "$scripts/rabbitmq-node.sh"

host="$(hostname -s)"
base=/var/lib/opsrelay-test-tls
certs="$base/certs"
mkdir -p "$certs" "$base/mnesia" "$base/log"

make_ca() {  # name
    [ -s "$certs/$1.pem" ] && return 0
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=opsrelay test $1" \
        -keyout "$certs/$1.key" -out "$certs/$1.pem" >/dev/null 2>&1
}

make_cert() {  # name, subject, extensions
    [ -s "$certs/$1.pem" ] && return 0
    openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$certs/$1.key" -out "$certs/$1.csr" >/dev/null 2>&1
    printf '%s\n' "$3" >"$certs/$1.ext"
    openssl x509 -req -in "$certs/$1.csr" -CA "$certs/ca.pem" -CAkey "$certs/ca.key" -CAcreateserial \
        -days 3650 -extfile "$certs/$1.ext" -out "$certs/$1.pem" >/dev/null 2>&1
}

make_ca ca
make_ca other-ca
make_cert server "/CN=localhost" "subjectAltName=IP:127.0.0.1,DNS:localhost"
make_cert client "/CN=opsrelay-x509" "extendedKeyUsage=clientAuth"
chmod 0644 "$certs"/*.pem
chmod 0640 "$certs"/*.key
chown -R rabbitmq:rabbitmq "$base"
chmod 0755 "$base" "$certs"

cat >"$base/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:5690
listeners.ssl.default = 127.0.0.1:5691
ssl_options.cacertfile = $certs/ca.pem
ssl_options.certfile = $certs/server.pem
ssl_options.keyfile = $certs/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
auth_mechanisms.1 = PLAIN
auth_mechanisms.2 = AMQPLAIN
auth_mechanisms.3 = EXTERNAL
ssl_cert_login_from = common_name
CONF
echo "[rabbitmq_auth_mechanism_ssl]." >"$base/enabled_plugins"
chown rabbitmq:rabbitmq "$base/rabbitmq.conf" "$base/enabled_plugins"

ctl() { rabbitmqctl -q -n "t1@$host" "$@"; }

if ! ctl status >/dev/null 2>&1; then
    echo "ensure-rabbitmq-tls: starting t1@$host (TLS on 127.0.0.1:5691)" >&2
    rabbit_node_start "RABBITMQ_NODENAME=t1@$host \
        RABBITMQ_CONFIG_FILE=$base/rabbitmq.conf RABBITMQ_DIST_PORT=25690 \
        RABBITMQ_MNESIA_BASE=$base/mnesia RABBITMQ_LOG_BASE=$base/log RABBITMQ_PID_FILE=$base/pid \
        RABBITMQ_ENABLED_PLUGINS_FILE=$base/enabled_plugins"
fi
rabbit_node_await "t1@$host" "$base/log"

# The x509 user: no password, so only its certificate logs it in.
if ! ctl list_users --formatter json | grep -q '"opsrelay-x509"'; then
    ctl add_user opsrelay-x509 "$(head -c 24 /dev/urandom | base64)" >/dev/null
    ctl clear_password opsrelay-x509 >/dev/null
fi
ctl set_permissions -p / opsrelay-x509 ".*" ".*" ".*" >/dev/null
echo "ensure-rabbitmq-tls: t1@$host running (TLS 5691, certificates in $certs)" >&2
