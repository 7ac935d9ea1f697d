"""Every port a launch listens on is known before it starts, and a taken one is refused
by name (issue 19): the public ones, the supervisor's, and the loopback ports behind
the guard that the supervisor and the replica set choose themselves."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from abdoserve.deploy.embedded import (
    Binding,
    PortInUse,
    Ports,
    ServerOptions,
    check_bindings,
    free_port,
)
from abdoserve.deploy.guard import GuardLimits
from abdoserve.deploy.replicas import ReplicaSet, ReplicaSetOptions
from abdoserve.deploy.supervisor import Supervisor, SupervisorOptions

LIMITS = GuardLimits(max_body_bytes=1 << 20)


def public_ports() -> Ports:
    return Ports(grpc=free_port(), http=free_port(), metrics=free_port())


@contextmanager
def held(port: int) -> Iterator[None]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        yield


def guarded_supervisor() -> Supervisor:
    options = ServerOptions(repository=Path("/nonexistent"), ports=public_ports())
    return Supervisor(options, SupervisorOptions(health_port=free_port(), guard=LIMITS))


def test_a_guarded_supervisor_knows_its_eight_ports() -> None:
    supervisor = guarded_supervisor()
    bindings = supervisor.bindings()
    names = [binding.name for binding in bindings]
    assert names[:4] == ["gRPC", "HTTP", "metrics", "supervisor"]
    internal = supervisor.base_options.ports
    assert {binding.port for binding in bindings[4:]} == {
        internal.grpc,
        internal.http,
        internal.metrics,
        supervisor.health_address[1] if supervisor.health_address else -1,
    }
    assert all(binding.host == "127.0.0.1" for binding in bindings[4:])
    assert len({binding.port for binding in bindings}) == 8


@pytest.mark.parametrize("which", range(8))
def test_any_taken_port_of_a_supervisor_is_refused_by_name(which: int) -> None:
    supervisor = guarded_supervisor()
    binding = supervisor.bindings()[which]
    with held(binding.port), pytest.raises(PortInUse) as refused:
        check_bindings(supervisor.bindings())
    assert f"port {binding.port} ({binding.name}) is already in use" in str(refused.value)


def test_a_supervisor_on_a_taken_port_is_never_made() -> None:
    ports = public_ports()
    options = ServerOptions(repository=Path("/nonexistent"), ports=ports)
    with held(ports.grpc), pytest.raises(PortInUse) as refused:
        Supervisor(options, SupervisorOptions(health_port=free_port(), guard=LIMITS))
    assert str(refused.value) == (
        f"port {ports.grpc} (gRPC) is already in use on 127.0.0.1; choose another with --grpc-port"
    )


def test_a_port_given_twice_is_refused() -> None:
    port = free_port()
    twice = [Binding("gRPC", "127.0.0.1", port), Binding("HTTP", "127.0.0.1", port)]
    with pytest.raises(PortInUse, match=f"port {port} is given twice \\(gRPC, HTTP\\)"):
        check_bindings(twice)


def test_a_replica_set_knows_its_public_and_loopback_ports(tmp_path: Path) -> None:
    options = ReplicaSetOptions(
        replicas=2,
        repository=tmp_path,
        public_host="127.0.0.1",
        public_ports=Ports(grpc=free_port(), http=free_port(), metrics=free_port()),
        health_port=free_port(),
        run_dir=tmp_path / "run",
        guard=LIMITS,
    )
    replicas = ReplicaSet(options)
    bindings = replicas.bindings()
    # gRPC, HTTP; per replica: public metrics and health, Triton's three and its health.
    assert len(bindings) == 2 + 2 * (2 + 4)
    assert [b.port for b in bindings if b.name == "replica 2's metrics"] == [
        options.public_ports.metrics + 10
    ]
    second = replicas.replicas[1].options
    with (
        held(second.health_port),
        pytest.raises(PortInUse, match="replica 2's supervisor, internal"),
    ):
        check_bindings(bindings)


def test_free_port_never_hands_out_a_port_twice() -> None:
    """The kernel offers just-released ports again: 2,000 draws from its ~28,000
    ephemeral ports would repeat one almost surely (the birthday bound), and two ports
    of one launch collided that way."""
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)
