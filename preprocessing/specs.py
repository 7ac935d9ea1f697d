"""Task specs: what each model reads, how its pixels are prepared, what it answers.

A spec is a frozen, validated dataclass. Every leaf value is covered by a
provenance entry saying whether it is a fact stated by the paper or a serving
choice made here (or a hospital's override), so that a hospital can re-point a
task to its own trained checkpoint by overriding values, not by editing code.
An invalid spec raises `SpecError` when it is built, never at the first request.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Modality = Literal["CT", "MR"]
Stacking = Literal["channels", "samples"]
Aggregation = Literal["none", "mean", "max"]
OutputKind = Literal["classification", "regression", "probability"]


class SpecError(ValueError):
    """A task spec (or an override of one) is invalid."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SpecError(message)


def _require_integers(owner: object, *names: str) -> None:
    """Counts and sizes must be ints: a float matrix would pass range checks and fail later."""
    for name in names:
        value = getattr(owner, name)
        _require(
            isinstance(value, int) and not isinstance(value, bool),
            f"{name} must be an integer, got {value!r}",
        )


class Source(enum.Enum):
    PAPER = "paper"
    CHOICE = "serving choice"
    OVERRIDE = "hospital override"


@dataclass(frozen=True)
class ValueProvenance:
    """Where one spec value comes from: the paper, a serving choice or a hospital."""

    source: Source
    note: str


def paper(note: str) -> ValueProvenance:
    return ValueProvenance(Source.PAPER, note)


def choice(note: str) -> ValueProvenance:
    return ValueProvenance(Source.CHOICE, note)


@dataclass(frozen=True)
class CTWindow:
    """Hounsfield units in [center - width/2, center + width/2] map linearly to [0, 1]."""

    center_hu: float
    width_hu: float

    def __post_init__(self) -> None:
        _require(self.width_hu > 0, "CT window width must be positive")
        _require(-2000 <= self.center_hu <= 4000, "CT window center outside -2000..4000 HU")


@dataclass(frozen=True)
class MRPercentileScaling:
    """Per-image robust scaling: the lower..upper percentile of intensities maps to [0, 1]."""

    lower_percentile: float = 1.0
    upper_percentile: float = 99.0

    def __post_init__(self) -> None:
        _require(
            0 <= self.lower_percentile < self.upper_percentile <= 100,
            "MR percentiles must satisfy 0 <= lower < upper <= 100",
        )


Intensity = CTWindow | MRPercentileScaling


@dataclass(frozen=True)
class FixedSpacing:
    """Resample to an isotropic in-plane spacing, then centre-crop or pad to the matrix."""

    spacing_mm: float
    matrix: int

    def __post_init__(self) -> None:
        _require_integers(self, "matrix")
        _require(0.1 <= self.spacing_mm <= 10, "target pixel spacing outside 0.1..10 mm")
        _require(16 <= self.matrix <= 1024, "matrix outside 16..1024")


@dataclass(frozen=True)
class RoiCrop:
    """A square field of view centred on the request's ROI, resampled to the matrix.

    The field of view is the ROI's longer side times `margin`, at least `min_fov_mm`.
    """

    matrix: int
    margin: float
    min_fov_mm: float

    def __post_init__(self) -> None:
        _require_integers(self, "matrix")
        _require(16 <= self.matrix <= 1024, "matrix outside 16..1024")
        _require(1.0 <= self.margin <= 10.0, "ROI margin outside 1..10")
        _require(self.min_fov_mm > 0, "minimum field of view must be positive")


Geometry = FixedSpacing | RoiCrop


@dataclass(frozen=True)
class ImageSet:
    """Which images one request carries and how they become network samples.

    `roles` names fixed images (phases, section levels) in order; an empty tuple
    means a free series of `min_images`..`max_images` slices. `stacking` says
    whether the images become the channels of one sample or one sample each.
    """

    roles: tuple[str, ...]
    min_images: int
    max_images: int
    stacking: Stacking

    def __post_init__(self) -> None:
        _require_integers(self, "min_images", "max_images")
        _require(1 <= self.min_images <= self.max_images, "need 1 <= min_images <= max_images")
        if self.roles:
            _require(
                self.min_images == self.max_images == len(self.roles),
                "a set of named roles needs exactly one image per role",
            )
        if self.stacking == "channels":
            _require(bool(self.roles), "channel stacking needs named roles")

    @property
    def channels(self) -> int:
        return len(self.roles) if self.stacking == "channels" else 1


