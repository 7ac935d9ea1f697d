"""Shared fixtures: the model repository is built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def built_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly built model repository (reference weights) for this test session."""
    from abdoserve.export.repository import build_repository

    out = tmp_path_factory.mktemp("repository") / "model_repository"
    build_repository(out)
    return out
