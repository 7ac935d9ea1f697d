"""<task>_net on the embedded CPU server: ONNX Runtime inside the Python backend.

Glue only. Every queued request's samples run as one ONNX Runtime batch (the
dynamic batcher may hand several studies at once). On a GPU server this model's
folder is replaced by a TensorRT plan or the ONNX Runtime backend; the ensemble
and the other models stay the same.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from preprocessing import batching
from preprocessing import triton_adapter as glue


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        glue.route_logging(pb_utils)
        config = json.loads(args["model_config"])
        parameters = glue.model_parameters(config)
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_threads", "0"))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # No busy-waiting between runs: the stubs and the server share the cores, and
        # spinning intra-op threads burned ~10 ms of CPU per study that preprocessing needed.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.with_features = "features" in {item.name for item in self.session.get_inputs()}
        self.max_samples = int(parameters.get("max_samples_per_run", "64"))

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        positions, samples, features = [], [], []
        for position, request in enumerate(requests):
            try:
                study_samples, study_features = self.read(request)
            except Exception as error:  # this request only
                responses[position] = glue.error_response(pb_utils, error)
                continue
            positions.append(position)
            samples.append(study_samples)
            features.append(study_features)
        if positions:
            outputs = self.run(samples, features if self.with_features else None)
            for position, output in zip(positions, outputs, strict=True):
                responses[position] = glue.response(pb_utils, {"OUTPUT": output[None, ...]})
        return responses

    def read(self, request: Any) -> tuple[np.ndarray, np.ndarray]:
        samples = glue.single_study(glue.require_input(pb_utils, request, "SAMPLES"), "SAMPLES")
        if not self.with_features:
            return samples, np.zeros(0, dtype=np.float32)
        features = glue.single_study(glue.require_input(pb_utils, request, "FEATURES"), "FEATURES")
        return samples, features

    def run(self, samples: list[np.ndarray], features: list[np.ndarray] | None) -> list[np.ndarray]:
        batch = batching.join(samples, features)
        results = []
        for rows in batching.chunks(batch.samples.shape[0], self.max_samples):
            feeds = {"samples": batch.samples[rows]}
            if batch.features is not None:
                feeds["features"] = batch.features[rows]
            results.append(self.session.run(["output"], feeds)[0])
        return batching.split(np.concatenate(results, axis=0), batch.counts)
