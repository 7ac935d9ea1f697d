"""<task> as one Python model (the fused CPU pipeline): DICOM in, the study's answer out.

The same public contract as the ensemble (inputs DICOM or DICOM_PACKED + DICOM_OFFSETS,
CLINICAL; outputs SCORES, STUDY, ANSWER; the task's published parameters), the same
code at each step: `StudyIntake`, the build's CPU runtime (`open_runner`), then
`study_answer`. What it saves is the two Python-backend hops of the ensemble: the
samples and the network's output no longer cross shared memory between three stub
processes. Every queued request's study is prepared in turn, then all of them run as
one network batch; a request the intake refuses answers alone.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from abdoserve.preprocessing.study import PreparedStudy
from abdoserve.serving import triton_adapter as glue
from abdoserve.serving.answer import ModelIdentity, study_answer
from abdoserve.serving.cpu_runtimes import configured_runner
from abdoserve.serving.drift_metrics import DriftMetrics
from abdoserve.serving.intake import StudyIntake


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        parameters, self.spec = glue.model_spec(pb_utils, args)
        version_folder = Path(args["model_repository"]) / args["model_version"]
        self.runner = configured_runner(self.spec, parameters, version_folder)
        self.identity = ModelIdentity.from_parameters(
            self.spec.name, parameters.get("model_version", "1"), parameters
        )
        self.intake = StudyIntake(pb_utils, self.spec, version_folder)
        self.drift = DriftMetrics(pb_utils, self.spec.name, self.spec.output)
        self.model_name = str(args["model_name"])

    def execute(self, requests: list[Any]) -> list[Any]:
        started = time.perf_counter()
        responses = self.respond_all(requests)
        self.intake.metrics.executed(self.model_name, time.perf_counter() - started)
        return responses

    def respond_all(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        positions, studies = [], []
        for position, request in enumerate(requests):
            try:
                studies.append(self.intake(request)[1])
            except Exception as error:  # this request only
                responses[position] = glue.error_response(pb_utils, error)
                continue
            positions.append(position)
        if studies:
            for position, reply in zip(positions, self.answer(studies), strict=True):
                responses[position] = reply
        return responses

    def answer(self, studies: list[PreparedStudy]) -> list[Any]:
        """Responses for the prepared studies, in order; a failed run fails each of them."""
        features = [study.features for study in studies]
        try:
            outputs = self.runner.run_studies([study.samples for study in studies], features)
        except Exception as error:  # never raised out of execute
            return [glue.error_response(pb_utils, error) for _ in studies]
        return [self.respond(study, output) for study, output in zip(studies, outputs, strict=True)]

    def respond(self, prepared: PreparedStudy, output: np.ndarray) -> Any:
        roles = dict(zip(prepared.roles, prepared.role_sources, strict=True))
        try:
            study, answer = study_answer(
                self.spec, output, prepared.sources.tolist(), self.identity, roles
            )
        except Exception as error:
            return glue.error_response(pb_utils, error)
        self.drift.observe(int(self.identity.version), prepared.profile, study)
        return glue.response(pb_utils, glue.answer_outputs(output, study, answer))

    def finalize(self) -> None:
        self.intake.release()
        self.runner = None  # type: ignore[assignment]
