"""<task>_postprocess: per-sample network outputs -> the study-level answer.

Glue only: the work is `abdoserve.serving.answer.study_answer`. Model identity and
weights provenance come from this model's config parameters, written there by
the repository build from the exported weights.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from abdoserve.preprocessing.tasks import get_task
from abdoserve.serving import triton_adapter as glue
from abdoserve.serving.answer import ModelIdentity, study_answer


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        glue.route_logging(pb_utils)
        parameters = glue.model_parameters(json.loads(args["model_config"]))
        overrides = json.loads(parameters.get("spec_overrides") or "{}")
        self.spec = get_task(parameters["task"], overrides)
        self.identity = ModelIdentity.from_parameters(
            self.spec.name, parameters.get("model_version", "1"), parameters
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self.handle(request) for request in requests]

    def handle(self, request: Any) -> Any:
        try:
            output = glue.single_study(glue.require_input(pb_utils, request, "OUTPUT"), "OUTPUT")
            sources = glue.single_study(
                glue.require_input(pb_utils, request, "SAMPLE_SOURCE"), "SAMPLE_SOURCE"
            )
            info = glue.json_object(
                glue.single_study(
                    glue.require_input(pb_utils, request, "STUDY_INFO"), "STUDY_INFO"
                ),
                "STUDY_INFO",
            )
            study, answer = study_answer(
                self.spec, output, sources.tolist(), self.identity, info.get("roles")
            )
        except Exception as error:
            return glue.error_response(pb_utils, error)
        return glue.response(
            pb_utils,
            {
                "SCORES": output[None, ...].astype(np.float32),
                "STUDY": study[None, ...],
                "ANSWER": glue.json_tensor(answer),
            },
        )
