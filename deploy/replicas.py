"""`abdoserve serve --replicas N`: N supervised Triton replicas behind Debian's nginx.

The one home of replicas: the command line's side (`run_replicas`), the set and its
balancer (`ReplicaSet`), and one replica's process (`run_replica`, run as `python -m
abdoserve.deploy.replicas OPTIONS.json`). A process per replica is what makes a replica a
unit that can die and drain, as a pod does: SIGTERM drains it (its readiness turns false,
the balancer takes it out within a second, what it holds finishes, then it exits);
SIGINT stops it at once (Triton still finishes the requests in flight); the launcher
starts a replica that exited again. Its options file holds its keys: written mode 0600.

Each replica is a process of its own with its Triton on
loopback ports; nginx (the guard's configuration: limits, TLS, the inference key)
balances gRPC and HTTP over them round robin on the public ports, and publishes each
replica's Triton metrics and supervisor health on ports of its own:

    replica i (1..N): metrics on `metrics_port + 10 (i - 1)`, health on
    `health_port + 10 (i - 1)`; replica 1 keeps the single server's 8002 and 8003.

The launcher does what Kubernetes does for pods: every 0.25 s it reads each replica's
readiness; one that turns not ready (draining, restarting its server, a model
degraded) is marked `down` in nginx's configuration and nginx reloaded (gracefully:
requests in flight finish); one that exits is started again and rejoins when ready.
A request whose replica dies under it is sent once more to another (nginx's
`grpc_next_upstream`), and the client retries what still fails as UNAVAILABLE.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from abdoserve.deploy import processes
from abdoserve.deploy.drift_watch import DriftBounds
from abdoserve.deploy.embedded import (
    PORT_FLAGS,
    Binding,
    PortInUse,
    Ports,
    ServerError,
    ServerOptions,
    check_bindings,
    free_port,
)
from abdoserve.deploy.guard import (
    Backend,
    GuardError,
    GuardLimits,
    GuardOptions,
    NginxGuard,
    ProxiedPort,
    TlsFiles,
)
from abdoserve.deploy.isolation import IsolationError, ShmIsolation
from abdoserve.deploy.prometheus_server import render_config
from abdoserve.deploy.rollback_watch import RollbackBounds
from abdoserve.deploy.supervisor import Supervisor, SupervisorOptions

log = logging.getLogger(__name__)
PORT_STRIDE = 10  # replica i's public metrics and health ports: base + 10 (i - 1)


@dataclass(frozen=True)
class ReplicaOptions:
    """Everything one replica process needs (written to its 0600 options file, read by
    `python -m abdoserve.deploy.replicas FILE`); Triton and its health port on loopback."""

    index: int
    repository: str
    log_file: str
    grpc_port: int
    http_port: int
    metrics_port: int
    health_port: int
    admin_key: str
    inference_key: str  # only the balancer adds it: clients cannot bypass it
    shm_private: bool = True
    shm_size_bytes: int | None = None
    deregister_s: float = 2.0  # not ready this long before Triton stops: the balancer learns
    rollback: dict[str, float] = field(default_factory=dict)  # RollbackBounds' fields
    drift: dict[str, float] = field(default_factory=dict)  # DriftBounds' fields

    def write(self, path: Path) -> Path:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(json.dumps(asdict(self)))
        return path

    @classmethod
    def read(cls, path: Path) -> ReplicaOptions:
        return cls(**json.loads(path.read_text()))

    def server_options(self) -> ServerOptions:
        return ServerOptions(
            repository=Path(self.repository),
            ports=Ports(grpc=self.grpc_port, http=self.http_port, metrics=self.metrics_port),
            log_file=Path(self.log_file),
            admin_key=self.admin_key,
            inference_key=self.inference_key,
            shm=ShmIsolation(private=self.shm_private, size_bytes=self.shm_size_bytes),
        )

    def supervisor_options(self) -> SupervisorOptions:
        return SupervisorOptions(
            health_host="127.0.0.1",
            health_port=self.health_port,
            admin_key=self.admin_key,
            rollback=RollbackBounds(**self.rollback),  # type: ignore[arg-type]
            drift=DriftBounds(**self.drift),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class ReplicaSetOptions:
    replicas: int
    repository: Path
    public_host: str
    public_ports: Ports  # gRPC and HTTP balanced; metrics of replica 1, then + 10 each
    health_port: int  # replica 1's supervisor port, then + 10 each
    run_dir: Path  # per replica: spec, log; the balancer's prefix; the scrape config
    guard: GuardLimits
    tls: TlsFiles | None = None
    admin_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    shm: ShmIsolation = field(default_factory=ShmIsolation)
    interval_s: float = 0.25
    startup_timeout_s: float = 600.0
    rollback: RollbackBounds = field(default_factory=RollbackBounds)
    drift: DriftBounds = field(default_factory=DriftBounds)

    def public_metrics_port(self, index: int) -> int:
        return self.public_ports.metrics + PORT_STRIDE * (index - 1)

    def public_health_port(self, index: int) -> int:
        return self.health_port + PORT_STRIDE * (index - 1)


class Replica:
    """One replica process: started, asked whether it is ready, restarted, stopped."""

    def __init__(self, options: ReplicaOptions, options_file: Path, output: Path) -> None:
        self.options = options
        self.options_file = options.write(options_file)
        self.output = output
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._out: IO[bytes] | None = None

    def start(self) -> None:
        self._out = self.output.open("ab")
        command = [sys.executable, "-m", "abdoserve.deploy.replicas", str(self.options_file)]
        # Its own group: Ctrl-C reaches the launcher, which stops replicas in order.
        # SIGTERM if the launcher dies: the replica drains and stops its server.
        self.process = processes.start(
            command, stdout=self._out, stderr=subprocess.STDOUT, death_signal=signal.SIGTERM
        )

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def is_ready(self) -> bool:
        url = f"http://127.0.0.1:{self.options.health_port}/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def restart(self) -> None:
        self.close()
        self.restarts += 1
        self.start()

    def signal(self, number: int) -> None:
        if self.is_alive():
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(number)

    def wait(self, timeout_s: float) -> None:
        # The signal was sent (signal()); SIGKILL to the group past the timeout.
        processes.stop(self.process, first=0, grace_s=timeout_s)

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


class ReplicaSet:
    """N replicas and the balancer in front of them; use as a context manager."""

    def __init__(self, options: ReplicaSetOptions) -> None:
        self.options = options
        self.inference_key = secrets.token_urlsafe(32)
        self.replicas = [self._replica(index) for index in range(1, options.replicas + 1)]
        self.up: tuple[bool, ...] = (False,) * options.replicas
        self.guard: NginxGuard | None = None
        self.balancer_restarts = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        check_bindings(self.bindings())  # before any replica starts: PortInUse

    def bindings(self) -> list[Binding]:
        """The balancer's public ports (gRPC, HTTP, each replica's metrics and health)
        and each replica's loopback ports (its Triton's and its supervisor's)."""
        options, host = self.options, self.options.public_host
        found = [
            Binding("gRPC", host, options.public_ports.grpc, PORT_FLAGS["gRPC"]),
            Binding("HTTP", host, options.public_ports.http, PORT_FLAGS["HTTP"]),
        ]
        for replica in self.replicas:
            index, inner = replica.options.index, replica.options
            found += [
                Binding(
                    f"replica {index}'s metrics",
                    host,
                    options.public_metrics_port(index),
                    PORT_FLAGS["metrics"],
                ),
                Binding(
                    f"replica {index}'s supervisor",
                    host,
                    options.public_health_port(index),
                    PORT_FLAGS["supervisor"],
                ),
            ]
            found += [
                Binding(f"replica {index}'s {name}, internal", "127.0.0.1", port)
                for name, port in (
                    ("Triton gRPC", inner.grpc_port),
                    ("Triton HTTP", inner.http_port),
                    ("Triton metrics", inner.metrics_port),
                    ("supervisor", inner.health_port),
                )
            ]
        return found

    def _replica(self, index: int) -> Replica:
        folder = self.options.run_dir / f"replica-{index}"
        replica_options = ReplicaOptions(
            index=index,
            repository=str(self.options.repository),
            log_file=str(folder / "triton.log"),
            grpc_port=free_port(),
            http_port=free_port(),
            metrics_port=free_port(),
            health_port=free_port(),
            admin_key=self.options.admin_key,
            inference_key=self.inference_key,
            shm_private=self.options.shm.private,
            shm_size_bytes=self.options.shm.size_bytes,
            rollback=asdict(self.options.rollback),
            drift=asdict(self.options.drift),
        )
        return Replica(replica_options, folder / "options.json", folder / "replica.log")

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> ReplicaSet:
        for replica in self.replicas:
            replica.start()
        self._wait_all_ready()
        self.up = tuple(True for _ in self.replicas)
        self.guard = NginxGuard(self._guard_options(), self.options.run_dir / "balancer")
        self.guard.start()
        self.write_scrape_config()
        self._thread = threading.Thread(target=self._watch, name="replicas", daemon=True)
        self._thread.start()
        return self

    def _wait_all_ready(self) -> None:
        deadline = time.monotonic() + self.options.startup_timeout_s
        while not all(replica.is_ready() for replica in self.replicas):
            for replica in self.replicas:
                if not replica.is_alive():
                    self.stop()
                    raise ServerError(
                        f"replica {replica.options.index} exited while starting; see "
                        f"{replica.output} and {replica.options.log_file}"
                    )
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError("the replicas were not ready in time")
            time.sleep(0.5)

    def stop(self) -> None:
        """The balancer finishes what it holds, then every replica stops (SIGINT: Triton
        still completes its requests in flight)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.guard is not None:
            self.guard.stop()
        for replica in self.replicas:
            replica.signal(signal.SIGINT)
        for replica in self.replicas:
            replica.wait(timeout_s=60)
            replica.close()

    def __enter__(self) -> ReplicaSet:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- the balancer ------------------------------------------------------------------

    def _guard_options(self) -> GuardOptions:
        options, limits = self.options, self.options.guard
        backends = tuple(
            Backend(replica.options.grpc_port, replica.options.http_port, up)
            for replica, up in zip(self.replicas, self.up, strict=True)
        )
        proxied = []
        for replica in self.replicas:
            index = replica.options.index
            proxied.append(
                ProxiedPort(options.public_metrics_port(index), replica.options.metrics_port)
            )
            proxied.append(
                ProxiedPort(options.public_health_port(index), replica.options.health_port)
            )
        return GuardOptions(
            host=options.public_host,
            grpc_port=options.public_ports.grpc,
            http_port=options.public_ports.http,
            upstream_grpc_port=backends[0].grpc_port,
            upstream_http_port=backends[0].http_port,
            limits=limits,
            tls=options.tls,
            proxied=tuple(proxied),
            upstream_key=self.inference_key,
            backends=backends,
        )

    def _watch(self) -> None:
        while not self._stop.wait(self.options.interval_s):
            try:
                self.check_once()
            except (OSError, ServerError) as error:
                log.error("replica check failed: %s", error)

    def check_once(self) -> None:
        if self.guard is not None and not self.guard.is_running():
            log.error("the balancer (nginx) exited; starting it again")
            self.balancer_restarts += 1
            self.guard.start()
        for replica in self.replicas:
            if not replica.is_alive():
                log.warning("replica %d exited; starting it again", replica.options.index)
                replica.restart()
        up = tuple(replica.is_ready() for replica in self.replicas)
        if not any(up):
            # None ready (each reloading a model at once, say): a live replica may still
            # answer, where a balancer with every server down answers 502 to every call.
            up = tuple(replica.is_alive() for replica in self.replicas)
        if up != self.up and self.guard is not None:
            self.up = up
            self.guard.reconfigure(self._guard_options())
            log.info("balancing over replicas %s", [i + 1 for i, ok in enumerate(up) if ok])

    @property
    def restarts(self) -> int:
        return sum(replica.restarts for replica in self.replicas)

    # -- monitoring --------------------------------------------------------------------

    def scrape_targets(self) -> dict[str, dict[str, str]]:
        """Each replica's public metrics address and its labels: `pod` and `namespace`
        as on Kubernetes, so the autoscaling rule reads the same here."""
        host = (
            "127.0.0.1"
            if self.options.public_host in ("0.0.0.0", "::")
            else self.options.public_host
        )
        return {
            f"{host}:{self.options.public_metrics_port(replica.options.index)}": {
                "namespace": "local",
                "pod": f"abdoserve-replica-{replica.options.index}",
            }
            for replica in self.replicas
        }

    def write_scrape_config(self) -> Path:
        """A Prometheus configuration listing every replica's Triton metrics and
        supervisor (TLS aside: with TLS on, add the scrapes' tls_config, see
        docs/security.md)."""
        path = self.options.run_dir / "prometheus.yml"
        targets = self.scrape_targets()
        host = next(iter(targets)).rsplit(":", 1)[0]
        supervisors = [
            f"{host}:{self.options.public_health_port(replica.options.index)}"
            for replica in self.replicas
        ]
        text = render_config(list(targets), target_labels=targets, supervisor_targets=supervisors)
        path.write_text(text)
        return path


def run_replica(options: ReplicaOptions) -> int:
    """One replica process: its supervised server until a signal; SIGTERM drains first."""
    signals = processes.Signals()
    supervisor = Supervisor(options.server_options(), options.supervisor_options())
    try:
        supervisor.start()
        print(f"replica {options.index} ready", flush=True)
        if signals.wait() == signal.SIGTERM:
            supervisor.drain()
            print(f"replica {options.index} draining", flush=True)
            threading.Event().wait(options.deregister_s)
    finally:
        code = supervisor.stop()  # Triton finishes the requests it holds, then exits
    print(f"replica {options.index} stopped (tritonserver exit code {code})", flush=True)
    return 0


def replica_set_options(args: argparse.Namespace) -> ReplicaSetOptions:
    """The set's options from `abdoserve serve`'s arguments (imported here: a replica
    process itself needs none of the command line)."""
    from abdoserve.deploy.serve import (
        ADMIN_KEY_VARIABLE,
        drift_bounds,
        guard_limits,
        read_key,
        rollback_bounds,
        shm_isolation,
        tls_files,
    )

    if args.shared_region is not None:
        raise IsolationError("--shared-region shares one region with one server: not with replicas")
    limits = guard_limits(args)
    if limits is None:
        raise GuardError("replicas are balanced by nginx: it must be installed and --guard not off")
    return ReplicaSetOptions(
        replicas=args.replicas,
        repository=args.repository,
        public_host=args.host,
        public_ports=Ports(grpc=args.grpc_port, http=args.http_port, metrics=args.metrics_port),
        health_port=args.supervisor_port,
        run_dir=args.log_file.parent / "replicas",
        guard=limits,
        tls=tls_files(args),
        admin_key=read_key(args.admin_key_file, ADMIN_KEY_VARIABLE) or secrets.token_urlsafe(32),
        shm=shm_isolation(args),
        rollback=rollback_bounds(args),
        drift=drift_bounds(args),
    )


def run_replicas(args: argparse.Namespace) -> int:
    """`abdoserve serve --replicas N`: the set, until SIGINT or SIGTERM."""
    from abdoserve.deploy.operator_key import forget_operator_key
    from abdoserve.deploy.serve import keep_generated_key, warn_if_exposed

    try:
        options = replica_set_options(args)
    except (GuardError, IsolationError, OSError) as error:
        print(f"error: {error}")
        return 2
    warn_if_exposed(args, SupervisorOptions(tls=options.tls))
    print(f"starting {options.replicas} replicas (each loads every model) ...", flush=True)
    try:
        replicas = ReplicaSet(options)  # refuses a taken port before anything starts
    except PortInUse as error:
        print(f"error: {error}")
        return 2
    kept = None
    try:
        replicas.start()
        kept = keep_generated_key(args, options.public_ports.grpc, options.admin_key)
        announce(replicas)
        stop = processes.wait_for_signal()
    except (ServerError, GuardError, OSError) as error:
        print(f"error: {error}")
        return 1
    finally:  # whatever happened: no replica, server or balancer outlives the command
        replicas.stop()
        if kept is not None:
            forget_operator_key(kept, options.admin_key)
    print(f"replicas stopped ({stop}); {replicas.restarts} restarted while serving")
    return 0


def announce(replicas: ReplicaSet) -> None:
    options = replicas.options
    scheme = "http" if options.tls is None else "https"
    host = options.public_host
    print(f"AbdoServe ready: {options.replicas} replicas behind nginx (round robin)")
    print(f"  gRPC     {host}:{options.public_ports.grpc}")
    print(f"  HTTP     {scheme}://{host}:{options.public_ports.http}/v2/health/ready")
    for replica in replicas.replicas:
        index = replica.options.index
        print(
            f"  replica {index}: metrics {scheme}://{host}:{options.public_metrics_port(index)}"
            f"/metrics, health {scheme}://{host}:{options.public_health_port(index)}"
            f"/health/ready, log {replica.options.log_file}"
        )
    print(f"  Prometheus scrape config: {options.run_dir / 'prometheus.yml'}")
    print("Ctrl-C stops them all.", flush=True)


if __name__ == "__main__":
    raise SystemExit(run_replica(ReplicaOptions.read(Path(sys.argv[1]))))
