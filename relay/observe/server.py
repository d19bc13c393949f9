"""``[metrics] listen``: ``/metrics``, ``/-/healthy`` and ``/-/ready`` in a thread of the relay's process.

As Prometheus' and Alertmanager's own endpoints: ``/-/healthy`` is 200 while the relay's loop runs
(it reports every second; silent for :data:`STALL` seconds is a wedged loop), ``/-/ready`` is 200
once it is connected and consuming, 503 with a one-line reason otherwise. The server runs in its
own thread so that a busy or blocked loop cannot stop it from saying so.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from relay.observe.prom import PromObserver

__all__ = ["STALL", "MetricsServer"]

STALL = 10.0

_StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every 15 s are not news; errors reach the relay's log through the app."""


def _text(start: _StartResponse, status: str, body: str) -> list[bytes]:
    start(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [body.encode("utf-8") + b"\n"]


class MetricsServer:
    def __init__(self, observer: PromObserver, host: str, port: int) -> None:
        self.observer = observer
        self._metrics = make_wsgi_app(observer.registry)
        self._server: WSGIServer = make_server(host, port, self._app, ThreadingWSGIServer, handler_class=_Quiet)
        self._thread = threading.Thread(target=self._server.serve_forever, name="opsrelay-metrics", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def _app(self, environ: dict[str, Any], start: _StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/-/healthy":
            if self.observer.healthy(STALL):
                return _text(start, "200 OK", "OK")
            return _text(start, "503 Service Unavailable", f"the relay's loop has not run for {STALL:g}s")
        if path == "/-/ready":
            reason = self.observer.not_ready
            return _text(start, "200 OK", "OK") if reason is None else _text(
                start, "503 Service Unavailable", reason)
        if path in ("/metrics", "/"):
            return self._metrics(environ, start)  # type: ignore[no-any-return]
        return _text(start, "404 Not Found", "not found: /metrics, /-/healthy, /-/ready")

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)
