"""The guard: Debian's nginx in front of the embedded Triton, for the limits Triton lacks.

Triton 2.51 accepts gRPC messages up to 2 GiB, reads every request whole before the
preprocess model can refuse it, queues without a byte bound, and never times out a
half-sent request. nginx, on the public ports, refuses those at once:

- a body over `max_body_bytes` (the largest request any task's spec allows): gRPC
  RESOURCE_EXHAUSTED / HTTP 413, as soon as the bytes cross the limit;
- more than `max_inflight` requests at a time (HTTP/2 streams count one each), or more
  than `max_inflight_per_client` from one client address: RESOURCE_EXHAUSTED / HTTP 503,
  at once, so overload costs nothing; with the body limit this bounds the bytes in
  flight to `max_inflight` x `max_body_bytes`, and one address cannot lock others out;
- a gRPC call not finished within `request_timeout_s`, however slowly its body trickles
  in: the guard sets the call's deadline (`grpc-timeout`), and Triton's gRPC server ends
  it with DEADLINE_EXCEEDED, freeing its slot;
- an HTTP request counts against the budget only once its body is whole (nginx reads it
  first, then hands it to a second server on a private socket that holds the budget): a
  slow HTTP sender holds a slot of its own address's share, never the budget;
- a client that stops sending its headers or body for `body_timeout_s`: the request is
  dropped (HTTP 408) and its memory freed.

Health checks (gRPC ServerLive/ServerReady/ModelReady, HTTP /v2/health/*) have a small
budget of their own: a full inference budget never makes a server look dead.

Triton itself listens on loopback ports only the guard uses; so do Triton's metrics
and the supervisor's health endpoint, which the guard proxies without the in-flight
budget (a busy server must still answer its probes and scrapes).

With `tls`, every public port speaks TLS (Triton 2.51 has none for HTTP), and with a
client CA, only clients holding a certificate it signed get past the handshake's end:
gRPC callers without one get UNAUTHENTICATED. Started as root, nginx's workers run as a
dedicated user, so no other account's process can read the keys and TLS key they hold.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from abdoserve.deploy import processes
from abdoserve.deploy.model_control import GRPC_HEADER_PREFIX, GUARD_HEADER

GRPC_RESOURCE_EXHAUSTED = 8
GRPC_UNAUTHENTICATED = 16
# Mozilla's "intermediate" TLS 1.2 list without its DHE suites: ECDHE, AES-GCM, ChaCha20.
TLS12_CIPHERS = ":".join(
    f"ECDHE-{auth}-{cipher}"
    for cipher in ("AES128-GCM-SHA256", "AES256-GCM-SHA384", "CHACHA20-POLY1305")
    for auth in ("ECDSA", "RSA")
)


class GuardError(RuntimeError):
    """nginx is missing, its configuration is refused, or it did not start."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the server's certificate chain and key; with `client_ca`, mutual TLS."""

    certificate: Path
    key: Path
    client_ca: Path | None = None

    def check(self) -> TlsFiles:
        for path in (self.certificate, self.key, self.client_ca):
            if path is not None and not path.is_file():
                raise GuardError(f"TLS file {path} does not exist")
        return self

    @classmethod
    def from_options(
        cls, certificate: Path | None, key: Path | None, client_ca: Path | None
    ) -> TlsFiles | None:
        """--tls-cert, --tls-key and --tls-client-ca (serve, the gateway's worklist): None
        for plain HTTP, GuardError for a half-given or missing file."""
        if certificate is None and key is None:
            if client_ca is not None:
                raise GuardError("--tls-client-ca needs --tls-cert and --tls-key")
            return None
        if certificate is None or key is None:
            raise GuardError("TLS needs both --tls-cert and --tls-key")
        return cls(certificate, key, client_ca).check()


@dataclass(frozen=True)
class ProxiedPort:
    """A read-only HTTP endpoint (metrics, health) published on `public` by the guard."""

    public: int
    upstream: int


@dataclass(frozen=True)
class Backend:
    """One Triton behind the guard: its loopback gRPC and HTTP ports. A backend that is
    not `up` (draining, restarting) stays listed as `down`, so it gets no new request."""

    grpc_port: int
    http_port: int
    up: bool = True


