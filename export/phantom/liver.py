"""Liver study builders: the dynamic CT of a mass, fibrosis on CT and on MR."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from abdoserve.export.phantom.anatomy import Mass, PhantomGrid, SliceAnatomy, label_slice
from abdoserve.export.phantom.common import (
    ABDOMEN_WINDOW,
    CT_CONTRAST,
    CT_GRID,
    DEFAULT_SYNTAX,
    INJECTION_S,
    NORMAL_TRABECULAR_HU,
    STUDY_START_S,
    DatasetMaker,
    Encoding,
    PhantomStudy,
    Planned,
    Truth,
    assemble,
    check_count,
    clock,
    ct_encoding,
    ct_maker,
    encoding_truth,
    file_order,
    make_rng,
    make_study,
    mr_encoding,
    render_all,
    series_info,
)
from abdoserve.export.phantom.dicom_writer import (
    MRAcquisition,
    SeriesHeader,
    SliceHeader,
    StudyHeader,
    mr_dataset,
)
from abdoserve.export.phantom.render import liver_texture
from abdoserve.export.phantom.tissues import (
    MASS_CLASSES,
    FloatArray,
    Label,
    MassClass,
    Phase,
    ct_values,
    mr_values,
)

CT_FIBROSIS_HU = 12.0  # HU per unit of texture pattern: septa darker, nodules brighter
MR_FIBROSIS_FRACTION = 0.2  # the same, relative to the liver's MR signal
MR_LEVELS = (("cranial", 20.0), ("middle", -30.0), ("caudal", -80.0))
MASS_XYZ_MM = (-75.0, -5.0, -20.0)  # in the right lobe, clear of vessels

_DYNAMIC: tuple[tuple[Phase, str, float], ...] = (
    ("non_contrast", "Liver non-contrast", STUDY_START_S),
    ("arterial", "Liver arterial phase", INJECTION_S + 35),
    ("delayed", "Liver delayed phase", INJECTION_S + 180),
)


def _mass_class(rng: np.random.Generator, given: str | None) -> MassClass:
    chosen = MASS_CLASSES[int(rng.integers(len(MASS_CLASSES)))] if given is None else given
    for item in MASS_CLASSES:
        if item == chosen:
            return item
    raise ValueError(f"mass_class must be one of {', '.join(MASS_CLASSES)}")


def _mass_roi(mass: Mass, margin_px: int = 3) -> tuple[list[int], list[int]]:
    """The mass's exact pixel box and the request's ROI (the box plus a margin),
    both [row_min, col_min, row_max, col_max], inclusive."""
    labels = label_slice(CT_GRID, SliceAnatomy(mass.z_mm, mass=mass))
    inside = np.isin(labels, [Label.MASS_CORE, Label.MASS_RIM, Label.MASS_NODULE])
    rows, cols = np.nonzero(inside)
    box = [int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())]
    roi = [max(box[0] - margin_px, 0), max(box[1] - margin_px, 0)]
    roi += [min(box[2] + margin_px, CT_GRID.rows - 1), min(box[3] + margin_px, CT_GRID.cols - 1)]
    return box, roi


def liver_mass_ct(
    *,
    seed: int = 0,
    transfer_syntax: str = DEFAULT_SYNTAX,
    mass_class: str | None = None,
    mass_radius_mm: float = 15.0,
    noise_hu: float = 8.0,
    signed: bool = True,
    bits_stored: int = 12,
    shuffle: bool = False,
) -> PhantomStudy:
    """Three one-image series (non-contrast, arterial, delayed) at one level through
    a liver mass of class A-E (seeded choice when None); the ROI boxes the mass."""
    task = "liver_mass_ct"
    rng = make_rng(seed)
    mass = Mass(_mass_class(rng, mass_class), *MASS_XYZ_MM, mass_radius_mm)
    if not 5.0 <= mass_radius_mm <= 30.0:
        raise ValueError("mass_radius_mm must be in 5..30")
    study = make_study(task, seed, rng, "dynamic liver CT")
    encoding = ct_encoding(transfer_syntax, noise_hu, signed, bits_stored)
    plans = []
    for number, (phase, description, seconds) in enumerate(_DYNAMIC, start=1):
        agent = None if phase == "non_contrast" else CT_CONTRAST
        series = series_info(task, seed, number, description, window=ABDOMEN_WINDOW, agent=agent)
        values = ct_values(phase, NORMAL_TRABECULAR_HU, mass.mass_class)
        anatomy = SliceAnatomy(mass.z_mm, mass=mass)
        plans.append(Planned(anatomy, series, 1, clock(seconds), values, {"phase": phase}))
    rendered = render_all(plans, ct_maker(study, encoding), encoding, rng)
    box, roi = _mass_roi(mass)
    truth: Truth = {
        **encoding_truth(encoding, CT_GRID, 5.0),
        "mass_class": mass.mass_class,
        "mass_radius_mm": mass_radius_mm,
        "mass_bbox": box,
    }
    return assemble(task, rendered, file_order(rng, 3, shuffle), {"roi": roi}, truth)


def _fibrotic(
    rng: np.random.Generator, grid: PhantomGrid, z: float, fibrosis: float, scale: float
) -> tuple[SliceAnatomy, FloatArray | None]:
    """A slice's anatomy and its liver's value change for a fibrosis severity."""
    if not 0.0 <= fibrosis <= 1.0:
        raise ValueError("fibrosis must be in 0..1")
    texture = liver_texture(rng, grid, fibrosis)
    if texture is None:
        return SliceAnatomy(z), None
    return SliceAnatomy(z, liver_surface=texture.surface), scale * texture.pattern


def _fibrosis_levels(count: int) -> list[float]:
    """Evenly spaced levels through the liver, cranial first."""
    return [round(float(z), 2) for z in np.linspace(10.0, -90.0, count)] if count > 1 else [-30.0]


def liver_fibrosis_ct(
    *,
    seed: int = 0,
    transfer_syntax: str = DEFAULT_SYNTAX,
    slices: int = 4,
    age: int | None = None,
    sex: str | None = None,
    fibrosis: float = 0.0,
    noise_hu: float = 8.0,
    signed: bool = True,
    bits_stored: int = 12,
    shuffle: bool = True,
) -> PhantomStudy:
    """Portal-venous slices through the liver; `fibrosis` (0..1) adds a nodular
    surface and a reticular texture. Age and sex are seeded when None."""
    task = "liver_fibrosis_ct"
    check_count("slices", slices, 1, 16)
    rng = make_rng(seed)
    study = make_study(task, seed, rng, "portal venous CT", age=age, sex=sex)
    encoding = ct_encoding(transfer_syntax, noise_hu, signed, bits_stored)
    description = "Abdomen portal venous"
    series = series_info(task, seed, 1, description, window=ABDOMEN_WINDOW, agent=CT_CONTRAST)
    values = ct_values("portal_venous", NORMAL_TRABECULAR_HU)
    plans = []
    for number, z in enumerate(_fibrosis_levels(slices), start=1):
        anatomy, change = _fibrotic(rng, CT_GRID, z, fibrosis, CT_FIBROSIS_HU)
        seconds = INJECTION_S + 70 + 0.5 * number
        plans.append(Planned(anatomy, series, number, clock(seconds), values, {}, change))
    rendered = render_all(plans, ct_maker(study, encoding), encoding, rng)
    truth: Truth = {**encoding_truth(encoding, CT_GRID, 5.0), "fibrosis": fibrosis}
    clinical: dict[str, object] = {"age": study.patient.age, "sex": study.patient.sex}
    return assemble(task, rendered, file_order(rng, slices, shuffle), clinical, truth)


def _mr_maker(study: StudyHeader, encoding: Encoding, scanner: MRAcquisition) -> DatasetMaker:
    def make(series: SeriesHeader, info: SliceHeader) -> Dataset:
        return mr_dataset(study, series, info, encoding.pixels, scanner)

    return make


def _viral(rng: np.random.Generator, given: str | None) -> str:
    status = str(rng.choice(["negative", "positive"])) if given is None else given
    if status not in ("negative", "positive"):
        raise ValueError("viral status must be 'negative' or 'positive'")
    return status


def liver_fibrosis_mri(
    *,
    seed: int = 0,
    transfer_syntax: str = DEFAULT_SYNTAX,
    field_strength: float | None = None,
    hbv: str | None = None,
    hcv: str | None = None,
    fibrosis: float = 0.0,
    matrix: int = 256,
    spacing_mm: float = 1.5,
    noise_sd: float = 15.0,
    bits_stored: int = 12,
    shuffle: bool = True,
) -> PhantomStudy:
    """Gadoxetic-acid hepatobiliary-phase MR at three liver levels (cranial,
    middle, caudal). Field strength and viral status are seeded when None."""
    task = "liver_fibrosis_mri"
    check_count("matrix", matrix, 128, 512)
    rng = make_rng(seed)
    scanner = MRAcquisition(
        float(rng.choice([1.5, 3.0]) if field_strength is None else field_strength)
    )
    status = {name: _viral(rng, given) for name, given in (("hbv", hbv), ("hcv", hcv))}
    study = make_study(task, seed, rng, "liver MRI gadoxetic acid")
    encoding = mr_encoding(transfer_syntax, noise_sd, bits_stored)
    grid, values = PhantomGrid(matrix, matrix, spacing_mm), mr_values(fibrosis)
    window, agent = (700.0, 1400.0), scanner.contrast_agent
    series = series_info(task, seed, 1, "HBP 20min t1 fs tra", window=window, agent=agent)
    scale = MR_FIBROSIS_FRACTION * float(values[Label.LIVER])
    plans = []
    for number, (level, z) in enumerate(MR_LEVELS, start=1):
        anatomy, change = _fibrotic(rng, grid, z, fibrosis, scale)
        seconds = INJECTION_S + 20 * 60  # 3D acquisition: one time for all levels
        plans.append(
            Planned(anatomy, series, number, clock(seconds), values, {"level": level}, change)
        )
    make = _mr_maker(study, encoding, scanner)
    rendered = render_all(plans, make, encoding, rng, grid=grid, thickness_mm=4.0)
    truth: Truth = {**encoding_truth(encoding, grid, 4.0), "fibrosis": fibrosis}
    clinical: dict[str, object] = {"field_strength": scanner.field_strength_t, **status}
    return assemble(task, rendered, file_order(rng, 3, shuffle), clinical, truth)
