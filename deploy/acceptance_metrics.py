"""The papers' acceptance metrics for a model version, each with a bootstrap CI.

`abdoserve model validate` sends a labelled cohort through a running server and hands
the answers and the labels here; this module only computes (numpy alone, no server).

Which field of a study answer (`result` of the ANSWER JSON, formed by
`abdoserve.serving.answer.interpret`) feeds which metric, against which label column
of `labels.csv` (as `abdoserve phantom cohort` writes it):

| task | answer field | label | metrics |
|---|---|---|---|
| liver_mass_ct | `result.label` (argmax class) | `class` A-E | accuracy, confusion matrix |
| liver_mass_ct | `result.probabilities[X]` | `class` | one-vs-rest AUC per class X |
| liver_mass_ct | `probabilities[A] + [B]` | `class` | AUC A-B vs C-E (the paper's) |
| liver_fibrosis_ct | `result.F_DLCT` (0-4 score) | `stage` 0-4 | Spearman rho; AUC >=F2, >=F3, F4 |
| liver_fibrosis_mri | `result.F_DLMRI` | `stage` 0-4 | as for CT |
| bone_density_ct | `result.BMD` (g/cm2) | `bmd` (DXA) | Pearson r, MAE, Bland-Altman, ICC |
| esophageal_cancer_ct | `result.esophageal_cancer` | `cancer` 0/1 | AUC; sensitivity, specificity |

The label field names (`F_DLCT`, `BMD`, ...) are the spec's `output.labels[0]`, read
from the task spec, not typed here. `result.stage` (the rounded score) is not used: the
papers rank the continuous score. Oesophageal cancer is positive at `p >= threshold`,
the comparison `interpret` makes for the `suspicious` flag (`flag_above`, 0.5 served);
the answer states p rounded to 6 decimals, so a p within 5e-7 of the threshold may land
on the other side of the flag it was served with.

ICC is ICC(A,1) of McGraw & Wong (Shrout & Fleiss ICC(2,1)): two-way, absolute
agreement, single measurement. The model is to replace DXA's number, so a constant
offset must count against it; consistency (ICC(3,1)) would forgive any bias, and
Bland-Altman reports that bias separately.

Confidence intervals: percentile bootstrap over studies (`resamples` draws of n studies
with replacement, from `numpy.random.default_rng(seed)`; every metric sees the same
draws). A draw on which a metric is undefined (AUC with one class missing, a correlation
with a constant side) is skipped for that metric; `resamples_used` says how many
counted. A metric undefined on the whole cohort is reported as NaN (null in JSON) with
the reason in `note`, so one missing stage does not hide the other metrics; bad input
(unequal lengths, unknown labels, non-finite numbers) raises ValueError.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from abdoserve.export.labels import LABEL_COLUMN
from abdoserve.preprocessing.specs import TaskSpec

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95
LOA_Z = 1.96  # Bland-Altman limits: bias +/- 1.96 SD of the differences
FIBROSIS_STAGES = (0, 1, 2, 3, 4)


class UndefinedMetricError(Exception):
    """A metric has no value on these studies (the message says why)."""


# --- result types -------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """One scalar metric: point estimate, bootstrap CI and how many draws counted."""

    name: str
    description: str
    value: float
    ci_low: float
    ci_high: float
    resamples_used: int
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "value": _json_number(self.value),
            "ci_low": _json_number(self.ci_low),
            "ci_high": _json_number(self.ci_high),
            "resamples_used": self.resamples_used,
            "note": self.note,
        }


@dataclass(frozen=True)
class ConfusionMatrix:
    """Counts of studies: rows are the true class, columns the answered class."""

    labels: tuple[str, ...]
    counts: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "counts": [list(row) for row in self.counts]}

    def to_markdown(self) -> str:
        lines = [
            "| true \\ answered | " + " | ".join(self.labels) + " |",
            "|---|" + "---|" * len(self.labels),
        ]
        for label, row in zip(self.labels, self.counts, strict=True):
            lines.append(f"| {label} | " + " | ".join(str(count) for count in row) + " |")
        return "\n".join(lines)


@dataclass(frozen=True)
class AcceptanceReport:
    """A task's metrics on one cohort, as `abdoserve model validate` reports them."""

    task: str
    studies: int
    resamples: int
    seed: int
    confidence: float
    estimates: tuple[Estimate, ...]
    confusion: ConfusionMatrix | None = None
    threshold: float | None = None

    def estimate(self, name: str) -> Estimate:
        for estimate in self.estimates:
            if estimate.name == name:
                return estimate
        raise KeyError(f"no metric {name!r}; have: {', '.join(e.name for e in self.estimates)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "studies": self.studies,
            "resamples": self.resamples,
            "seed": self.seed,
            "confidence": self.confidence,
            "threshold": self.threshold,
            "metrics": [estimate.to_dict() for estimate in self.estimates],
            "confusion_matrix": self.confusion.to_dict() if self.confusion else None,
        }

    def to_json(self, indent: int | None = 2) -> str:
        # allow_nan=False: an undefined metric must already be null, never bare NaN
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_markdown(self) -> str:
        percent = f"{self.confidence * 100:g} %"
        lines = [
            f"**{self.task}**: {self.studies} studies, percentile bootstrap "
            f"({self.resamples} resamples, seed {self.seed})"
            + (f", threshold {self.threshold:g}" if self.threshold is not None else ""),
            "",
            f"| metric | value | {percent} CI | resamples used | note |",
            "|---|---|---|---|---|",
        ]
        for e in self.estimates:
            interval = f"{_cell(e.ci_low)} to {_cell(e.ci_high)}"
            lines.append(
                f"| {e.description} | {_cell(e.value)} | {interval} | {e.resamples_used} "
                f"| {e.note} |"
            )
        if self.confusion is not None:
            lines += ["", self.confusion.to_markdown()]
        return "\n".join(lines)


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _cell(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "n/a"


# --- the statistics -----------------------------------------------------------------


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy's rankdata 'average')."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts_group = np.r_[True, ordered[1:] != ordered[:-1]]
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + 1 + ends) / 2.0  # ranks start+1 .. end, averaged
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = mean_rank[np.cumsum(starts_group) - 1]
    return ranks


def auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney U over n_pos * n_neg; a tied pair counts half."""
    n_pos = int(np.count_nonzero(positive))
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise UndefinedMetricError(f"needs both classes; got {n_pos} positive, {n_neg} negative")
    u = float(average_ranks(score)[positive].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    dx, dy = x - x.mean(), y - y.mean()
    scale = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if scale == 0.0:
        raise UndefinedMetricError("a constant variable has no correlation")
    return float(dx @ dy) / scale


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r of the average ranks (so ties are handled as scipy does)."""
    return pearson(average_ranks(x), average_ranks(y))


def icc_a1(reference: np.ndarray, measured: np.ndarray) -> float:
    """ICC(A,1): two-way ANOVA, absolute agreement, single measurement (k = 2 raters)."""
    table = np.column_stack([reference, measured])
    n, k = table.shape
    if n < 2:
        raise UndefinedMetricError("needs at least two studies")
    grand = table.mean()
    ms_rows = k * float(((table.mean(axis=1) - grand) ** 2).sum()) / (n - 1)
    ss_cols = n * float(((table.mean(axis=0) - grand) ** 2).sum())
    ss_error = float(((table - grand) ** 2).sum()) - ms_rows * (n - 1) - ss_cols
    ms_error = ss_error / ((n - 1) * (k - 1))
    denominator = ms_rows + (k - 1) * ms_error + k * (ss_cols / (k - 1) - ms_error) / n
    if denominator <= 0.0:
        raise UndefinedMetricError("no variance between studies or methods")
    return (ms_rows - ms_error) / denominator


def proportion(hits: np.ndarray, what: str) -> float:
    if len(hits) == 0:
        raise UndefinedMetricError(f"no {what}")
    return float(np.count_nonzero(hits)) / len(hits)


# --- the bootstrap ------------------------------------------------------------------

# A metric on the studies at the given indices (a bootstrap draw or all of them).
MetricFunction = Callable[[np.ndarray], float]