@dataclass(frozen=True)
class GuardLimits:
    """What the guard refuses: sizes, counts and times, one set for every deployment."""

    max_body_bytes: int
    max_inflight_bytes: int = 8 * 1024**3
    body_timeout_s: int = 30
    # The longest a legitimate call may take, body and queue included (docs/reliability.md
    # has the measurement): past it a call is ended, a frozen backend's included.
    request_timeout_s: int = 120
    # The largest share of the in-flight budget one client address may hold: half, so
    # that one address never locks the others out, and one busy integration engine
    # still has more calls in flight than the cores can serve.
    client_share: float = 0.5
    # Proxies (CIDRs) whose X-Forwarded-For names the client: behind a load balancer
    # each client keeps its own share, instead of all sharing the balancer's.
    trusted_proxies: tuple[str, ...] = ()
    probes_per_client: int = 16  # health checks in flight from one address

    @property
    def max_inflight(self) -> int:
        """Requests in flight such that even requests of the largest size stay within the
        byte budget (nginx counts requests, not bytes)."""
        return max(1, self.max_inflight_bytes // self.max_body_bytes)

    @property
    def max_inflight_per_client(self) -> int:
        return max(1, min(self.max_inflight, int(self.max_inflight * self.client_share)))


@dataclass(frozen=True)
class GuardOptions:
    host: str
    grpc_port: int  # public
    http_port: int  # public
    upstream_grpc_port: int  # one Triton's, on loopback (or see `backends`)
    upstream_http_port: int
    limits: GuardLimits
    tls: TlsFiles | None = None
    proxied: tuple[ProxiedPort, ...] = ()
    # Added to every forwarded request: Triton serves inference only to the guard.
    upstream_key: str | None = None
    # Several Tritons (local replicas) balanced round robin; empty: the one above.
    backends: tuple[Backend, ...] = ()

    def all_backends(self) -> tuple[Backend, ...]:
        return self.backends or (Backend(self.upstream_grpc_port, self.upstream_http_port),)


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if found is None:
        raise GuardError("nginx is not installed (`make install` installs Debian's nginx)")
    return found


def _grpc_refusal(name: str, message: str, status: int = GRPC_RESOURCE_EXHAUSTED) -> str:
    """A named location answering a gRPC call with a status and no body (trailers-only)."""
    return f"""
        location @{name} {{
            internal;
            default_type application/grpc;
            add_header grpc-status {status} always;
            add_header grpc-message "{message}" always;
            add_header content-length 0 always;
            return 204;
        }}"""


def _tls_settings(tls: TlsFiles | None) -> str:
    if tls is None:
        return ""
    lines = [
        f"ssl_certificate {tls.certificate};",
        f"ssl_certificate_key {tls.key};",
        "ssl_protocols TLSv1.2 TLSv1.3;",
        # TLS 1.2: forward secrecy and AEAD only. nginx's default (HIGH:!aNULL:!MD5)
        # also let a client agree on AES128-SHA: RSA key exchange, CBC (issue 19, 8c).
        # TLS 1.3's suites are all forward secret and AEAD, and unaffected by this list.
        f"ssl_ciphers {TLS12_CIPHERS};",
        "ssl_prefer_server_ciphers on;",
        "ssl_session_cache shared:abdoserve_tls:1m;",
    ]
    if tls.client_ca is not None:
        lines += [
            f"ssl_client_certificate {tls.client_ca};",
            "ssl_verify_client on;",
            "ssl_verify_depth 4;",
        ]
    return "".join(f"\n    {line}" for line in lines)


def _upstream_key(directive: str, options: GuardOptions) -> str:
    """The key Triton asks of inference, set (never passed on from the client)."""
    if options.upstream_key is None:
        return ""
    header = GUARD_HEADER if directive == "proxy_set_header" else GRPC_HEADER_PREFIX + GUARD_HEADER
    return f"\n            {directive} {header} {options.upstream_key};"


def _upstream(name: str, ports: list[tuple[int, bool]], sticky: bool = False) -> str:
    """An upstream group; a backend that fails a connection rests 5 s before a retry.
    `sticky`: each client address keeps to one backend (consistent hashing)."""
    servers = " ".join(
        f"server 127.0.0.1:{port}{' max_fails=1 fail_timeout=5s' if up else ' down'};"
        for port, up in ports
    )
    hashing = "hash $remote_addr consistent; " if sticky else ""
    return f"upstream {name} {{ {hashing}{servers} keepalive 32; }}"


def _upstreams(options: GuardOptions) -> str:
    backends = options.all_backends()
    grpc_ports = [(backend.grpc_port, backend.up) for backend in backends]
    http_ports = [(backend.http_port, backend.up) for backend in backends]
    # Model-repository calls keep to their replica even while it reports not ready: a
    # model load makes it not ready for a moment, and the command reads back what it
    # loaded (a replica that is gone fails its connections and is passed over).
    return "\n    ".join(
        [
            _upstream("triton_grpc", grpc_ports),
            _upstream("triton_http", http_ports),
            _upstream("triton_repository_grpc", [(p, True) for p, _ in grpc_ports], sticky=True),
            _upstream("triton_repository_http", [(p, True) for p, _ in http_ports], sticky=True),
        ]
    )


def _listen(options: GuardOptions, port: int, *flags: str) -> str:
    tls = ("ssl",) if options.tls is not None else ()
    return " ".join(("listen", f"{options.host}:{port}", *tls, *flags)) + ";"


def _proxied_servers(options: GuardOptions) -> str:
    return "".join(
        f"""

    server {{
        {_listen(options, port.public)}
        location / {{
            proxy_pass http://127.0.0.1:{port.upstream};
            proxy_read_timeout 30s;
        }}
    }}"""
        for port in options.proxied
    )


# The gRPC health methods: outside the inference budget, under the probes' own.
GRPC_PROBES = r"^/inference\.GRPCInferenceService/(ServerLive|ServerReady|ModelReady)$"
# Model-repository calls and model configs: a client's calls all reach the same server, so
# that `abdoserve model canary` loads versions and reads them back on one replica (its
# supervisor then carries the change to the others, abdoserve.deploy.version_sync).
GRPC_REPOSITORY = r"^/inference\.GRPCInferenceService/(Repository\w+|ModelConfig)$"
HTTP_REPOSITORY = r"^/v2/(repository/|models/[^/]+(/versions/[0-9]+)?/config$)"
WORKER_USER = "abdoserve-guard"
BUDGET_SOCKET = "http-budget.sock"


def ensure_worker_user() -> pwd.struct_passwd:
    """The workers' system account (root only), made on first use: no login, no home."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(WORKER_USER)
    made = subprocess.run(
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            WORKER_USER,
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    if made.returncode != 0 and "already exists" not in made.stderr:
        raise GuardError(f"cannot create the guard's worker user {WORKER_USER}: {made.stderr}")
    return pwd.getpwnam(WORKER_USER)


WORKERS_PREFIX = "abdoserve-guard-"
OWNER_FILE = "launcher.pid"  # the process that made a workers' directory


def sweep_abandoned_worker_directories(parent: Path) -> list[Path]:
    """Remove the workers' directories whose launcher is gone (it was SIGKILLed and could
    not remove its own); those of running launchers stay."""
    removed = []
    for folder in parent.glob(f"{WORKERS_PREFIX}*"):
        try:
            owner = int((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not one of ours, or being made right now
        if not _alive(owner):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_directory(prefix: Path) -> Path:
    """Where nginx's workers write (request bodies, the HTTP budget's socket) when they
    run as the launching user: inside the prefix. As root see `NginxGuard`."""
    return prefix / "worker"


def _refusals(options: GuardOptions) -> str:
    limits = options.limits
    too_large = (
        f"request exceeds the limit of {limits.max_body_bytes} bytes (the guard in front of Triton)"
    )
    busy = (
        f"server busy: {limits.max_inflight} requests in flight (the guard's budget), at "
        f"most {limits.max_inflight_per_client} from one client address"
    )
    unauthenticated = "a client certificate signed by the server's client CA is required"
    return (
        _grpc_refusal("too_large", too_large)
        + _grpc_refusal("busy", busy)
        + _grpc_refusal("unauthenticated", unauthenticated, GRPC_UNAUTHENTICATED)
    )


def _grpc_server(options: GuardOptions) -> str:
    limits = options.limits
    key = _upstream_key("grpc_set_header", options)
    return f"""
    server {{
        {_listen(options, options.grpc_port, "http2")}
        error_page 495 496 = @unauthenticated;
        location ~ {GRPC_PROBES} {{
            limit_conn probes {limits.probes_per_client};
            grpc_pass grpc://triton_grpc;{key}
            grpc_read_timeout 10s;
            error_page 503 = @busy;
        }}
        location ~ {GRPC_REPOSITORY} {{
            limit_conn inflight {limits.max_inflight};
            limit_conn per_client {limits.max_inflight_per_client};
            grpc_pass grpc://triton_repository_grpc;{key}
            grpc_set_header grpc-timeout {limits.request_timeout_s}S;
            grpc_read_timeout {limits.request_timeout_s}s;
            error_page 503 = @busy;
        }}
        location / {{
            limit_conn inflight {limits.max_inflight};
            limit_conn per_client {limits.max_inflight_per_client};
            grpc_pass grpc://triton_grpc;{key}
            # The call's deadline, set here whatever the client asked: Triton's gRPC
            # server ends it at this time with DEADLINE_EXCEEDED however slowly its body
            # arrives, and its slot comes back (a client's shorter deadline ends it first).
            grpc_set_header grpc-timeout {limits.request_timeout_s}S;
            grpc_read_timeout {limits.request_timeout_s}s;
            grpc_send_timeout {limits.request_timeout_s}s;
            # Inference is idempotent: a request whose Triton failed (refused the
            # connection, reset it mid-request) is sent once more, to another one.
            grpc_next_upstream error timeout non_idempotent;
            grpc_next_upstream_tries 2;
            error_page 413 = @too_large;
            error_page 503 = @busy;
        }}{_refusals(options)}
    }}"""


def _http_servers(options: GuardOptions, workers: Path) -> str:
    """The public HTTP server reads each body whole, then passes the request to a second
    server on a socket only nginx's workers can reach, which holds the in-flight budget."""
    limits = options.limits
    budget_socket = f"unix:{workers / BUDGET_SOCKET}"
    key = _upstream_key("proxy_set_header", options)
    return f"""
    server {{
        {_listen(options, options.http_port)}
        location /v2/health/ {{
            limit_conn probes {limits.probes_per_client};
            proxy_pass http://triton_http;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 10s;
        }}
        location / {{
            limit_conn per_client {limits.max_inflight_per_client};
            proxy_pass http://{budget_socket}:;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering on;
            proxy_read_timeout {limits.request_timeout_s}s;
        }}
    }}

    server {{
        listen {budget_socket};
        location ~ {HTTP_REPOSITORY} {{
            limit_conn inflight {limits.max_inflight};
            proxy_pass http://triton_repository_http;
            proxy_http_version 1.1;
            proxy_set_header Connection "";{key}
            proxy_read_timeout {limits.request_timeout_s}s;
        }}
        location / {{
            limit_conn inflight {limits.max_inflight};
            proxy_pass http://triton_http;
            proxy_http_version 1.1;
            proxy_set_header Connection "";{key}
            proxy_read_timeout {limits.request_timeout_s}s;
            proxy_request_buffering off;
            proxy_next_upstream error timeout non_idempotent;
            proxy_next_upstream_tries 2;
        }}
    }}"""


