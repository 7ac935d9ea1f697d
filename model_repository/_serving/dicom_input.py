"""The study's DICOM instances from a request, in either of the two accepted forms.

- `DICOM`: BYTES [n], one element per instance (the original contract, and what a raw
  KServe v2 client sends).
- `DICOM_PACKED` with `DICOM_OFFSETS`: every instance back to back in one UINT8 tensor,
  and the INT64 start offset of each. One flat buffer instead of n length-prefixed
  elements: Triton and the Python backend move it as one block, the stub makes no Python
  object per element, and a co-located sender can place it in a shared-memory region.

Exactly one form per request; errors name the inputs and counts, never the content.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from abdoserve.preprocessing.errors import IntakeError, MissingInputError
from abdoserve.preprocessing.specs import IntakeLimits
from abdoserve.serving import triton_adapter as glue
from abdoserve.serving import validation

LISTED = "DICOM"
PACKED = "DICOM_PACKED"
OFFSETS = "DICOM_OFFSETS"


def read_instances(pb_utils: Any, request: Any, limits: IntakeLimits) -> list[bytes]:
    """One study's instances as bytes, from whichever form the request carries."""
    listed = pb_utils.get_input_tensor_by_name(request, LISTED)
    packed = pb_utils.get_input_tensor_by_name(request, PACKED)
    if listed is not None and packed is not None:
        raise IntakeError(f"send the study as {LISTED!r} or as {PACKED!r}, not both")
    if packed is not None:
        offsets = glue.require_input(pb_utils, request, OFFSETS)
        return split_packed(
            glue.single_study(packed.as_numpy(), PACKED),
            glue.single_study(offsets, OFFSETS),
            limits,
        )
    if listed is None:
        raise MissingInputError(
            f"input tensor {LISTED!r} (or {PACKED!r} with {OFFSETS!r}) is missing"
        )
    dicom = glue.single_study(listed.as_numpy(), LISTED)
    validation.check_bytes_input(dicom, LISTED)
    return glue.bytes_elements(dicom)


def split_packed(packed: np.ndarray, offsets: np.ndarray, limits: IntakeLimits) -> list[bytes]:
    """Cut the packed buffer at the offsets: instance i is packed[offsets[i]:offsets[i+1]]
    (the last one runs to the end). Offsets start at 0 and strictly increase, so no
    instance is empty and none overlaps another."""
    check_packed(packed, offsets, limits)
    ends = [*offsets[1:].tolist(), packed.size]
    # One copy per instance (the decoder wants bytes); ~0.1 ms per MB.
    return [packed[start:end].tobytes() for start, end in zip(offsets.tolist(), ends, strict=True)]


def check_packed(packed: np.ndarray, offsets: np.ndarray, limits: IntakeLimits) -> None:
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise IntakeError(f"input {PACKED!r} must be UINT8 of shape [bytes] per study")
    if offsets.dtype != np.int64 or offsets.ndim != 1:
        raise IntakeError(f"input {OFFSETS!r} must be INT64 of shape [instances] per study")
    if offsets.size == 0 or packed.size == 0:
        raise IntakeError(f"inputs {PACKED!r} and {OFFSETS!r} hold no instance")
    if offsets.size > limits.max_instances_per_request:
        raise IntakeError(
            f"input {OFFSETS!r} lists {offsets.size} instances; at most "
            f"{limits.max_instances_per_request} per request"
        )
    if offsets[0] != 0 or np.any(np.diff(offsets) <= 0) or offsets[-1] >= packed.size:
        raise IntakeError(
            f"input {OFFSETS!r} must start at 0 and strictly increase within the "
            f"{packed.size} bytes of {PACKED!r}"
        )
