"""Fusing a task's ensemble into one Python model: the same contract, the net's files and
runtime, the warm-up study; builds record the pipeline and the sources they came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abdoserve.export import repository as builds
from abdoserve.export.errors import ExportError
from abdoserve.export.fused import fuse_task, read_config
from abdoserve.export.locations import PYTHON_MODELS
from abdoserve.export.repository import build_repository, is_built

TASK = "liver_fibrosis_ct"  # clinical inputs and features: every part of the contract


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ensemble") / "repository"
    build_repository(out, [TASK], pipeline="ensemble")
    return out


def test_the_fused_model_has_the_ensembles_contract_and_the_composing_settings(
    ensemble: Path,
) -> None:
    folder = fuse_task(ensemble, TASK, PYTHON_MODELS, name="fused_" + TASK)
    fused = read_config(folder)
    public = read_config(ensemble / TASK)
    preprocess = read_config(ensemble / f"{TASK}_preprocess")
    net = read_config(ensemble / f"{TASK}_net")
    assert fused.name == "fused_" + TASK and fused.backend == "python"
    assert list(fused.input) == list(preprocess.input)
    assert [item.name for item in fused.input] == [item.name for item in public.input]
    assert list(fused.output) == list(public.output)
    assert fused.dynamic_batching == preprocess.dynamic_batching
    assert list(fused.instance_group) == list(preprocess.instance_group)
    for source in (public, net):
        for key, value in source.parameters.items():
            assert fused.parameters[key] == value, key
    version = folder / "1"
    assert (version / "model.onnx").read_bytes() == (
        ensemble / f"{TASK}_net" / "1" / "model.onnx"
    ).read_bytes()
    assert (version / "model.py").read_text() == (PYTHON_MODELS / "pipeline.py").read_text()
    assert sorted(p.name for p in (version / "warmup").iterdir()) == sorted(
        p.name for p in (ensemble / f"{TASK}_preprocess" / "1" / "warmup").iterdir()
    )
    assert (ensemble / f"{TASK}_net").is_dir()  # written beside: the ensemble stays


def test_a_fused_build_replaces_the_ensemble_and_is_recorded(tmp_path: Path) -> None:
    out = tmp_path / "repository"
    build_repository(out, [TASK], pipeline="fused")
    # one model per task, and the explanation model beside it (it runs the version itself)
    assert sorted(p.name for p in out.iterdir()) == ["BUILD.json", TASK, f"{TASK}_explain"]
    explain = (out / f"{TASK}_explain" / "config.pbtxt").read_text()
    assert 'key: "versions_model"' in explain and f'string_value: "{TASK}"' in explain
    assert json.loads((out / "BUILD.json").read_text())["pipeline"] == "fused"
    assert is_built(out, [TASK], pipeline="fused")
    assert is_built(out, [TASK])  # fused is the default with the CPU runtimes
    assert not is_built(out, [TASK], pipeline="ensemble")


def test_a_build_from_older_sources_is_stale(
    ensemble: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert is_built(ensemble, [TASK], pipeline="ensemble")
    monkeypatch.setattr(builds, "source_digest", lambda: "another-version")
    assert not is_built(ensemble, [TASK], pipeline="ensemble")


def test_the_fused_pipeline_is_refused_with_a_gpu_runtime(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="fused"):
        build_repository(tmp_path / "r", [TASK], net_runtime="tensorrt", pipeline="fused")
