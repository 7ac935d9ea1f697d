"""One request (DICOM instances + clinical inputs) -> network samples and features.

`StudyPreparer` is built once per task (when the Triton model loads) and called
per request. It refuses oversized and malformed requests before decoding pixels
where it can, and every refusal is an `IntakeError` naming instance and attribute.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from abdoserve.preprocessing.arrangement import Image, arrange
from abdoserve.preprocessing.budget import RequestBudget
from abdoserve.preprocessing.clinical import ROI_KEY, check_keys, clinical_value, feature_vector
from abdoserve.preprocessing.decode import DecodedInstance, decode_instance
from abdoserve.preprocessing.errors import (
    ClinicalInputError,
    InputTooLargeError,
    InstanceCountError,
    WrongModalityError,
    describe_tag,
)
from abdoserve.preprocessing.geometry import (
    Grid,
    centred_grid,
    fill_outside,
    parse_roi,
    resample,
    roi_grid,
)
from abdoserve.preprocessing.intensity import scale_mr, window_ct
from abdoserve.preprocessing.specs import CTWindow, FixedSpacing, TaskSpec
from abdoserve.preprocessing.study_profile import StudyProfile, study_profile

GRID_CACHE_SIZE = 64


@dataclass(frozen=True, eq=False)
class PreparedStudy:
    """What the network eats, and which request instance each sample came from."""

    samples: np.ndarray  # float32 (n, channels, matrix, matrix), values in [0, 1]
    features: np.ndarray  # float32 (feature_width,)
    sources: np.ndarray  # int32 (n,): request instance index of each sample
    roles: tuple[str, ...]  # channel roles (phases, levels) or () for a series
    role_sources: tuple[int, ...]  # request instance index of each role
    stage_seconds: Mapping[str, float] = field(default_factory=dict)  # decode, arrange, pixels
    study_key: str = ""  # see study_key()
    profile: StudyProfile = field(default_factory=StudyProfile)  # what arrived, for drift


class StudyPreparer:
    """Prepares requests for one task spec."""

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        # Scanners repeat a handful of (shape, spacing) pairs: build each grid once.
        self._grids: dict[tuple[tuple[int, int], tuple[float, float]], Grid] = {}
        self.fallback_tags = tuple(
            item.dicom_fallback for item in spec.clinical_inputs if item.dicom_fallback is not None
        )

    def __call__(self, instances: Sequence[bytes], clinical: Mapping[str, object]) -> PreparedStudy:
        spec = self.spec
        check_instance_count(spec, len(instances))
        check_request_bytes(spec, instances)
        check_keys(spec, clinical)
        values = {
            item.name: clinical_value(item, clinical[item.name])
            for item in spec.clinical_inputs
            if clinical.get(item.name) is not None
        }
        started = time.perf_counter()
        budget = RequestBudget(spec.limits)  # inflated and pixel bytes, across the instances
        decoded = [self.decode(data, index, budget) for index, data in enumerate(instances)]
        decoded_at = time.perf_counter()
        images = [
            Image(item, number, frame)
            for item in decoded
            for number, frame in enumerate(item.frames)
        ]
        arranged = arrange(spec, images)
        values.update(fallback_values(spec, values, decoded))
        arranged_at = time.perf_counter()
        # Each image is written straight into the stacked array: no extra copy per study.
        pixels = np.empty((len(arranged), spec.matrix, spec.matrix), dtype=np.float32)
        for image, target in zip(arranged, pixels, strict=True):
            self.prepare_image(image, clinical.get(ROI_KEY), target)
        prepared = assemble(spec, arranged, pixels, feature_vector(spec, values))
        stages = {
            "decode": decoded_at - started,
            "arrange": arranged_at - decoded_at,
            "pixels": time.perf_counter() - arranged_at,
        }
        return replace(
            prepared,
            stage_seconds=stages,
            study_key=study_key(decoded, instances),
            profile=study_profile(
                [item.header for item in decoded],
                [frame for item in decoded for frame in item.frames],
                ct=spec.modality == "CT",
            ),
        )

    def decode(
        self, data: bytes, index: int, budget: RequestBudget | None = None
    ) -> DecodedInstance:
        decoded = decode_instance(data, index, self.spec.limits, self.fallback_tags, budget)
        if decoded.modality != self.spec.modality:
            raise WrongModalityError(modality_problem(self.spec, decoded.modality), instance=index)
        return decoded

    def prepare_image(self, image: Image, roi: object, out: np.ndarray | None = None) -> np.ndarray:
        """One frame -> (matrix, matrix) float32 in [0, 1], written into `out` if given."""
        grid = self.grid_for(image, roi)
        resampled = resample(image.frame.pixels, grid, out)
        source, frame = image.instance, image.frame
        if isinstance(self.spec.intensity, CTWindow):
            window_ct(resampled, frame.slope, frame.intercept, self.spec.intensity)
        else:
            inside = (
                None
                if grid.rows.all_inside and grid.columns.all_inside
                else (grid.rows.inside[:, None] & grid.columns.inside[None, :])
            )
            inverted = source.inverted != (frame.slope < 0)
            scale_mr(
                resampled, inside, self.spec.intensity, inverted=inverted, instance=source.index
            )
        fill_outside(resampled, grid, 0.0)  # 0 is air (CT) and background (MR)
        return resampled

    def grid_for(self, image: Image, roi: object) -> Grid:
        pixels = image.frame.pixels
        shape = (int(pixels.shape[0]), int(pixels.shape[1]))
        geometry = self.spec.geometry
        if isinstance(geometry, FixedSpacing):
            key = (shape, image.frame.spacing)
            grid = self._grids.get(key)
            if grid is None:
                if len(self._grids) >= GRID_CACHE_SIZE:
                    self._grids.clear()
                grid = self._grids[key] = centred_grid(shape, image.frame.spacing, geometry)
            return grid
        return roi_grid(shape, image.frame.spacing, parse_roi(roi, shape), geometry)


def modality_problem(spec: TaskSpec, modality: str) -> str:
    """Names what the task expects, never the value sent: a Modality can hold any text."""
    found = "is missing or empty" if not modality else f"is not {spec.modality}"
    return f"(0008,0060) Modality {found}; {spec.name} reads {spec.modality}"


def check_instance_count(spec: TaskSpec, count: int) -> None:
    """Refuse too many instances before decoding any of them."""
    if count > spec.limits.max_instances_per_request:
        raise InputTooLargeError(
            f"{count} instances exceed the limit of {spec.limits.max_instances_per_request} "
            "per request"
        )
    if count == 0:
        raise InstanceCountError(f"{spec.name} needs at least one DICOM instance, got none")


def check_request_bytes(spec: TaskSpec, instances: Sequence[bytes]) -> None:
    """Refuse a request whose instances together exceed the limit, before decoding any."""
    total = sum(len(item) for item in instances)
    limit = spec.limits.max_bytes_per_request
    if total > limit:
        raise InputTooLargeError(
            f"the request's {len(instances)} instances hold {total} bytes, over the limit of "
            f"{limit} per request"
        )


def fallback_values(
    spec: TaskSpec, given: Mapping[str, float | str], decoded: Sequence[DecodedInstance]
) -> dict[str, float | str]:
    """Clinical inputs the request left out, read from the images where the spec allows."""
    found: dict[str, float | str] = {}
    for item in spec.clinical_inputs:
        if item.name in given:
            continue
        value = decoded[0].extras.get(item.dicom_fallback) if item.dicom_fallback else None
        if value in (None, ""):
            where = (
                f" and the images lack {describe_tag(item.dicom_fallback)}"
                if item.dicom_fallback
                else ""
            )
            raise ClinicalInputError(f"clinical input {item.name!r} is missing{where}")
        found[item.name] = clinical_value(item, value)
    return found


def study_key(decoded: Sequence[DecodedInstance], instances: Sequence[bytes]) -> str:
    """A digest that names the study and nothing in it: SHA-256 of its instances' sorted
    SOP Instance UIDs, so the same study sent again, in any order or transfer syntax,
    gets the same key (a canary's assignment rests on it). An instance without a UID
    counts by the digest of its bytes."""
    names = sorted(
        item.uid or "sha256:" + hashlib.sha256(data).hexdigest()
        for item, data in zip(decoded, instances, strict=True)
    )
    return hashlib.sha256("\\".join(names).encode()).hexdigest()


def assemble(
    spec: TaskSpec, images: Sequence[Image], stacked: np.ndarray, features: np.ndarray
) -> PreparedStudy:
    indices = [image.instance.index for image in images]
    if spec.images.stacking == "channels":
        samples = stacked[None, ...]
        sources = np.asarray(indices[:1], dtype=np.int32)
        return PreparedStudy(samples, features, sources, spec.images.roles, tuple(indices))
    return PreparedStudy(stacked[:, None, ...], features, np.asarray(indices, np.int32), (), ())
