"""Which instances of a series a request carries: slice positions, then the picking methods.

A slice's position `z` is its ImagePositionPatient projected on the slice normal
(ImageOrientationPatient's row x column direction), the normal flipped where it points
to the feet, so that a larger z lies nearer the head whatever the scanner wrote; the
projection and the TM parsing are the intake's (`preprocessing.acquisition`). Picks
come out head first. Header values are read from the raw bytes (`header_texts`): a missing or
broken element makes an instance unusable, never the routing of a study fail.

Problem texts say counts, UIDs and positions in mm, never a header's text.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.valuerep import TEXT_VR_DELIMS

from abdoserve.preprocessing.acquisition import (
    position_along,
    slice_normal,
    time_seconds,
    toward_head,
)
from abdoserve.preprocessing.errors import AttributeProblem

SAME_POSITION_MM = 0.01  # slices closer than this are one position (a repeat, not a level)
_ORIENTATION_DECIMALS = 3  # orientations equal to this precision are one orientation
_DISTANCE_DECIMALS = 6  # ties between candidate slices are ties, not rounding noise
_NO_NUMBER = 2**31  # sorts an instance without an InstanceNumber last


def _element(ds: Dataset, keyword: str) -> DataElement | RawDataElement | None:
    try:  # keep_deferred: never convert here
        return ds.get_item(keyword, keep_deferred=True)
    except (KeyError, ValueError):
        return None


def _decoded(ds: Dataset, raw: bytes) -> str:
    """Raw text bytes in the dataset's character set (replacement characters at worst)."""
    charset = _element(ds, "SpecificCharacterSet")
    value = None if charset is None else charset.value
    if isinstance(value, bytes):
        names = value.decode("ascii", "replace").split("\\")
    elif isinstance(value, MultiValue | list):
        names = [str(item) for item in value]
    else:
        names = [value] if isinstance(value, str) else []
    names = [name.strip(" \x00") for name in names]
    try:
        return decode_bytes(raw, convert_encodings(names if any(names) else None), TEXT_VR_DELIMS)
    except (LookupError, UnicodeError, ValueError):
        return raw.decode("latin-1")


def header_texts(ds: Dataset, keyword: str) -> tuple[str, ...] | None:
    """A text element's values (split at backslashes, padding stripped); None when it is
    absent or empty.

    The raw bytes are read, not pydicom's converted value: the conversion validates, and
    pydicom logs an invalid value with its text (a patient's age, a description), and a
    malformed element would raise. Here it just fails the criterion that reads it.
    """
    element = _element(ds, keyword)
    value = None if element is None else element.value
    if isinstance(value, bytes):
        parts: list[str] = _decoded(ds, value).split("\\")
    elif isinstance(value, str | int | float):
        parts = [str(value)]
    elif isinstance(value, MultiValue | list):
        parts = [str(item) for item in value]
    else:
        return None
    stripped = tuple(part.strip(" \x00") for part in parts)
    return stripped if any(stripped) else None


def header_text(ds: Dataset, keyword: str) -> str | None:
    """A single-valued text element, stripped; None when absent, empty or multi-valued."""
    values = header_texts(ds, keyword)
    return values[0] if values is not None and len(values) == 1 else None


def header_number(ds: Dataset, keyword: str) -> float | None:
    """A single finite number (DS, IS); None otherwise."""
    numbers = header_numbers(ds, keyword, 1)
    return numbers[0] if numbers else None


