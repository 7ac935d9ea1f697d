"""Shared fixtures, and the test tiers, marked by directory.

| directory            | marker        | what its tests may start                          |
|----------------------|---------------|---------------------------------------------------|
| `tests/unit/`        | `unit`        | nothing: pure Python in this process              |
| `tests/contract/`    | `contract`    | nothing: configs vs ONNX graphs vs the client     |
| `tests/tools/`       | `tools`       | external programs (kubectl, promtool, nginx -t,   |
|                      |               | dcmtk, dicom3tools) or whole repository builds    |
| `tests/integration/` | `integration` | real servers, gateways and peers on free ports    |

`make check` runs the first two (a one-minute loop); `make test` runs all four.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "contract", "tools", "integration")


def tier_of(path: Path) -> str:
    """The tier a test file belongs to: the first directory under tests/."""
    tier = path.resolve().relative_to(TESTS).parts[0]
    if tier not in TIERS:
        raise pytest.UsageError(f"{path}: tests live in one of tests/{{{','.join(TIERS)}}}/")
    return tier


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(getattr(pytest.mark, tier_of(Path(item.path))))


@pytest.fixture(scope="session")
def ensemble_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly built model repository (reference weights) in the ensemble shape, the
    one a GPU server runs and `serve --pipeline ensemble` serves."""
    from abdoserve.export.repository import build_repository

    out = tmp_path_factory.mktemp("ensemble") / "model_repository"
    build_repository(out, pipeline="ensemble")
    return out


@pytest.fixture(scope="session")
def built_repository(ensemble_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same build in the shape `serve` runs by default: one fused model per task.

    Fused from the ensemble build as `build_repository` fuses its own (the same files,
    then `fuse_task`), so that both shapes come from one export."""
    from abdoserve.export.fused import fuse_task
    from abdoserve.export.locations import PYTHON_MODELS
    from abdoserve.export.repository import BUILD_RECORD, built_tasks

    out = tmp_path_factory.mktemp("repository") / "model_repository"
    shutil.copytree(ensemble_repository, out)
    for task in built_tasks(out):
        fuse_task(out, task, PYTHON_MODELS)
    record = json.loads((out / BUILD_RECORD).read_text())
    (out / BUILD_RECORD).write_text(json.dumps({**record, "pipeline": "fused"}, indent=2))
    return out
