"""Drift's bins and the comparison of two distributions over them: numpy and the
standard library alone, so that the supervisor, which loads no model code, reads a
version's baseline (`drift_reference.json`) and judges a window with it.

A feature is a distribution over fixed bins. A number's bins are a Prometheus
histogram's (value <= edge, then +Inf), and one more bin for studies that lacked the
value; a category's are its fixed vocabulary. The baseline carries each feature's bins
with its counts, so the watch needs nothing else to read the live counts the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

REFERENCE_FILE = "drift_reference.json"
REFERENCE_SCHEMA = "abdoserve-drift-reference/2"
MISSING_METRIC = "abdoserve_drift_input_missing_total"  # by feature, for the numbers
CLASS_METRIC = "abdoserve_drift_answer_class_total"
SCORE_METRIC = "abdoserve_drift_answer_score"
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

    @property
    def label(self) -> str:
        """The metric label that holds a category's value."""
        return "class" if self.name == "answer" else self.name

    def bin_of(self, value: float | str | None) -> int:
        if self.categories:
            return self.categories.index(str(value))
        if value is None or not math.isfinite(float(value)):
            return len(self.edges) + 1
        # Prometheus counts a value into every bucket whose bound is >= it.
        return int(np.searchsorted(np.asarray(self.edges), float(value), side="left"))

    def to_json(self) -> dict[str, Any]:
        shape: dict[str, Any] = (
            {"categories": list(self.categories)}
            if self.categories
            else {"edges": [float(edge) for edge in self.edges]}
        )
        return {"metric": self.metric, **shape}

    @classmethod
    def from_json(cls, name: str, value: Mapping[str, Any]) -> Feature:
        return cls(
            name,
            str(value["metric"]),
            tuple(float(edge) for edge in value.get("edges", ())),
            tuple(str(category) for category in value.get("categories", ())),
        )


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
