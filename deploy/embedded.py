"""The embedded CPU Triton server: the real `tritonserver` binary from the nvidia-pytriton wheel.

`EmbeddedServer` starts it on the given ports with the environment its Python
backend needs, waits until every model is ready, and stops it cleanly. The
`serve` command and the integration tests both use it.

Environment facts (see docs/architecture.md): the Python-backend stub links the system
libpython3.11 and must sit in the backend folder; it sees this virtual
environment's packages when the environment's bin/ is first on PATH; the wheel's
shared libraries live in `nvidia_pytriton.libs`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

from abdoserve.deploy import processes, triton_keys
from abdoserve.deploy.isolation import ShmIsolation, prepare_staging, wrap
from abdoserve.deploy.model_control import ADMIN_HEADER, GUARD_HEADER, SHM_HEADER
from abdoserve.deploy.triton_keys import LOADED, placeholder
from abdoserve.export.locations import BUILD_DIR

# The checkout this module sits in; only meaningful in a development checkout.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
STUB_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


# Closed to callers without the admin key. Health, metadata, model-config (clients read
# a task's labels from it) and inference stay open.
ADMIN_APIS = ("model-repository", "statistics", "trace", "logging")


class ServerError(RuntimeError):
    """The server could not be started or did not become ready."""


@dataclass(frozen=True)
class Ports:
    grpc: int = 8001
    http: int = 8000
    metrics: int = 8002

    def named(self) -> dict[str, int]:
        return {"gRPC": self.grpc, "HTTP": self.http, "metrics": self.metrics}


@dataclass(frozen=True)
class ServerOptions:
    repository: Path
    ports: Ports = field(default_factory=Ports)
    log_file: Path = BUILD_DIR / "triton.log"
    host: str = "127.0.0.1"
    log_verbose: int = 0
    startup_timeout_s: float = 300.0
    extra_args: tuple[str, ...] = ()
    # Closed by default: the model-repository, statistics, trace, logging and
    # shared-memory APIs answer only requests carrying this key (a fresh random one
    # unless given); models are loaded and reloaded through it (explicit control).
    admin_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    # A separate key for the shared-memory API alone, given to the one co-located
    # sender of `shm.shared_region`; None: shared memory is under the admin key.
    shm_key: str | None = None
    # Behind the guard: inference only with the key nginx adds to what it forwards.
    inference_key: str | None = None
    # The server's /dev/shm: a private tmpfs by default (see abdoserve.deploy.isolation).
    shm: ShmIsolation = field(default_factory=ShmIsolation)
    # The Python backend's /dev/shm region names start with this: one server's regions
    # (and orphaned stubs) can be found and removed after a crash.
    shm_region_prefix: str | None = None
    exit_timeout_s: int = 30  # Triton waits this long for in-flight requests on exit
    # Where the binary and its backends are: None, the nvidia-pytriton wheel's (and the
    # environment it needs); a container names its own (the NGC image's /opt/tritonserver).
    binary: Path | None = None
    backends: Path | None = None
    gpu_metrics: bool = False
    # gRPC TLS served by Triton itself (the container, where no guard terminates TLS).
    grpc_tls: GrpcTls | None = None


@dataclass(frozen=True)
class GrpcTls:
    """PEM files for Triton's own gRPC TLS; with `client_ca`, mutual TLS."""

    certificate: Path
    key: Path
    client_ca: Path | None = None

    def args(self) -> list[str]:
        args = [
            "--grpc-use-ssl=true",
            f"--grpc-server-cert={self.certificate}",
            f"--grpc-server-key={self.key}",
        ]
        if self.client_ca is not None:
            args += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={self.client_ca}"]
        return args


def triton_home() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("nvidia-pytriton is not installed: run `make install`")
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def backend_directory(target: Path = BUILD_DIR / "triton_backends") -> Path:
    """A backend folder whose python/ holds the stub matching this interpreter."""
    home = triton_home()
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    sources = {
        "libtriton_python.so": home / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": home
        / "backends"
        / "python"
        / "triton_python_backend_utils.py",
        "triton_python_backend_stub": home
        / "python_backend_stubs"
        / STUB_PYTHON
        / "triton_python_backend_stub",
    }
    for name, source in sources.items():
        if not source.exists():
            raise ServerError(f"the Triton wheel lacks {source}")
        destination = python_dir / name
        if not destination.exists() or destination.stat().st_size != source.stat().st_size:
            shutil.copy2(source, destination)
    return target


