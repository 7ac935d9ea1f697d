"""The GPU `_net` variants: same tensor contract as the CPU net, numerically the same network."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from abdoserve.export.configs import Tuning, net_config
from abdoserve.export.gpu_net import (
    PLATFORMS,
    engine_script,
    export_study_batched,
    gpu_net_config,
    study_batched_error,
)
from abdoserve.export.weights import load_network
from abdoserve.preprocessing.tasks import TASKS

PROVENANCE = {
    "weights_source": "reference-untrained",
    "weights_sha256": "0" * 64,
    "weights_untrained": "true",
}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_study_batched_graph_equals_pytorch(task: str, tmp_path: Path) -> None:
    spec = TASKS[task]
    network = load_network(spec).module
    path = tmp_path / "model.onnx"
    export_study_batched(spec, network, path)
    assert study_batched_error(spec, network, path) <= 1e-4
    graph = onnx.load(str(path)).graph
    expected_inputs = ["SAMPLES", "FEATURES"] if spec.feature_width else ["SAMPLES"]
    assert [item.name for item in graph.input] == expected_inputs
    assert [item.name for item in graph.output] == ["OUTPUT"]
    samples_dims = [dim.dim_value or -1 for dim in graph.input[0].type.tensor_type.shape.dim]
    assert samples_dims == [-1, -1, *spec.sample_shape]
    output_dims = [dim.dim_value or -1 for dim in graph.output[0].type.tensor_type.shape.dim]
    assert output_dims == [-1, -1, spec.output.width]  # as the config: Triton compares them


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("runtime", ["onnxruntime", "tensorrt"])
def test_gpu_net_keeps_the_cpu_net_tensor_contract(task: str, runtime: str) -> None:
    spec = TASKS[task]
    cpu = net_config(spec, Tuning(), PROVENANCE)
    gpu = gpu_net_config(spec, runtime, PROVENANCE)  # type: ignore[arg-type]
    assert gpu.platform == PLATFORMS[runtime] and not gpu.backend
    assert gpu.name == cpu.name and gpu.max_batch_size == cpu.max_batch_size
    signature = [(item.name, item.data_type, list(item.dims)) for item in cpu.input]
    assert [(item.name, item.data_type, list(item.dims)) for item in gpu.input] == signature
    assert [(o.name, list(o.dims)) for o in gpu.output] == [
        (o.name, list(o.dims)) for o in cpu.output
    ]
    assert gpu.instance_group[0].kind == gpu.instance_group[0].Kind.KIND_GPU
    assert gpu.parameters["weights_sha256"].string_value == "0" * 64


def test_engine_script_profiles_cover_the_task_limits() -> None:
    spec = TASKS["esophageal_cancer_ct"]
    script = engine_script(spec)
    assert "--minShapes=SAMPLES:1x1x1x192x192" in script
    assert "--maxShapes=SAMPLES:8x128x1x192x192" in script
    mri = engine_script(TASKS["liver_fibrosis_mri"])
    assert "FEATURES:8x5" in mri


def test_a_gpu_build_is_not_taken_for_the_embedded_server(tmp_path: Path) -> None:
    from abdoserve.export.repository import build_repository, is_built

    out = tmp_path / "repository"
    build_repository(out, ["bone_density_ct"], net_runtime="onnxruntime")
    assert is_built(out, ["bone_density_ct"], net_runtime="onnxruntime")
    assert not is_built(out, ["bone_density_ct"])  # `abdoserve serve` rebuilds for the CPU
    assert not (out / "bone_density_ct_net" / "1" / "model.py").exists()
    assert (out / "bone_density_ct_preprocess" / "1" / "model.py").is_file()
