"""Per-frame geometry: pixel spacing, position and orientation of each 2-D frame.

Single-frame images carry these at the top level; enhanced multi-frame images in
the shared and per-frame functional groups. Spacing is required (resampling needs
it); position and orientation are optional here and required by the study
assembly only where it orders or aligns images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from abdoserve.preprocessing import header
from abdoserve.preprocessing.errors import AttributeProblem
from abdoserve.preprocessing.tags import (
    IMAGE_ORIENTATION_PATIENT,
    IMAGE_POSITION_PATIENT,
    PER_FRAME_FUNCTIONAL_GROUPS,
    PIXEL_MEASURES,
    PIXEL_SPACING,
    PLANE_ORIENTATION,
    PLANE_POSITION,
    SHARED_FUNCTIONAL_GROUPS,
)


@dataclass(frozen=True, eq=False)
class Frame:
    """One 2-D frame of stored values and where it lies in the patient."""

    pixels: np.ndarray  # (rows, columns), stored values
    spacing: tuple[float, float]  # (between rows, between columns) in mm
    position: tuple[float, ...] | None  # (x, y, z) centre of the first pixel, mm
    orientation: tuple[float, ...] | None  # row and column direction cosines

    @property
    def normal(self) -> np.ndarray | None:
        if self.orientation is None:
            return None
        row, column = np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:])
        normal: np.ndarray = np.cross(row, column)
        return normal


def frames_of(dataset: Dataset, pixels: np.ndarray, index: int) -> tuple[Frame, ...]:
    """Split decoded pixels (frames, rows, columns) into frames with their geometry."""
    shared = _first_item(dataset, SHARED_FUNCTIONAL_GROUPS)
    per_frame_element = dataset.get(PER_FRAME_FUNCTIONAL_GROUPS)
    per_frame = per_frame_element.value if per_frame_element is not None else None
    frames = []
    for number in range(pixels.shape[0]):
        groups = per_frame[number] if per_frame and number < len(per_frame) else None
        sources = [item for item in (groups, shared) if item is not None] + [dataset]
        frames.append(
            Frame(
                pixels=pixels[number],
                spacing=_spacing(sources, index),
                position=_vector(sources, PLANE_POSITION, IMAGE_POSITION_PATIENT, 3, index),
                orientation=_vector(
                    sources, PLANE_ORIENTATION, IMAGE_ORIENTATION_PATIENT, 6, index
                ),
            )
        )
    return tuple(frames)


def _first_item(dataset: Dataset, tag: int) -> Dataset | None:
    element = dataset.get(tag)
    return element.value[0] if element is not None and element.value else None


def _lookup(sources: list[Dataset], macro: int, tag: int, index: int) -> tuple[float, ...] | None:
    """The attribute from the first source that has it, inside `macro` for functional groups."""
    for source in sources:
        holder = _first_item(source, macro) if macro in source else source
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
