"""<task>_postprocess: per-sample network outputs -> the study-level answer.

Glue only: the work is `abdoserve.serving.answer.study_answer`. Model identity and
weights provenance come from this model's config parameters, written there by
the repository build from the exported weights. Any client can call this model
directly, so its inputs are checked against the task spec first
(`abdoserve.serving.validation`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from abdoserve.serving import triton_adapter as glue
from abdoserve.serving import validation
from abdoserve.serving.answer import ModelIdentity, study_answer


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        parameters, self.spec = glue.model_spec(pb_utils, args)
        self.identity = ModelIdentity.from_parameters(
            self.spec.name, parameters.get("model_version", "1"), parameters
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self.handle(request) for request in requests]

    def handle(self, request: Any) -> Any:
        try:
            output, sources, info = self.read(request)
            study, answer = study_answer(
                self.spec, output, sources.tolist(), self.identity, info.roles
            )
        except Exception as error:
            return glue.error_response(pb_utils, error)
        return glue.response(pb_utils, glue.answer_outputs(output, study, answer))

    def read(self, request: Any) -> tuple[np.ndarray, np.ndarray, validation.StudyInfo]:
        """One study's OUTPUT, SAMPLE_SOURCE and STUDY_INFO, checked against each other."""
        output = glue.single_study(glue.require_input(pb_utils, request, "OUTPUT"), "OUTPUT")
        validation.check_output(self.spec, output)
        info = validation.study_info(
            self.spec,
            glue.single_study(glue.require_input(pb_utils, request, "STUDY_INFO"), "STUDY_INFO"),
        )
        sources = glue.single_study(
            glue.require_input(pb_utils, request, "SAMPLE_SOURCE"), "SAMPLE_SOURCE"
        )
        validation.check_sample_source(sources, output.shape[0], info.instances)
        return output, sources, info
