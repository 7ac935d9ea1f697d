"""The `<task>_net` model for GPU servers: ONNX Runtime backend or a TensorRT plan.

Only this model changes between the embedded CPU server and a GPU server; the
ensemble, preprocess and postprocess models stay byte for byte the same. The
ensemble hands the net one study per request, SAMPLES [1, n, C, H, W] and
FEATURES [1, F]; Triton's dynamic batcher stacks requests into [b, n, ...]. The
network itself reads samples [N, C, H, W], so the GPU graph is the network
wrapped to fold the study axis into its batch and back:

    SAMPLES [b, n, C, H, W], FEATURES [b, F]  ->  OUTPUT [b, n, K]

The batcher only stacks requests whose n agree (SAMPLES is not ragged here);
requests with other n run in the next batch. TensorRT plans are built from this
ONNX on the GPU host (`deploy/gpu/build-engines.sh`), since a plan is specific
to the GPU and TensorRT version that built it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import onnx
import torch
from torch import Tensor, nn
from tritonclient.grpc import model_config_pb2 as mc

from abdoserve.export.architectures import run_network
from abdoserve.export.configs import MAX_BATCH_SIZE, Tuning, net_config
from abdoserve.export.onnx_export import OPSET
from abdoserve.preprocessing.specs import TaskSpec

GpuRuntime = Literal["onnxruntime", "tensorrt"]
PLATFORMS: dict[str, str] = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
FILENAMES: dict[str, str] = {"onnxruntime": "model.onnx", "tensorrt": "model.plan"}


class StudyBatched(nn.Module):
    """[b, n, C, H, W] (+ [b, F]) -> [b, n, K] around a per-sample network."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, samples: Tensor, features: Tensor | None = None) -> Tensor:
        batch, count = samples.shape[0], samples.shape[1]
        flat = samples.flatten(0, 1)
        flat_features = None
        if features is not None:
            width = features.shape[-1]
            flat_features = features.unsqueeze(1).expand(batch, count, width).reshape(-1, width)
        output = run_network(self.network, flat, flat_features)
        return output.reshape(batch, count, -1)


def export_study_batched(spec: TaskSpec, network: nn.Module, path: Path) -> None:
    """ONNX with Triton's own tensor names, so the GPU backends need no name mapping."""
    wrapper = StudyBatched(network).eval()
    generator = torch.Generator().manual_seed(0)
    samples = torch.rand((2, 3, *spec.sample_shape), generator=generator)
    args: tuple[Tensor, ...] = (samples,)
    names = ["SAMPLES"]
    if spec.feature_width:
        args = (samples, torch.rand((2, spec.feature_width), generator=generator))
        names.append("FEATURES")
    axes = {name: {0: "batch"} for name in names}
    axes["SAMPLES"][1] = "samples"
    axes["OUTPUT"] = {0: "batch", 1: "samples"}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", "The feature will be removed", module=r"torch\.onnx\.")
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=names,
            output_names=["OUTPUT"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    model = onnx.load(str(path))
    # Triton's ONNX Runtime backend refuses a graph whose OUTPUT dims differ from the
    # config's [-1, -1, K] (seen on 2.51), and the traced reshape leaves K unknown.
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_value = spec.output.width
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def gpu_net_config(
    spec: TaskSpec, runtime: GpuRuntime, provenance: dict[str, str], tuning: Tuning | None = None
) -> mc.ModelConfig:
    """The net config of the CPU server, re-pointed at a GPU backend; same tensor names."""
    config = net_config(spec, tuning or Tuning(), provenance)
    config.ClearField("backend")
    config.platform = PLATFORMS[runtime]
    config.default_model_filename = FILENAMES[runtime]
    config.max_batch_size = MAX_BATCH_SIZE
    for item in config.input:
        item.allow_ragged_batch = False  # stacked batches need equal sample counts
    del config.instance_group[:]
    config.instance_group.add(
        kind=mc.ModelInstanceGroup.Kind.KIND_GPU, count=tuning.net_instances if tuning else 1
    )
    for key in ("intra_op_threads", "max_samples_per_run"):
        del config.parameters[key]
    return config


def study_batched_error(spec: TaskSpec, network: nn.Module, path: Path) -> float:
    """Relative error of the exported study-batched graph (ONNX Runtime, CPU) vs PyTorch."""
    import numpy as np
    import onnxruntime

    generator = torch.Generator().manual_seed(1)
    samples = torch.rand((3, 4, *spec.sample_shape), generator=generator)
    feeds = {"SAMPLES": samples.numpy()}
    features = None
    if spec.feature_width:
        features = torch.rand((3, spec.feature_width), generator=generator)
        feeds["FEATURES"] = features.numpy()
    with torch.no_grad():
        expected = StudyBatched(network).eval()(samples, features).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    served = session.run(["OUTPUT"], feeds)[0]
    scale = max(float(np.max(np.abs(expected))), 1e-6)
    return float(np.max(np.abs(served - expected))) / scale


def engine_script(spec: TaskSpec) -> str:
    """A trtexec command for this net's plan, with shape profiles covering the spec's limits."""
    channels, rows, columns = spec.sample_shape
    sample = f"{channels}x{rows}x{columns}"
    typical = min(max(spec.images.max_images, 1), 16) if spec.images.stacking == "samples" else 1
    most = spec.images.max_images if spec.images.stacking == "samples" else 1

    def shapes(batch: int, count: int) -> str:
        items = [f"SAMPLES:{batch}x{count}x{sample}"]
        if spec.feature_width:
            items.append(f"FEATURES:{batch}x{spec.feature_width}")
        return ",".join(items)

    return (
        "#!/usr/bin/env bash\n"
        "# Builds model.plan from model.onnx on the GPU host (TensorRT plans are specific\n"
        "# to the GPU and TensorRT version). Run inside the NGC tritonserver container.\n"
        "set -euo pipefail\n"
        'cd "$(dirname "$0")/1"\n'
        f"trtexec --onnx=model.onnx --saveEngine=model.plan --fp16 \\\n"
        f"  --minShapes={shapes(1, 1)} \\\n"
        f"  --optShapes={shapes(MAX_BATCH_SIZE // 2, typical)} \\\n"
        f"  --maxShapes={shapes(MAX_BATCH_SIZE, most)}\n"
    )
