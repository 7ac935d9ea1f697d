"""The guard: Debian's nginx in front of the embedded Triton, for the limits Triton lacks.

Triton 2.51 accepts gRPC messages up to 2 GiB, reads every request whole before the
preprocess model can refuse it, queues without a byte bound, and never times out a
half-sent request. nginx, on the public ports, refuses those at once:

- a body over `max_body_bytes` (the largest request any task's spec allows): gRPC
  RESOURCE_EXHAUSTED / HTTP 413, as soon as the bytes cross the limit;
- more than `max_inflight` requests at a time (HTTP/2 streams count one each):
  RESOURCE_EXHAUSTED / HTTP 503, before the body is read, so overload costs nothing;
  with the body limit this bounds the bytes in flight to `max_inflight` x
  `max_body_bytes`;
- a client that stops sending its headers or body for `body_timeout_s`: the
  request is dropped (HTTP 408) and its memory freed.

Triton itself listens on loopback ports only the guard uses.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

GRPC_RESOURCE_EXHAUSTED = 8


class GuardError(RuntimeError):
    """nginx is missing, its configuration is refused, or it did not start."""


@dataclass(frozen=True)
class GuardOptions:
    host: str
    grpc_port: int  # public
    http_port: int  # public
    upstream_grpc_port: int  # Triton's, on loopback
    upstream_http_port: int
    max_body_bytes: int
    max_inflight: int = 32
    body_timeout_s: int = 30
    read_timeout_s: int = 300  # a whole study's inference, as the client deadline allows


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if found is None:
        raise GuardError("nginx is not installed (`make install` installs Debian's nginx)")
    return found


def _grpc_refusal(name: str, message: str) -> str:
    """A named location answering a gRPC call with a status and no body (trailers-only)."""
    return f"""
        location @{name} {{
            internal;
            default_type application/grpc;
            add_header grpc-status {GRPC_RESOURCE_EXHAUSTED} always;
            add_header grpc-message "{message}" always;
            add_header content-length 0 always;
            return 204;
        }}"""


def render_config(options: GuardOptions, prefix: Path) -> str:
    """The nginx.conf for `options`, with every runtime file under `prefix`."""
    too_large = (
        f"request exceeds the limit of {options.max_body_bytes} bytes (the guard in front "
        "of Triton)"
    )
    busy = f"server busy: {options.max_inflight} requests in flight (the guard's budget)"
    return f"""# Written by abdoserve (deploy/guard.py); regenerated at every start.
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    client_max_body_size {options.max_body_bytes};
    client_body_timeout {options.body_timeout_s}s;
    client_header_timeout {options.body_timeout_s}s;
    send_timeout {options.read_timeout_s}s;
    keepalive_timeout 75s;
    # nginx ends a connection after 1000 requests or 1 h by default (HTTP/2 GOAWAY): a
    # long-lived gRPC channel then sees UNAVAILABLE on the calls it raced in (a soak
    # found it). Clients reconnect anyway; there is no reason to make them.
    keepalive_requests 100000000;
    keepalive_time 7d;
    # One budget for gRPC and HTTP together: every request has the same (non-empty) key.
    map $request_method $inflight_key {{ default all; }}
    limit_conn_zone $inflight_key zone=inflight:1m;
    limit_conn_status 503;
    limit_conn_log_level warn;

    upstream triton_grpc {{ server 127.0.0.1:{options.upstream_grpc_port}; keepalive 32; }}
    upstream triton_http {{ server 127.0.0.1:{options.upstream_http_port}; keepalive 32; }}

    server {{
        listen {options.host}:{options.grpc_port} http2;
        limit_conn inflight {options.max_inflight};
        location / {{
            grpc_pass grpc://triton_grpc;
            grpc_read_timeout {options.read_timeout_s}s;
            grpc_send_timeout {options.read_timeout_s}s;
            error_page 413 = @too_large;
            error_page 503 = @busy;
        }}{_grpc_refusal("too_large", too_large)}{_grpc_refusal("busy", busy)}
    }}

    server {{
        listen {options.host}:{options.http_port};
        limit_conn inflight {options.max_inflight};
        location / {{
            proxy_pass http://triton_http;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout {options.read_timeout_s}s;
            proxy_request_buffering off;
        }}
    }}
}}
"""


class NginxGuard:
    """nginx running `render_config(options)` in the foreground of its own process."""

    def __init__(self, options: GuardOptions, prefix: Path) -> None:
        self.options = options
        self.prefix = prefix
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> NginxGuard:
        self.prefix.mkdir(parents=True, exist_ok=True)
        config = self.prefix / "nginx.conf"
        config.write_text(render_config(self.options, self.prefix))
        command = [nginx_binary(), "-p", str(self.prefix), "-c", str(config)]
        checked = subprocess.run(
            [*command, "-t", "-q"], check=False, capture_output=True, text=True
        )
        if checked.returncode != 0:
            raise GuardError(f"nginx refused its configuration: {checked.stderr.strip()}")
        self.process = subprocess.Popen(
            [*command, "-g", "daemon off;"], stderr=subprocess.DEVNULL, start_new_session=True
        )
        self._wait_listening(timeout_s)
        return self

    def _wait_listening(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise GuardError(f"nginx exited; see {self.prefix / 'error.log'}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.options.host, self.options.grpc_port), timeout=1),
            ):
                return
            time.sleep(0.05)
        raise GuardError(f"nginx did not listen on {self.options.grpc_port} in {timeout_s} s")

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGQUIT: finish the requests in flight, then exit; SIGKILL if it hangs."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
