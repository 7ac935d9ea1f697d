"""How far a CPU runtime's answers lie from the FP32 PyTorch network's.

Measured at build time on held-out phantom studies (never the calibration ones):
for every output value, the maximum and mean absolute difference; and how often the
answer's decision agrees (the class, the stage, or the flag, whichever the task's
output reports). FP32 runtimes must stay within `FP32_TOLERANCE`; INT8 deviations
are reported, never held to a bound: the hospital that opts in reads them in
BUILD.json and in every answer's provenance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from abdoserve.export.calibration import StudyTensors
from abdoserve.export.errors import ParityError
from abdoserve.preprocessing.specs import Output, TaskSpec
from abdoserve.serving.answer import aggregate, interpret
from abdoserve.serving.cpu_runtimes import CpuRuntime
from abdoserve.serving.study_runner import StudyRunner

FP32_TOLERANCE = 1e-4  # absolute, scaled by the output's magnitude where it exceeds 1
REFERENCE = "PyTorch FP32"
UNTRAINED_CAVEAT = (
    "measured with untrained reference weights, whose outputs barely vary between studies "
    "(see each output's reference range): agreement is near-certain and says little about "
    "a trained network; a trained checkpoint is measured again when it is built"
)

Reference = Callable[[np.ndarray, np.ndarray | None], np.ndarray]


@dataclass(frozen=True)
class OutputDeviation:
    """One output value (a class probability, a score) over every held-out image."""

    output: str
    max_abs: float
    mean_abs: float
    reference_min: float
    reference_max: float


@dataclass(frozen=True)
class DeviationReport:
    runtime: str
    precision: str
    held_out_seeds: tuple[int, ...]
    images: int
    outputs: tuple[OutputDeviation, ...]
    agreement_of: str | None  # "class", "stage" or "<flag> flag"; None: nothing discrete
    study_agreement: float | None
    image_agreement: float | None
    untrained: bool

    @property
    def max_abs(self) -> float:
        return max(item.max_abs for item in self.outputs)

    @property
    def mean_abs(self) -> float:
        return float(np.mean([item.mean_abs for item in self.outputs]))

    @property
    def reference_scale(self) -> float:
        """The largest output magnitude the reference gave, at least 1."""
        extremes = [
            abs(v) for item in self.outputs for v in (item.reference_min, item.reference_max)
        ]
        return max(1.0, *extremes)

    def to_json(self) -> dict[str, Any]:
        """The report as BUILD.json and every answer's provenance carry it."""
        report: dict[str, Any] = {
            "reference": REFERENCE,
            "max_abs": _short(self.max_abs),
            "mean_abs": _short(self.mean_abs),
            "outputs": {
                item.output: {
                    "max_abs": _short(item.max_abs),
                    "mean_abs": _short(item.mean_abs),
                    "reference_range": [_short(item.reference_min), _short(item.reference_max)],
                }
                for item in self.outputs
            },
            "held_out_studies": len(self.held_out_seeds),
            "held_out_images": self.images,
            "held_out_seeds": list(self.held_out_seeds),
        }
        if self.agreement_of is not None:
            report["agreement_of"] = self.agreement_of
            report["study_agreement"] = self.study_agreement
            report["image_agreement"] = self.image_agreement
        if self.untrained:
            report["caveat"] = UNTRAINED_CAVEAT
        return report


def measure_deviation(
    spec: TaskSpec,
    runtime: CpuRuntime,
    runner: StudyRunner,
    reference: Reference,
    held_out: Sequence[StudyTensors],
    *,
    untrained: bool,
) -> DeviationReport:
    """The runner vs the FP32 reference on the same held-out studies."""
    features = [study.features for study in held_out] if spec.feature_width else None
    actual = runner.run_studies([study.samples for study in held_out], features)
    expected = [reference(study.samples, study.feeds().get("features")) for study in held_out]
    rows_actual, rows_expected = np.concatenate(actual), np.concatenate(expected)
    labels = spec.output.labels if spec.output.kind == "classification" else spec.output.labels[:1]
    return DeviationReport(
        runtime=runtime.name,
        precision=runtime.precision,
        held_out_seeds=tuple(study.seed for study in held_out),
        images=len(rows_expected),
        outputs=tuple(
            _output_deviation(label, rows_actual[:, column], rows_expected[:, column])
            for column, label in enumerate(labels)
        ),
        agreement_of=decision_kind(spec.output),
        study_agreement=_agreement(
            spec.output,
            [aggregate(spec.output, rows) for rows in actual],
            [aggregate(spec.output, rows) for rows in expected],
        ),
        image_agreement=_agreement(spec.output, list(rows_actual), list(rows_expected)),
        untrained=untrained,
    )


def check_fp32(report: DeviationReport, tolerance: float = FP32_TOLERANCE) -> None:
    """Raises `ParityError` when an FP32 runtime strays from PyTorch (NaN included)."""
    bound = tolerance * report.reference_scale
    if report.precision == "fp32" and not report.max_abs <= bound:
        raise ParityError(
            f"{report.runtime}: FP32 outputs differ from PyTorch by up to {report.max_abs:.3g} "
            f"on held-out phantom studies (bound {bound:.3g})"
        )


def decision_kind(output: Output) -> str | None:
    """What the answer decides from the values: a class, a stage or a flag."""
    if output.kind == "classification":
        return "class"
    if output.stage_cutoffs:
        return "stage"
    if output.flag_name:
        return f"{output.flag_name} flag"
    return None


def decision(output: Output, values: np.ndarray) -> object:
    """The answer's decision for these values (`interpret`'s, so it is the served one)."""
    result = interpret(output, values)
    if output.kind == "classification":
        return result["label"]
    if output.stage_cutoffs:
        return result["stage"]
    return result.get(output.flag_name)


def _agreement(
    output: Output, actual: Sequence[np.ndarray], expected: Sequence[np.ndarray]
) -> float | None:
    if decision_kind(output) is None:
        return None
    same = [
        decision(output, a) == decision(output, e) for a, e in zip(actual, expected, strict=True)
    ]
    return round(sum(same) / len(same), 4)


def _output_deviation(label: str, actual: np.ndarray, expected: np.ndarray) -> OutputDeviation:
    difference = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    return OutputDeviation(
        output=label,
        max_abs=float(np.max(difference)),
        mean_abs=float(np.mean(difference)),
        reference_min=float(np.min(expected)),
        reference_max=float(np.max(expected)),
    )


def _short(value: float) -> float:
    """Three significant digits: a deviation, not a checksum."""
    return float(f"{value:.3g}")
