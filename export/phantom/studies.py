"""Study builders, one per task: the images each task's request carries.

Every builder takes keyword options only, is deterministic in `seed`, and
returns a `PhantomStudy`. `build_study(task, ...)` dispatches by task name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from abdoserve.export.phantom.anatomy import (
    L1_CENTRE_Z,
    NORMAL_OESOPHAGEAL_WALL_MM,
    VERTEBRA_PITCH_MM,
    SliceAnatomy,
)
from abdoserve.export.phantom.common import (
    CT_CONTRAST,
    CT_GRID,
    DEFAULT_SYNTAX,
    INJECTION_S,
    NORMAL_TRABECULAR_HU,
    STUDY_START_S,
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
    render_all,
    series_info,
)
from abdoserve.export.phantom.liver import liver_fibrosis_ct, liver_fibrosis_mri, liver_mass_ct
from abdoserve.export.phantom.tissues import ct_values

VERTEBRAE = ("L1", "L2", "L3", "L4", "L5")
BONE_OFFSETS_MM = (-7.0, 0.0, 7.0)  # within a 27 mm body: never in a disc


def bone_density_ct(
    *,
    seed: int = 0,
    transfer_syntax: str = DEFAULT_SYNTAX,
    slices: int = 9,
    trabecular_hu: float = NORMAL_TRABECULAR_HU,
    noise_hu: float = 8.0,
    signed: bool = True,
    bits_stored: int = 12,
    shuffle: bool = True,
) -> PhantomStudy:
    """Unenhanced slices through the lumbar bodies, three per vertebra from L1
    down, with trabecular bone of `trabecular_hu` (osteoporotic below ~80)."""
    task = "bone_density_ct"
    check_count("slices", slices, 1, 3 * len(VERTEBRAE))
    if not -100.0 <= trabecular_hu <= 600.0:
        raise ValueError("trabecular_hu must be in -100..600")
    rng = make_rng(seed)
    study = make_study(task, seed, rng, "unenhanced abdominal CT")
    encoding = ct_encoding(transfer_syntax, noise_hu, signed, bits_stored)
    series = series_info(task, seed, 1, "Abdomen non-contrast", window=(300.0, 1500.0), agent=None)
    values = ct_values("non_contrast", trabecular_hu)
    plans = []
    for index in range(slices):
        vertebra, offset = divmod(index, len(BONE_OFFSETS_MM))
        z = L1_CENTRE_Z - VERTEBRA_PITCH_MM * vertebra - BONE_OFFSETS_MM[offset]
        facts: Truth = {"vertebra": VERTEBRAE[vertebra]}
        seconds = STUDY_START_S + 0.5 * index
        plans.append(Planned(SliceAnatomy(z), series, index + 1, clock(seconds), values, facts))
    rendered = render_all(plans, ct_maker(study, encoding), encoding, rng)
    truth: Truth = {**encoding_truth(encoding, CT_GRID, 5.0), "trabecular_hu": trabecular_hu}
    return assemble(task, rendered, file_order(rng, slices, shuffle), {}, truth)


def esophageal_cancer_ct(
    *,
    seed: int = 0,
    transfer_syntax: str = DEFAULT_SYNTAX,
    slices: int = 8,
    interval_mm: float = 10.0,
    cancer: bool = True,
    thickened_slices: Sequence[int] | None = None,
    wall_thickness_mm: float = 15.0,
    noise_hu: float = 8.0,
    signed: bool = True,
    bits_stored: int = 12,
    shuffle: bool = True,
) -> PhantomStudy:
    """Contrast-enhanced slices through the thoracic oesophagus, cranial first by
    instance number. With `cancer`, the wall of `thickened_slices` (indices in
    instance order; default the middle third) thickens to `wall_thickness_mm`."""
    task = "esophageal_cancer_ct"
    check_count("slices", slices, 1, 64)
    if not 2.0 <= interval_mm <= 20.0 or slices * interval_mm > 400:
        raise ValueError("interval_mm must be in 2..20 and the slices span at most 400 mm")
    thick = _thickened(slices, cancer, thickened_slices)
    rng = make_rng(seed)
    study = make_study(task, seed, rng, "contrast chest-abdomen CT")
    encoding = ct_encoding(transfer_syntax, noise_hu, signed, bits_stored)
    series = series_info(
        task, seed, 1, "Chest-abdomen contrast", window=(50.0, 350.0), agent=CT_CONTRAST
    )
    values = ct_values("portal_venous", NORMAL_TRABECULAR_HU)
    plans = []
    for index in range(slices):
        z = 40.0 + interval_mm * (slices - 1 - index)
        wall = wall_thickness_mm if index in thick else NORMAL_OESOPHAGEAL_WALL_MM
        facts: Truth = {"wall_thickened": index in thick, "wall_thickness_mm": wall}
        seconds = INJECTION_S + 70 + 0.5 * index
        anatomy = SliceAnatomy(z, oesophageal_wall_mm=wall)
        plans.append(Planned(anatomy, series, index + 1, clock(seconds), values, facts))
    rendered = render_all(plans, ct_maker(study, encoding), encoding, rng)
    truth: Truth = {**encoding_truth(encoding, CT_GRID, 5.0), "cancer": bool(thick)}
    return assemble(task, rendered, file_order(rng, slices, shuffle), {}, truth)


def _thickened(slices: int, cancer: bool, chosen: Sequence[int] | None) -> set[int]:
    if not cancer:
        return set()
    if chosen is None:
        third = max(slices // 3, 1)
        return set(range(slices // 3, slices // 3 + third))
    if not all(0 <= index < slices for index in chosen):
        raise ValueError("thickened_slices must index the slices")
    return set(chosen)


BUILDERS: dict[str, Callable[..., PhantomStudy]] = {
    "liver_mass_ct": liver_mass_ct,
    "liver_fibrosis_ct": liver_fibrosis_ct,
    "liver_fibrosis_mri": liver_fibrosis_mri,
    "bone_density_ct": bone_density_ct,
    "esophageal_cancer_ct": esophageal_cancer_ct,
}


def build_study(
    task: str, *, seed: int = 0, transfer_syntax: str = DEFAULT_SYNTAX, **options: Any
) -> PhantomStudy:
    """The phantom study for `task`; `options` are that task's builder keywords."""
    try:
        builder = BUILDERS[task]
    except KeyError as error:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(BUILDERS)}") from error
    return builder(seed=seed, transfer_syntax=transfer_syntax, **options)
