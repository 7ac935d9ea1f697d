"""A real `tritonserver` (the embedded CPU build) started once per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from abdoserve.deploy.embedded import EmbeddedServer, ServerOptions, free_ports
from abdoserve.deploy.isolation import HOST_SHM, server_shm
from abdoserve.deploy.model_control import ADMIN_HEADER, GRPC_HEADER_PREFIX


def running(repository: Path, folder: Path) -> Iterator[EmbeddedServer]:
    """A server on `repository`; its stubs' shared memory stays in its own /dev/shm."""
    options = ServerOptions(
        repository=repository, ports=free_ports(), log_file=folder / "triton.log"
    )
    host_before = set(os.listdir(HOST_SHM))
    with EmbeddedServer(options) as started:
        assert started.process is not None
        regions = os.listdir(server_shm(started.process.pid))
        assert regions, "no stub shared memory in the server's private /dev/shm?"
        yield started
        # The regions live in the server's own tmpfs: the host never sees one.
        assert not set(regions) & set(os.listdir(HOST_SHM))
    leaked = set(os.listdir(HOST_SHM)) - host_before
    assert not leaked, f"shared memory left in {HOST_SHM}: {sorted(leaked)}"


@pytest.fixture(scope="session")
def server(
    built_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedServer]:
    """The shape `serve` runs by default: one fused model per task."""
    yield from running(built_repository, tmp_path_factory.mktemp("triton"))


@pytest.fixture(scope="session")
def ensemble_server(
    ensemble_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedServer]:
    """The ensemble shape (`serve --pipeline ensemble`, and a GPU server's): the tests
    of what only it has (the composing models) and of the two shapes side by side."""
    yield from running(ensemble_repository, tmp_path_factory.mktemp("triton-ensemble"))


@pytest.fixture(scope="session")
def grpc_url(server: EmbeddedServer) -> str:
    return f"{server.options.host}:{server.ports.grpc}"


@pytest.fixture(scope="session")
def admin_headers(server: EmbeddedServer) -> dict[str, str]:
    """gRPC metadata that opens the restricted APIs (statistics, logging, ...)."""
    return {GRPC_HEADER_PREFIX + ADMIN_HEADER: server.options.admin_key}
