"""Our own metric families on Triton's /metrics, through pb_utils.MetricFamily.

Named by Prometheus' rules: `abdoserve_` prefix, base units, `_total` on counters.
Labels are low-cardinality and never carry patient data: the task, a processing
stage, and the error's stable `reason` (never its message).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from abdoserve.preprocessing.errors import IntakeError

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
IMAGE_BUCKETS = (1, 2, 3, 4, 8, 16, 32, 64, 128, 256)
STAGES = ("decode", "arrange", "pixels", "total")


INTERNAL = "internal"


def known_reasons() -> tuple[str, ...]:
    """Every reason a refusal can carry: each is counted from 0 at load, so that a rate
    sees the first refusal (a series born at its first increment hides it)."""
    found, pending = set(), list(IntakeError.__subclasses__())
    while pending:
        kind = pending.pop()
        pending.extend(kind.__subclasses__())
        reason = getattr(kind, "reason", None)
        if isinstance(reason, str):
            found.add(reason)
    return (*sorted(found), INTERNAL)


def rejection_reason(error: Exception) -> str:
    """The error class's stable `reason` (see abdoserve.preprocessing.errors); anything
    unexpected is 'internal'."""
    return error.reason if isinstance(error, IntakeError) else INTERNAL


class IntakeMetrics:
    """The preprocess model's metrics for one task (one instance per model instance)."""

    def __init__(self, pb_utils: Any, task: str) -> None:
        family = pb_utils.MetricFamily
        self.task = task
        self._durations = family(
            name="abdoserve_preprocess_duration_seconds",
            description="Preprocessing time per request, by task and stage",
            kind=family.HISTOGRAM,
        )
        self._stage = {
            stage: self._durations.Metric(
                labels={"task": task, "stage": stage}, buckets=list(DURATION_BUCKETS)
            )
            for stage in STAGES
        }
        self._rejected = family(
            name="abdoserve_rejected_requests_total",
            description="Requests refused with an error, by task and reason",
            kind=family.COUNTER,
        )
        self._reasons = {
            reason: self._rejected.Metric(labels={"task": task, "reason": reason})
            for reason in known_reasons()
        }
        # The fused model's: a request whose client left is answered CANCELLED, which
        # Triton counts as a success of a Python model (the ensemble counts it itself).
        self._cancelled_family = cancelled = family(
            name="abdoserve_cancelled_requests_total",
            description="Requests dropped because their client cancelled or left, by task",
            kind=family.COUNTER,
        )
        self._cancelled = cancelled.Metric(labels={"task": task})
        # Families must outlive their metrics (Triton refuses observations otherwise).
        self._image_family = images = family(
            name="abdoserve_images_per_request",
            description="DICOM instances per request, by task",
            kind=family.HISTOGRAM,
        )
        self._images = images.Metric(labels={"task": task}, buckets=list(IMAGE_BUCKETS))
        self._bytes_family = received = family(
            name="abdoserve_received_bytes_total",
            description="DICOM bytes received, by task",
            kind=family.COUNTER,
        )
        self._bytes = received.Metric(labels={"task": task})

        # Wall time inside a Python model's `execute`, per call: Triton's compute_infer for
        # the model less this is what the Python backend itself costs around our code.
        self._execute_family = family(
            name="abdoserve_execute_duration_seconds",
            description="Time inside the Python model's execute per call, by task and model",
            kind=family.HISTOGRAM,
        )
        self._execute: dict[str, Any] = {}

    def executed(self, model: str, seconds: float) -> None:
        if model not in self._execute:
            self._execute[model] = self._execute_family.Metric(
                labels={"task": self.task, "model": model}, buckets=list(DURATION_BUCKETS)
            )
        self._execute[model].observe(seconds)

    def received(self, instances: int, size: int) -> None:
        self._images.observe(float(instances))
        self._bytes.increment(float(size))

    def prepared(self, stage_seconds: Mapping[str, float], total_seconds: float) -> None:
        for stage, seconds in stage_seconds.items():
            self._stage[stage].observe(seconds)
        self._stage["total"].observe(total_seconds)

    def cancelled(self) -> None:
        self._cancelled.increment(1.0)

    def failed_internally(self) -> None:
        """A request that failed past the intake (the fused model's network or answer)."""
        self._reasons[INTERNAL].increment(1.0)

    def rejected(self, error: Exception) -> None:
        reason = rejection_reason(error)
        if reason not in self._reasons:
            self._reasons[reason] = self._rejected.Metric(
                labels={"task": self.task, "reason": reason}
            )
        self._reasons[reason].increment(1.0)
