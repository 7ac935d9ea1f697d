"""Metric updates off the request's path.

Every update of a Triton metric from a Python model is a round trip between the stub and
the server: 35-40 us each on the 2-core machine (docs/benchmarks.md, "Per-hop cost"),
and the fused model makes about fifteen per study (intake, drift, routing, execute
time). A writer thread makes them instead, after the response has gone. The stub's
wait for the server's reply releases the GIL (measured: a thread making 1000 updates
did not slow a busy loop beside it), so the next request's work goes on meanwhile.

`MetricsOffPath` is the `pb_utils` the metric classes (`IntakeMetrics`, `DriftMetrics`,
`RoutingMetrics`) are given: its `MetricFamily` creates each family at once, as Triton
wants, and hands out metrics whose creation and updates go to the writer; everything
else is `pb_utils` itself. A metric may lag its request by a few milliseconds; none is
lost, since `close` drains the queue before the model goes.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

_LOG = logging.getLogger(__name__)

Update = Callable[[], None]


QUEUE_BOUND = 100_000  # updates waiting: minutes of traffic, a few MiB at most


class MetricWriter:
    """One thread that makes the queued metric updates, in order. Past `bound` waiting
    updates (a writer stalled on the server), new ones are dropped, never the request:
    memory stays bounded and the log says so once."""

    def __init__(self, bound: int = QUEUE_BOUND) -> None:
        self._queue: queue.Queue[Update | None] = queue.Queue(maxsize=bound)
        self._failed = False
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="abdoserve-metrics", daemon=True)
        self._thread.start()

    def submit(self, update: Update) -> None:
        try:
            self._queue.put_nowait(update)
        except queue.Full:
            if self.dropped == 0:
                _LOG.error("metric updates are not being made; dropping them, not requests")
            self.dropped += 1

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every update submitted so far is made; False if that took too long."""
        done = threading.Event()
        try:
            self._queue.put(done.set, timeout=timeout_s)
        except queue.Full:
            return False
        return done.wait(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Make what is queued, then stop the thread."""
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return  # stalled: the daemon thread goes with the stub
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while (update := self._queue.get()) is not None:
            try:
                update()
            except Exception:  # a metric must never take the model down
                if not self._failed:  # once: a broken metric would flood the log
                    _LOG.exception("a metric update failed; later failures are not logged")
                    self._failed = True


class DeferredMetric:
    """A metric created, and updated, by the writer."""

    def __init__(self, writer: MetricWriter, create: Callable[[], Any]) -> None:
        self._writer = writer
        self._create = create
        self._metric: Any = None
        writer.submit(self._real)  # the series exists (at 0) from now, not its first update

    def increment(self, value: float) -> None:
        self._writer.submit(lambda: self._real().increment(value))

    def observe(self, value: float) -> None:
        self._writer.submit(lambda: self._real().observe(value))

    def set(self, value: float) -> None:
        self._writer.submit(lambda: self._real().set(value))

    def _real(self) -> Any:
        if self._metric is None:  # the writer's thread alone calls this
            self._metric = self._create()
        return self._metric


class MetricsOffPath:
    """`pb_utils`, with metrics that update from the writer's thread."""

    def __init__(self, pb_utils: Any, writer: MetricWriter) -> None:
        self._pb_utils = pb_utils
        self.MetricFamily = deferred_families(pb_utils.MetricFamily, writer)

    def __getattr__(self, name: str) -> Any:
        # Kept on first use: the intake reads its inputs through this on every request.
        value = getattr(self._pb_utils, name)
        setattr(self, name, value)
        return value


def deferred_families(family_class: Any, writer: MetricWriter) -> Any:
    """A stand-in for `pb_utils.MetricFamily` whose metrics are `DeferredMetric`s."""

    class DeferredFamily:
        COUNTER = family_class.COUNTER
        HISTOGRAM = family_class.HISTOGRAM
        GAUGE = getattr(family_class, "GAUGE", None)

        def __init__(self, name: str, description: str, kind: Any) -> None:
            self.family = family_class(name=name, description=description, kind=kind)

        def Metric(
            self, labels: dict[str, str], buckets: list[float] | None = None
        ) -> DeferredMetric:
            family = self.family
            if buckets is None:
                return DeferredMetric(writer, lambda: family.Metric(labels=labels))
            return DeferredMetric(writer, lambda: family.Metric(labels=labels, buckets=buckets))

    return DeferredFamily
