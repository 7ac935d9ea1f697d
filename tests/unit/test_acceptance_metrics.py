"""The acceptance metrics: hand values on tiny inputs, scipy/sklearn where installed,
the bootstrap's behaviour, degenerate cohorts, and the answer fields they read."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from abdoserve.deploy.acceptance_metrics import (
    Metric,
    Resampling,
    UndefinedMetricError,
    auc,
    average_ranks,
    bone_density_report,
    bootstrap,
    esophageal_report,
    fibrosis_report,
    icc_a1,
    liver_mass_report,
    pearson,
    read_labels,
    report_from_answers,
    spearman,
)
from abdoserve.preprocessing.tasks import get_task

FEW = Resampling(resamples=200, seed=3)


def arrays(*values: list[float]) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(v, dtype=np.float64) for v in values)


# --- the statistics against hand values ---------------------------------------------


def test_average_ranks_share_ties() -> None:
    assert average_ranks(np.array([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_auc_counts_a_tied_pair_half() -> None:
    positive = np.array([True, True, False, False])
    # pairs (pos, neg): (0.8, 0.5) win, (0.8, 0.2) win, (0.5, 0.5) tie, (0.5, 0.2) win
    assert auc(positive, np.array([0.8, 0.5, 0.5, 0.2])) == pytest.approx(3.5 / 4)
    assert auc(positive, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert auc(positive, np.array([0.1, 0.2, 0.3, 0.4])) == 0.0


def test_auc_needs_both_classes() -> None:
    with pytest.raises(UndefinedMetricError, match="both classes"):
        auc(np.array([True, True]), np.array([0.1, 0.9]))


def test_pearson_and_spearman_by_hand() -> None:
    x, y = arrays([1, 2, 3], [1, 3, 2])
    # deviations (-1, 0, 1) and (-1, 1, 0): r = 1 / sqrt(2 * 2)
    assert pearson(x, y) == pytest.approx(0.5)
    # monotone but not linear: rho 1, r below 1
    x, y = arrays([1, 2, 3, 4], [1, 4, 9, 100])
    assert spearman(x, y) == pytest.approx(1.0) and pearson(x, y) < 0.9
    with pytest.raises(UndefinedMetricError, match="constant"):
        pearson(*arrays([1, 1, 1], [1, 2, 3]))


def test_icc_absolute_agreement_by_hand() -> None:
    # a constant offset of 1: consistency would be 1, absolute agreement is
    # MSR / (MSR + 2 * MSC / n) = 2 / (2 + 2 * 1.5 / 3) = 2/3
    assert icc_a1(*arrays([1, 2, 3], [2, 3, 4])) == pytest.approx(2 / 3)
    # MSR 4.125, MSC 0.125, MSE 1.375 / 3: (11/3) / (53/12) = 44/53
    assert icc_a1(*arrays([1, 2, 3, 4], [1, 3, 2, 5])) == pytest.approx(44 / 53)
    assert icc_a1(*arrays([1, 2, 3], [1, 2, 3])) == pytest.approx(1.0)


def test_statistics_match_scipy_and_sklearn() -> None:
    stats = pytest.importorskip("scipy.stats")
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    stage = rng.integers(0, 5, 80).astype(np.float64)
    score = np.round(stage + rng.normal(0, 1.2, 80), 1)  # rounding makes ties
    assert np.allclose(average_ranks(score), stats.rankdata(score))
    assert spearman(score, stage) == pytest.approx(stats.spearmanr(score, stage)[0])
    assert pearson(score, stage) == pytest.approx(stats.pearsonr(score, stage)[0])
    positive = stage >= 2
    assert auc(positive, score) == pytest.approx(metrics.roc_auc_score(positive, score))


# --- the task reports ---------------------------------------------------------------


def test_liver_mass_accuracy_auc_and_confusion() -> None:
    truth = ["A", "A", "B", "E"]
    answered = ["A", "B", "B", "E"]
    probabilities = [
        [0.7, 0.1, 0.1, 0.05, 0.05],
        [0.3, 0.4, 0.1, 0.1, 0.1],
        [0.1, 0.6, 0.1, 0.1, 0.1],
        [0.05, 0.05, 0.1, 0.1, 0.7],
    ]
    report = liver_mass_report(truth, answered, probabilities, resampling=FEW)
    assert report.estimate("accuracy").value == 0.75
    # A: positives 0.7, 0.3 vs negatives 0.1, 0.05 -> 4 of 4 pairs won
    assert report.estimate("auc_A").value == 1.0
    # B: positive 0.6 vs 0.1, 0.4, 0.05 -> 3 of 3
    assert report.estimate("auc_B").value == 1.0
    # A-B vs C-E: P(A)+P(B) 0.8, 0.7, 0.7 vs 0.1 -> 3 of 3
    assert report.estimate("auc_AB_vs_rest").value == 1.0
    # no C or D in the cohort: undefined, with the reason, and null in JSON
    c = report.estimate("auc_C")
    assert math.isnan(c.value) and "both classes" in c.note and c.resamples_used == 0
    assert report.confusion is not None
    assert report.confusion.counts[0] == (1, 1, 0, 0, 0)  # A answered as A and as B
    assert report.confusion.counts[4] == (0, 0, 0, 0, 1)
    decoded = json.loads(report.to_json())
    assert decoded["metrics"][3]["value"] is None  # auc_C
    assert decoded["confusion_matrix"]["labels"] == ["A", "B", "C", "D", "E"]


def test_liver_mass_refuses_unknown_classes() -> None:
    with pytest.raises(ValueError, match="unknown true class F"):
        liver_mass_report(["F"], ["A"], [[1, 0, 0, 0, 0]], resampling=FEW)


def test_fibrosis_spearman_and_stage_aucs() -> None:
    stage = [0, 1, 2, 3, 4, 4]
    score = [0.2, 1.4, 1.1, 3.0, 3.9, 2.5]
    report = fibrosis_report("liver_fibrosis_ct", stage, score, resampling=FEW)
    # >=F2: positives 1.1, 3.0, 3.9, 2.5 vs 0.2, 1.4: wins 1+2+2+2 = 7 of 8
    assert report.estimate("auc_ge_F2").value == pytest.approx(7 / 8)
    # >=F3: 3.0, 3.9, 2.5 vs 0.2, 1.4, 1.1: 9 of 9
    assert report.estimate("auc_ge_F3").value == 1.0
    # F4: 3.9, 2.5 vs 0.2, 1.4, 1.1, 3.0: 4 + 3 = 7 of 8
    assert report.estimate("auc_F4").value == pytest.approx(7 / 8)
    # ranks: stage (1, 2, 3, 4, 5.5, 5.5), score (1, 3, 2, 5, 6, 4)
    rho = pearson(*arrays([1, 2, 3, 4, 5.5, 5.5], [1, 3, 2, 5, 6, 4]))
    assert report.estimate("spearman_rho").value == pytest.approx(rho)
    assert fibrosis_report("x", ["F0", "F4"], [0, 4], resampling=FEW).studies == 2
    with pytest.raises(ValueError, match="not one of 0-4"):
        fibrosis_report("x", [5], [1.0], resampling=FEW)


def test_bone_density_by_hand() -> None:
    dxa = [0.8, 1.0, 1.2]
    model = [0.9, 1.0, 1.4]  # differences 0.1, 0.0, 0.2
    report = bone_density_report(dxa, model, resampling=FEW)
    assert report.estimate("mae").value == pytest.approx(0.1)
    assert report.estimate("bias").value == pytest.approx(0.1)
    sd = 0.1  # sample SD of (0.1, 0.0, 0.2)
    assert report.estimate("loa_low").value == pytest.approx(0.1 - 1.96 * sd)
    assert report.estimate("loa_high").value == pytest.approx(0.1 + 1.96 * sd)
    assert report.estimate("pearson_r").value == pytest.approx(pearson(*arrays(dxa, model)))
    assert report.estimate("icc_a1").value == pytest.approx(icc_a1(*arrays(dxa, model)))


def test_esophageal_sensitivity_specificity_at_the_threshold() -> None:
    cancer = [1, 1, 1, 0, 0]
    probability = [0.9, 0.5, 0.3, 0.6, 0.1]
    report = esophageal_report(cancer, probability, threshold=0.5, resampling=FEW)
    # p >= 0.5 is positive, as the served flag: 0.5 counts
    assert report.estimate("sensitivity").value == pytest.approx(2 / 3)
    assert report.estimate("specificity").value == pytest.approx(1 / 2)
    # pairs: 0.9 wins 2, 0.5 loses to 0.6 and wins 1, 0.3 wins 1: 4 of 6
    assert report.estimate("auc").value == pytest.approx(4 / 6)
    stricter = esophageal_report(cancer, probability, threshold=0.55, resampling=FEW)
    assert stricter.estimate("sensitivity").value == pytest.approx(1 / 3)
    assert stricter.threshold == 0.55


def test_one_class_only_is_nan_with_a_reason() -> None:
    report = esophageal_report([0, 0, 0], [0.1, 0.7, 0.2], resampling=FEW)
    assert math.isnan(report.estimate("auc").value)
    assert report.estimate("sensitivity").note == "undefined: no studies with cancer"
    assert report.estimate("specificity").value == pytest.approx(2 / 3)
    assert "n/a" in report.to_markdown()


# --- the bootstrap ------------------------------------------------------------------


def cohort(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    stage = rng.integers(0, 5, n)
    return stage, stage + rng.normal(0, 1.5, n)


def test_ci_contains_the_estimate_and_narrows_with_n() -> None:
    widths = []
    for n in (40, 400):
        report = fibrosis_report("liver_fibrosis_ct", *cohort(n), resampling=FEW)
        for estimate in report.estimates:
            assert estimate.ci_low <= estimate.value <= estimate.ci_high
        rho = report.estimate("spearman_rho")
        widths.append(rho.ci_high - rho.ci_low)
    assert widths[1] < widths[0] / 2  # about 1/sqrt(10) as wide


def test_bootstrap_is_deterministic_in_the_seed() -> None:
    stage, score = cohort(50)
    first = fibrosis_report("liver_fibrosis_ct", stage, score, resampling=FEW)
    again = fibrosis_report("liver_fibrosis_ct", stage, score, resampling=FEW)
    other = fibrosis_report(
        "liver_fibrosis_ct", stage, score, resampling=Resampling(resamples=200, seed=4)
    )
    assert first == again
    assert first.estimates[0].ci_low != other.estimates[0].ci_low
    assert first.estimates[0].value == other.estimates[0].value


def test_degenerate_resamples_are_skipped_and_counted() -> None:
    # one F4 in 20: about 36 % of the draws miss it and say nothing about F4's AUC
    stage = np.array([4] + [0, 1, 2, 3] * 4 + [0, 1, 2])
    score = stage + np.linspace(0, 0.5, 20)
    report = fibrosis_report("liver_fibrosis_ct", stage, score, resampling=FEW)
    f4 = report.estimate("auc_F4")
    assert 80 < f4.resamples_used < 180 and f4.note.endswith("resamples skipped (undefined)")
    assert report.estimate("spearman_rho").resamples_used == 200


def test_bootstrap_refuses_nonsense() -> None:
    metric = Metric("one", "one", lambda i: 1.0)
    with pytest.raises(ValueError):
        bootstrap([metric], 0)
    with pytest.raises(ValueError):
        bootstrap([metric], 3, confidence=1.0)


# --- rendering, answers and labels.csv ----------------------------------------------


def test_markdown_table_lists_every_metric() -> None:
    report = bone_density_report([0.8, 1.0, 1.2, 0.7], [0.85, 1.0, 1.1, 0.75], resampling=FEW)
    text = report.to_markdown()
    assert "| metric | value | 95 % CI | resamples used | note |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(report.estimates) == 7  # the header, then one per metric
    assert "ICC(A,1) absolute agreement" in text


def answer(result: dict[str, Any]) -> dict[str, Any]:
    return {"task": "t", "result": result}


def test_report_from_answers_reads_the_served_fields(tmp_path: Any) -> None:
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("study,cancer\ns1,1\ns2,0\ns3,1\n")
    rows = read_labels(labels_csv, "esophageal_cancer_ct")
    answers = {
        name: answer({"esophageal_cancer": p, "unit": "", "suspicious": p >= 0.5})
        for name, p in (("s1", 0.8), ("s2", 0.6), ("s3", 0.4))
    }
    report = report_from_answers(get_task("esophageal_cancer_ct"), answers, rows, resampling=FEW)
    assert report.threshold == 0.5  # the spec's served flag
    assert report.estimate("sensitivity").value == 0.5
    assert report.estimate("auc").value == 0.5
    with pytest.raises(ValueError, match="no answer for 1 studies"):
        report_from_answers(get_task("esophageal_cancer_ct"), {}, rows[:1], resampling=FEW)


def test_report_from_answers_for_every_task() -> None:
    fibrosis = {"s1": answer({"F_DLMRI": 0.4, "stage": "F0"}), "s2": answer({"F_DLMRI": 3.2})}
    rows = [{"study": "s1", "stage": "0"}, {"study": "s2", "stage": "3"}]
    report = report_from_answers(get_task("liver_fibrosis_mri"), fibrosis, rows, resampling=FEW)
    assert report.estimate("auc_ge_F2").value == 1.0
    bmd = {"s1": answer({"BMD": 0.9}), "s2": answer({"BMD": 0.6})}
    rows = [{"study": "s1", "bmd": "0.95"}, {"study": "s2", "bmd": "0.65"}]
    report = report_from_answers(get_task("bone_density_ct"), bmd, rows, resampling=FEW)
    assert report.estimate("bias").value == pytest.approx(-0.05)
    probabilities = {"A": 0.6, "B": 0.1, "C": 0.1, "D": 0.1, "E": 0.1}
    mass = {"s1": answer({"label": "A", "probabilities": probabilities})}
    rows = [{"study": "s1", "class": "B"}]
    report = report_from_answers(get_task("liver_mass_ct"), mass, rows, resampling=FEW)
    assert report.estimate("accuracy").value == 0.0


def test_read_labels_names_a_missing_column(tmp_path: Any) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("study,stage\ns1,2\n")
    with pytest.raises(ValueError, match="lacks the column"):
        read_labels(path, "bone_density_ct")
