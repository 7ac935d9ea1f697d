"""Export: reference architectures, weights and checkpoints, ONNX graphs and parity."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from abdoserve.export.architectures import build_network, run_network
from abdoserve.export.errors import (
    CheckpointError,
    CheckpointMismatchError,
    ParityError,
    ReferenceInputError,
)
from abdoserve.export.inputs import FloatArray, example_inputs
from abdoserve.export.onnx_export import ExportResult, check_parity, export_task
from abdoserve.export.reference import TorchReference
from abdoserve.export.weights import REFERENCE_SOURCE, load_network, reference_network, state_sha256
from abdoserve.preprocessing.specs import TaskSpec
from abdoserve.preprocessing.tasks import TASKS

# hospitals still ship TorchScript; the tests make such archives with torch.jit.trace
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")

REPO = Path(__file__).resolve().parents[2]
TASK_NAMES = sorted(TASKS)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ExportResult]:
    root = tmp_path_factory.mktemp("export")
    return {name: export_task(TASKS[name], root / name) for name in TASK_NAMES}


def _torch_outputs(module: nn.Module, spec: TaskSpec, batch: int, seed: int) -> FloatArray:
    samples, features = example_inputs(spec, batch, seed)
    with torch.no_grad():
        result = run_network(
            module.eval(),
            torch.from_numpy(samples),
            None if features is None else torch.from_numpy(features),
        )
    outputs: FloatArray = result.numpy()
    return outputs


def _perturbed(spec: TaskSpec) -> nn.Module:
    """Reference weights scaled by 1 + 0.3 * noise: a stand-in for a trained checkpoint."""
    module = reference_network(spec).module
    generator = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.mul_(1.0 + 0.3 * torch.randn(parameter.shape, generator=generator))
    return module


def _save_traced(module: nn.Module, spec: TaskSpec, path: Path) -> None:
    """A TorchScript archive as a hospital would ship it."""
    samples, features = example_inputs(spec, 2)
    arrays = [samples] if features is None else [samples, features]
    args = tuple(torch.from_numpy(array) for array in arrays)
    torch.jit.trace(module, args).save(str(path))  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_outputs_have_the_spec_width_and_range(name: str) -> None:
    spec = TASKS[name]
    reference = TorchReference(spec)
    samples, features = example_inputs(spec, batch=5, seed=3)
    output = reference(samples, features)
    assert output.shape == (5, spec.output.width) and output.dtype == np.float32
    low, high = spec.output.value_range
    if spec.output.kind == "classification":
        np.testing.assert_allclose(output.sum(axis=1), 1.0, atol=1e-5)
        assert output.min() >= 0.0
    else:
        assert low <= output.min() and output.max() <= high
    # untrained but not degenerate: samples get different answers
    assert float(np.ptp(output, axis=0).max()) > 1e-4


def test_liver_mass_ct_has_the_papers_layers() -> None:
    layers = list(build_network(TASKS["liver_mass_ct"]).modules())
    counts = [sum(isinstance(m, kind) for m in layers) for kind in (nn.Conv2d, nn.MaxPool2d)]
    assert counts == [6, 3]
    assert sum(isinstance(m, nn.Linear) for m in layers) == 3


@pytest.mark.parametrize("name", TASK_NAMES)
def test_reference_weights_are_deterministic(name: str) -> None:
    first, second = reference_network(TASKS[name]), reference_network(TASKS[name])
    assert first.provenance == second.provenance
    assert first.provenance.untrained and first.provenance.source == REFERENCE_SOURCE
    for a, b in zip(
        first.module.state_dict().values(), second.module.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_reference_sha_is_over_float32_little_endian_tensors() -> None:
    loaded = reference_network(TASKS["bone_density_ct"])
    digest = hashlib.sha256()
    for tensor in loaded.module.state_dict().values():
        digest.update(tensor.numpy().astype("<f4").tobytes())
    assert loaded.provenance.weights_sha256 == digest.hexdigest()
    shas = {reference_network(TASKS[name]).provenance.weights_sha256 for name in TASK_NAMES}
    assert len(shas) == len(TASK_NAMES)


def test_reference_sha_is_the_same_in_a_fresh_process() -> None:
    code = (
        "from abdoserve.export.weights import reference_network; "
        "from abdoserve.preprocessing.tasks import TASKS; "
        "print(reference_network(TASKS['liver_mass_ct']).provenance.weights_sha256)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    expected = reference_network(TASKS["liver_mass_ct"]).provenance.weights_sha256
    assert done.stdout.strip() == expected


@pytest.mark.parametrize("name", TASK_NAMES)
def test_onnx_graph_names_and_dims(name: str, exported: dict[str, ExportResult]) -> None:
    spec = TASKS[name]
    graph = onnx.load(str(exported[name].onnx_path)).graph
    dims = {
        value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        for value in [*graph.input, *graph.output]
    }
    expected = {"samples": ["n", *spec.sample_shape], "output": ["n", spec.output.width]}
    if spec.feature_width:
        expected["features"] = ["n", spec.feature_width]
    assert dims == expected
    assert graph.input[0].name == "samples"
    float_type = onnx.TensorProto.FLOAT
    assert all(v.type.tensor_type.elem_type == float_type for v in [*graph.input, *graph.output])


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("name", TASK_NAMES)
def test_onnx_runtime_matches_pytorch(
    name: str, batch: int, exported: dict[str, ExportResult]
) -> None:
    spec = TASKS[name]
    module = reference_network(spec).module
    samples, features = example_inputs(spec, batch, seed=7)
    report = check_parity(module, exported[name].onnx_path, samples, features)
    assert report.batch_size == batch
    assert (
        report.relative_error <= 1e-4 and report.max_abs_error < 1e-4 * spec.output.value_range[1]
    )


def test_parity_check_catches_a_graph_that_disagrees(exported: dict[str, ExportResult]) -> None:
    spec = TASKS["liver_fibrosis_ct"]
    samples, features = example_inputs(spec, 3)
    with pytest.raises(ParityError, match="relative error"):
        check_parity(_perturbed(spec), exported[spec.name].onnx_path, samples, features)


def test_export_writes_provenance_and_logs_the_cost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = TASKS["liver_mass_ct"]
    with caplog.at_level(logging.INFO, logger="abdoserve.export"):
        result = export_task(spec, tmp_path)
    record = json.loads((tmp_path / "provenance.json").read_text())
    assert record["weights_source"] == REFERENCE_SOURCE and record["weights_untrained"] == "true"
    assert record["weights_sha256"] == result.provenance.weights_sha256
    assert record["onnx_sha256"] == hashlib.sha256(result.onnx_path.read_bytes()).hexdigest()
    assert result.provenance.to_parameters() == {
        "weights_source": "reference-untrained",
        "weights_sha256": result.provenance.weights_sha256,
        "weights_untrained": "true",
    }
    expected = f"liver_mass_ct: params={result.parameters}, GFLOPs/sample="
    assert any(expected in message for message in caplog.messages)


def test_costs_stay_within_the_cpu_budget(exported: dict[str, ExportResult]) -> None:
    for result in exported.values():
        assert 5e7 < result.flops_per_sample < 1e9
        assert 1e5 < result.parameters < 1e7


@pytest.mark.parametrize("wrapping", ["plain", "state_dict", "model", "data_parallel"])
def test_state_dict_checkpoint_round_trip(tmp_path: Path, wrapping: str) -> None:
    spec = TASKS["liver_fibrosis_ct"]
    perturbed = _perturbed(spec)
    state = perturbed.state_dict()
    payload = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 40},
        "model": {"model": state},
        "data_parallel": {f"module.{key}": value for key, value in state.items()},
    }[wrapping]
    path = tmp_path / "hospital_fibrosis.pt"
    torch.save(payload, path)
    reference = TorchReference(spec, path)
    samples, features = example_inputs(spec, 4, seed=5)
    output = reference(samples, features)
    np.testing.assert_array_equal(output, _torch_outputs(perturbed, spec, 4, seed=5))
    untrained = TorchReference(spec)(samples, features)
    assert float(np.abs(output - untrained).max()) > 1e-3
    provenance = reference.provenance
    assert provenance.source == "hospital_fibrosis.pt" and not provenance.untrained
    assert provenance.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert provenance.weights_sha256 != state_sha256(state)


def test_checkpoint_exports_with_parity(tmp_path: Path) -> None:
    spec = TASKS["liver_mass_ct"]
    perturbed = _perturbed(spec)
    torch.save(perturbed.state_dict(), tmp_path / "mass.pt")
    result = export_task(spec, tmp_path / "out", tmp_path / "mass.pt")
    assert result.provenance.source == "mass.pt" and result.parity.relative_error <= 1e-4
    record = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert record["weights_source"] == "mass.pt" and record["weights_untrained"] == "false"
    samples, _ = example_inputs(spec, 2, seed=11)
    report = check_parity(perturbed, result.onnx_path, samples, None)
    assert report.relative_error <= 1e-4


def test_torchscript_checkpoint_is_taken_as_is(tmp_path: Path) -> None:
    spec = TASKS["liver_fibrosis_mri"]
    perturbed = _perturbed(spec)
    path = tmp_path / "mri_scripted.pt"
    _save_traced(perturbed, spec, path)
    loaded = load_network(spec, path)
    assert isinstance(loaded.module, torch.jit.ScriptModule)
    assert loaded.provenance.source == "mri_scripted.pt"
    assert loaded.provenance.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    np.testing.assert_allclose(
        _torch_outputs(loaded.module, spec, 3, seed=2),
        _torch_outputs(perturbed, spec, 3, seed=2),
        rtol=0,
        atol=1e-6,
    )
    result = export_task(spec, tmp_path / "out", path)
    assert result.parity.relative_error <= 1e-4


def test_torchscript_with_the_wrong_output_width_is_refused(tmp_path: Path) -> None:
    spec = TASKS["bone_density_ct"]
    wrong = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16, 3))
    path = tmp_path / "wrong.pt"
    _save_traced(wrong, spec, path)
    with pytest.raises(CheckpointMismatchError, match=r"answers \(2, 3\).*needs \(2, 1\)"):
        load_network(spec, path)


def test_wrong_shape_checkpoint_names_the_key(tmp_path: Path) -> None:
    spec = TASKS["liver_mass_ct"]
    state = reference_network(spec).module.state_dict()
    state["trunk.0.weight"] = torch.zeros(32, 1, 3, 3)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch for trunk\.0\.weight"):
        load_network(spec, tmp_path / "bad.pt")


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    spec = TASKS["esophageal_cancer_ct"]
    state = reference_network(spec).module.state_dict()
    state["classifier.weight"] = state.pop("head.2.weight")
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(CheckpointMismatchError) as caught:
        load_network(spec, tmp_path / "renamed.pt")
    assert "missing keys: head.2.weight" in str(caught.value)
    assert "unexpected keys: classifier.weight" in str(caught.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"not a checkpoint at all", "not a PyTorch checkpoint"), (None, "holds no state_dict")],
)
def test_a_file_that_is_no_checkpoint_is_refused(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "odd.pt"
    if content is None:
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_network(TASKS["bone_density_ct"], path)


def test_reference_refuses_misshaped_inputs() -> None:
    spec = TASKS["liver_fibrosis_ct"]
    reference = TorchReference(spec)
    samples, features = example_inputs(spec, 2)
    with pytest.raises(ReferenceInputError, match=r"samples must be \[N, 1, 192, 192\]"):
        reference(samples[:, :, :64, :64], features)
    with pytest.raises(ReferenceInputError, match="needs features"):
        reference(samples, None)
    with pytest.raises(ReferenceInputError, match="2 feature rows for 1 samples"):
        reference(samples[:1], features)


def test_command_line_exports_the_named_task(tmp_path: Path) -> None:
    from abdoserve.export.__main__ import main

    assert main([str(tmp_path), "--task", "liver_mass_ct"]) == 0
    record = json.loads((tmp_path / "liver_mass_ct" / "provenance.json").read_text())
    assert record["task"] == "liver_mass_ct" and record["parity"]["relative_error"] <= 1e-4
