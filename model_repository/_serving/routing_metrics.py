"""What routing between versions records on Triton's /metrics (pb_utils.MetricFamily).

Per task and version: answers by route, failures, and the network call's duration;
per (answering, companion) version pair: comparisons by result and the |Δ score|.
These feed `abdoserve model list`, the canary's automatic rollback (the supervisor
reads them) and the dashboards. Versions are small numbers: labels stay few.
"""

from __future__ import annotations

from typing import Any

from abdoserve.serving.metrics import DURATION_BUCKETS

DELTA_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)


class RoutingMetrics:
    def __init__(self, pb_utils: Any, task: str) -> None:
        family = pb_utils.MetricFamily
        self.task = task
        # Families must outlive their metrics (see IntakeMetrics).
        self._answers = family(
            name="abdoserve_version_answers_total",
            description="Studies answered, by task, network version and route "
            "(production, canary, fallback: the candidate failed and production answered)",
            kind=family.COUNTER,
        )
        self._failures = family(
            name="abdoserve_version_failures_total",
            description="Network calls that failed, by task and version",
            kind=family.COUNTER,
        )
        self._durations = family(
            name="abdoserve_version_duration_seconds",
            description="Network call time per study, by task and version",
            kind=family.HISTOGRAM,
        )
        self._comparisons = family(
            name="abdoserve_version_comparisons_total",
            description="Studies run by a second version beside the answer, by task, "
            "answering and companion version and result (agree, disagree, failed, dropped)",
            kind=family.COUNTER,
        )
        self._deltas = family(
            name="abdoserve_version_score_delta",
            description="|score of the companion - score of the answer| per compared study",
            kind=family.HISTOGRAM,
        )
        self._metrics: dict[tuple[object, ...], Any] = {}

    def answered(self, version: int, route: str) -> None:
        self._counter(self._answers, version=str(version), route=route).increment(1.0)

    def failed(self, version: int) -> None:
        self._counter(self._failures, version=str(version)).increment(1.0)

    def called(self, version: int, seconds: float) -> None:
        self._histogram(self._durations, DURATION_BUCKETS, version=str(version)).observe(seconds)

    def compared(self, answering: int, companion: int, result: str, delta: float | None) -> None:
        pair = {"answering": str(answering), "companion": str(companion)}
        self._counter(self._comparisons, result=result, **pair).increment(1.0)
        if delta is not None:
            self._histogram(self._deltas, DELTA_BUCKETS, **pair).observe(delta)

    def _counter(self, family: Any, **labels: str) -> Any:
        key = (id(family), *sorted(labels.items()))
        if key not in self._metrics:
            self._metrics[key] = family.Metric(labels={"task": self.task, **labels})
        return self._metrics[key]

    def _histogram(self, family: Any, buckets: tuple[float, ...], **labels: str) -> Any:
        key = (id(family), *sorted(labels.items()))
        if key not in self._metrics:
            self._metrics[key] = family.Metric(
                labels={"task": self.task, **labels}, buckets=list(buckets)
            )
        return self._metrics[key]
