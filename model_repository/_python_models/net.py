"""<task>_net on the embedded CPU server: a CPU runtime inside the Python backend.

Glue only. The runtime (ONNX Runtime FP32 by default; OpenVINO, or INT8 where the
hospital opted in) is the one the build recorded in this model's `runtime` parameter
(`abdoserve.serving.cpu_runtimes`). Every queued request's samples run as one batch
(the dynamic batcher may hand several studies at once). Any client can call this model
directly, so each request's tensors are checked against the task spec first
(`abdoserve.serving.validation`). On a GPU server this model's folder is replaced by
a TensorRT plan or the ONNX Runtime backend; the ensemble and the other models stay
the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from abdoserve.serving import triton_adapter as glue
from abdoserve.serving import validation
from abdoserve.serving.cpu_runtimes import configured_runner


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        parameters, self.spec = glue.model_spec(pb_utils, args)
        version_folder = Path(args["model_repository"]) / args["model_version"]
        self.runner = configured_runner(self.spec, parameters, version_folder)

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
            for position, reply in zip(positions, self.run(samples, features), strict=True):
                responses[position] = reply
        return responses

    def run(self, samples: list[np.ndarray], features: list[np.ndarray]) -> list[Any]:
        """Responses for the checked studies, in order; a failed run fails each of them."""
        try:
            outputs = self.runner.run_studies(samples, features)
        except Exception as error:  # never raised out of execute
            return [glue.error_response(pb_utils, error) for _ in samples]
        return [glue.response(pb_utils, {"OUTPUT": output[None, ...]}) for output in outputs]

    def read(self, request: Any) -> tuple[np.ndarray, np.ndarray]:
        """One study's SAMPLES and FEATURES, checked as the preprocess would have made them."""
        samples = glue.single_study(glue.require_input(pb_utils, request, "SAMPLES"), "SAMPLES")
        validation.check_samples(self.spec, samples)
        if not self.spec.feature_width:
            return samples, np.zeros(0, dtype=np.float32)
        features = glue.single_study(glue.require_input(pb_utils, request, "FEATURES"), "FEATURES")
        validation.check_features(self.spec, features)
        return samples, features
