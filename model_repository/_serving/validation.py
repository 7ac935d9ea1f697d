"""Composing-model inputs checked against the task spec.

Triton 2.51 has no per-model access control: any client that reaches the port can
call `<task>_net` or `<task>_postprocess` directly, bypassing the ensemble. So each
composing model accepts only what `<task>_preprocess` (or `_net`) would have sent:
dtype, rank, per-study lengths that agree, and finite values within the ranges the
preprocess emits. The sample count is bounded by the spec's image limits, which bounds
what one request can make the network allocate. Checks are vectorised (a min and a
max per tensor). Errors name the tensor, its shape and what was expected, never a
value the sender chose. All arrays here are one study's, batch axis already dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from abdoserve.preprocessing.errors import IntakeError
from abdoserve.preprocessing.specs import ClinicalInput, TaskSpec
from abdoserve.preprocessing.study_profile import StudyProfile

# The preprocess clips windowed (CT) or percentile-scaled (MR) pixels to [0, 1] and
# fills the outside of the image with 0: nothing it emits lies outside this range.
SAMPLE_RANGE = (0.0, 1.0)
# STUDY_INFO as the preprocess writes it is under 100 bytes; this bounds the JSON a
# direct caller can make the postprocess parse (and its nesting depth).
MAX_STUDY_INFO_BYTES = 4096
STUDY_INFO_KEYS = frozenset({"instances", "roles", "key"})
# What arrived (abdoserve.preprocessing.study_profile), for drift: optional, since a
# direct caller's study without it is still answered, and counted as missing.
STUDY_INFO_OPTIONAL = frozenset({"profile"})
STUDY_KEY_PATTERN = re.compile("[0-9a-f]{64}")


@dataclass(frozen=True)
class StudyInfo:
    instances: int
    roles: dict[str, int]
    key: str  # the study's digest (abdoserve.preprocessing.study.study_key): routing's input
    profile: StudyProfile = field(default_factory=StudyProfile)


def sample_count_range(spec: TaskSpec) -> tuple[int, int]:
    """Samples per study: one where the images are channels, else one per image."""
    images = spec.images
    if images.stacking == "channels":
        return 1, 1
    return images.min_images, images.max_images


def check_samples(spec: TaskSpec, samples: np.ndarray) -> None:
    """SAMPLES (s, C, M, M) FP32, s within the spec's sample count, values in [0, 1]."""
    _check_dtype(samples, "SAMPLES", np.float32, "FP32")
    low, high = sample_count_range(spec)
    expected = ", ".join(str(size) for size in spec.sample_shape)
    if samples.ndim != 4 or tuple(samples.shape[1:]) != spec.sample_shape:
        raise _error("SAMPLES", samples, f"[s, {expected}] per study")
    _check_count("SAMPLES", samples, low, high)
    if not _within(samples, *SAMPLE_RANGE):
        raise IntakeError(
            f"input 'SAMPLES' must hold finite values in [{SAMPLE_RANGE[0]:g}, "
            f"{SAMPLE_RANGE[1]:g}] (the preprocess' range)"
        )


def check_features(spec: TaskSpec, features: np.ndarray) -> None:
    """FEATURES (F,) FP32: scaled numbers within their inputs' ranges, one-hot categories."""
    _check_dtype(features, "FEATURES", np.float32, "FP32")
    if features.shape != (spec.feature_width,):
        raise _error("FEATURES", features, f"[{spec.feature_width}] per study")
    if not np.isfinite(features).all():
        raise IntakeError("input 'FEATURES' must hold finite values")
    start = 0
    for item in spec.clinical_inputs:
        values = features[start : start + item.width]
        if item.kind == "number":
            _check_scaled_number(start, values, item)
        elif not ((values == 0) | (values == 1)).all() or values.sum() != 1:
            raise IntakeError(
                f"input 'FEATURES' [{start}:{start + item.width}] must one-hot encode "
                f"{item.name!r} over {item.width} choices"
            )
        start += item.width


def check_output(spec: TaskSpec, output: np.ndarray) -> None:
    """OUTPUT (s, K) FP32, finite; probabilities (softmax, sigmoid) within [0, 1]."""
    _check_dtype(output, "OUTPUT", np.float32, "FP32")
    width = spec.output.width
    if output.ndim != 2 or output.shape[1] != width:
        raise _error("OUTPUT", output, f"[s, {width}] per study")
    _check_count("OUTPUT", output, *sample_count_range(spec))
    if spec.output.kind == "regression":
        # A hospital's regression head may leave the nominal range; finite is what is safe.
        if not np.isfinite(output).all():
            raise IntakeError("input 'OUTPUT' must hold finite values")
    elif not _within(output, 0.0, 1.0):
        raise IntakeError("input 'OUTPUT' must hold probabilities in [0, 1]")