@dataclass(frozen=True)
class Metric:
    name: str
    description: str
    compute: MetricFunction


def bootstrap(
    metrics: Sequence[Metric],
    studies: int,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> tuple[Estimate, ...]:
    """Each metric on all studies, and its percentile CI over the same seeded draws."""
    if studies < 1:
        raise ValueError("no studies to measure")
    if resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError("resamples must be >= 1 and confidence in (0, 1)")
    draws = np.random.default_rng(seed).integers(0, studies, size=(resamples, studies))
    everyone = np.arange(studies)
    return tuple(_estimate(metric, everyone, draws, confidence) for metric in metrics)


def _estimate(
    metric: Metric, everyone: np.ndarray, draws: np.ndarray, confidence: float
) -> Estimate:
    try:
        value = metric.compute(everyone)
    except UndefinedMetricError as why:
        nan = math.nan
        return Estimate(metric.name, metric.description, nan, nan, nan, 0, f"undefined: {why}")
    values = []
    for draw in draws:
        try:
            values.append(metric.compute(draw))
        except UndefinedMetricError:
            continue  # a draw without both classes says nothing about this metric
    if not values:
        note = "undefined on every resample"
        return Estimate(metric.name, metric.description, value, math.nan, math.nan, 0, note)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.asarray(values), [tail, 1.0 - tail])
    skipped = len(draws) - len(values)
    note = f"{skipped} resamples skipped (undefined)" if skipped else ""
    return Estimate(
        metric.name, metric.description, value, float(low), float(high), len(values), note
    )


# --- the tasks ----------------------------------------------------------------------


@dataclass(frozen=True)
class Resampling:
    """How the CIs are drawn: the same for every task."""

    resamples: int = DEFAULT_RESAMPLES
    seed: int = 0
    confidence: float = DEFAULT_CONFIDENCE


DEFAULT_RESAMPLING = Resampling()


def liver_mass_report(
    truth: Sequence[str],
    answered: Sequence[str],
    probabilities: np.ndarray | Sequence[Sequence[float]],
    *,
    labels: Sequence[str] = ("A", "B", "C", "D", "E"),
    resampling: Resampling = DEFAULT_RESAMPLING,
) -> AcceptanceReport:
    """Accuracy, one-vs-rest AUC per class, AUC A-B vs C-E and the confusion matrix."""
    names = tuple(labels)
    true_index = _class_indices(truth, names, "true class")
    answered_index = _class_indices(answered, names, "answered class")
    scores = _finite(probabilities, "probabilities", ndim=2)
    _same_length(true_index, answered_index, scores)
    if scores.shape[1] != len(names):
        raise ValueError(f"probabilities have {scores.shape[1]} columns for {len(names)} classes")
    metrics = [
        Metric(
            "accuracy",
            "accuracy",
            lambda i: proportion(true_index[i] == answered_index[i], "studies"),
        )
    ]
    for column, name in enumerate(names):
        metrics.append(
            _auc_metric(
                f"auc_{name}", f"AUC {name} vs rest", true_index == column, scores[:, column]
            )
        )
    if names[:2] == ("A", "B") and len(names) > 2:
        malignant = true_index <= 1  # A classic HCC, B other malignant: the paper's split
        metrics.append(
            _auc_metric("auc_AB_vs_rest", "AUC A-B vs C-E", malignant, scores[:, :2].sum(axis=1))
        )
    counts = np.zeros((len(names), len(names)), dtype=np.int64)
    np.add.at(counts, (true_index, answered_index), 1)
    confusion = ConfusionMatrix(names, tuple(tuple(int(c) for c in row) for row in counts))
    return _report("liver_mass_ct", metrics, len(true_index), resampling, confusion=confusion)


