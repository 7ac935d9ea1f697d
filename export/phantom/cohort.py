"""`abdoserve phantom cohort TASK --n N --out DIR`: N phantom studies and their labels.

Each study goes into its own subfolder of DIR (DICOM files, request.json and
truth.json, as `abdoserve phantom` writes one study) and `DIR/labels.csv` lists them:
`study` (the subfolder), the task's label column, then the task's clinical inputs.

| task | label column | builder option varied | read back from truth.json |
|---|---|---|---|
| liver_mass_ct | `class` A-E | `mass_class` | `mass_class` |
| liver_fibrosis_ct/_mri | `stage` 0-4 | `fibrosis` = stage / 4 | `round(4 * fibrosis)` |
| bone_density_ct | `bmd` g/cm2 | `trabecular_hu` | `bmd_from_trabecular_hu` |
| esophageal_cancer_ct | `cancer` 0/1 | `cancer` | `cancer` |

Labels are read back from each built study's own truth, never from the plan alone.
Classes (stages, cancer or not, osteoporotic or not) come in equal numbers (the first
ones one more when N does not divide), in an order shuffled by `--seed`; study k of a
cohort is phantom seed `seed * 1_000_000 + k`, so cohorts of different seeds never
share a study UID.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from abdoserve.export.labels import LABEL_COLUMN, LABELS_FILE
from abdoserve.export.phantom.common import DEFAULT_SYNTAX, NORMAL_TRABECULAR_HU, write_study
from abdoserve.export.phantom.studies import BUILDERS, build_study
from abdoserve.export.phantom.tissues import MASS_CLASSES
from abdoserve.preprocessing.tasks import get_task

SEED_STRIDE = 1_000_000  # phantom seeds per cohort seed: the most studies in a cohort
FIBROSIS_STAGES = (0, 1, 2, 3, 4)

# The phantom has no BMD, only trabecular HU: a line through the healthy adult's
# NORMAL_TRABECULAR_HU at the 1.0 g/cm2 young-adult mean, and 80 HU (tissues.py's
# "osteoporotic below about 80") at the served osteoporosis flag, 0.70 g/cm2.
OSTEOPOROTIC_HU = 80.0
YOUNG_ADULT_BMD = 1.0
OSTEOPOROSIS_BMD = 0.70
BMD_PER_HU = (YOUNG_ADULT_BMD - OSTEOPOROSIS_BMD) / (NORMAL_TRABECULAR_HU - OSTEOPOROTIC_HU)
# Drawn uniformly per group; the gap keeps rounding off the flag's boundary.
OSTEOPOROTIC_BMD_RANGE = (0.55, 0.70)
NORMAL_BMD_RANGE = (0.71, 1.30)


def bmd_from_trabecular_hu(hu: float) -> float:
    """The cohort's DXA-like lumbar BMD (g/cm2) for a phantom's trabecular HU."""
    return YOUNG_ADULT_BMD + BMD_PER_HU * (hu - NORMAL_TRABECULAR_HU)


def trabecular_hu_for_bmd(bmd: float) -> float:
    return NORMAL_TRABECULAR_HU + (bmd - YOUNG_ADULT_BMD) / BMD_PER_HU


@dataclass(frozen=True)
class PlannedStudy:
    """One cohort member before it is built: its folder, phantom seed and options."""

    name: str
    seed: int
    options: Mapping[str, Any]


def plan_cohort(task: str, n: int, seed: int = 0) -> list[PlannedStudy]:
    """The cohort's studies, balanced across the task's classes, in a seeded order."""
    if task not in BUILDERS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(BUILDERS)}")
    if not 1 <= n <= SEED_STRIDE:
        raise ValueError(f"n must be in 1..{SEED_STRIDE}")
    if not 0 <= seed < SEED_STRIDE:
        raise ValueError(f"seed must be in 0..{SEED_STRIDE - 1}")
    rng = np.random.default_rng(seed)
    options = _options(task, n, rng)
    width = max(4, len(str(n)))
    return [
        PlannedStudy(f"study-{index + 1:0{width}d}", seed * SEED_STRIDE + index, chosen)
        for index, chosen in enumerate(options)
    ]


def _balanced(groups: Sequence[Any], n: int, rng: np.random.Generator) -> list[Any]:
    """n picks, as equal in number per group as n allows, in a shuffled order."""
    picks = [groups[index % len(groups)] for index in range(n)]
    return [picks[int(index)] for index in rng.permutation(n)]


def _options(task: str, n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """The builder keywords that set each study's label."""
    if task == "liver_mass_ct":
        return [{"mass_class": name} for name in _balanced(MASS_CLASSES, n, rng)]
    if task in ("liver_fibrosis_ct", "liver_fibrosis_mri"):
        return [{"fibrosis": stage / 4} for stage in _balanced(FIBROSIS_STAGES, n, rng)]
    if task == "bone_density_ct":
        ranges = _balanced((OSTEOPOROTIC_BMD_RANGE, NORMAL_BMD_RANGE), n, rng)
        # HU to 0.1, the BMD read back from it: the label is exactly what was rendered
        return [
            {"trabecular_hu": round(trabecular_hu_for_bmd(float(rng.uniform(*r))), 1)}
            for r in ranges
        ]
    return [{"cancer": bool(cancer)} for cancer in _balanced((True, False), n, rng)]


def label_of(task: str, truth: Mapping[str, Any]) -> str:
    """The label column's value, from a built study's truth."""
    if task == "liver_mass_ct":
        return str(truth["mass_class"])
    if task in ("liver_fibrosis_ct", "liver_fibrosis_mri"):
        return str(round(4 * float(truth["fibrosis"])))
    if task == "bone_density_ct":
        return f"{bmd_from_trabecular_hu(float(truth['trabecular_hu'])):.4f}"
    return str(int(bool(truth["cancer"])))


def columns(task: str) -> list[str]:
    """labels.csv's header: study, the label, the clinical inputs the task takes."""
    clinical = [item.name for item in get_task(task).clinical_inputs]
    return ["study", LABEL_COLUMN[task], *clinical]


def write_cohort(
    task: str,
    n: int,
    out: Path,
    *,
    seed: int = 0,
    transfer_syntax: str = DEFAULT_SYNTAX,
) -> list[dict[str, str]]:
    """Build and write the cohort into `out` (new or empty); return labels.csv's rows."""
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty: a cohort goes into a folder of its own")
    header = columns(task)
    rows = []
    for planned in plan_cohort(task, n, seed):
        study = build_study(
            task, seed=planned.seed, transfer_syntax=transfer_syntax, **planned.options
        )
        write_study(study, out / planned.name)
        row = {"study": planned.name, LABEL_COLUMN[task]: label_of(task, study.truth)}
        row.update({name: str(study.clinical[name]) for name in header[2:]})
        rows.append(row)
    with (out / LABELS_FILE).open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return rows
