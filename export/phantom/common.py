"""What every phantom study shares: the study record, patient, slice rendering
and ground truth, and writing a study to a folder."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset

from abdoserve.export.phantom.anatomy import (
    AORTA_XY,
    OESOPHAGUS_LUMEN_MM,
    VERTEBRA_XY,
    PhantomGrid,
    SliceAnatomy,
    label_slice,
    oesophagus_centre,
)
from abdoserve.export.phantom.dicom_writer import (
    Patient,
    PixelFormat,
    SeriesHeader,
    SliceHeader,
    StudyHeader,
    ct_dataset,
    encode,
    phantom_uid,
    resolve_transfer_syntax,
)
from abdoserve.export.phantom.render import Region, regions, render, to_stored
from abdoserve.export.phantom.tissues import FloatArray, Label

MAX_SEED = 10**12
CT_GRID = PhantomGrid(rows=512, cols=512, spacing_mm=0.75)
Truth = dict[str, Any]  # JSON-ready ground truth


@dataclass(frozen=True)
class PhantomStudy:
    """One request's worth of DICOM files, its clinical inputs and what is true of it.

    `instances` are encoded DICOM files in file order (deliberately unsorted for
    series tasks); `truth["instances"][i]` describes `instances[i]`.
    """

    task: str
    instances: tuple[bytes, ...]
    clinical: dict[str, object]
    truth: dict[str, Any]


@dataclass(frozen=True)
class Encoding:
    """How a study's pixels are stored and its files encoded."""

    syntax: uid.UID
    pixels: PixelFormat
    noise_sd: float
    value_range: tuple[float, float]  # values clip here before storing


@dataclass(frozen=True)
class Planned:
    """One instance to render: anatomy, series, time, and its values by label."""

    anatomy: SliceAnatomy
    series: SeriesHeader
    instance_number: int
    acquisition_time: str
    values: FloatArray
    facts: Truth = field(default_factory=dict)
    liver_change: FloatArray | None = None


DatasetMaker = Callable[[SeriesHeader, SliceHeader], Dataset]


def make_rng(seed: int) -> np.random.Generator:
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be in 0..{MAX_SEED - 1}")
    return np.random.default_rng(seed)


def make_study(
    task: str,
    seed: int,
    rng: np.random.Generator,
    description: str,
    *,
    age: int | None = None,
    sex: str | None = None,
) -> StudyHeader:
    """Patient and study identity, all derived from the seed."""
    age = int(rng.integers(40, 81)) if age is None else age
    if not 18 <= age <= 100:
        raise ValueError("age must be in 18..100")
    sex = str(rng.choice(["M", "F"])) if sex is None else sex
    if sex not in ("M", "F"):
        raise ValueError("sex must be 'M' or 'F'")
    study_date = date(2023, 1, 1) + timedelta(days=seed % 365)
    birth = study_date.replace(year=study_date.year - age) - timedelta(days=1)
    patient = Patient(f"PHANTOM-{seed:04d}", birth, "M" if sex == "M" else "F", age)
    return StudyHeader(
        uid=phantom_uid(task, seed, "study"),
        frame_of_reference_uid=phantom_uid(task, seed, "frame"),
        study_date=study_date,
        study_time="093000",
        accession=f"PH{seed}",
        description=f"PHANTOM {description}",
        patient=patient,
    )


def clock(seconds: float) -> str:
    """HHMMSS.FFFFFF for a time of day given in seconds after midnight."""
    whole = int(seconds)
    micro = round((seconds - whole) * 1e6)
    return f"{whole // 3600:02d}{whole // 60 % 60:02d}{whole % 60:02d}.{micro:06d}"


def file_order(rng: np.random.Generator, count: int, shuffle: bool) -> list[int]:
    """A permutation of range(count): shuffled, and (for count > 2) in neither
    ascending nor descending order, so a consumer must sort by position."""
    order = list(range(count))
    if not shuffle or count < 2:
        return order
    order = [int(i) for i in rng.permutation(count)]
    monotonic = (sorted(order), sorted(order, reverse=True))
    if order in monotonic[: 2 if count > 2 else 1]:
        order = order[1:] + order[:1]
    return order


def landmarks(anatomy: SliceAnatomy) -> dict[str, tuple[float, float, Label]]:
    """Points inside named tissues; those present at the slice go into the truth."""
    points = {
        "liver": (-35.0, -45.0, Label.LIVER),
        "spleen": (100.0, 20.0, Label.SPLEEN),
        "aorta": (*AORTA_XY, Label.AORTA),
        "trabecular_bone": (*VERTEBRA_XY, Label.TRABECULAR_BONE),
        "kidney": (-65.0, 75.0, Label.KIDNEY),
        "paraspinal_muscle": (35.0, 105.0, Label.MUSCLE),
        "subcutaneous_fat": (0.0, -107.0, Label.FAT),
        "heart": (15.0, -45.0, Label.HEART),
        "air": (0.0, -180.0, Label.AIR),
    }
    if anatomy.mass is not None:
        points["mass"] = (anatomy.mass.x_mm, anatomy.mass.y_mm, Label.MASS_CORE)
    centre = oesophagus_centre(anatomy.z_mm)
    if centre is not None:
        wall = anatomy.oesophageal_wall_mm
        label = Label.OESOPHAGEAL_TUMOUR if wall > 5.0 else Label.OESOPHAGUS_WALL
        x = centre[0] + OESOPHAGUS_LUMEN_MM + wall / 2
        points["oesophageal_wall"] = (x, centre[1], label)
    return points


