"""What a study looked like on arrival, for drift: vendor, kVp, slice thickness, pixel
spacing and body HU, in values that can never carry a patient identifier.

The header values are read tolerantly: a malformed kVp is missing, not a refusal, since
none of them change the answer. The vendor is mapped onto a fixed vocabulary, so a
header's free text never becomes a metric label. Both the server (per request) and
`abdoserve model validate` (per cohort study) describe a study with `study_profile`, so
the acceptance cohort and live traffic are binned alike (abdoserve.serving.drift).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from abdoserve.preprocessing import header
from abdoserve.preprocessing.errors import IntakeError
from abdoserve.preprocessing.frames import Frame

MANUFACTURER = 0x00080070
KVP = 0x00180060
SLICE_THICKNESS = 0x00180050

# Lower-case fragments of (0008,0070) Manufacturer as vendors write it, in the order
# tried; a name that matches none is "other", an absent one "missing".
VENDOR_FRAGMENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ge", ("ge medical", "ge healthcare", "general electric", "gehc")),
    ("siemens", ("siemens",)),
    ("philips", ("philips",)),
    ("canon", ("canon", "toshiba")),
    ("fujifilm", ("fujifilm", "hitachi")),
    ("united_imaging", ("united imaging", "uih")),
    ("neusoft", ("neusoft",)),
)
MANUFACTURERS = (*(name for name, _ in VENDOR_FRAGMENTS), "other", "missing")

# Voxels above this are the body, not the air around it (HU). Every fourth row and
# column is enough for a mean over the body, at a sixteenth of the cost.
BODY_THRESHOLD_HU = -500.0
BODY_STRIDE = 4
NUMBER_FIELDS = ("kvp", "slice_thickness_mm", "pixel_spacing_mm", "body_hu")


@dataclass(frozen=True)
class InstanceHeader:
    """The acquisition attributes of one instance, read without refusing anything."""

    manufacturer: str = "missing"  # one of MANUFACTURERS
    kvp: float | None = None
    slice_thickness_mm: float | None = None


@dataclass(frozen=True)
class StudyProfile:
    manufacturer: str = "missing"
    kvp: float | None = None
    slice_thickness_mm: float | None = None
    pixel_spacing_mm: float | None = None
    body_hu: float | None = None  # CT only

    def to_json(self) -> dict[str, Any]:
        return {
            "manufacturer": self.manufacturer,
            **{name: _rounded(getattr(self, name)) for name in NUMBER_FIELDS},
        }

    @classmethod
    def from_json(cls, value: object) -> StudyProfile:
        """A profile as the preprocess model wrote it, checked: a direct caller of the
        postprocess model may send anything, and these values become metric labels."""
        if not isinstance(value, Mapping) or set(value) != {"manufacturer", *NUMBER_FIELDS}:
            raise IntakeError(
                "input 'STUDY_INFO' 'profile' must be an object with keys "
                f"manufacturer, {', '.join(NUMBER_FIELDS)}"
            )
        if value["manufacturer"] not in MANUFACTURERS:
            raise IntakeError(
                f"input 'STUDY_INFO' 'profile' 'manufacturer' must be one of "
                f"{', '.join(MANUFACTURERS)}"
            )
        numbers = {name: value[name] for name in NUMBER_FIELDS}
        for name, number in numbers.items():
            if number is not None and not _finite_number(number):
                raise IntakeError(
                    f"input 'STUDY_INFO' 'profile' {name!r} must be a finite number or null"
                )
        return cls(
            manufacturer=str(value["manufacturer"]),
            **{name: None if n is None else float(n) for name, n in numbers.items()},
        )


def vendor(manufacturer: str | None) -> str:
    """(0008,0070) Manufacturer -> one of MANUFACTURERS."""
    if not manufacturer:
        return "missing"
    lowered = manufacturer.lower()
    for name, fragments in VENDOR_FRAGMENTS:
        if any(fragment in lowered for fragment in fragments):
            return name
    return "ge" if lowered.strip() in {"ge", "ge ms"} else "other"


def instance_header(dataset: Dataset) -> InstanceHeader:
    try:
        manufacturer = header.text(dataset, MANUFACTURER)
    except IntakeError:
        manufacturer = None
    return InstanceHeader(
        manufacturer=vendor(manufacturer),
        kvp=_tolerant_number(dataset, KVP),
        slice_thickness_mm=_tolerant_number(dataset, SLICE_THICKNESS),
    )


def study_profile(
    headers: Sequence[InstanceHeader], frames: Sequence[Frame], *, ct: bool
) -> StudyProfile:
    """The study's vendor (the most common), and the median of each value over its
    instances or frames; body HU is the mean over the body voxels of every frame."""
    vendors = [item.manufacturer for item in headers if item.manufacturer != "missing"]
    return StudyProfile(
        manufacturer=statistics.mode(vendors) if vendors else "missing",
        kvp=_median(item.kvp for item in headers),
        slice_thickness_mm=_median(item.slice_thickness_mm for item in headers),
        pixel_spacing_mm=_median(sum(frame.spacing) / 2.0 for frame in frames),
        body_hu=_body_hu(frames) if ct else None,
    )


def _body_hu(frames: Sequence[Frame]) -> float | None:
    total, count = 0.0, 0
    for frame in frames:
        stored = frame.pixels[::BODY_STRIDE, ::BODY_STRIDE].astype(np.float64)
        values = stored * frame.slope + frame.intercept
        body = values[values > BODY_THRESHOLD_HU]
        total += float(body.sum())
        count += int(body.size)
    return total / count if count else None


def _tolerant_number(dataset: Dataset, tag: int) -> float | None:
    try:
        value = header.number(dataset, tag, 0)
    except IntakeError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _median(values: Any) -> float | None:
    found = [value for value in values if value is not None and math.isfinite(value)]
    return float(statistics.median(found)) if found else None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _finite_number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )
