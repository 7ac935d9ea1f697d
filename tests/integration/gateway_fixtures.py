"""What each gateway test module starts for itself: a repository of its tasks, a Triton
server on it, and an Orthanc as the PACS (module fixtures call these)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from abdoserve.deploy.embedded import EmbeddedServer, ServerOptions, free_ports
from abdoserve.loadtests.dicom_peers import Orthanc, start_orthanc


def built_repository(factory: pytest.TempPathFactory, name: str, tasks: Iterable[str]) -> Path:
    from abdoserve.export.repository import build_repository

    out = factory.mktemp(name) / "model_repository"
    build_repository(out, tuple(tasks))
    return out


@contextmanager
def running_triton(
    repository: Path, factory: pytest.TempPathFactory, name: str
) -> Iterator[EmbeddedServer]:
    log_file = factory.mktemp(name) / "triton.log"
    options = ServerOptions(repository=repository, ports=free_ports(), log_file=log_file)
    with EmbeddedServer(options) as running:
        yield running


@contextmanager
def running_orthanc(factory: pytest.TempPathFactory, name: str) -> Iterator[Orthanc]:
    instance = start_orthanc(factory.mktemp(name), aet="ORTHANC")
    try:
        yield instance
    finally:
        instance.stop()
