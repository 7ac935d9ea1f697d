"""transport_probe: a null model for `abdoserve bench serving` (never in a served build).

It takes a study exactly as a task's ensemble does (BYTES `DICOM`, or `DICOM_PACKED`
with `DICOM_OFFSETS`, inline or in a shared-memory region), reads every instance out of
its input as the preprocess model does, and answers how many bytes it saw. The bench
sends it the same studies over the same transport: its time is what moving the bytes
costs, so that a served study's time splits into work, transport and everything else.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from abdoserve.preprocessing.specs import IntakeLimits
from abdoserve.serving import dicom_input
from abdoserve.serving import triton_adapter as glue


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        self.limits = IntakeLimits()

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self.handle(request) for request in requests]

    def handle(self, request: Any) -> Any:
        try:
            instances = dicom_input.read_instances(pb_utils, request, self.limits)
        except Exception as error:
            return glue.error_response(pb_utils, error)
        seen = np.array([[sum(len(instance) for instance in instances)]], dtype=np.int64)
        return glue.response(pb_utils, {"BYTES_SEEN": seen})