def fibrosis_report(
    task: str,
    stage: Sequence[int] | Sequence[str],
    score: Sequence[float],
    *,
    resampling: Resampling = DEFAULT_RESAMPLING,
) -> AcceptanceReport:
    """Spearman rho of score against stage; AUC of the score for >=F2, >=F3 and F4."""
    stages = _stages(stage)
    scores = _finite(score, "fibrosis score")
    _same_length(stages, scores)
    metrics = [
        Metric(
            "spearman_rho", "Spearman rho, score vs stage", lambda i: spearman(scores[i], stages[i])
        ),
        _auc_metric("auc_ge_F2", "AUC >=F2 (significant)", stages >= 2, scores),
        _auc_metric("auc_ge_F3", "AUC >=F3 (advanced)", stages >= 3, scores),
        _auc_metric("auc_F4", "AUC F4 (cirrhosis)", stages >= 4, scores),
    ]
    return _report(task, metrics, len(stages), resampling)


def bone_density_report(
    reference: Sequence[float],
    predicted: Sequence[float],
    *,
    resampling: Resampling = DEFAULT_RESAMPLING,
) -> AcceptanceReport:
    """Pearson r, MAE, Bland-Altman bias and 95 % limits (model minus DXA), ICC(A,1)."""
    dxa = _finite(reference, "reference BMD")
    model = _finite(predicted, "predicted BMD")
    _same_length(dxa, model)
    difference = model - dxa

    def limit(sign: float) -> MetricFunction:
        return lambda i: _bias(difference[i]) + sign * LOA_Z * _sd(difference[i])

    metrics = [
        Metric("pearson_r", "Pearson r", lambda i: pearson(model[i], dxa[i])),
        Metric("mae", "MAE (g/cm2)", lambda i: float(np.abs(difference[i]).mean())),
        Metric("bias", "Bland-Altman bias, model - DXA (g/cm2)", lambda i: _bias(difference[i])),
        Metric("loa_low", "lower 95 % limit of agreement (g/cm2)", limit(-1.0)),
        Metric("loa_high", "upper 95 % limit of agreement (g/cm2)", limit(1.0)),
        Metric("icc_a1", "ICC(A,1) absolute agreement", lambda i: icc_a1(dxa[i], model[i])),
    ]
    return _report("bone_density_ct", metrics, len(dxa), resampling)


def esophageal_report(
    cancer: Sequence[int] | Sequence[bool] | Sequence[str],
    probability: Sequence[float],
    *,
    threshold: float = 0.5,
    resampling: Resampling = DEFAULT_RESAMPLING,
) -> AcceptanceReport:
    """AUC, and sensitivity and specificity with `probability >= threshold` positive."""
    truth = _binary(cancer)
    scores = _finite(probability, "probability")
    _same_length(truth, scores)
    flagged = scores >= threshold  # the served flag's own comparison (answer.interpret)
    metrics = [
        _auc_metric("auc", "AUC", truth, scores),
        Metric(
            "sensitivity",
            f"sensitivity at p >= {threshold:g}",
            lambda i: proportion(flagged[i][truth[i]], "studies with cancer"),
        ),
        Metric(
            "specificity",
            f"specificity at p >= {threshold:g}",
            lambda i: proportion(~flagged[i][~truth[i]], "studies without cancer"),
        ),
    ]
    return _report("esophageal_cancer_ct", metrics, len(truth), resampling, threshold=threshold)


def _auc_metric(name: str, description: str, positive: np.ndarray, score: np.ndarray) -> Metric:
    return Metric(name, description, lambda i: auc(positive[i], score[i]))


def _bias(difference: np.ndarray) -> float:
    return float(difference.mean())


def _sd(difference: np.ndarray) -> float:
    if len(difference) < 2:
        raise UndefinedMetricError("needs at least two studies")
    return float(difference.std(ddof=1))


def _report(
    task: str,
    metrics: Sequence[Metric],
    studies: int,
    resampling: Resampling,
    *,
    confusion: ConfusionMatrix | None = None,
    threshold: float | None = None,
) -> AcceptanceReport:
    estimates = bootstrap(
        metrics,
        studies,
        resamples=resampling.resamples,
        seed=resampling.seed,
        confidence=resampling.confidence,
    )
    return AcceptanceReport(
        task=task,
        studies=studies,
        resamples=resampling.resamples,
        seed=resampling.seed,
        confidence=resampling.confidence,
        estimates=estimates,
        confusion=confusion,
        threshold=threshold,
    )


# --- input checks -------------------------------------------------------------------


