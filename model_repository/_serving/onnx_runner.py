"""The ONNX Runtime runner of the served `_net` model and of the in-process benchmarks.

One place builds the session and runs a batch of studies, so the benchmark measures
exactly what the server runs: every study's samples joined into one batch, run in
chunks of at most `max_samples` rows, then split back per study.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from abdoserve.serving import batching


class OnnxRunner:
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

    def run_studies(
        self, samples: Sequence[np.ndarray], features: Sequence[np.ndarray] | None
    ) -> list[np.ndarray]:
        """One output array per study, in order; `features` only where the graph takes them."""
        study_features = list(features) if self.with_features and features is not None else None
        batch = batching.join(list(samples), study_features)
        results = []
        for rows in batching.chunks(batch.samples.shape[0], self.max_samples):
            feeds = {"samples": batch.samples[rows]}
            if batch.features is not None:
                feeds["features"] = batch.features[rows]
            results.append(self.session.run(["output"], feeds, self.run_options)[0])
        return batching.split(np.concatenate(results, axis=0), batch.counts)
