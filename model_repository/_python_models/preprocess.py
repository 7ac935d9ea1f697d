"""<task>_preprocess: DICOM bytes + clinical JSON -> network samples (Python backend, CPU).

Glue only: the work is `preprocessing.study.StudyPreparer`. Shared by all five
tasks; the task comes from the config parameter "task".
"""

from __future__ import annotations

import json
import time
from typing import Any

import triton_python_backend_utils as pb_utils

from preprocessing import triton_adapter as glue
from preprocessing.metrics import IntakeMetrics
from preprocessing.phantom import build_study
from preprocessing.study import StudyPreparer
from preprocessing.tasks import get_task


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        glue.route_logging(pb_utils)
        parameters = glue.model_parameters(json.loads(args["model_config"]))
        overrides = json.loads(parameters.get("spec_overrides") or "{}")
        # An invalid spec or override fails the model load, not the first patient.
        self.spec = get_task(parameters["task"], overrides)
        self.prepare = StudyPreparer(self.spec)
        self.warm_up()
        # After warm-up: the metrics count patients' requests only.
        self.metrics = IntakeMetrics(pb_utils, self.spec.name)

    def warm_up(self) -> None:
        """Decode and prepare a real (phantom) DICOM study once before serving."""
        study = build_study(self.spec.name, seed=0)
        self.prepare(study.instances, study.clinical)

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self.handle(request) for request in requests]

    def handle(self, request: Any) -> Any:
        started = time.perf_counter()
        try:
            instances = glue.bytes_elements(
                glue.single_study(glue.require_input(pb_utils, request, "DICOM"), "DICOM")
            )
            self.metrics.received(len(instances), sum(len(item) for item in instances))
            clinical_array = glue.require_input(pb_utils, request, "CLINICAL")
            clinical = glue.json_object(glue.single_study(clinical_array, "CLINICAL"), "CLINICAL")
            prepared = self.prepare(instances, clinical)
        except Exception as error:  # every failure answers this request only
            self.metrics.rejected(error)
            return glue.error_response(pb_utils, error)
        self.metrics.prepared(prepared.stage_seconds, time.perf_counter() - started)
        outputs = {
            "SAMPLES": prepared.samples[None, ...],
            "SAMPLE_SOURCE": prepared.sources[None, ...],
            "STUDY_INFO": glue.json_tensor(
                {
                    "roles": dict(zip(prepared.roles, prepared.role_sources, strict=True)),
                    "instances": len(instances),
                }
            ),
        }
        if self.spec.feature_width:
            outputs["FEATURES"] = prepared.features[None, ...]
        return glue.response(pb_utils, outputs)

    def finalize(self) -> None:
        self.prepare = None  # type: ignore[assignment]
