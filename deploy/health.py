"""The supervisor's HTTP endpoint: `/health/live`, `/health/ready` and `/metrics`.

Triton's own `/v2/health/ready` stays 200 while a model instance's stub is dead; this
one answers 503 until the supervisor has made the model whole again. Point readiness
probes and load balancers here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from abdoserve.deploy.supervisor_metrics import SupervisorMetrics


class HealthServer:
    """A small threaded HTTP server; `ready()` decides `/health/ready`."""

    def __init__(
        self, host: str, port: int, *, ready: Callable[[], bool], metrics: SupervisorMetrics
    ) -> None:
        handler = _handler(ready, metrics)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(ready: Callable[[], bool], metrics: SupervisorMetrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif self.path == "/health/live":
                self._send(200, b"live\n")
            elif self.path == "/health/ready":
                healthy = ready()
                self._send(200 if healthy else 503, b"ready\n" if healthy else b"degraded\n")
            else:
                self._send(404, b"not found\n")

        def _send(self, status: int, body: bytes, kind: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Probes every second would flood the log."""

    return Handler