def header_numbers(ds: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    """Exactly `count` finite numbers (DS, IS); None otherwise."""
    values = header_texts(ds, keyword)
    if values is None or len(values) != count:
        return None
    try:
        numbers = tuple(float(item) for item in values)
    except ValueError:
        return None
    return numbers if all(math.isfinite(number) for number in numbers) else None


def time_of_day(ds: Dataset, keyword: str) -> float | None:
    """A TM element in seconds after midnight; None where it is absent or not a valid TM."""
    value = header_text(ds, keyword)
    if value is None:
        return None
    try:
        return time_seconds(value, Tag(keyword))
    except AttributeProblem:
        return None


def instance_key(ds: Dataset) -> tuple[int, str]:
    """The order of a series' instances: InstanceNumber, then SOP Instance UID."""
    number = header_number(ds, "InstanceNumber")
    usable = number is not None and number.is_integer() and abs(number) < _NO_NUMBER
    return (int(number) if usable and number is not None else _NO_NUMBER, _uid(ds) or "")


def reference_instance(datasets: Sequence[Dataset]) -> Dataset | None:
    """The instance whose header stands for the series: the lowest InstanceNumber.

    Fixed by the headers, not by the order the instances arrived in.
    """
    return min(datasets, key=instance_key) if datasets else None


@dataclass(frozen=True)
class Slice:
    sop_uid: str
    z_mm: float


@dataclass(frozen=True)
class Stack:
    """A series' usable slices, head first, one instance per position.

    `unusable` counts instances left out for want of a SOP Instance UID, a position or
    an orientation, or for another orientation than most of the series (a localizer);
    a repeated instance or position is dropped without being counted.
    """

    slices: tuple[Slice, ...]
    unusable: int = 0

    @property
    def z_values(self) -> list[float]:
        return [item.z_mm for item in self.slices]

    def within(self, z_range: tuple[float, float] | None) -> Stack:
        """The slices with z_range[0] <= z <= z_range[1] (all of them for None)."""
        if z_range is None:
            return self
        low, high = z_range
        kept = tuple(item for item in self.slices if low <= item.z_mm <= high)
        return Stack(kept, self.unusable)


@dataclass(frozen=True)
class Picked:
    """The chosen instances in the order to send, or why none can be sent."""

    instances: tuple[str, ...]
    problem: str | None = None


def stack_of(datasets: Iterable[Dataset]) -> Stack:
    """The series' slices, head first; at a repeated position the lowest InstanceNumber."""
    placed: dict[str, tuple[tuple[float, ...] | None, tuple[float, ...] | None]] = {}
    unusable = 0
    for ds in sorted(datasets, key=instance_key):
        uid = _uid(ds)
        if uid is None:
            unusable += 1
        elif uid not in placed:  # one instance received twice is one instance
            placed[uid] = (_orientation(ds), header_numbers(ds, "ImagePositionPatient", 3))
    counts = Counter(_rounded(found) for found, _ in placed.values() if found is not None)
    # The most common orientation; equal counts go to the lowest, so arrival order is moot.
    common = min(counts, key=lambda key: (-counts[key], key)) if counts else None
    slices: list[Slice] = []
    for uid, (found, position) in placed.items():
        if common is None or found is None or position is None or _rounded(found) != common:
            unusable += 1
        else:
            z = position_along(position, toward_head(slice_normal(common)))
            slices.append(Slice(uid, round(z, 4)))
    return Stack(_one_per_position(slices), unusable)


def _uid(ds: Dataset) -> str | None:
    return header_text(ds, "SOPInstanceUID")


def _orientation(ds: Dataset) -> tuple[float, ...] | None:
    found = header_numbers(ds, "ImageOrientationPatient", 6)
    if found is None or _length(found[:3]) < 0.5 or _length(found[3:]) < 0.5:
        return None
    return found


def _rounded(orientation: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(value, _ORIENTATION_DECIMALS) + 0.0 for value in orientation)


def _length(vector: Sequence[float]) -> float:
    return math.sqrt(sum(value * value for value in vector))


def _one_per_position(slices: list[Slice]) -> tuple[Slice, ...]:
    """Head first; of slices at one position the first (the lowest InstanceNumber) stays."""
    kept: list[Slice] = []
    for item in sorted(slices, key=lambda each: -each.z_mm):  # stable: keeps instance order
        if not any(abs(item.z_mm - other.z_mm) < SAME_POSITION_MM for other in kept[-1:]):
            kept.append(item)
    return tuple(kept)


def nearest_in_order(z_values: Sequence[float], targets: Sequence[float]) -> list[int]:
    """For targets head first, distinct slice indices in the same order, each near its
    target: the set with the least total distance (exactly the nearest slice to each
    target whenever those differ). Ties go to the more cranial slice.

    Dynamic programming over (target, slice), O(targets x slices).
    """
    count, size = len(targets), len(z_values)
    if count > size:
        raise ValueError("more targets than slices")
    cost = [[round(abs(z - target), _DISTANCE_DECIMALS) for z in z_values] for target in targets]
    total = [cost[0][:]]  # total[j][i]: best for targets 0..j with target j on slice i
    came_from: list[list[int]] = [[-1] * size]
    for j in range(1, count):
        row, links = [math.inf] * size, [-1] * size
        best, best_at = math.inf, -1
        for i in range(j, size):
            if total[j - 1][i - 1] < best:  # strict: the earlier (cranial) slice wins ties
                best, best_at = total[j - 1][i - 1], i - 1
            row[i], links[i] = best + cost[j][i], best_at
        total.append(row)
        came_from.append(links)
    last = min(range(count - 1, size), key=lambda i: (total[-1][i], i))
    chosen = [last]
    for j in range(count - 1, 0, -1):
        chosen.append(came_from[j][chosen[-1]])
    return chosen[::-1]


def _at_fractions(stack: Stack, fractions: Sequence[float]) -> tuple[str, ...]:
    """The slices nearest to fractions of the z extent, 0 = the cranial end."""
    z = stack.z_values
    top, bottom = z[0], z[-1]
    targets = [top + (bottom - top) * fraction for fraction in fractions]
    return tuple(stack.slices[i].sop_uid for i in nearest_in_order(z, targets))


def _too_few(stack: Stack, need: int, z_range: tuple[float, float] | None) -> str | None:
    have = len(stack.slices)
    if have >= need:
        return None
    where = f" within z {z_range[0]:g}..{z_range[1]:g} mm" if z_range else ""
    unusable = f" ({stack.unusable} without a usable position)" if stack.unusable else ""
    noun = "image" if need == 1 else "images"
    return f"needs {need} {noun}, series has {have}{where}{unusable}"


def pick_all(
    stack: Stack, low: int, high: int, z_range: tuple[float, float] | None = None
) -> Picked:
    """Every slice (within z_range), head first; more than `high` is a problem, not a cut."""
    chosen = stack.within(z_range)
    problem = _too_few(chosen, low, z_range)
    if problem is None and len(chosen.slices) > high:
        problem = (
            f"series has {len(chosen.slices)} images, the task takes at most {high}: "
            "select evenly_spaced or narrow z_range"
        )
    if problem:
        return Picked((), problem)
    return Picked(tuple(item.sop_uid for item in chosen.slices))


def pick_evenly_spaced(
    stack: Stack, count: int, low: int, z_range: tuple[float, float] | None = None
) -> Picked:
    """`count` slices nearest to evenly spaced z over the slices' extent (within z_range);
    all of them when the series has no more than `count`."""
    chosen = stack.within(z_range)
    problem = _too_few(chosen, low, z_range)
    if problem:
        return Picked((), problem)
    if len(chosen.slices) <= count:
        return Picked(tuple(item.sop_uid for item in chosen.slices))
    if count == 1:
        return Picked(_at_fractions(chosen, [0.5]))
    return Picked(_at_fractions(chosen, [step / (count - 1) for step in range(count)]))


def pick_levels(
    stack: Stack, fractions: Sequence[float], z_range: tuple[float, float] | None = None
) -> Picked:
    """One slice per level: nearest to each fraction of the z extent (0 = cranial end)."""
    chosen = stack.within(z_range)
    problem = _too_few(chosen, len(fractions), z_range)
    if problem:
        return Picked((), problem)
    return Picked(_at_fractions(chosen, fractions))


@dataclass(frozen=True)
class Phase:
    """One series of a multi-phase acquisition: its UID, slices and when it was acquired."""

    series_uid: str
    stack: Stack
    started_s: float | None  # the earliest AcquisitionTime of its instances
    series_number: int | None

    @property
    def order(self) -> tuple[float, float, str]:
        """Acquisition order: time, then SeriesNumber (missing ones last), then UID."""
        number = self.series_number
        return (
            math.inf if self.started_s is None else self.started_s,
            math.inf if number is None else number,
            self.series_uid,
        )


def phase_of(series_uid: str, datasets: Sequence[Dataset]) -> Phase:
    times = [t for t in (time_of_day(ds, "AcquisitionTime") for ds in datasets) if t is not None]
    reference = reference_instance(datasets)
    number = None if reference is None else header_number(reference, "SeriesNumber")
    series_number = int(number) if number is not None and number.is_integer() else None
    return Phase(series_uid, stack_of(datasets), min(times, default=None), series_number)


def pick_phases(
    phases: Sequence[Phase], count: int, z_mm: float | None, tolerance_mm: float
) -> tuple[tuple[str, ...], Picked]:
    """One slice per series at a common z, in acquisition order: the series' UIDs and
    the picks. The common z is `z_mm`, else the median z of the first series."""
    ordered = sorted(phases, key=lambda phase: phase.order)
    series_uids = tuple(phase.series_uid for phase in ordered)
    if len(ordered) != count:
        hint = "" if len(ordered) < count else ": narrow the rule's match"
        return series_uids, Picked((), f"needs {count} series, {len(ordered)} matched{hint}")
    empty = next((phase.series_uid for phase in ordered if not phase.stack.slices), None)
    if empty is not None:
        return series_uids, Picked((), f"series {empty} has no image with a usable position")
    level = _median(ordered[0].stack.z_values) if z_mm is None else z_mm
    chosen: list[str] = []
    for phase in ordered:
        nearest = min(phase.stack.slices, key=lambda item: (abs(item.z_mm - level), -item.z_mm))
        if abs(nearest.z_mm - level) > tolerance_mm:
            problem = f"series {phase.series_uid} has no slice within {tolerance_mm:g} mm"
            return series_uids, Picked((), f"{problem} of z {level:g} mm")
        chosen.append(nearest.sop_uid)
    return series_uids, Picked(tuple(chosen))


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2.0


def frame_count(ds: Dataset) -> int:
    """(0028,0008) Number of Frames; 1 where absent or unreadable."""
    value = header_number(ds, "NumberOfFrames")
    return int(value) if value is not None and value.is_integer() and value > 1 else 1


def pick_multiframe(datasets: Sequence[Dataset], low: int, high: int) -> Picked:
    """An Enhanced (multi-frame) series goes whole: an instance is what travels, and its
    frames cannot be chosen without rewriting it. Too few or too many frames for the task
    is a problem, never a cut."""
    ordered = sorted(datasets, key=instance_key)
    uids = tuple(uid for uid in (_uid(ds) for ds in ordered) if uid is not None)
    frames = sum(frame_count(ds) for ds in ordered)
    if frames < low:
        return Picked((), f"needs {low} images, series has {frames} frames")
    if frames > high:
        return Picked(
            (),
            f"series has {frames} frames in {len(uids)} multi-frame instance(s), the task "
            f"takes at most {high}: frames of an enhanced instance are not selected",
        )
    return Picked(uids)