def server_environment() -> dict[str, str]:
    env = dict(os.environ)
    libs = triton_home().parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        item for item in (str(libs), env.get("LD_LIBRARY_PATH", "")) if item
    )
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    # One thread per numpy/OpenMP pool: the stubs share two cores with the server.
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(variable, "1")
    return env


class PortInUse(ServerError):
    """A port this launch would listen on is taken (or named twice)."""


# The option that chooses each public port, for the refusal's advice.
PORT_FLAGS = {
    "gRPC": "--grpc-port",
    "HTTP": "--http-port",
    "metrics": "--metrics-port",
    "supervisor": "--supervisor-port",
}


@dataclass(frozen=True)
class Binding:
    """One listening socket a launch will open: what it is for, where."""

    name: str  # "gRPC", "supervisor", "Triton's gRPC behind the guard", ...
    host: str
    port: int
    flag: str | None = None  # the option that chooses it; None: chosen free by us

    def refusal(self) -> str:
        advice = f"; choose another with {self.flag}" if self.flag else ""
        return f"port {self.port} ({self.name}) is already in use on {self.host}{advice}"


def public_bindings(host: str, ports: Ports) -> list[Binding]:
    return [Binding(name, host, port, PORT_FLAGS[name]) for name, port in ports.named().items()]


def check_bindings(bindings: list[Binding]) -> None:
    """Refuse, naming the port, before anything starts: a port given twice, or one that
    another process holds. A server that starts anyway finds out late: an orphaned nginx
    on the guard's ports answered our readiness probe, so `serve` printed ready and then
    restarted its own nginx every 2.6 s on "address already in use" (issue 19)."""
    seen: dict[int, Binding] = {}
    for binding in bindings:
        if binding.port in seen:
            first = seen[binding.port]
            raise PortInUse(f"port {binding.port} is given twice ({first.name}, {binding.name})")
        seen[binding.port] = binding
        _check_bindable(binding)


def _check_bindable(binding: Binding) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the servers will: connections closing in TIME_WAIT do not block a listener.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((binding.host, binding.port))
        except OSError as error:
            raise PortInUse(binding.refusal()) from error


def check_ports_free(host: str, ports: Ports) -> None:
    check_bindings(public_bindings(host, ports))


# Every port free_port handed out in this process: the kernel may offer a port it just
# released again, and two ports of one launch then collided (seen: Triton's HTTP and
# metrics ports behind the guard both 33301, refused as "given twice").
_HANDED_OUT: set[int] = set()
_HANDED_OUT_LOCK = threading.Lock()


def free_port() -> int:
    """A loopback port free now, and never one this process was given before."""
    with _HANDED_OUT_LOCK:
        for _ in range(1000):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind(("127.0.0.1", 0))
                port: int = probe.getsockname()[1]
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port
    raise ServerError("no free loopback port that this process was not given before")


def free_ports() -> Ports:
    return Ports(grpc=free_port(), http=free_port(), metrics=free_port())


def triton_command(options: ServerOptions) -> list[str]:
    """The one `tritonserver` command line, for `abdoserve serve`, the tests, the bench
    and the container (abdoserve.deploy.container): closed admin APIs, explicit model
    control, our ports and the stubs' shared-memory prefix. It holds no key, only
    placeholders: run it as `EmbeddedServer.start` does, with `triton_key_values` in a
    key file and the library of abdoserve.deploy.triton_keys preloaded."""
    binary = options.binary or triton_home() / "bin" / "tritonserver"
    backends = options.backends or backend_directory()
    return [
        str(binary),
        f"--model-repository={options.repository}",
        f"--backend-directory={backends}",
        f"--grpc-address={options.host}",
        f"--grpc-port={options.ports.grpc}",
        f"--http-address={options.host}",
        f"--http-port={options.ports.http}",
        f"--metrics-address={options.host}",
        f"--metrics-port={options.ports.metrics}",
        "--allow-metrics=true",
        f"--allow-gpu-metrics={str(options.gpu_metrics).lower()}",
        "--disable-auto-complete-config",
        # `true` once argv_keys.c has run; Triton refuses the placeholder itself.
        f"--exit-on-error={placeholder(LOADED)}",
        "--strict-readiness=true",
        f"--log-verbose={options.log_verbose}",
        f"--exit-timeout-secs={options.exit_timeout_s}",
        # No pool of spent gRPC requests: each kept its (up to request-sized) buffers.
        "--grpc-infer-allocation-pool-size=0",
        *control_args(options),
        *([] if options.grpc_tls is None else options.grpc_tls.args()),
        *options.extra_args,
    ]


