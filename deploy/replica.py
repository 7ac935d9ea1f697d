"""One local replica: a supervised embedded Triton behind the balancer, in a process of
its own (`python -m abdoserve.deploy.replica SPEC.json`), started by `abdoserve serve
--replicas N` (abdoserve.deploy.replicas).

A process per replica is what makes a replica a unit that can die and drain, as a pod
does: SIGTERM drains it (its readiness turns false, the balancer takes it out within a
second, what it holds finishes, then it exits); SIGINT stops it at once (Triton still
finishes the requests in flight); the launcher starts a replica that exited again.

The spec file holds the replica's keys: the launcher writes it mode 0600.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

from abdoserve.deploy.embedded import Ports, ServerOptions
from abdoserve.deploy.isolation import ShmIsolation
from abdoserve.deploy.supervisor import Supervisor, SupervisorOptions


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a replica process needs; Triton and its health port on loopback."""

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

    def write(self, path: Path) -> Path:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(json.dumps(asdict(self)))
        return path

    @classmethod
    def read(cls, path: Path) -> ReplicaSpec:
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
            health_host="127.0.0.1", health_port=self.health_port, admin_key=self.admin_key
        )


class Signals:
    """SIGTERM and SIGINT caught from the start (one during start-up must not kill the
    process before it can stop its server); `wait` says which came."""

    def __init__(self) -> None:
        self.received = threading.Event()
        self.number = 0
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, number: int, _frame: FrameType | None) -> None:
        self.number = number
        self.received.set()

    def wait(self) -> int:
        self.received.wait()
        return self.number


def run(spec: ReplicaSpec) -> int:
    signals = Signals()
    supervisor = Supervisor(spec.server_options(), spec.supervisor_options())
    try:
        supervisor.start()
        print(f"replica {spec.index} ready", flush=True)
        if signals.wait() == signal.SIGTERM:
            supervisor.drain()
            print(f"replica {spec.index} draining", flush=True)
            threading.Event().wait(spec.deregister_s)
    finally:
        code = supervisor.stop()  # Triton finishes the requests it holds, then exits
    print(f"replica {spec.index} stopped (tritonserver exit code {code})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(ReplicaSpec.read(Path(sys.argv[1]))))
