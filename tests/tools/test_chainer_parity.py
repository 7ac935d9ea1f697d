"""Chainer checkpoints: our numpy importer against Chainer 7.8.1 itself.

Chainer is not a dependency: this test makes its own environment
(build/chainer-env, kept for the next run once complete), where
tests/tools/chainer_twin.py trains, answers and saves Chainer twins of the
reference architectures. The files it writes are imported here, in .venv, and
must answer what Chainer answered.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from abdoserve.export.architectures import PLANS, build_network, run_network
from abdoserve.export.errors import CheckpointMismatchError
from abdoserve.export.inputs import FloatArray, example_inputs
from abdoserve.export.onnx_export import export_task
from abdoserve.export.phantom import build_study
from abdoserve.export.weights import load_network
from abdoserve.preprocessing.specs import TaskSpec
from abdoserve.preprocessing.study import StudyPreparer
from abdoserve.preprocessing.tasks import get_task

REPO = Path(__file__).resolve().parents[2]
TWIN = Path(__file__).with_name("chainer_twin.py")
CHAINER_ENV = REPO / "build" / "chainer-env"
COMPLETE = CHAINER_ENV / "abdoserve-complete.json"
TOLERANCE = 1e-4  # FP32, max abs difference
LAYOUTS = ("model.npz", "snapshot.npz")
SNAPSHOT_PREDICTOR = "updater/model:main/predictor/"

# case -> (task, overrides): one plain CNN with a flatten readout (the paper's 6 conv,
# 3 fc), one with a strided stem, BatchNorm, global average and clinical features, and
# the first at 60 px, where Chainer's cover_all pooling keeps 15 -> 8 (PyTorch: 7)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "liver_mass_ct": ("liver_mass_ct", {}),
    "liver_fibrosis_ct": ("liver_fibrosis_ct", {}),
    "liver_mass_ct_60px": ("liver_mass_ct", {"geometry.matrix": 60}),
}


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    # xdist workers share build/: one makes the environment, the others wait for it
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _make_chainer_env() -> float:
    """A fresh venv with Chainer 7.8.1; the seconds it took."""
    shutil.rmtree(CHAINER_ENV, ignore_errors=True)  # a half-made one from a killed run
    started = time.perf_counter()
    pip = [str(CHAINER_ENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    for command in (
        [sys.executable, "-m", "venv", str(CHAINER_ENV)],
        # chainer 7.8.1 is an sdist whose setup.py needs wheel; numpy 2 breaks it
        [*pip, "wheel", "numpy<2"],
        [*pip, "--no-build-isolation", "chainer==7.8.1"],
    ):
        completed = subprocess.run(
            command, check=False, capture_output=True, text=True, timeout=600
        )
        assert completed.returncode == 0, f"{command}: {completed.stderr[-2000:]}"
    return time.perf_counter() - started


@pytest.fixture(scope="module")
def chainer_python() -> Path:
    with _locked(REPO / "build" / "chainer-env.lock"):
        if not COMPLETE.exists():
            seconds = _make_chainer_env()
            COMPLETE.write_text(json.dumps({"chainer": "7.8.1", "seconds": round(seconds, 1)}))
    print(f"chainer environment: {COMPLETE.read_text()}")
    return CHAINER_ENV / "bin" / "python"


def _plan(spec: TaskSpec) -> dict[str, Any]:
    """The ConvPlan and the spec's shapes, as the twin script reads them."""
    low, high = spec.output.value_range
    return {
        **asdict(PLANS[spec.name]),
        "channels": spec.sample_shape[0],
        "output_width": spec.output.width,
        "output": {"kind": spec.output.kind, "low": low, "high": high},
    }


def _inputs(spec: TaskSpec, seed: int) -> tuple[FloatArray, FloatArray | None]:
    """A phantom study through the real preprocessing, plus random samples of that shape."""
    study = build_study(spec.name, seed=seed)
    prepared = StudyPreparer(spec)(study.instances, study.clinical)
    extra, extra_features = example_inputs(spec, batch=3, seed=seed)
    samples = np.concatenate([prepared.samples, extra]).astype(np.float32)
    if extra_features is None:
        return samples, None
    repeated = np.repeat(prepared.features[None, :], len(prepared.samples), axis=0)
    return samples, np.concatenate([repeated, extra_features]).astype(np.float32)


