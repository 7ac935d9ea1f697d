"""Clinical inputs (age, sex, field strength, HBV/HCV, ROI) -> validated values and features."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from abdoserve.preprocessing.errors import ClinicalInputError, RoiError
from abdoserve.preprocessing.specs import ClinicalInput, RoiCrop, TaskSpec

ROI_KEY = "roi"


def check_keys(spec: TaskSpec, clinical: Mapping[str, object]) -> None:
    """Refuse unknown keys (a typo must not silently drop an input) and a missing ROI."""
    known = {item.name for item in spec.clinical_inputs}
    if isinstance(spec.geometry, RoiCrop):
        known.add(ROI_KEY)
        if clinical.get(ROI_KEY) is None:
            raise RoiError(f"{spec.name} needs 'roi' [row_min, col_min, row_max, col_max]")
    unknown = len(set(clinical) - known)
    if unknown:  # counted, never named: a key is text the sender wrote
        expected = ", ".join(sorted(known)) or "none"
        keys = "key" if unknown == 1 else "keys"
        raise ClinicalInputError(
            f"CLINICAL has {unknown} unknown {keys} for {spec.name}; expected: {expected}"
        )


def clinical_value(item: ClinicalInput, value: object) -> float | str:
    """A request value checked against its input's kind, range or choices."""
    if item.kind == "number":
        return _number(item, value)
    text = str(value) if isinstance(value, str | int | float) else None
    if text not in item.choices:
        raise ClinicalInputError(
            f"clinical input {item.name!r} must be one of {', '.join(item.choices)}"
        )
    return text


def _number(item: ClinicalInput, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ClinicalInputError(f"clinical input {item.name!r} must be a number")
    try:
        number = float(value)
    except ValueError as error:
        raise ClinicalInputError(f"clinical input {item.name!r} must be a number") from error
    if not math.isfinite(number) or not item.minimum <= number <= item.maximum:
        unit = f" {item.unit}" if item.unit else ""
        raise ClinicalInputError(
            f"clinical input {item.name!r} must lie within {item.minimum:g}..{item.maximum:g}{unit}"
        )
    return number


def feature_vector(spec: TaskSpec, values: Mapping[str, float | str]) -> np.ndarray:
    """Scaled numbers and one-hot categories, in the spec's input order."""
    features: list[float] = []
    for item in spec.clinical_inputs:
        value = values[item.name]
        if item.kind == "number":
            features.append((float(value) - item.offset) / item.scale)
        else:
            features.extend(1.0 if choice == value else 0.0 for choice in item.choices)
    return np.asarray(features, dtype=np.float32)
