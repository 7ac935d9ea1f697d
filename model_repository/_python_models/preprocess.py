"""<task>_preprocess: DICOM bytes + clinical JSON -> network samples (Python backend, CPU).

The DICOM comes as BYTES (`DICOM`) or packed UINT8 with offsets (`DICOM_PACKED`,
`DICOM_OFFSETS`); `abdoserve.serving.dicom_input` reads either.

Glue only: the work is `abdoserve.preprocessing.study.StudyPreparer`. Shared by all five
tasks; the task comes from the config parameter "task". It takes the ensemble's own
inputs, so a direct call is checked exactly as one through the ensemble: tensor dtype
and rank here, CLINICAL (the ROI included) by the intake.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

from abdoserve.preprocessing.errors import ClinicalInputError
from abdoserve.preprocessing.nesting import load_clinical_json
from abdoserve.preprocessing.study import StudyPreparer
from abdoserve.preprocessing.tasks import get_task
from abdoserve.serving import dicom_input, validation
from abdoserve.serving import triton_adapter as glue
from abdoserve.serving.metrics import IntakeMetrics
from abdoserve.serving.warmup import read_warmup

# Under abdoserve: route_logging sends that tree to Triton's log.
_LOG = logging.getLogger("abdoserve.serving.preprocess")


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        glue.route_logging(pb_utils)
        parameters = glue.model_parameters(json.loads(args["model_config"]))
        overrides = json.loads(parameters.get("spec_overrides") or "{}")
        # An invalid spec or override fails the model load, not the first patient.
        self.spec = get_task(parameters["task"], overrides)
        self.prepare = StudyPreparer(self.spec)
        self.warm_up(Path(args["model_repository"]) / args["model_version"])
        # After warm-up: the metrics count patients' requests only.
        self.metrics = IntakeMetrics(pb_utils, self.spec.name)

    def warm_up(self, version_folder: Path) -> None:
        """Decode and prepare the build's warm-up DICOM study once before serving."""
        study = read_warmup(version_folder)
        if study is None:
            _LOG.warning("%s: no warm-up study; the first request pays for it", self.spec.name)
            return
        self.prepare(*study)

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self.handle(request) for request in requests]

    def handle(self, request: Any) -> Any:
        started = time.perf_counter()
        try:
            instances = dicom_input.read_instances(pb_utils, request, self.spec.limits)
            self.metrics.received(len(instances), sum(len(item) for item in instances))
            clinical = self.clinical(request)
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

    def clinical(self, request: Any) -> dict[str, Any]:
        """The CLINICAL JSON object; absent (optional where the task takes none) means {}."""
        tensor = pb_utils.get_input_tensor_by_name(request, "CLINICAL")
        if tensor is None:
            return {}
        clinical = glue.single_study(tensor.as_numpy(), "CLINICAL")
        validation.check_bytes_input(clinical, "CLINICAL")
        elements = glue.bytes_elements(clinical)
        if len(elements) != 1:
            raise ClinicalInputError("input 'CLINICAL' must hold exactly one JSON object")
        return load_clinical_json(elements[0], self.spec.limits)

    def finalize(self) -> None:
        self.prepare = None  # type: ignore[assignment]
