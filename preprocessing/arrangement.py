"""Series assembly: which decoded frame plays which part, in which order.

- A free series is sorted by position along the slice normal (not by file order),
  after checking that all slices share orientation and pixel spacing.
- Section levels (MRI) are ordered cranial to caudal by position; they must differ.
- Phases (dynamic CT) are ordered by acquisition time, or request order when the
  times are missing or tied; they must show the same location with the same geometry.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from abdoserve.preprocessing.acquisition import position_along, time_seconds, toward_head
from abdoserve.preprocessing.decode import DecodedInstance
from abdoserve.preprocessing.errors import (
    AttributeProblem,
    InconsistentGeometryError,
    InstanceCountError,
    describe_tag,
)
from abdoserve.preprocessing.frames import Frame
from abdoserve.preprocessing.specs import TaskSpec
from abdoserve.preprocessing.tags import (
    ACQUISITION_TIME,
    IMAGE_ORIENTATION_PATIENT,
    IMAGE_POSITION_PATIENT,
    PIXEL_SPACING,
    ROWS,
)

PARALLEL_TOLERANCE = 0.99  # |cos| between slice normals (about 8 degrees)
SPACING_TOLERANCE = 0.01  # relative difference in pixel spacing
PHASE_LOCATION_TOLERANCE_MM = 10.0  # phases of one mass: same location within this


@dataclass(frozen=True, eq=False)
class Image:
    """One frame of one request instance."""

    instance: DecodedInstance
    number: int  # frame number within the instance
    frame: Frame

    @property
    def index(self) -> int:
        return self.instance.index


def arrange(spec: TaskSpec, images: Sequence[Image]) -> list[Image]:
    """The images in the order the network reads them; geometry checked."""
    check_image_count(spec, len(images))
    roles = spec.images.roles
    if not roles:
        return sort_series(images)
    if spec.modality == "MR" or "cranial" in roles:
        return order_levels(images)
    return order_phases(images)


def check_image_count(spec: TaskSpec, count: int) -> None:
    wanted = spec.images
    if wanted.min_images <= count <= wanted.max_images:
        return
    if wanted.roles:
        expected = f"exactly {len(wanted.roles)} images ({', '.join(wanted.roles)})"
    else:
        expected = f"{wanted.min_images} to {wanted.max_images} images"
    raise InstanceCountError(f"{spec.name} needs {expected}, got {count}")


def sort_series(images: Sequence[Image]) -> list[Image]:
    """Sort slices by position along the normal; request order if positions are absent."""
    check_same_spacing(images)
    if any(image.frame.position is None or image.frame.orientation is None for image in images):
        return list(images)
    normal = check_parallel(images)
    return sorted(images, key=lambda image: _along(image, normal))


def order_levels(images: Sequence[Image]) -> list[Image]:
    """Section levels, cranial (largest patient z along the normal) first."""
    for image in images:
        _require_position(image, "needed to order the section levels")
    normal = np.array(toward_head(check_parallel(images)), dtype=np.float64)
    ordered = sorted(images, key=lambda image: -_along(image, normal))
    for above, below in itertools.pairwise(ordered):
        if abs(_along(above, normal) - _along(below, normal)) < 1e-3:
            raise InconsistentGeometryError(
                f"{describe_tag(IMAGE_POSITION_PATIENT)} equals that of instance {above.index}: "
                "the section levels must differ",
                instance=below.index,
            )
    return ordered


def order_phases(images: Sequence[Image]) -> list[Image]:
    """Phases by acquisition time (request order when missing or tied); same location."""
    times = [_acquisition_seconds(image) for image in images]
    ordered = list(images)
    if None not in times and len(set(times)) == len(times):
        ordered = [
            image
            for _, image in sorted(zip(times, images, strict=True), key=lambda pair: pair[0] or 0.0)
        ]
    reference = ordered[0]
    for image in ordered[1:]:
        check_same_grid(reference, image)
        check_same_location(reference, image)
    return ordered


def check_same_spacing(images: Sequence[Image]) -> None:
    first = images[0]
    for image in images[1:]:
        if not np.allclose(image.frame.spacing, first.frame.spacing, rtol=SPACING_TOLERANCE):
            raise InconsistentGeometryError(
                f"{describe_tag(PIXEL_SPACING)} {list(image.frame.spacing)} differs from instance "
                f"{first.index} {list(first.frame.spacing)}",
                instance=image.index,
            )


def check_parallel(images: Sequence[Image]) -> np.ndarray:
    """The common slice normal; refuse slices whose orientation differs."""
    normal = images[0].frame.normal
    if normal is None:
        raise AttributeProblem(IMAGE_ORIENTATION_PATIENT, "is missing", instance=images[0].index)
    for image in images[1:]:
        other = image.frame.normal
        if other is None or abs(float(np.dot(normal, other))) < PARALLEL_TOLERANCE:
            raise InconsistentGeometryError(
                f"{describe_tag(IMAGE_ORIENTATION_PATIENT)} differs from instance "
                f"{images[0].index}",
                instance=image.index,
            )
    return normal


def check_same_grid(reference: Image, image: Image) -> None:
    if image.frame.pixels.shape != reference.frame.pixels.shape:
        raise InconsistentGeometryError(
            f"{describe_tag(ROWS)}/Columns {image.frame.pixels.shape} differ from instance "
            f"{reference.index} {reference.frame.pixels.shape}; phases must share one grid",
            instance=image.index,
        )
    check_same_spacing([reference, image])


def check_same_location(reference: Image, image: Image) -> None:
    """Phases must show the same slice location (when both carry a position)."""
    if reference.frame.position is None or image.frame.position is None:
        return
    normal = check_parallel([reference, image])
    distance = abs(_along(image, normal) - _along(reference, normal))
    if distance > PHASE_LOCATION_TOLERANCE_MM:
        raise InconsistentGeometryError(
            f"{describe_tag(IMAGE_POSITION_PATIENT)} lies {distance:.1f} mm from instance "
            f"{reference.index} along the slice normal; the phases must show one location "
            f"(tolerance {PHASE_LOCATION_TOLERANCE_MM:g} mm)",
            instance=image.index,
        )


def _require_position(image: Image, why: str) -> None:
    if image.frame.position is None:
        raise AttributeProblem(IMAGE_POSITION_PATIENT, f"is missing; {why}", instance=image.index)
    if image.frame.orientation is None:
        raise AttributeProblem(
            IMAGE_ORIENTATION_PATIENT, f"is missing; {why}", instance=image.index
        )


def _along(image: Image, normal: np.ndarray) -> float:
    assert image.frame.position is not None
    return position_along(image.frame.position, normal)


def _acquisition_seconds(image: Image) -> float | None:
    """AcquisitionTime (else ContentTime) in seconds after midnight; None where it is
    missing or not a valid TM, and the phases keep request order."""
    text = image.instance.acquisition_time
    if not text:
        return None
    try:
        return time_seconds(text, ACQUISITION_TIME)
    except AttributeProblem:
        return None
