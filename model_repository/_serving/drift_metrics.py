"""What arrives and what is answered, per task and version, on Triton's /metrics
(pb_utils.MetricFamily), binned as abdoserve.serving.drift defines.

Labels are the task, the version (a small number), and a value from a fixed
vocabulary (vendor, class, feature name): nothing a header or a sender wrote.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from abdoserve.preprocessing.specs import Output
from abdoserve.preprocessing.study_profile import StudyProfile
from abdoserve.serving.drift import INPUT_FEATURES, answer_feature, answer_value, profile_value
from abdoserve.serving.drift_bins import CLASS_METRIC, MISSING_METRIC, SCORE_METRIC, Feature

DESCRIPTIONS = {
    "manufacturer": "Studies by scanner vendor (a fixed vocabulary), task and network version",
    "kvp": "Tube voltage (0018,0060) of the studies answered, by task and version",
    "slice_thickness_mm": "Slice thickness (0018,0050) in mm, by task and version",
    "pixel_spacing_mm": "In-plane pixel spacing in mm, by task and version",
    "body_hu": "Mean HU of the body (voxels above -500 HU), CT studies, by task and version",
}


class DriftMetrics:
    def __init__(self, pb_utils: Any, task: str, output: Output) -> None:
        family = pb_utils.MetricFamily
        self.task = task
        self.output = output
        self.answer = answer_feature(output)
        # Families must outlive their metrics (see IntakeMetrics).
        self._families = {
            feature.name: family(
                name=feature.metric,
                description=DESCRIPTIONS[feature.name],
                kind=family.COUNTER if feature.categories else family.HISTOGRAM,
            )
            for feature in INPUT_FEATURES
        }
        self._families["answer"] = family(
            name=self.answer.metric,
            description=(
                "Studies answered by class, task and version"
                if self.answer.metric == CLASS_METRIC
                else "The study value answered, by task and version"
            ),
            kind=family.COUNTER if self.answer.metric == CLASS_METRIC else family.HISTOGRAM,
        )
        assert self.answer.metric in (CLASS_METRIC, SCORE_METRIC)
        self._missing = family(
            name=MISSING_METRIC,
            description="Studies without the feature's value, by task, version and feature",
            kind=family.COUNTER,
        )
        self._metrics: dict[tuple[str, ...], Any] = {}

    def observe(self, version: int, profile: StudyProfile, study: np.ndarray) -> None:
        """One answered study: its profile and its answer, under the version that ran."""
        for feature in INPUT_FEATURES:
            self._record(feature, str(version), profile_value(profile, feature))
        self._record(self.answer, str(version), answer_value(self.output, study))

    def _record(self, feature: Feature, version: str, value: float | str | None) -> None:
        if feature.categories:
            label = "class" if feature.name == "answer" else feature.name
            self._metric(feature, version, **{label: str(value)}).increment(1.0)
        elif value is None:
            self._metric(feature, version, missing=feature.name).increment(1.0)
        else:
            self._metric(feature, version).observe(float(value))

    def _metric(self, feature: Feature, version: str, **labels: str) -> Any:
        key = (
            feature.name,
            version,
            *(f"{name}={value}" for name, value in sorted(labels.items())),
        )
        metric = self._metrics.get(key)
        if metric is None:
            all_labels = {"task": self.task, "version": version}
            if "missing" in labels:
                family = self._missing
                all_labels["feature"] = labels["missing"]
                metric = family.Metric(labels=all_labels)
            elif feature.categories:
                metric = self._families[feature.name].Metric(labels={**all_labels, **labels})
            else:
                metric = self._families[feature.name].Metric(
                    labels=all_labels, buckets=[float(edge) for edge in feature.edges]
                )
            self._metrics[key] = metric
        return metric
