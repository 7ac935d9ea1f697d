"""<task>_preprocess: DICOM bytes + clinical JSON -> network samples (Python backend, CPU).

Glue only: the work is `abdoserve.serving.intake.StudyIntake` (the DICOM as BYTES
`DICOM` or packed `DICOM_PACKED` + `DICOM_OFFSETS`, CLINICAL, then `StudyPreparer`).
Shared by all five tasks; the task comes from the config parameter "task". It takes the
ensemble's own inputs, so a direct call is checked exactly as one through the ensemble:
tensor dtype and rank here, CLINICAL (the ROI included) by the intake.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

from abdoserve.serving import triton_adapter as glue
from abdoserve.serving.intake import StudyIntake
from abdoserve.serving.metric_writer import MetricsOffPath, MetricWriter


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        _, self.spec = glue.model_spec(pb_utils, args)
        version_folder = Path(args["model_repository"]) / args["model_version"]
        # Metric updates are stub-to-server round trips: made after the response goes.
        self.metrics_writer = MetricWriter()
        measured = MetricsOffPath(pb_utils, self.metrics_writer)
        self.intake = StudyIntake(measured, self.spec, version_folder)
        self.model_name = str(args["model_name"])

    def execute(self, requests: list[Any]) -> list[Any]:
        started = time.perf_counter()
        responses = [self.handle(request) for request in requests]
        self.intake.metrics.executed(self.model_name, time.perf_counter() - started)
        return responses

    def handle(self, request: Any) -> Any:
        try:
            instances, prepared = self.intake(request)
        except Exception as error:  # every failure answers this request only
            return glue.error_response(pb_utils, error)
        outputs = {
            "SAMPLES": prepared.samples[None, ...],
            "SAMPLE_SOURCE": prepared.sources[None, ...],
            "STUDY_INFO": glue.json_tensor(
                {
                    "roles": dict(zip(prepared.roles, prepared.role_sources, strict=True)),
                    "instances": instances,
                    "key": prepared.study_key,
                    "profile": prepared.profile.to_json(),
                }
            ),
        }
        if self.spec.feature_width:
            outputs["FEATURES"] = prepared.features[None, ...]
        return glue.response(pb_utils, outputs)

    def finalize(self) -> None:
        self.metrics_writer.close()
        self.intake.release()
