"""The CPU runtimes a `_net` Python model can run, chosen when the repository is built.

ONNX Runtime FP32 is the default. A hospital without a GPU may opt in to OpenVINO
FP32, or to INT8 (ONNX Runtime static QDQ, or OpenVINO after NNCF), whose
deviation from the FP32 network the build measures and every answer carries.
Each runtime reads one file in the `_net` version folder, beside the exported
`model.onnx` (which every build keeps: it is the FP32 graph the others come from).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from abdoserve.preprocessing.specs import TaskSpec
from abdoserve.serving.study_runner import StudyRunner
from abdoserve_client import model_identity

Engine = Literal["onnxruntime", "openvino"]
Precision = Literal["fp32", "int8", "fp16"]

# Config parameters (of `_net`, `_postprocess` and the ensemble) that name what runs
# the network; the answer's provenance repeats them. Named where the model identity that
# reads them lives (the client distribution), re-exported for the build.
RUNTIME_PARAMETER = model_identity.RUNTIME_PARAMETER
PRECISION_PARAMETER = model_identity.PRECISION_PARAMETER
DEVIATION_PARAMETER = model_identity.DEVIATION_PARAMETER  # JSON: measured vs FP32 PyTorch


@dataclass(frozen=True)
class CpuRuntime:
    name: str  # the build option and the `runtime` config parameter
    engine: Engine
    precision: Precision
    model_file: str  # in the `_net` version folder

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_CPU_RUNTIME


DEFAULT_CPU_RUNTIME = "onnxruntime"
CPU_RUNTIMES = {
    runtime.name: runtime
    for runtime in (
        CpuRuntime("onnxruntime", "onnxruntime", "fp32", "model.onnx"),
        CpuRuntime("onnxruntime-int8", "onnxruntime", "int8", "model.int8.onnx"),
        CpuRuntime("openvino", "openvino", "fp32", "model.xml"),
        CpuRuntime("openvino-int8", "openvino", "int8", "model.int8.xml"),
    )
}


def cpu_runtime(name: str) -> CpuRuntime:
    """The runtime called `name`; a name the build never writes fails the model's load."""
    try:
        return CPU_RUNTIMES[name]
    except KeyError:
        raise ValueError(
            f"unknown CPU runtime {name!r}; known: {', '.join(CPU_RUNTIMES)}"
        ) from None


def open_runner(
    runtime: CpuRuntime, version_folder: Path, *, intra_op_threads: int, max_samples: int
) -> StudyRunner:
    """The runtime's runner over its file in `version_folder` (engines load lazily)."""
    path = version_folder / runtime.model_file
    if runtime.engine == "openvino":
        from abdoserve.serving.openvino_runner import OpenVinoRunner

        return OpenVinoRunner(path, intra_op_threads=intra_op_threads, max_samples=max_samples)
    from abdoserve.serving.onnx_runner import OnnxRunner

    return OnnxRunner(path, intra_op_threads=intra_op_threads, max_samples=max_samples)


def configured_runner(
    spec: TaskSpec, parameters: Mapping[str, str], version_folder: Path
) -> StudyRunner:
    """The runner a `_net` or fused model's config parameters name (runtime, threads, rows
    per run); a graph whose inputs disagree with the spec fails the load, not a patient."""
    runner = open_runner(
        cpu_runtime(parameters.get(RUNTIME_PARAMETER, DEFAULT_CPU_RUNTIME)),
        version_folder,
        intra_op_threads=int(parameters.get("intra_op_threads", "0")),
        max_samples=int(parameters.get("max_samples_per_run", "64")),
    )
    if runner.with_features != bool(spec.feature_width):
        raise ValueError(f"{spec.name}: the ONNX graph's inputs disagree with the spec")
    return runner