def render_instance(
    plan: Planned,
    *,
    grid: PhantomGrid,
    thickness_mm: float,
    encoding: Encoding,
    rng: np.random.Generator,
    make_dataset: DatasetMaker,
) -> tuple[bytes, Truth]:
    """Encode one planned slice; return its file and its truth record."""
    labels = label_slice(grid, plan.anatomy)
    image = render(labels, plan.values, encoding.noise_sd, rng, plan.liver_change)
    image = np.clip(image, *encoding.value_range)
    intercept = encoding.pixels.rescale_intercept or 0.0
    stored = to_stored(image, intercept, encoding.pixels.signed, encoding.pixels.bits_stored)
    sop = phantom_uid(plan.series.uid, plan.instance_number, "sop")
    info = SliceHeader(
        sop, plan.instance_number, plan.anatomy.z_mm, grid, thickness_mm, plan.acquisition_time
    )
    data = encode(make_dataset(plan.series, info), stored, encoding.syntax)
    found: dict[str, Region] = regions(grid, labels, plan.values, landmarks(plan.anatomy))
    truth: Truth = {
        "z_mm": plan.anatomy.z_mm,
        "instance_number": plan.instance_number,
        "series_number": plan.series.number,
        "series_description": plan.series.description,
        "sop_instance_uid": sop,
        "regions": found,
        **plan.facts,
    }
    return data, truth


def assemble(
    task: str,
    rendered: Sequence[tuple[bytes, Truth]],
    order: Sequence[int],
    clinical: dict[str, object],
    truth: Truth,
) -> PhantomStudy:
    """Put rendered instances into file order and the study's truth together."""
    files = tuple(rendered[i][0] for i in order)
    records = [rendered[i][1] for i in order]
    for position, record in enumerate(records):
        record["file"] = f"{position + 1:04d}.dcm"
    full: Truth = {"task": task, **truth, "instances": records}
    return PhantomStudy(task=task, instances=files, clinical=clinical, truth=full)


def encoding_truth(encoding: Encoding, grid: PhantomGrid, thickness_mm: float) -> Truth:
    pixels = encoding.pixels
    return {
        "transfer_syntax": str(encoding.syntax),
        "rows": grid.rows,
        "columns": grid.cols,
        "pixel_spacing_mm": grid.spacing_mm,
        "slice_thickness_mm": thickness_mm,
        "noise_sd": encoding.noise_sd,
        "pixel_representation": int(pixels.signed),
        "bits_stored": pixels.bits_stored,
        "rescale_intercept": pixels.rescale_intercept,
    }


def write_study(study: PhantomStudy, out_dir: Path) -> list[Path]:
    """Write 0001.dcm, 0002.dcm, ... in file order, request.json (the clinical
    inputs) and truth.json; return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for position, data in enumerate(study.instances):
        path = out_dir / f"{position + 1:04d}.dcm"
        path.write_bytes(data)
        paths.append(path)
    for name, content in (("request.json", study.clinical), ("truth.json", study.truth)):
        path = out_dir / name
        path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        paths.append(path)
    return paths


# Shared by the study builders.
DEFAULT_SYNTAX = "ExplicitVRLittleEndian"
CT_RANGE_HU = (-1024.0, 3071.0)  # the 12-bit range CT scanners store
CT_CONTRAST = "iopamidol 370 mgI/mL"
NORMAL_TRABECULAR_HU = 160.0  # healthy adult lumbar spine
ABDOMEN_WINDOW = (50.0, 400.0)
STUDY_START_S = 9 * 3600 + 30 * 60
INJECTION_S = STUDY_START_S + 60


def ct_encoding(syntax: str, noise_hu: float, signed: bool, bits_stored: int) -> Encoding:
    """Signed pixels store HU as they are; unsigned ones store HU + 1024."""
    check_noise(noise_hu)
    pixels = PixelFormat(signed, bits_stored, 0.0 if signed else -1024.0)
    return Encoding(resolve_transfer_syntax(syntax), pixels, noise_hu, CT_RANGE_HU)


def mr_encoding(syntax: str, noise_sd: float, bits_stored: int) -> Encoding:
    """Unsigned MR units with no rescale, clipped to what the bits hold."""
    check_noise(noise_sd)
    pixels = PixelFormat(False, bits_stored, None)
    top = float((1 << bits_stored) - 1)
    return Encoding(resolve_transfer_syntax(syntax), pixels, noise_sd, (0.0, top))


def series_info(
    task: str,
    seed: int,
    number: int,
    description: str,
    *,
    window: tuple[float, float],
    agent: str | None,
) -> SeriesHeader:
    return SeriesHeader(
        phantom_uid(task, seed, "series", number), number, description, window, agent
    )


def render_all(
    plans: Sequence[Planned],
    make_dataset: DatasetMaker,
    encoding: Encoding,
    rng: np.random.Generator,
    *,
    grid: PhantomGrid = CT_GRID,
    thickness_mm: float = 5.0,
) -> list[tuple[bytes, Truth]]:
    """Render the plans in order: the noise generator advances slice by slice."""
    return [
        render_instance(
            plan,
            grid=grid,
            thickness_mm=thickness_mm,
            encoding=encoding,
            rng=rng,
            make_dataset=make_dataset,
        )
        for plan in plans
    ]


def ct_maker(study: StudyHeader, encoding: Encoding) -> DatasetMaker:
    def make(series: SeriesHeader, info: SliceHeader) -> Dataset:
        return ct_dataset(study, series, info, encoding.pixels)

    return make


def check_count(name: str, count: int, low: int, high: int) -> None:
    if not low <= count <= high:
        raise ValueError(f"{name} must be in {low}..{high}")


def check_noise(noise: float) -> None:
    if noise < 0:
        raise ValueError("noise must not be negative")
