"""Drift's features and their bins: one definition for what the server records
(abdoserve.serving.drift_metrics), what `model validate` keeps of the acceptance cohort
(a version's `drift_reference.json`) and what the supervisor compares them by
(abdoserve.deploy.drift_watch).

Each feature is a distribution over fixed bins. A number's bins are a Prometheus
histogram's (value <= edge, then +Inf), and one more bin for studies that lacked the
value; a category's are its fixed vocabulary. The answer's feature is the class for a
classifier, and the score over ten equal bins of the output's range otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from abdoserve.preprocessing.specs import Output
from abdoserve.preprocessing.study_profile import MANUFACTURERS, StudyProfile

MISSING = "missing"
SCORE_BINS = 10
REFERENCE_FILE = "drift_reference.json"
REFERENCE_SCHEMA = "abdoserve-drift-reference/1"
# A bin's share below this counts as this (a tenth of a percent): an empty bin that fills
# weighs by how much it filled, not by how empty it was.
MIN_SHARE = 1e-3


@dataclass(frozen=True)
class Feature:
    name: str  # the profile field, or "answer"
    metric: str  # the family on Triton's /metrics
    edges: tuple[float, ...] = ()  # a number's bucket bounds
    categories: tuple[str, ...] = ()  # a category's vocabulary

    @property
    def bins(self) -> int:
        """A number: its buckets, +Inf, and missing. A category: its vocabulary."""
        return len(self.edges) + 2 if self.edges else len(self.categories)

    def bin_of(self, value: float | str | None) -> int:
        if self.categories:
            return self.categories.index(str(value))
        if value is None or not math.isfinite(float(value)):
            return len(self.edges) + 1
        # Prometheus counts a value into every bucket whose bound is >= it.
        return int(np.searchsorted(np.asarray(self.edges), float(value), side="left"))


INPUT_FEATURES = (
    Feature("manufacturer", "abdoserve_drift_input_manufacturer_total", categories=MANUFACTURERS),
    Feature("kvp", "abdoserve_drift_input_kvp", edges=(70, 80, 90, 100, 110, 120, 130, 140)),
    Feature(
        "slice_thickness_mm",
        "abdoserve_drift_input_slice_thickness_mm",
        edges=(0.75, 1.25, 2.0, 3.0, 4.0, 5.5, 8.0),
    ),
    Feature(
        "pixel_spacing_mm",
        "abdoserve_drift_input_pixel_spacing_mm",
        edges=(0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.6, 2.0),
    ),
    Feature(
        "body_hu",
        "abdoserve_drift_input_body_hu",
        edges=(-300, -200, -150, -100, -50, 0, 50, 100),
    ),
)
MISSING_METRIC = "abdoserve_drift_input_missing_total"  # by feature, for the numbers
CLASS_METRIC = "abdoserve_drift_answer_class_total"
SCORE_METRIC = "abdoserve_drift_answer_score"


def answer_feature(output: Output) -> Feature:
    if output.kind == "classification":
        return Feature("answer", CLASS_METRIC, categories=output.labels)
    low, high = output.value_range
    edges = np.linspace(low, high, SCORE_BINS + 1)[1:-1]
    return Feature("answer", SCORE_METRIC, edges=tuple(round(float(e), 6) for e in edges))


def features(output: Output) -> tuple[Feature, ...]:
    return (*INPUT_FEATURES, answer_feature(output))


def answer_value(output: Output, study: np.ndarray) -> float | str:
    """The class label, or the study value: what the answer feature bins."""
    if output.kind == "classification":
        return output.labels[int(np.argmax(study))]
    return float(study[0])


def profile_value(profile: StudyProfile, feature: Feature) -> float | str | None:
    value: float | str | None = getattr(profile, feature.name)
    return value


def study_bins(output: Output, profile: StudyProfile, study: np.ndarray) -> dict[str, int]:
    """The bin of each feature for one answered study."""
    found = {
        feature.name: feature.bin_of(profile_value(profile, feature)) for feature in INPUT_FEATURES
    }
    found["answer"] = answer_feature(output).bin_of(answer_value(output, study))
    return found


def reference(
    task: str, version: int, output: Output, studies: Sequence[Mapping[str, int]]
) -> dict[str, object]:
    """`drift_reference.json`: each feature's counts over its bins in the cohort."""
    counts = {feature.name: [0] * feature.bins for feature in features(output)}
    for bins in studies:
        for name, index in bins.items():
            counts[name][index] += 1
    return {
        "schema": REFERENCE_SCHEMA,
        "task": task,
        "version": version,
        "studies": len(studies),
        "features": counts,
    }


def stability_index(
    expected: Sequence[float] | np.ndarray, observed: Sequence[float] | np.ndarray
) -> float:
    """The population stability index of `observed` against `expected` (counts over the
    same bins): sum((o - e) * ln(o / e)) over the bins' shares, each share at least
    MIN_SHARE so an empty bin counts without dividing by zero, and the same shares give
    0 whatever the counts. Above 0.25 is the usual reading of a real shift; below 0.1,
    none."""
    e = np.asarray(expected, dtype=np.float64)
    o = np.asarray(observed, dtype=np.float64)
    e = np.maximum(e / max(e.sum(), 1.0), MIN_SHARE)
    o = np.maximum(o / max(o.sum(), 1.0), MIN_SHARE)
    return float(np.sum((o - e) * np.log(o / e)))
