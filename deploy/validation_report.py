"""The acceptance report `abdoserve model validate` writes: Markdown, JSON and PNG plots.

The plots come from the same answers and labels as the metrics
(abdoserve.deploy.acceptance_metrics): ROC curves where the task has an AUC, the
Bland-Altman plot for bone density, the confusion matrix for liver mass. matplotlib
draws them off screen (Agg), so no display is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from abdoserve.deploy.acceptance_metrics import AcceptanceReport
from abdoserve.export.labels import LABEL_COLUMN
from abdoserve.preprocessing.specs import TaskSpec

REPORT_FILE = "report.md"
METRICS_FILE = "metrics.json"


def roc_points(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) from the highest threshold down."""
    order = np.argsort(-score, kind="stable")
    hits = positive[order].astype(float)
    tpr = np.concatenate([[0.0], np.cumsum(hits) / max(hits.sum(), 1.0)])
    fpr = np.concatenate([[0.0], np.cumsum(1.0 - hits) / max((1.0 - hits).sum(), 1.0)])
    return fpr, tpr


def curves(
    spec: TaskSpec, rows: Sequence[Mapping[str, str]], results: Sequence[Mapping[str, Any]]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The ROC curves the task's AUCs are measured on, by name (none for BMD)."""
    truth = [row[LABEL_COLUMN[spec.name]] for row in rows]
    if spec.name == "liver_mass_ct":
        found = {}
        for label in spec.output.labels:
            positive = np.array([value == label for value in truth])
            score = np.array([float(r["probabilities"][label]) for r in results])
            found[f"class {label} vs rest"] = roc_points(positive, score)
        return found
    if spec.name == "bone_density_ct":
        return {}
    score = np.array([float(r[spec.output.labels[0]]) for r in results])
    if spec.name == "esophageal_cancer_ct":
        return {"cancer": roc_points(np.array([int(v) == 1 for v in truth]), score)}
    stages = np.array([int(value) for value in truth])
    return {
        ">=F2": roc_points(stages >= 2, score),
        ">=F3": roc_points(stages >= 3, score),
        "F4": roc_points(stages == 4, score),
    }


def write_report(
    folder: Path,
    spec: TaskSpec,
    *,
    version: int,
    report: AcceptanceReport,
    verdict: Sequence[str],
    rows: Sequence[Mapping[str, str]],
    results: Sequence[Mapping[str, Any]],
) -> Path:
    """report.md, metrics.json and the PNGs in `folder`; returns report.md's path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / METRICS_FILE).write_text(report.to_json() + "\n")
    pictures = plot(folder, spec, report, rows, results)
    lines = [
        f"# {spec.name} version {version}: acceptance on {report.studies} labelled studies",
        "",
        report.to_markdown(),
        "",
        "## Against the thresholds",
        "",
        *[f"- {line}" for line in verdict],
        "",
        *[f"![{picture.stem}]({picture.name})" for picture in pictures],
    ]
    path = folder / REPORT_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


def plot(
    folder: Path,
    spec: TaskSpec,
    report: AcceptanceReport,
    rows: Sequence[Mapping[str, str]],
    results: Sequence[Mapping[str, Any]],
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    written = []
    found = curves(spec, rows, results)
    if found:
        figure, axes = pyplot.subplots(figsize=(5, 5))
        for name, (fpr, tpr) in found.items():
            axes.plot(fpr, tpr, label=name)
        axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
        axes.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"{spec.name}: ROC")
        axes.legend(loc="lower right")
        written.append(_save(figure, folder / "roc.png"))
    if spec.name == "bone_density_ct":
        reference = np.array([float(row[LABEL_COLUMN[spec.name]]) for row in rows])
        measured = np.array([float(r[spec.output.labels[0]]) for r in results])
        mean, difference = (reference + measured) / 2, measured - reference
        bias, spread = float(difference.mean()), 1.96 * float(difference.std(ddof=1))
        figure, axes = pyplot.subplots(figsize=(6, 4))
        axes.scatter(mean, difference, s=10)
        for level, style in ((bias, "-"), (bias - spread, "--"), (bias + spread, "--")):
            axes.axhline(level, linestyle=style, color="grey")
        axes.set(
            xlabel="mean of model and reference (g/cm²)",
            ylabel="model - reference (g/cm²)",
            title="Bland-Altman",
        )
        written.append(_save(figure, folder / "bland_altman.png"))
    if report.confusion is not None:
        counts = np.array(report.confusion.counts)
        labels = report.confusion.labels
        figure, axes = pyplot.subplots(figsize=(5, 4))
        image = axes.imshow(counts, cmap="Blues")
        for (row, column), count in np.ndenumerate(counts):
            axes.text(column, row, str(count), ha="center", va="center")
        axes.set_xticks(range(len(labels)), labels)
        axes.set_yticks(range(len(labels)), labels)
        axes.set(xlabel="answered", ylabel="true", title="confusion matrix")
        figure.colorbar(image)
        written.append(_save(figure, folder / "confusion_matrix.png"))
    return written


def _save(figure: Any, path: Path) -> Path:
    from matplotlib import pyplot

    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return path