@pytest.fixture(scope="module")
def chainer_runs(chainer_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per case folder: Chainer's model.npz, snapshot.npz, inputs and outputs."""
    root = tmp_path_factory.mktemp("chainer")
    cases = []
    for seed, (case, (task, overrides)) in enumerate(CASES.items(), start=7):
        spec = get_task(task, overrides)
        samples, features = _inputs(spec, seed)
        np.save(root / f"{case}-samples.npy", samples)
        if features is not None:
            np.save(root / f"{case}-features.npy", features)
        cases.append(
            {
                "plan": _plan(spec),
                "seed": seed,
                "samples": str(root / f"{case}-samples.npy"),
                "features": None if features is None else str(root / f"{case}-features.npy"),
                "out": str(root / case),
            }
        )
    (root / "cases.json").write_text(json.dumps(cases))
    started = time.perf_counter()
    completed = subprocess.run(
        [str(chainer_python), str(TWIN), str(root / "cases.json")],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    print(f"chainer twins: {completed.stdout.strip()} in {time.perf_counter() - started:.1f} s")
    return root


def _answers(module: nn.Module, root: Path, case: str) -> FloatArray:
    features = root / f"{case}-features.npy"
    with torch.no_grad():
        result = run_network(
            module.eval(),
            torch.from_numpy(np.load(root / f"{case}-samples.npy")),
            torch.from_numpy(np.load(features)) if features.exists() else None,
        )
    answers: FloatArray = result.numpy()
    return answers


def _spec(case: str) -> TaskSpec:
    task, overrides = CASES[case]
    return get_task(task, overrides)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(CASES))
def test_chainer_file_answers_as_chainer_did(chainer_runs: Path, case: str, layout: str) -> None:
    path = chainer_runs / case / layout
    loaded = load_network(_spec(case), path)
    assert loaded.provenance.framework == "chainer" and loaded.provenance.source == layout
    assert loaded.provenance.to_parameters()["weights_framework"] == "chainer"
    expected = np.load(chainer_runs / case / "outputs.npy")
    answers = _answers(loaded.module, chainer_runs, case)
    difference = float(np.abs(answers - expected).max())
    print(f"{case} {layout}: max abs difference {difference:.2e} over {expected.shape}")
    assert answers.shape == expected.shape and difference <= TOLERANCE
    # the twins answer differently per sample: the comparison is not of constants
    assert float(np.ptp(expected, axis=0).max()) > 1e-3


def test_the_snapshot_is_a_real_trainer_snapshot(chainer_runs: Path) -> None:
    with np.load(chainer_runs / "liver_fibrosis_ct" / "snapshot.npz") as archive:
        keys = set(archive.files)
    assert SNAPSHOT_PREDICTOR + "bn3/avg_var" in keys
    assert any(key.startswith("updater/optimizer:main/") for key in keys)
    assert any(not key.startswith("updater/") for key in keys)  # the trainer's own entries


def test_pytorch_batchnorm_eps_would_miss_parity(chainer_runs: Path) -> None:
    # the twin has channels with a variance near eps: 1e-5 instead of 2e-5 shows
    loaded = load_network(
        _spec("liver_fibrosis_ct"), chainer_runs / "liver_fibrosis_ct" / "model.npz"
    )
    for layer in loaded.module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            assert layer.eps == 2e-5
            layer.eps = 1e-5
    expected = np.load(chainer_runs / "liver_fibrosis_ct" / "outputs.npy")
    answers = _answers(loaded.module, chainer_runs, "liver_fibrosis_ct")
    difference = float(np.abs(answers - expected).max())
    print(f"liver_fibrosis_ct with PyTorch's eps: max abs difference {difference:.2e}")
    assert difference > 10 * TOLERANCE


def test_cover_all_pooling_widens_the_flatten_readout(chainer_runs: Path) -> None:
    with np.load(chainer_runs / "liver_mass_ct_60px" / "model.npz") as archive:
        chainer_width = archive["predictor/fc1/W"].shape[1]
    # PyTorch's default floor pooling would make fc1 narrower: the file would not fit
    pytorch_default = build_network(_spec("liver_mass_ct_60px")).state_dict()["head.0.weight"]
    assert (chainer_width, pytorch_default.shape[1]) == (128 * 8 * 8, 128 * 7 * 7)


@pytest.mark.parametrize("case", ["liver_fibrosis_ct", "liver_mass_ct_60px"])
def test_a_chainer_checkpoint_exports_with_parity(
    chainer_runs: Path, tmp_path: Path, case: str
) -> None:
    # the ONNX graph keeps eps 2e-5 and ceil_mode pooling: ONNX Runtime agrees with PyTorch
    result = export_task(_spec(case), tmp_path, chainer_runs / case / "snapshot.npz")
    assert result.parity.relative_error <= TOLERANCE
    record = json.loads((tmp_path / "provenance.json").read_text())
    assert record["weights_framework"] == "chainer" and record["weights_source"] == "snapshot.npz"


def _edited(source: Path, target: Path, edit: dict[str, np.ndarray | None]) -> Path:
    """A copy of an npz with keys replaced (None: removed), written by numpy alone."""
    with np.load(source) as archive:
        arrays = {key: archive[key] for key in archive.files}
    for key, value in edit.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    np.savez(target, **arrays)
    return target


def test_a_renamed_layer_is_refused_by_name(chainer_runs: Path, tmp_path: Path) -> None:
    source = chainer_runs / "liver_fibrosis_ct" / "snapshot.npz"
    with np.load(source) as archive:
        gamma = archive[SNAPSHOT_PREDICTOR + "bn3/gamma"]
    edit = {SNAPSHOT_PREDICTOR + "bn3/gamma": None, SNAPSHOT_PREDICTOR + "bn3/scale": gamma}
    path = _edited(source, tmp_path / "renamed.npz", edit)
    with pytest.raises(CheckpointMismatchError) as raised:
        load_network(_spec("liver_fibrosis_ct"), path)
    message = str(raised.value)
    assert f"missing {SNAPSHOT_PREDICTOR}bn3/gamma" in message
    assert f"unexpected {SNAPSHOT_PREDICTOR}bn3/scale" in message


def test_a_misshaped_layer_is_refused_by_name(chainer_runs: Path, tmp_path: Path) -> None:
    source = chainer_runs / "liver_mass_ct" / "snapshot.npz"
    wrong = np.zeros((64, 32, 5, 5), np.float32)
    path = _edited(source, tmp_path / "misshaped.npz", {SNAPSHOT_PREDICTOR + "conv3/W": wrong})
    with pytest.raises(CheckpointMismatchError) as raised:
        load_network(_spec("liver_mass_ct"), path)
    expected = f"{SNAPSHOT_PREDICTOR}conv3/W: expected (64, 32, 3, 3), got (64, 32, 5, 5)"
    assert expected in str(raised.value)
