"""A real `tritonserver` (the embedded CPU build) started once per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from abdoserve.deploy.embedded import EmbeddedServer, ServerOptions, free_ports

SHARED_MEMORY = "/dev/shm"


@pytest.fixture(scope="session")
def server(
    built_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedServer]:
    log_file = tmp_path_factory.mktemp("triton") / "triton.log"
    options = ServerOptions(repository=built_repository, ports=free_ports(), log_file=log_file)
    shared_memory_before = set(os.listdir(SHARED_MEMORY))
    with EmbeddedServer(options) as running:
        assert set(os.listdir(SHARED_MEMORY)) - shared_memory_before, "no stub shared memory?"
        yield running
    # Triton QA's habit: a stopped server leaves no Python-backend shared memory behind.
    leaked = set(os.listdir(SHARED_MEMORY)) - shared_memory_before
    assert not leaked, f"shared memory left in {SHARED_MEMORY}: {sorted(leaked)}"


@pytest.fixture(scope="session")
def grpc_url(server: EmbeddedServer) -> str:
    return f"{server.options.host}:{server.ports.grpc}"
