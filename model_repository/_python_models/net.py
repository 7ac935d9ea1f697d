"""<task>_net on the embedded CPU server: ONNX Runtime inside the Python backend.

Glue only. Every queued request's samples run as one ONNX Runtime batch (the
dynamic batcher may hand several studies at once). On a GPU server this model's
folder is replaced by a TensorRT plan or the ONNX Runtime backend; the ensemble
and the other models stay the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from abdoserve.serving import triton_adapter as glue
from abdoserve.serving.onnx_runner import OnnxRunner


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        glue.route_logging(pb_utils)
        parameters = glue.model_parameters(json.loads(args["model_config"]))
        self.runner = OnnxRunner(
            Path(args["model_repository"]) / args["model_version"] / "model.onnx",
            intra_op_threads=int(parameters.get("intra_op_threads", "0")),
            max_samples=int(parameters.get("max_samples_per_run", "64")),
        )

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
            outputs = self.runner.run_studies(samples, features)
            for position, output in zip(positions, outputs, strict=True):
                responses[position] = glue.response(pb_utils, {"OUTPUT": output[None, ...]})
        return responses

    def read(self, request: Any) -> tuple[np.ndarray, np.ndarray]:
        samples = glue.single_study(glue.require_input(pb_utils, request, "SAMPLES"), "SAMPLES")
        if not self.runner.with_features:
            return samples, np.zeros(0, dtype=np.float32)
        features = glue.single_study(glue.require_input(pb_utils, request, "FEATURES"), "FEATURES")
        return samples, features
