"""The OpenVINO runner of the served `_net` model and of the in-process benchmarks.

It runs an OpenVINO IR the build wrote beside `model.onnx`: FP32 (`model.xml`) or
NNCF's INT8 quantization (`model.int8.xml`). The batching of studies is
`StudyRunner`'s, as for ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from abdoserve.serving.study_runner import StudyRunner


def compile_options(intra_op_threads: int) -> dict[str, object]:
    """Latency-oriented CPU settings, as for the ONNX Runtime session."""
    options: dict[str, object] = {
        # One request at a time per model instance: one stream, every thread on it.
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        # FP32 stays FP32 where the CPU has bf16 (which OpenVINO would otherwise pick):
        # the FP32 runtime is held to PyTorch within 1e-4.
        "INFERENCE_PRECISION_HINT": "f32",
        # The stubs and the server share the cores: threads pinned to cores could not
        # move off one the preprocess stub needs.
        "ENABLE_CPU_PINNING": False,
    }
    if intra_op_threads > 0:  # 0: OpenVINO's own choice, as for ONNX Runtime
        options["INFERENCE_NUM_THREADS"] = intra_op_threads
    return options


class OpenVinoRunner(StudyRunner):
    """An OpenVINO CPU compiled model over a `_net` IR (inputs `samples`[, `features`])."""

    def __init__(
        self,
        path: Path | str,
        *,
        intra_op_threads: int,
        max_samples: int,
        options: Mapping[str, object] | None = None,
    ) -> None:
        """`options` replaces `compile_options` (the benchmark compares settings)."""
        import openvino as ov

        chosen = compile_options(intra_op_threads) if options is None else dict(options)
        self.compiled = ov.Core().compile_model(str(path), "CPU", chosen)
        names = {name for port in self.compiled.inputs for name in port.get_names()}
        self.with_features = "features" in names
        self.max_samples = max_samples
        self.output = self.compiled.output("output")
        # A model instance runs one batch at a time: one infer request, reused.
        self.request = self.compiled.create_infer_request()

    def run_rows(self, samples: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        feeds = {"samples": samples}
        if features is not None:
            feeds["features"] = features
        # share_inputs: no copy of the chunk; the outputs are copied out of the request.
        result = self.request.infer(feeds, share_inputs=True)
        return np.array(result[self.output], dtype=np.float32)