@dataclass(frozen=True)
class ClinicalInput:
    """One non-image input. Numbers are scaled as (value - offset) / scale;
    categories are one-hot encoded over `choices`. `dicom_fallback` names a tag
    read from the first image when the request leaves the input out."""

    name: str
    kind: Literal["number", "category"]
    unit: str = ""
    minimum: float = -math.inf
    maximum: float = math.inf
    offset: float = 0.0
    scale: float = 1.0
    choices: tuple[str, ...] = ()
    dicom_fallback: int | None = None

    def __post_init__(self) -> None:
        _require(self.name.isidentifier() and self.name.islower(), f"bad input name {self.name!r}")
        if self.kind == "number":
            _require(self.minimum < self.maximum, f"{self.name}: minimum must be below maximum")
            _require(self.scale > 0, f"{self.name}: scale must be positive")
            _require(not self.choices, f"{self.name}: a number has no choices")
        else:
            _require(len(self.choices) >= 2, f"{self.name}: a category needs two or more choices")
            _require(len(set(self.choices)) == len(self.choices), f"{self.name}: repeated choice")

    @property
    def width(self) -> int:
        """How many feature values this input contributes."""
        return 1 if self.kind == "number" else len(self.choices)


@dataclass(frozen=True)
class Output:
    """What the network answers per sample, and how samples become a study answer.

    For regression, `stage_cutoffs` (ascending) turn the score into stage labels
    `labels[1:]` (e.g. F0..F4); `flag_below` raises a flag (e.g. osteoporosis)
    when the study value is at or below it. For probabilities, `flag_above`.
    """

    kind: OutputKind
    labels: tuple[str, ...]
    descriptions: tuple[str, ...]
    unit: str
    aggregation: Aggregation
    value_range: tuple[float, float] = (0.0, 1.0)
    stage_cutoffs: tuple[float, ...] = ()
    flag_name: str = ""
    flag_below: float | None = None
    flag_above: float | None = None

    def __post_init__(self) -> None:
        _require(len(self.labels) == len(self.descriptions), "one description per label")
        _require(self.value_range[0] < self.value_range[1], "empty value range")
        if self.kind == "classification":
            _require(len(self.labels) >= 2, "a classifier needs two or more labels")
        if self.stage_cutoffs:
            _require(list(self.stage_cutoffs) == sorted(self.stage_cutoffs), "cutoffs must ascend")
            _require(
                len(self.labels) == len(self.stage_cutoffs) + 2,
                "regression labels are the score name followed by one label per stage",
            )
        if self.flag_below is not None or self.flag_above is not None:
            _require(bool(self.flag_name), "a flag needs a name")

    @property
    def width(self) -> int:
        """Values the network emits per sample."""
        return len(self.labels) if self.kind == "classification" else 1


