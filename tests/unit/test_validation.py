"""`abdoserve model validate`'s parts without a server: thresholds judged on the report,
the routing that sends the cohort (and only it) to the version, the study key the CLI
computes equal to the preprocess model's, and the report files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abdoserve.deploy.acceptance_metrics import bone_density_report, liver_mass_report
from abdoserve.deploy.validation import (
    THRESHOLDS_FILE,
    described,
    judge,
    read_thresholds,
    with_validation,
    without_validation,
)
from abdoserve.deploy.validation_report import roc_points, write_report
from abdoserve.deploy.versions import VersionError
from abdoserve.export.phantom import build_study
from abdoserve.preprocessing.study import StudyPreparer
from abdoserve.preprocessing.tasks import TASKS, get_task
from abdoserve.serving.routing import Routing

BONE = get_task("bone_density_ct")


def bmd_report(error: float) -> object:
    reference = [0.6 + 0.02 * index for index in range(30)]
    predicted = [value + error * (-1) ** index for index, value in enumerate(reference)]
    return bone_density_report(reference, predicted)


def test_every_task_has_thresholds_on_metrics_its_report_has() -> None:
    for task in TASKS:
        for name, bound in read_thresholds(THRESHOLDS_FILE, task).items():
            assert set(bound) <= {"min", "max"}, (task, name)
    report = bmd_report(0.01)
    for name in read_thresholds(THRESHOLDS_FILE, "bone_density_ct"):
        report.estimate(name)  # type: ignore[attr-defined]


def test_a_good_version_passes_and_a_poor_one_fails_naming_the_figures() -> None:
    bounds = {"mae": {"max": 0.05}, "pearson_r": {"min": 0.9}}
    good = judge(bmd_report(0.01), bounds)  # type: ignore[arg-type]
    assert good.passed and good.lines == (
        "mae 0.010 <= 0.05: pass",
        "pearson_r 0.998 >= 0.9: pass",
    )
    poor = judge(bmd_report(0.2), bounds)  # type: ignore[arg-type]
    assert not poor.passed and poor.lines[0] == "mae 0.200 <= 0.05: FAIL"


def test_an_undefined_metric_fails_its_threshold() -> None:
    # One class only: every one-vs-rest AUC is undefined (NaN), which passes no bound.
    report = liver_mass_report(["A"] * 5, ["A"] * 5, [[0.9, 0.025, 0.025, 0.025, 0.025]] * 5)
    verdict = judge(report, {"auc_A": {"min": 0.5}})
    assert not verdict.passed and verdict.lines[0].endswith("FAIL")


def test_only_the_cohort_goes_to_the_version_being_validated() -> None:
    production = Routing(production=1, candidate=2, mode="canary", percent=10.0)
    keys = ["a" * 64, "b" * 64]
    routing = with_validation(production, 3, keys)
    assert Routing.from_json(routing.to_json()) == routing
    assert [routing.answering(key) for key in keys] == [3, 3]
    others = [f"{index:064x}" for index in range(200)]
    assert {routing.answering(key) for key in others} == {production.answering(k) for k in others}
    assert routing.versions(now=0.0) == (1, 2, 3)
    assert routing.state_of(3, now=0.0) == "validating"
    with pytest.raises(VersionError, match="version 3 is being validated"):
        with_validation(routing, 4, keys)
    done = without_validation(routing, "failed")
    assert (done.validating, done.validation_keys, done.versions(now=0.0)) == (None, (), (1, 2))
    assert done.verdict(3) == "failed" and done.reason == "version 3 validated: failed"
    assert Routing.from_json(done.to_json()) == done
    again = without_validation(with_validation(done, 3, keys), "passed")
    assert again.acceptance == ((3, "passed"),)
    interrupted = without_validation(with_validation(done, 2, keys))
    assert interrupted.acceptance == ((3, "failed"),) and interrupted.verdict(2) is None


def test_the_key_and_profile_the_command_computes_are_the_preprocess_models() -> None:
    study = build_study("bone_density_ct", seed=4)
    served = StudyPreparer(BONE)(study.instances, study.clinical)
    key, profile = described(BONE, study.instances)
    assert (key, profile) == (served.study_key, served.profile)
    assert profile.body_hu is not None and profile.pixel_spacing_mm is not None
    assert described(BONE, list(reversed(study.instances)))[0] == served.study_key


def test_roc_points_run_from_the_origin_to_the_corner() -> None:
    import numpy as np

    fpr, tpr = roc_points(np.array([True, False, True, False]), np.array([0.9, 0.8, 0.7, 0.1]))
    assert list(fpr) == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert list(tpr) == [0.0, 0.5, 0.5, 1.0, 1.0]


def test_the_report_is_markdown_json_and_plots(tmp_path: Path) -> None:
    rows = [{"study": f"s{index}", "bmd": str(0.6 + 0.02 * index)} for index in range(30)]
    results = [{"BMD": float(row["bmd"]) + 0.01} for row in rows]
    report = bone_density_report([float(r["bmd"]) for r in rows], [r["BMD"] for r in results])
    path = write_report(
        tmp_path,
        BONE,
        version=2,
        report=report,
        verdict=("mae 0.010 <= 0.1: pass",),
        rows=rows,
        results=results,
    )
    text = path.read_text()
    assert text.startswith("# bone_density_ct version 2: acceptance on 30 labelled studies")
    assert "- mae 0.010 <= 0.1: pass" in text and "![bland_altman](bland_altman.png)" in text
    assert (tmp_path / "bland_altman.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "metrics.json").read_text())["studies"] == 30
