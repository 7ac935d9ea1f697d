"""`abdoserve phantom cohort`: labelled phantom studies, balanced, seeded, on disk."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from abdoserve.deploy.cli import main
from abdoserve.export.phantom.cohort import (
    OSTEOPOROSIS_BMD,
    bmd_from_trabecular_hu,
    plan_cohort,
    trabecular_hu_for_bmd,
    write_cohort,
)
from abdoserve.export.phantom.common import NORMAL_TRABECULAR_HU

# DICOM files per study, as the builders' defaults make them.
FILES = {
    "liver_mass_ct": 3,
    "liver_fibrosis_ct": 4,
    "liver_fibrosis_mri": 3,
    "bone_density_ct": 9,
    "esophageal_cancer_ct": 8,
}
HEADERS = {
    "liver_mass_ct": ["study", "class"],
    "liver_fibrosis_ct": ["study", "stage", "age", "sex"],
    "liver_fibrosis_mri": ["study", "stage", "field_strength", "hbv", "hcv"],
    "bone_density_ct": ["study", "bmd"],
    "esophageal_cancer_ct": ["study", "cancer"],
}


def read(out: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (out / "labels.csv").open(newline="") as stream:
        reader = csv.DictReader(stream)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


@pytest.mark.parametrize("task", sorted(FILES))
def test_cohort_writes_studies_and_labels(task: str, tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    n = 10 if task.startswith("liver_") else 4
    write_cohort(task, n, out, seed=1)
    header, rows = read(out)
    assert header == HEADERS[task] and len(rows) == n
    for row in rows:
        folder = out / row["study"]
        assert len(list(folder.glob("*.dcm"))) == FILES[task]
        truth = json.loads((folder / "truth.json").read_text())
        request = json.loads((folder / "request.json").read_text())
        for column in header[2:]:  # the clinical inputs are the study's own request
            assert row[column] == str(request[column])
        assert truth["task"] == task
    assert sorted(path.name for path in out.iterdir()) == sorted(
        ["labels.csv", *(row["study"] for row in rows)]
    )


def test_labels_are_the_phantoms_truth_and_balanced(tmp_path: Path) -> None:
    write_cohort("liver_fibrosis_mri", 10, tmp_path / "mri")
    _, rows = read(tmp_path / "mri")
    assert Counter(row["stage"] for row in rows) == {str(s): 2 for s in range(5)}
    for row in rows:
        truth = json.loads((tmp_path / "mri" / row["study"] / "truth.json").read_text())
        assert truth["fibrosis"] == int(row["stage"]) / 4
    write_cohort("liver_mass_ct", 7, tmp_path / "mass")
    _, rows = read(tmp_path / "mass")
    counts = Counter(row["class"] for row in rows)
    assert sorted(counts.values()) == [1, 1, 1, 2, 2]  # as even as 7 over 5 allows
    for row in rows:
        truth = json.loads((tmp_path / "mass" / row["study"] / "truth.json").read_text())
        assert truth["mass_class"] == row["class"]


def test_balance_of_the_binary_tasks() -> None:
    plans = plan_cohort("esophageal_cancer_ct", 9, seed=5)
    assert Counter(plan.options["cancer"] for plan in plans) == {True: 5, False: 4}
    plans = plan_cohort("bone_density_ct", 20, seed=5)
    bmds = [bmd_from_trabecular_hu(plan.options["trabecular_hu"]) for plan in plans]
    assert sum(bmd <= OSTEOPOROSIS_BMD for bmd in bmds) == 10


def test_bmd_calibration_anchors() -> None:
    assert bmd_from_trabecular_hu(NORMAL_TRABECULAR_HU) == pytest.approx(1.0)
    assert bmd_from_trabecular_hu(80.0) == pytest.approx(OSTEOPOROSIS_BMD)
    assert trabecular_hu_for_bmd(bmd_from_trabecular_hu(123.4)) == pytest.approx(123.4)


def test_cohort_is_deterministic_in_its_seed() -> None:
    assert plan_cohort("liver_fibrosis_ct", 15, seed=2) == plan_cohort(
        "liver_fibrosis_ct", 15, seed=2
    )
    first, other = plan_cohort("liver_mass_ct", 15, seed=2), plan_cohort("liver_mass_ct", 15)
    assert [p.options for p in first] != [p.options for p in other]
    assert {p.seed for p in first}.isdisjoint(p.seed for p in other)  # distinct study UIDs


def test_same_seed_writes_the_same_files(tmp_path: Path) -> None:
    for name in ("a", "b"):
        write_cohort("liver_mass_ct", 3, tmp_path / name, seed=9)
    for path in sorted((tmp_path / "a").rglob("*")):
        twin = tmp_path / "b" / path.relative_to(tmp_path / "a")
        assert path.is_dir() or path.read_bytes() == twin.read_bytes()


def test_cohort_refuses_a_used_folder_and_bad_sizes(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        write_cohort("liver_mass_ct", 2, tmp_path)
    with pytest.raises(ValueError, match="n must be"):
        plan_cohort("liver_mass_ct", 0)


def test_cli_writes_a_bone_density_cohort(tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    assert main(["phantom", "cohort", "bone_density_ct", "--n", "4", "--out", str(out)]) == 0
    header, rows = read(out)
    assert header == ["study", "bmd"] and len(rows) == 4
    assert sum(float(row["bmd"]) <= OSTEOPOROSIS_BMD for row in rows) == 2
    assert all(len(list((out / row["study"]).glob("*.dcm"))) == 9 for row in rows)


def test_cli_keeps_the_single_study_form_and_refuses_mixtures(tmp_path: Path) -> None:
    assert main(["phantom", "liver_mass_ct", "--out", str(tmp_path / "one")]) == 0
    assert len(list((tmp_path / "one").glob("*.dcm"))) == 3
    assert main(["phantom", "liver_mass_ct", "--n", "3", "--out", str(tmp_path / "x")]) == 2
    assert main(["phantom", "cohort", "--out", str(tmp_path / "y")]) == 2
    with pytest.raises(SystemExit):
        main(["phantom", "cohort", "no_such_task", "--n", "2", "--out", str(tmp_path / "z")])