def _finite(values: Any, what: str, ndim: int = 1) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dimension(s), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} must be finite numbers")
    return array


def _same_length(*arrays: np.ndarray) -> None:
    lengths = {len(array) for array in arrays}
    if len(lengths) != 1:
        raise ValueError(f"predictions and labels differ in length: {sorted(lengths)}")
    if 0 in lengths:
        raise ValueError("no studies to measure")


def _class_indices(values: Sequence[str], labels: tuple[str, ...], what: str) -> np.ndarray:
    unknown = sorted({str(value) for value in values} - set(labels))
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(unknown)}; known: {', '.join(labels)}")
    return np.asarray([labels.index(str(value)) for value in values], dtype=np.int64)


def _stages(values: Sequence[int] | Sequence[str]) -> np.ndarray:
    """Stages 0-4, given as numbers or as 'F0'..'F4'."""
    stages = []
    for value in values:
        text = str(value).strip().upper().removeprefix("F")
        if not text.isdigit() or int(text) not in FIBROSIS_STAGES:
            raise ValueError(f"fibrosis stage {value!r} is not one of 0-4 or F0-F4")
        stages.append(int(text))
    return np.asarray(stages, dtype=np.int64)


def _binary(values: Sequence[int] | Sequence[bool] | Sequence[str]) -> np.ndarray:
    truth = []
    for value in values:
        text = str(value).strip().lower()
        if text not in ("0", "1", "true", "false"):
            raise ValueError(f"cancer label {value!r} is not 0/1")
        truth.append(text in ("1", "true"))
    return np.asarray(truth, dtype=bool)


# --- from answers and labels.csv ----------------------------------------------------


def read_labels(path: Path, task: str) -> list[dict[str, str]]:
    """labels.csv rows (header `study`, then the task's label column, then any others)."""
    with path.open(newline="") as stream:
        reader = csv.DictReader(stream)
        rows = list(reader)
        header = reader.fieldnames or []
    needed = ("study", LABEL_COLUMN[task])
    missing = [column for column in needed if column not in header]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {', '.join(missing)} for {task}")
    return rows


def report_from_answers(
    spec: TaskSpec,
    answers: Mapping[str, Mapping[str, Any]],
    labels: Sequence[Mapping[str, str]],
    *,
    threshold: float | None = None,
    resampling: Resampling = DEFAULT_RESAMPLING,
) -> AcceptanceReport:
    """The task's report from ANSWER JSON objects keyed by study and the labels.csv rows.

    `threshold` defaults to the spec's served flag (`output.flag_above`).
    """
    missing = [row["study"] for row in labels if row["study"] not in answers]
    if missing:
        raise ValueError(f"no answer for {len(missing)} studies, e.g. {missing[:3]}")
    results = [_result(answers[row["study"]]) for row in labels]
    truth = [row[LABEL_COLUMN[spec.name]] for row in labels]
    score_name = spec.output.labels[0]
    if spec.name == "liver_mass_ct":
        names = spec.output.labels
        probabilities = [[float(r["probabilities"][name]) for name in names] for r in results]
        answered = [str(r["label"]) for r in results]
        return liver_mass_report(
            truth, answered, probabilities, labels=names, resampling=resampling
        )
    scores = [float(result[score_name]) for result in results]
    if spec.name in ("liver_fibrosis_ct", "liver_fibrosis_mri"):
        return fibrosis_report(spec.name, truth, scores, resampling=resampling)
    if spec.name == "bone_density_ct":
        return bone_density_report([float(t) for t in truth], scores, resampling=resampling)
    if spec.name == "esophageal_cancer_ct":
        served = spec.output.flag_above if spec.output.flag_above is not None else 0.5
        cutoff = served if threshold is None else threshold
        return esophageal_report(truth, scores, threshold=cutoff, resampling=resampling)
    raise ValueError(f"no acceptance metrics for task {spec.name!r}")


def _result(answer: Mapping[str, Any]) -> Mapping[str, Any]:
    result = answer.get("result")
    if not isinstance(result, Mapping):
        raise ValueError("an answer lacks its 'result' object")
    return result
