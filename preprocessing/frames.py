"""Each 2-D frame's geometry and modality LUT: spacing, position, orientation, rescale.

Single-frame images carry these at the top level; enhanced multi-frame images
(Enhanced CT and MR) in the per-frame functional groups, else the shared ones, and
each frame may have its own. Spacing is required (resampling needs it); a CT frame
needs Rescale Slope and Intercept (stored values are not Hounsfield units without
them); position and orientation are optional here and required by the study
assembly only where it orders or aligns images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from abdoserve.preprocessing import header
from abdoserve.preprocessing.acquisition import slice_normal
from abdoserve.preprocessing.errors import AttributeProblem, ModalityLutError
from abdoserve.preprocessing.tags import (
    IMAGE_ORIENTATION_PATIENT,
    IMAGE_POSITION_PATIENT,
    MODALITY_LUT_SEQUENCE,
    PER_FRAME_FUNCTIONAL_GROUPS,
    PIXEL_MEASURES,
    PIXEL_SPACING,
    PIXEL_VALUE_TRANSFORMATION,
    PLANE_ORIENTATION,
    PLANE_POSITION,
    RESCALE_INTERCEPT,
    RESCALE_SLOPE,
    SHARED_FUNCTIONAL_GROUPS,
)


@dataclass(frozen=True, eq=False)
class Frame:
    """One 2-D frame of stored values and where it lies in the patient."""

    pixels: np.ndarray  # (rows, columns), stored values
    spacing: tuple[float, float]  # (between rows, between columns) in mm
    position: tuple[float, ...] | None  # (x, y, z) centre of the first pixel, mm
    orientation: tuple[float, ...] | None  # row and column direction cosines
    slope: float = 1.0  # modality LUT: value = stored * slope + intercept (HU for CT)
    intercept: float = 0.0

    @property
    def normal(self) -> np.ndarray | None:
        """The unit slice normal (row x column), None without an orientation."""
        if self.orientation is None:
            return None
        return np.asarray(slice_normal(self.orientation))


def frames_of(dataset: Dataset, pixels: np.ndarray, index: int, modality: str) -> tuple[Frame, ...]:
    """Split decoded pixels (frames, rows, columns) into frames with geometry and LUT."""
    if header.present(dataset, MODALITY_LUT_SEQUENCE):
        raise ModalityLutError(
            "(0028,3000) Modality LUT Sequence is not supported; "
            "Rescale Slope and Intercept are required",
            instance=index,
        )
    shared = _first_item(dataset, SHARED_FUNCTIONAL_GROUPS, index)
    per_frame = _items(dataset, PER_FRAME_FUNCTIONAL_GROUPS, index)
    frames = []
    for number in range(pixels.shape[0]):
        groups = per_frame[number] if per_frame and number < len(per_frame) else None
        sources = [item for item in (groups, shared) if item is not None] + [dataset]
        slope, intercept = _modality_lut(sources, modality, index)
        frames.append(
            Frame(
                pixels=pixels[number],
                slope=slope,
                intercept=intercept,
                spacing=_spacing(sources, index),
                position=_vector(sources, PLANE_POSITION, IMAGE_POSITION_PATIENT, 3, index),
                orientation=_vector(
                    sources, PLANE_ORIENTATION, IMAGE_ORIENTATION_PATIENT, 6, index
                ),
            )
        )
    return tuple(frames)


def _modality_lut(sources: list[Dataset], modality: str, index: int) -> tuple[float, float]:
    """(slope, intercept) of one frame; identity where an MR image carries none."""
    values = []
    for tag, fallback in ((RESCALE_SLOPE, 1.0), (RESCALE_INTERCEPT, 0.0)):
        value = _lookup(sources, PIXEL_VALUE_TRANSFORMATION, tag, index)
        if value is None and modality == "CT":
            raise AttributeProblem(
                tag, "is missing; CT needs it to give Hounsfield units", instance=index
            )
        values.append(fallback if not value else value[0])
    if values[0] == 0:
        raise AttributeProblem(RESCALE_SLOPE, "is zero", instance=index)
    return values[0], values[1]


def _items(dataset: Dataset, tag: int, index: int) -> list[Dataset]:
    """A sequence's items; anything else under a sequence's tag is the sender's error
    (attributes in the wrong place were found by fuzzing)."""
    element = dataset.get(tag)
    if element is None or element.value in (None, b"", ""):
        return []
    value = element.value
    if not isinstance(value, Sequence) or not all(isinstance(item, Dataset) for item in value):
        raise AttributeProblem(tag, "is not a sequence of items", instance=index)
    return list(value)


def _first_item(dataset: Dataset, tag: int, index: int) -> Dataset | None:
    items = _items(dataset, tag, index)
    return items[0] if items else None


def _lookup(sources: list[Dataset], macro: int, tag: int, index: int) -> tuple[float, ...] | None:
    """The attribute from the first source that has it, inside `macro` for functional groups."""
    for source in sources:
        holder = _first_item(source, macro, index) if macro in source else source
        if holder is not None and header.present(holder, tag):
            return header.numbers(holder, tag, index)
    return None


def _spacing(sources: list[Dataset], index: int) -> tuple[float, float]:
    value = _lookup(sources, PIXEL_MEASURES, PIXEL_SPACING, index)
    if value is None:
        raise AttributeProblem(PIXEL_SPACING, "is missing", instance=index)
    numbers = _numbers(value, 2, PIXEL_SPACING, index)
    if min(numbers) <= 0:
        raise AttributeProblem(PIXEL_SPACING, f"must be positive, got {numbers}", instance=index)
    return numbers[0], numbers[1]


def _vector(
    sources: list[Dataset], macro: int, tag: int, size: int, index: int
) -> tuple[float, ...] | None:
    value = _lookup(sources, macro, tag, index)
    return None if value is None else _numbers(value, size, tag, index)


def _numbers(numbers: tuple[float, ...], size: int, tag: int, index: int) -> tuple[float, ...]:
    if len(numbers) != size or not np.all(np.isfinite(numbers)):
        raise AttributeProblem(tag, f"must hold {size} finite numbers", instance=index)
    return numbers