def _real_client(limits: GuardLimits) -> str:
    """The client address from X-Forwarded-For, where a trusted proxy sent the call."""
    if not limits.trusted_proxies:
        return ""
    trusted = "".join(f"\n    set_real_ip_from {cidr};" for cidr in limits.trusted_proxies)
    return f"{trusted}\n    real_ip_header X-Forwarded-For;\n    real_ip_recursive on;"


def _worker_user() -> str:
    """As root, nginx's workers drop to a user of their own (not `nobody`, whose other
    processes could read a worker's memory: the upstream key, the TLS key)."""
    return f"user {WORKER_USER};\n" if os.geteuid() == 0 else ""


def render_config(options: GuardOptions, prefix: Path, workers: Path | None = None) -> str:
    """The nginx.conf for `options`, with the master's files under `prefix` and the
    workers' under `workers` (by default the prefix's `worker/`)."""
    limits = options.limits
    workers = workers or worker_directory(prefix)
    return f"""# Written by abdoserve (deploy/guard.py); regenerated at every start.
{_worker_user()}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    server_tokens off;  # "Server: nginx", no version, in headers and error pages
    client_body_temp_path {workers}/body;
    proxy_temp_path {workers}/proxy;
    fastcgi_temp_path {workers}/fastcgi;
    uwsgi_temp_path {workers}/uwsgi;
    scgi_temp_path {workers}/scgi;
    client_max_body_size {limits.max_body_bytes};
    client_body_timeout {limits.body_timeout_s}s;
    client_header_timeout {limits.body_timeout_s}s;
    send_timeout {limits.request_timeout_s}s;
    keepalive_timeout 75s;
    # nginx ends a connection after 1000 requests or 1 h by default (HTTP/2 GOAWAY): a
    # long-lived gRPC channel then sees UNAVAILABLE on the calls it raced in (a soak
    # found it). Clients reconnect anyway; there is no reason to make them.
    keepalive_requests 100000000;
    keepalive_time 7d;{_tls_settings(options.tls)}{_real_client(limits)}
    # One budget for gRPC and HTTP together: every request has the same (non-empty) key;
    # and each client address's share of it, and its probes, counted apart.
    map $request_method $inflight_key {{ default all; }}
    limit_conn_zone $inflight_key zone=inflight:1m;
    limit_conn_zone $binary_remote_addr zone=per_client:4m;
    limit_conn_zone $binary_remote_addr zone=probes:1m;
    limit_conn_status 503;
    limit_conn_log_level warn;

    {_upstreams(options)}
{_grpc_server(options)}
{_http_servers(options, workers)}{_proxied_servers(options)}
}}
"""