@dataclass(frozen=True)
class IntakeLimits:
    """Sizes refused before any pixel data is decoded."""

    max_bytes_per_instance: int = 64 * 1024 * 1024  # also bounds a deflated body, inflated
    max_pixels_per_instance: int = 4096 * 4096
    max_instances_per_request: int = 256
    max_bytes_per_request: int = 256 * 1024 * 1024  # all instances together
    # All instances together as parsed (a deflated one inflated), counted while inflating:
    # a plain request may bring no more than this either (max_bytes_per_request).
    max_inflated_bytes_per_request: int = 256 * 1024 * 1024
    # Decoded pixel values of all instances together (Rows x Columns x frames x bytes per
    # sample, from each header before its decode): compressed frames may be tiny on the wire.
    max_pixel_bytes_per_request: int = 256 * 1024 * 1024
    max_sequence_depth: int = 16  # DICOM sequences within sequences
    max_clinical_bytes: int = 64 * 1024  # the CLINICAL JSON document
    max_json_depth: int = 8  # arrays and objects within each other in CLINICAL
    max_number_chars: int = 64  # one numeric literal in CLINICAL

    def __post_init__(self) -> None:
        _require_integers(
            self,
            "max_bytes_per_instance",
            "max_pixels_per_instance",
            "max_instances_per_request",
            "max_bytes_per_request",
            "max_inflated_bytes_per_request",
            "max_pixel_bytes_per_request",
            "max_sequence_depth",
            "max_clinical_bytes",
            "max_json_depth",
            "max_number_chars",
        )
        _require(
            self.max_bytes_per_request >= self.max_bytes_per_instance,
            "max_bytes_per_request below max_bytes_per_instance",
        )
        _require(
            self.max_inflated_bytes_per_request >= self.max_bytes_per_request,
            "max_inflated_bytes_per_request below max_bytes_per_request",
        )
        _require(  # one 16-bit instance at the pixel limit must fit
            self.max_pixel_bytes_per_request >= 2 * self.max_pixels_per_instance,
            "max_pixel_bytes_per_request below 2 x max_pixels_per_instance",
        )
        _require(self.max_sequence_depth >= 2, "max_sequence_depth below 2")
        _require(self.max_json_depth >= 2, "max_json_depth below 2")
        _require(self.max_number_chars >= 16, "max_number_chars below 16")
        _require(self.max_clinical_bytes >= 1024, "max_clinical_bytes below 1 KiB")
        _require(self.max_bytes_per_instance >= 1024, "max_bytes_per_instance below 1 KiB")
        _require(self.max_pixels_per_instance >= 64 * 64, "max_pixels_per_instance below 64x64")
        _require(self.max_instances_per_request >= 1, "max_instances_per_request below 1")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    title: str
    paper: str
    modality: Modality
    images: ImageSet
    intensity: Intensity
    geometry: Geometry
    clinical_inputs: tuple[ClinicalInput, ...]
    output: Output
    sources: Mapping[str, ValueProvenance] = field(compare=False)
    limits: IntakeLimits = IntakeLimits()

    def __post_init__(self) -> None:
        _require(self.name.isidentifier() and self.name.islower(), f"bad task name {self.name!r}")
        _require(self.modality in ("CT", "MR"), f"unknown modality {self.modality!r}")
        for name, kinds in _PARTS.items():  # an override may replace a whole part
            expected = " or ".join(kind.__name__ for kind in kinds)
            _require(isinstance(getattr(self, name), kinds), f"{name} must be {expected}")
        _require(
            isinstance(self.clinical_inputs, tuple)
            and all(isinstance(item, ClinicalInput) for item in self.clinical_inputs),
            "clinical_inputs must be a tuple of ClinicalInput",
        )
        if self.modality == "CT":
            _require(isinstance(self.intensity, CTWindow), "a CT task needs a CT window")
        else:
            _require(isinstance(self.intensity, MRPercentileScaling), "an MR task needs MR scaling")
        _require(
            self.images.max_images <= self.limits.max_instances_per_request,
            "images.max_images exceeds limits.max_instances_per_request",
        )
        names = [item.name for item in self.clinical_inputs]
        _require(len(set(names)) == len(names), "repeated clinical input name")
        missing = [path for path in leaf_paths(self) if provenance_of(self, path) is None]
        _require(not missing, f"no provenance recorded for: {', '.join(missing)}")

    @property
    def matrix(self) -> int:
        return self.geometry.matrix

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(channels, rows, columns) of one network sample."""
        return (self.images.channels, self.matrix, self.matrix)

    @property
    def feature_width(self) -> int:
        return sum(item.width for item in self.clinical_inputs)

    def clinical_input(self, name: str) -> ClinicalInput:
        for item in self.clinical_inputs:
            if item.name == name:
                return item
        raise KeyError(name)


_TOP_LEVEL_SKIP = {"name", "title", "paper", "sources"}
_PARTS: dict[str, tuple[type, ...]] = {
    "images": (ImageSet,),
    "intensity": (CTWindow, MRPercentileScaling),
    "geometry": (FixedSpacing, RoiCrop),
    "output": (Output,),
    "limits": (IntakeLimits,),
}


def leaf_paths(spec: TaskSpec) -> Iterator[str]:
    """Dotted paths of every value a spec holds (clinical inputs by name)."""
    for item in dataclasses.fields(spec):
        if item.name in _TOP_LEVEL_SKIP:
            continue
        yield from _leaves(item.name, getattr(spec, item.name))


def _leaves(prefix: str, value: object) -> Iterator[str]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            yield from _leaves(f"{prefix}.{item.name}", getattr(value, item.name))
    elif isinstance(value, tuple) and value and isinstance(value[0], ClinicalInput):
        for clinical in value:
            yield from _leaves(f"{prefix}.{clinical.name}", clinical)
    else:
        yield prefix


def provenance_of(spec: TaskSpec, path: str) -> ValueProvenance | None:
    """The provenance of a dotted path: its own entry or that of its nearest parent."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        found = spec.sources.get(".".join(parts[:end]))
        if found is not None:
            return found
    return None


def with_overrides(spec: TaskSpec, overrides: Mapping[str, Any]) -> TaskSpec:
    """A new spec with dotted-path values replaced, each recorded as a hospital override.

    `{"geometry.matrix": 224, "intensity.center_hu": 60}` re-points the task to a
    checkpoint trained at 224 pixels with another window. Validation runs again.
    """
    sources = dict(spec.sources)
    updated: Any = spec
    for path, value in overrides.items():
        updated = _replace_path(updated, path.split("."), value, path)
        sources[path] = ValueProvenance(Source.OVERRIDE, f"set to {value!r}")
    result: TaskSpec = dataclasses.replace(updated, sources=sources)
    return result


def _replace_path(node: Any, parts: list[str], value: Any, path: str) -> Any:
    head, rest = parts[0], parts[1:]
    if isinstance(node, tuple) and node and isinstance(node[0], ClinicalInput):
        names = [item.name for item in node]
        if head not in names:
            raise SpecError(f"override {path!r}: no clinical input {head!r}")
        index = names.index(head)
        child = _replace_path(node[index], rest, value, path) if rest else value
        return (*node[:index], child, *node[index + 1 :])
    is_instance = dataclasses.is_dataclass(node) and not isinstance(node, type)
    if not is_instance or head not in {f.name for f in dataclasses.fields(node)}:
        raise SpecError(f"override {path!r}: unknown field {head!r}")
    current = getattr(node, head)
    new_value = _replace_path(current, rest, value, path) if rest else _coerce(current, value)
    try:
        return dataclasses.replace(node, **{head: new_value})
    except (TypeError, ValueError) as error:
        raise SpecError(f"override {path!r}: {error}") from error


def _coerce(current: object, value: Any) -> Any:
    """JSON gives lists where specs hold tuples; keep the spec's types."""
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
