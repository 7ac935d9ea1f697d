"""The missing clinical inputs of a waiting request: the form's fields, and the form back
to values checked as the server checks them (so a wrong value is refused on the page,
not by the server after the SR path has started)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from abdoserve.deploy.gateway.worklist.roi import parse_box, roi_from_box
from abdoserve.preprocessing.clinical import ROI_KEY, clinical_value
from abdoserve.preprocessing.errors import ClinicalInputError, RoiError
from abdoserve.preprocessing.specs import TaskSpec

LABELS = {
    ROI_KEY: "Mass region of interest",
    "hbv": "Hepatitis B (HBV)",
    "hcv": "Hepatitis C (HCV)",
    "age": "Age",
    "sex": "Sex",
    "field_strength": "Field strength",
}
BOX_FIELD, VIEW_FIELD = "roi_box", "roi_view"


class InputProblem(ValueError):
    """A value the form cannot give; the message names the input, never the value."""


@dataclass(frozen=True)
class InputField:
    name: str
    label: str
    kind: str  # "roi", "number" or "category"
    choices: tuple[str, ...] = ()
    unit: str = ""
    minimum: float | None = None
    maximum: float | None = None


def fields_for(spec: TaskSpec, missing: Sequence[str]) -> list[InputField]:
    fields = []
    for name in missing:
        label = LABELS.get(name, name)
        if name == ROI_KEY:
            fields.append(InputField(name, label, "roi"))
            continue
        item = spec.clinical_input(name)
        bounded = item.kind == "number"
        fields.append(
            InputField(
                name,
                label,
                item.kind,
                item.choices,
                item.unit,
                item.minimum if bounded else None,
                item.maximum if bounded else None,
            )
        )
    return fields


def parse_inputs(
    spec: TaskSpec,
    missing: Sequence[str],
    form: Mapping[str, Any],
    shape: Callable[[], tuple[int, int]],
) -> dict[str, Any]:
    """Every missing input from the form; `shape` gives the slice's (rows, columns)."""
    values: dict[str, Any] = {}
    for name in missing:
        if name == ROI_KEY:
            values[name] = _roi(form, shape)
        else:
            values[name] = _value(spec, name, form.get(name))
    return values


def _roi(form: Mapping[str, Any], shape: Callable[[], tuple[int, int]]) -> list[int]:
    try:
        box = parse_box(str(form.get(BOX_FIELD, "")), str(form.get(VIEW_FIELD, "")))
        return roi_from_box(box, shape())
    except RoiError as error:
        raise InputProblem(f"{LABELS[ROI_KEY]}: {error.detail}") from error


def _value(spec: TaskSpec, name: str, raw: object) -> float | int | str:
    if not isinstance(raw, str) or not raw.strip():
        raise InputProblem(f"{LABELS.get(name, name)}: please give a value")
    try:
        value = clinical_value(spec.clinical_input(name), raw.strip())
    except ClinicalInputError as error:
        raise InputProblem(f"{LABELS.get(name, name)}: {error.detail}") from error
    if isinstance(value, float) and value.is_integer():
        return int(value)  # as `abdoserve infer` sends whole numbers
    return value