def triton_key_values(options: ServerOptions) -> dict[str, str]:
    """What each placeholder of `triton_command` stands for (the key file's lines)."""
    keys = {"admin": options.admin_key, LOADED: "true"}
    if options.shm_key is not None:
        keys["shm"] = options.shm_key
    if options.inference_key is not None:
        keys["inference"] = options.inference_key
    return keys


def control_args(options: ServerOptions) -> list[str]:
    """Explicit model control, the restricted APIs (their keys as placeholders: any local
    user reads a command line) and the stubs' region prefix."""
    admin = list(ADMIN_APIS)
    restricted = []
    if options.shm_key is None:
        admin.append("shared-memory")
    else:
        restricted.append(f"shared-memory:{SHM_HEADER}={placeholder('shm')}")
    restricted.append(f"{','.join(admin)}:{ADMIN_HEADER}={placeholder('admin')}")
    if options.inference_key is not None:
        restricted.append(f"inference:{GUARD_HEADER}={placeholder('inference')}")
    args = ["--model-control-mode=explicit", "--load-model=*"]
    for setting in restricted:
        args += [f"--http-restricted-api={setting}", f"--grpc-restricted-protocol={setting}"]
    if options.shm_region_prefix is not None:
        args.append(f"--backend-config=python,shm-region-prefix-name={options.shm_region_prefix}")
    return args


def _keys_step(step: Callable[[], Path]) -> Path:
    """A step of abdoserve.deploy.triton_keys, its refusal as ours (launchers print it)."""
    try:
        return step()
    except triton_keys.TritonKeysError as error:
        raise ServerError(str(error)) from error


class EmbeddedServer:
    """A running `tritonserver` process; use as a context manager."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def ports(self) -> Ports:
        return self.options.ports

    def command(self) -> list[str]:
        return triton_command(self.options)

    def start(self) -> EmbeddedServer:
        options = self.options
        if not options.repository.is_dir():
            raise ServerError(f"no model repository at {options.repository}")
        check_ports_free(options.host, options.ports)
        preload = _keys_step(triton_keys.library)  # built before anything starts
        options.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = options.log_file.open("ab")
        staging = prepare_staging(options.shm, options.log_file.parent / "shm-staging")
        keys, folder = triton_key_values(options), options.log_file.parent / "triton-keys"
        key_file = _keys_step(lambda: triton_keys.write_key_file(keys, folder))
        try:
            self._start_process(
                staging, triton_keys.environment(self._base_env(), key_file, preload)
            )
        finally:
            key_file.unlink(missing_ok=True)  # read before Triton's main (and removed there)
        return self

    def _base_env(self) -> dict[str, str]:
        """The wheel's binary needs its libraries and this environment's bin/; a
        container's own binary (`binary=`) runs in the image's environment as it is."""
        return server_environment() if self.options.binary is None else dict(os.environ)

    def _start_process(self, staging: Path | None, env: dict[str, str]) -> None:
        options = self.options
        # Its own process group (Ctrl-C in a terminal reaches us; we stop it in order),
        # and killed with us: a SIGKILLed launcher leaves no server behind.
        self.process = processes.start(
            wrap(self.command(), options.shm, staging),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        # A `with` block whose __enter__ raises never reaches __exit__: a server that
        # never came ready (or a Ctrl-C while it loads) is stopped here.
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def url(self, path: str) -> str:
        return f"http://{self.options.host}:{self.ports.http}{path}"

    def is_live(self, timeout_s: float = 2.0) -> bool:
        """Whether its HTTP server answers at all (a frozen process does not)."""
        try:
            with urllib.request.urlopen(self.url("/v2/health/live"), timeout=timeout_s) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url("/v2/health/ready"), timeout=2) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.options.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(
                    f"tritonserver exited with code {self.process.returncode} while starting; "
                    f"last log lines:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.5)
        self.stop()
        raise ServerError(
            f"tritonserver not ready after {self.options.startup_timeout_s:.0f} s;"
            f" last log lines:\n{self.log_tail()}"
        )

    def model_names(self) -> list[str]:
        request = urllib.request.Request(
            self.url("/v2/repository/index"),
            data=b"{}",
            method="POST",
            headers={ADMIN_HEADER: self.options.admin_key},
        )
        with urllib.request.urlopen(request, timeout=5) as reply:
            return [item["name"] for item in json.loads(reply.read())]

    def log_tail(self, lines: int = 30) -> str:
        path = self.options.log_file
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGINT first (Triton unloads models and exits), SIGKILL to its group (the
        stubs too) if it hangs."""
        process, self.process = self.process, None
        code = None
        if process is not None:
            code = processes.stop(process, first=signal.SIGINT, grace_s=timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
