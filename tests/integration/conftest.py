"""A real `tritonserver` (the embedded CPU build) started once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.embedded import EmbeddedServer, ServerOptions, free_ports


@pytest.fixture(scope="session")
def server(
    built_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedServer]:
    log_file = tmp_path_factory.mktemp("triton") / "triton.log"
    options = ServerOptions(repository=built_repository, ports=free_ports(), log_file=log_file)
    with EmbeddedServer(options) as running:
        yield running


@pytest.fixture(scope="session")
def grpc_url(server: EmbeddedServer) -> str:
    return f"{server.options.host}:{server.ports.grpc}"
