"""The ONNX Runtime runner of the served `_net` model and of the in-process benchmarks.

It runs any `_net` ONNX graph: the exported FP32 `model.onnx` or its INT8 QDQ
quantization (`model.int8.onnx`). The batching of studies is `StudyRunner`'s, so
the benchmark measures exactly what the server runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from abdoserve.serving.study_runner import StudyRunner


class OnnxRunner(StudyRunner):
    """A CPU ONNX Runtime session over a `_net` graph (inputs `samples`[, `features`])."""

    def __init__(self, path: Path | str, *, intra_op_threads: int, max_samples: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # No busy-waiting between runs: the stubs and the server share the cores, and
        # spinning intra-op threads burned ~10 ms of CPU per study that preprocessing needed.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.with_features = "features" in {item.name for item in self.session.get_inputs()}
        self.max_samples = max_samples
        # The arena would keep the largest chunk's activations for good; shrinking it after
        # each run returns them at no measurable cost (without an arena: 25 % slower).
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def run_rows(self, samples: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        feeds = {"samples": samples}
        if features is not None:
            feeds["features"] = features
        return np.asarray(self.session.run(["output"], feeds, self.run_options)[0])
