"""A request's study, read and prepared: what the preprocess model and the fused pipeline
model both do first.

The DICOM in either form (`abdoserve.serving.dicom_input`), CLINICAL (absent where the
task takes none, meaning {}), then `StudyPreparer`, with the intake metrics recorded.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from abdoserve.preprocessing.errors import ClinicalInputError, MissingInputError
from abdoserve.preprocessing.nesting import load_clinical_json
from abdoserve.preprocessing.specs import RoiCrop, TaskSpec
from abdoserve.preprocessing.study import PreparedStudy, StudyPreparer
from abdoserve.serving import dicom_input, validation
from abdoserve.serving import triton_adapter as glue
from abdoserve.serving.metrics import IntakeMetrics
from abdoserve.serving.warmup import read_warmup

_LOG = logging.getLogger("abdoserve.serving.intake")


class StudyIntake:
    """Prepares one request's study; decodes the build's warm-up study first."""

    def __init__(self, pb_utils: Any, spec: TaskSpec, version_folder: Path) -> None:
        self.pb_utils = pb_utils
        self.spec = spec
        self.prepare = StudyPreparer(spec)
        self.warm_up(version_folder)
        # After warm-up: the metrics count patients' requests only.
        self.metrics = IntakeMetrics(pb_utils, spec.name)

    def warm_up(self, version_folder: Path) -> None:
        """Decode and prepare the build's warm-up DICOM study once before serving."""
        study = read_warmup(version_folder)
        if study is None:
            _LOG.warning("%s: no warm-up study; the first request pays for it", self.spec.name)
            return
        self.prepare(*study)

    def __call__(self, request: Any) -> tuple[int, PreparedStudy]:
        """The number of instances and the prepared study; raises what the intake refuses
        (recorded as a rejection first)."""
        started = time.perf_counter()
        try:
            instances = dicom_input.read_instances(self.pb_utils, request, self.spec.limits)
            self.metrics.received(len(instances), sum(len(item) for item in instances))
            prepared = self.prepare(instances, self.clinical(request))
        except Exception as error:
            self.metrics.rejected(error)
            raise
        self.metrics.prepared(prepared.stage_seconds, time.perf_counter() - started)
        return len(instances), prepared

    def release(self) -> None:
        """Drop the preparer at unload. The metrics stay: their families must not be
        destroyed while Triton unloads the model (that raced in 2.51 and corrupted the
        server's heap); they go with the stub process."""
        self.prepare = None  # type: ignore[assignment]

    def clinical(self, request: Any) -> dict[str, Any]:
        return read_clinical(self.pb_utils, request, self.spec)


def read_clinical(pb_utils: Any, request: Any, spec: TaskSpec) -> dict[str, Any]:
    """The CLINICAL JSON object; absent means {} where the task reads no clinical input,
    and is refused by name where it reads some."""
    tensor = pb_utils.get_input_tensor_by_name(request, "CLINICAL")
    if tensor is None:
        if spec.clinical_inputs or isinstance(spec.geometry, RoiCrop):
            raise MissingInputError(
                "input tensor 'CLINICAL' is missing: this task reads clinical inputs"
            )
        return {}
    clinical = glue.single_study(tensor.as_numpy(), "CLINICAL")
    validation.check_bytes_input(clinical, "CLINICAL")
    elements = glue.bytes_elements(clinical)
    if len(elements) != 1:
        raise ClinicalInputError("input 'CLINICAL' must hold exactly one JSON object")
    return load_clinical_json(elements[0], spec.limits)
