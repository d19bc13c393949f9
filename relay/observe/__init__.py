"""What a running relay shows of itself: metrics and health (HTTP), its heartbeat (``opsrelay status``).

:mod:`relay.observe.observer` is the interface the relay reports through (a no-op when metrics are off);
:mod:`relay.observe.prom` keeps Prometheus metrics with prometheus_client; :mod:`relay.observe.server`
serves them beside ``/-/healthy`` and ``/-/ready``; :mod:`relay.observe.health` is the pure record of
smarthost failures, holds and dead letters that status, heartbeats and the relay's alerts about
itself read. prometheus_client is imported only by :mod:`relay.observe.prom`.
"""
