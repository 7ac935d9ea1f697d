"""Drift: a recent window of what each version received and answered, against what its
acceptance cohort looked like.

The server counts every answered study per task and version, over fixed bins
(abdoserve.serving.drift). `abdoserve model validate` keeps the cohort's counts, with
the bins, in the version's folder (`drift_reference.json`): the supervisor reads the
live counts by those bins, and loads no model code to do it. Every `every_s`, the
supervisor takes the counts' increase over the last `window_s` from Triton's /metrics
and, for each version with a reference and at least `min_studies` in the window,
gives each feature's population stability index against its reference
(`abdoserve_supervisor_drift_index`). The alert (AbdoServeDrift) reads that gauge; a
version never validated has no reference, and no index.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from abdoserve.deploy.rollback_watch import Samples
from abdoserve.serving.drift_bins import (
    MISSING_METRIC,
    REFERENCE_FILE,
    REFERENCE_SCHEMA,
    Feature,
    stability_index,
)

log = logging.getLogger(__name__)

Series = tuple[str, str]  # (task, version)
Counts = dict[tuple[str, str, str], np.ndarray]  # (task, version, feature) -> bin counts


@dataclass(frozen=True)
class Baseline:
    """A version's acceptance cohort: each feature's bins, and its counts over them."""

    features: tuple[Feature, ...]
    counts: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class DriftBounds:
    window_s: float = 3600.0
    min_studies: int = 50
    every_s: float = 15.0


@dataclass(frozen=True)
class DriftFigure:
    task: str
    version: str
    feature: str
    index: float  # population stability index of the window against the reference
    studies: int  # studies in the window


def feature_counts(samples: Samples, task: str, version: str, feature: Feature) -> np.ndarray:
    """One feature's counts over its bins, cumulative since the server started."""
    wanted = {("task", task), ("version", version)}
    if feature.categories:
        counts = np.zeros(feature.bins)
        for (name, labels), value in samples.items():
            if name == feature.metric and wanted <= labels:
                category = dict(labels).get(feature.label)
                if category in feature.categories:
                    counts[feature.categories.index(category)] += value
        return counts
    cumulative = np.zeros(len(feature.edges) + 1)
    bounds = np.asarray([*feature.edges, np.inf])
    for (name, labels), value in samples.items():
        if name == feature.metric + "_bucket" and wanted <= labels:
            # /metrics writes a bound in its own decimal form: matched, not compared
            found = np.flatnonzero(np.isclose(bounds, float(dict(labels)["le"]), rtol=1e-9))
            if found.size:
                cumulative[found[0]] = value
    missing = sum(
        value
        for (name, labels), value in samples.items()
        if name == MISSING_METRIC and wanted | {("feature", feature.name)} <= labels
    )
    return np.append(np.diff(cumulative, prepend=0.0), missing)


def series_in(samples: Samples) -> set[Series]:
    """The (task, version) pairs that answered studies, from the answer's families."""
    found = set()
    for name, labels in samples:
        if name.startswith("abdoserve_drift_answer_"):
            values = dict(labels)
            if "task" in values and "version" in values:
                found.add((values["task"], values["version"]))
    return found


@dataclass
class References:
    """Each version's `drift_reference.json`, read again when it changes."""

    repository: Path
    cache: dict[Path, tuple[float, Baseline | None]] = field(default_factory=dict)

    def __call__(self, task: str, version: str) -> Baseline | None:
        path = self.repository / f"{task}_net" / version / REFERENCE_FILE
        if not path.parent.is_dir():  # a fused model's versions lie beside its code
            path = self.repository / task / version / REFERENCE_FILE
        try:
            stamp = path.stat().st_mtime
        except OSError:
            return None
        cached = self.cache.get(path)
        if cached is None or cached[0] != stamp:
            cached = (stamp, read_reference(path))
            self.cache[path] = cached
        return cached[1]


def read_reference(path: Path) -> Baseline | None:
    """A baseline, checked (each feature's counts fit its bins); None, logged, when the
    file is not one."""
    try:
        document = json.loads(path.read_text())
        if document.get("schema") != REFERENCE_SCHEMA:
            raise ValueError(f"schema is not {REFERENCE_SCHEMA}")
        features, counts = [], {}
        for name, value in document["features"].items():
            feature = Feature.from_json(str(name), value)
            found = np.asarray(value["counts"], dtype=np.float64)
            if found.shape != (feature.bins,) or (found < 0).any() or not feature.bins:
                raise ValueError(f"{name}: {feature.bins} counts expected")
            features.append(feature)
            counts[feature.name] = found
        return Baseline(tuple(features), counts)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        log.warning("drift reference %s not used: %s", path, error)
        return None


@dataclass
class DriftWatch:
    bounds: DriftBounds
    references: Callable[[str, str], Baseline | None]
    history: deque[tuple[float, Counts]] = field(default_factory=deque)

    def due(self, now: float) -> bool:
        return not self.history or now - self.history[-1][0] >= self.bounds.every_s

    def update(self, samples: Samples, now: float) -> list[DriftFigure]:
        """The window's figures, with this scrape as its newest point."""
        current = self.all_counts(samples)
        if self.history and restarted(self.history[-1][1], current):
            self.history.clear()  # Triton restarted: its counters began again
        if not self.history:
            self.history.append((now, {}))  # counters start at zero with their server
        self.history.append((now, current))
        while len(self.history) > 2 and self.history[1][0] <= now - self.bounds.window_s:
            self.history.popleft()  # the oldest kept is the window's base
        base = self.history[0][1]
        window = {
            key: counts - base.get(key, np.zeros_like(counts)) for key, counts in current.items()
        }
        return list(self.figures(window))

    def all_counts(self, samples: Samples) -> Counts:
        """Each baselined version's counts over its baseline's bins, since the server
        started; a version without a baseline is not read at all."""
        counts: Counts = {}
        for task, version in sorted(series_in(samples)):
            baseline = self.references(task, version)
            for feature in baseline.features if baseline is not None else ():
                counts[(task, version, feature.name)] = feature_counts(
                    samples, task, version, feature
                )
        return counts

    def figures(self, window: Counts) -> Iterable[DriftFigure]:
        for task, version in sorted({(task, version) for task, version, _ in window}):
            baseline = self.references(task, version)
            answers = window.get((task, version, "answer"))
            if baseline is None or answers is None:
                continue
            studies = int(answers.sum())
            if studies < self.bounds.min_studies:
                continue
            for name, expected in sorted(baseline.counts.items()):
                observed = window.get((task, version, name))
                if observed is not None:
                    index = stability_index(expected, observed)
                    yield DriftFigure(task, version, name, index, studies)


def restarted(before: Counts, now: Counts) -> bool:
    return any(key in before and (counts < before[key]).any() for key, counts in now.items())