class NginxGuard:
    """nginx running `render_config(options)` in the foreground of its own process."""

    def __init__(self, options: GuardOptions, prefix: Path) -> None:
        self.options = options
        self.prefix = prefix
        self.workers = worker_directory(prefix)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> NginxGuard:
        self._reap_workers()
        self._prepare_directories()
        self._write_config()
        self._check_config()
        # SIGTERM, not SIGKILL, when we die: the master then stops its workers and exits.
        # A SIGKILLed master leaves its worker running as an orphan that holds every
        # listening port (seen: 4 of 4 ports held after `serve` was SIGKILLed).
        self.process = processes.start(
            [*self._command(), "-g", "daemon off;"],
            stderr=subprocess.DEVNULL,
            death_signal=signal.SIGTERM,
        )
        try:  # stopped here if it never listens: a raising __enter__ gets no __exit__
            self._wait_listening(timeout_s)
            self._hand_socket_to_workers()
        except BaseException:
            self.stop()
            raise
        return self

    def _hand_socket_to_workers(self) -> None:
        """The master (root) made the HTTP budget's socket root's, 0755: the workers, who
        connect to it, get it as theirs alone (a reload keeps the same socket)."""
        if os.geteuid() != 0:
            return
        user = ensure_worker_user()
        budget_socket = self.workers / BUDGET_SOCKET
        os.chown(budget_socket, user.pw_uid, user.pw_gid)
        budget_socket.chmod(0o600)

    def _reap_workers(self) -> None:
        """A master that died (SIGKILL) leaves its workers running, holding the listening
        ports: kill its whole process group before a new master binds them."""
        if self.process is not None and self.process.poll() is not None:
            processes.sweep(self.process)

    def _command(self) -> list[str]:
        return [nginx_binary(), "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf")]

    def _prepare_directories(self) -> None:
        """The prefix (configuration, keys, log) is this user's alone. The workers get a
        directory of their own; as root, a fresh one under the temporary directory,
        which every user can traverse (the prefix's parents may not be)."""
        self.prefix.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.prefix.chmod(0o700)
        if os.geteuid() != 0:
            self.workers.mkdir(mode=0o700, exist_ok=True)
            (self.workers / BUDGET_SOCKET).unlink(missing_ok=True)  # a killed master's
            return
        self._remove_workers_directory()
        sweep_abandoned_worker_directories(Path(tempfile.gettempdir()))
        self.workers = Path(tempfile.mkdtemp(prefix=WORKERS_PREFIX))
        (self.workers / OWNER_FILE).write_text(f"{os.getpid()}\n")
        user = ensure_worker_user()
        os.chown(self.workers, user.pw_uid, user.pw_gid)

    def _remove_workers_directory(self) -> None:
        if self.workers != worker_directory(self.prefix):
            shutil.rmtree(self.workers, ignore_errors=True)

    def _write_config(self) -> None:
        # It holds the key Triton asks of inference: for this user's eyes only.
        descriptor = os.open(
            self.prefix / "nginx.conf", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600
        )
        with os.fdopen(descriptor, "w") as handle:
            handle.write(render_config(self.options, self.prefix, self.workers))

    def _check_config(self) -> None:
        checked = subprocess.run(
            [*self._command(), "-t", "-q"], check=False, capture_output=True, text=True
        )
        if checked.returncode != 0:
            raise GuardError(f"nginx refused its configuration: {checked.stderr.strip()}")

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

    def reconfigure(self, options: GuardOptions) -> None:
        """New options without dropping a request: nginx starts workers with the new
        configuration and lets the old ones finish what they hold (SIGHUP)."""
        self.options = options
        self._write_config()
        if self.process is not None and self.process.poll() is None:
            self._check_config()
            self.process.send_signal(signal.SIGHUP)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGQUIT: finish the requests in flight, then exit; SIGKILL if it hangs."""
        process, self.process = self.process, None
        processes.stop(process, first=signal.SIGQUIT, grace_s=timeout_s)
        self._remove_workers_directory()
