"""Drift's features: one definition for what the server records
(abdoserve.serving.drift_metrics) and what `model validate` keeps of the acceptance
cohort (a version's `drift_reference.json`, which carries the bins for the supervisor's
watch, abdoserve.deploy.drift_watch). The bins themselves: abdoserve.serving.drift_bins.
The answer's feature is the class for a classifier, and the score over ten equal bins
of the output's range otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from abdoserve.preprocessing.specs import Output
from abdoserve.preprocessing.study_profile import MANUFACTURERS, StudyProfile
from abdoserve.serving.drift_bins import (
    CLASS_METRIC,
    REFERENCE_SCHEMA,
    SCORE_METRIC,
    Feature,
)

SCORE_BINS = 10


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
    """`drift_reference.json`: each feature's bins and its counts over them in the cohort."""
    counts = {feature.name: [0] * feature.bins for feature in features(output)}
    for bins in studies:
        for name, index in bins.items():
            counts[name][index] += 1
    return {
        "schema": REFERENCE_SCHEMA,
        "task": task,
        "version": version,
        "studies": len(studies),
        "features": {
            feature.name: {**feature.to_json(), "counts": counts[feature.name]}
            for feature in features(output)
        },
    }