def check_sample_source(sources: np.ndarray, rows: int, instances: int) -> None:
    """SAMPLE_SOURCE (s,) INT32: one request-instance index per OUTPUT row."""
    _check_dtype(sources, "SAMPLE_SOURCE", np.int32, "INT32")
    if sources.shape != (rows,):
        raise _error("SAMPLE_SOURCE", sources, f"[{rows}] per study (one per OUTPUT row)")
    if not _within(sources, 0, instances - 1):
        raise IntakeError(
            f"input 'SAMPLE_SOURCE' must hold instance indices in [0, {instances - 1}] "
            "(below STUDY_INFO 'instances')"
        )


def study_info(spec: TaskSpec, array: np.ndarray) -> StudyInfo:
    """STUDY_INFO (1,) BYTES: {"roles": {role: instance}, "instances": n, "key": digest,
    "profile": {...}} as preprocess writes."""
    value = _json_element(array)
    if not isinstance(value, dict) or not (
        STUDY_INFO_KEYS <= set(value) <= STUDY_INFO_KEYS | STUDY_INFO_OPTIONAL
    ):
        raise IntakeError(
            "input 'STUDY_INFO' must be a JSON object with keys instances, key, roles (and profile)"
        )
    key = value["key"]
    if not isinstance(key, str) or not STUDY_KEY_PATTERN.fullmatch(key):
        raise IntakeError("input 'STUDY_INFO' 'key' must be 64 lowercase hexadecimal digits")
    instances = value["instances"]
    limit = spec.limits.max_instances_per_request
    if not _is_int(instances) or not 1 <= instances <= limit:
        raise IntakeError(f"input 'STUDY_INFO' 'instances' must be an integer in [1, {limit}]")
    profile = StudyProfile.from_json(value["profile"]) if "profile" in value else StudyProfile()
    return StudyInfo(instances, _roles(spec, value["roles"], instances), key, profile)


def check_bytes_input(array: np.ndarray, name: str) -> None:
    """A BYTES input of rank 1 per study (DICOM, CLINICAL)."""
    if array.dtype != np.object_:
        raise IntakeError(f"input {name!r} must be BYTES, got {array.dtype.name}")
    if array.ndim != 1:
        raise _error(name, array, "[n] per study")


def _roles(spec: TaskSpec, roles: Any, instances: int) -> dict[str, int]:
    wanted = spec.images.roles
    expected = ", ".join(wanted) or "none"
    if not isinstance(roles, dict) or set(roles) != set(wanted):
        raise IntakeError(f"input 'STUDY_INFO' 'roles' must map exactly these roles: {expected}")
    if not all(_is_int(index) and 0 <= index < instances for index in roles.values()):
        raise IntakeError(
            f"input 'STUDY_INFO' 'roles' must map each role to an instance index in "
            f"[0, {instances - 1}]"
        )
    return {role: int(roles[role]) for role in wanted}


def _json_element(array: np.ndarray) -> Any:
    if array.dtype != np.object_ or array.shape != (1,):
        raise _error("STUDY_INFO", array, "[1] BYTES per study")
    element = array[0]
    data = element if isinstance(element, bytes) else bytes(element)
    if len(data) > MAX_STUDY_INFO_BYTES:
        raise IntakeError(f"input 'STUDY_INFO' exceeds {MAX_STUDY_INFO_BYTES} bytes")
    try:
        return json.loads(data)
    # ValueError covers bad UTF-8 and JSON syntax; RecursionError, nesting past the stack.
    except (ValueError, RecursionError) as error:
        raise IntakeError(
            f"input 'STUDY_INFO' is not valid JSON ({error.__class__.__name__})"
        ) from error


def _check_scaled_number(index: int, values: np.ndarray, item: ClinicalInput) -> None:
    # The preprocess computes in float64 and casts to float32; cast the bounds the same way
    # (monotonic, so a value at a bound stays inside it).
    low = float(np.float32((item.minimum - item.offset) / item.scale))
    high = float(np.float32((item.maximum - item.offset) / item.scale))
    if not _within(values, low, high):
        raise IntakeError(
            f"input 'FEATURES' [{index}] ({item.name!r}, scaled) must lie in [{low:g}, {high:g}]"
        )


def _check_dtype(array: np.ndarray, name: str, dtype: type[np.generic], triton: str) -> None:
    if array.dtype != dtype:
        raise IntakeError(f"input {name!r} must be {triton}, got {array.dtype.name}")


def _check_count(name: str, array: np.ndarray, low: int, high: int) -> None:
    if not low <= array.shape[0] <= high:
        count = f"{low} to {high}" if low < high else f"exactly {low}"
        count += " sample" if high == 1 else " samples"
        raise IntakeError(
            f"input {name!r} must hold {count} per study, got shape {list(array.shape)}"
        )


def _within(array: np.ndarray, low: float, high: float) -> bool:
    """All values in [low, high]; NaN fails (min and max propagate it). Empty passes."""
    if array.size == 0:
        return True
    return bool(array.min() >= low and array.max() <= high)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _error(name: str, array: np.ndarray, expected: str) -> IntakeError:
    return IntakeError(f"input {name!r} must have shape {expected}, got {list(array.shape)}")
