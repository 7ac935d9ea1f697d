"""Client-side Prometheus metrics (prometheus_client, for processes we own).

`ClientMetrics` records, per task, the latency of each `infer` call as the caller
sees it (retries and the one-time task-description fetch included), the retries
on UNAVAILABLE, and the calls that failed, by gRPC status name. Pass one to
`AbdoServeClient(metrics=...)` or `AsyncAbdoServeClient(metrics=...)` and expose
its registry with `prometheus_client.start_http_server` or your web framework.
Labels are the task and a status code only: never patient data.

Needs the `metrics` extra: `pip install "abdoserve-client[metrics]"`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from abdoserve_client.errors import AbdoServeError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

# From a warm CPU answer (tens of ms) to a deadline-length wait.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ClientMetrics:
    """The client's metric families in `registry` (the global one by default)."""

    def __init__(
        self, registry: CollectorRegistry | None = None, namespace: str = "abdoserve_client"
    ) -> None:
        # Imported here: prometheus-client is the optional `metrics` extra, and the
        # client itself never needs it.
        from prometheus_client import REGISTRY, Counter, Histogram

        registry = REGISTRY if registry is None else registry
        self.latency = Histogram(
            "request_duration_seconds",
            "Duration of infer calls as the caller sees them, retries included, by task",
            ["task"],
            namespace=namespace,
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        # prometheus_client appends _total to counter names.
        self.retries = Counter(
            "retries",
            "RPCs retried after UNAVAILABLE, by task",
            ["task"],
            namespace=namespace,
            registry=registry,
        )
        self.errors = Counter(
            "errors",
            "Calls that failed, by task and gRPC status name",
            ["task", "code"],
            namespace=namespace,
            registry=registry,
        )
        self._clock: Callable[[], float] = time.perf_counter  # replaced in tests

    def retried(self, task: str) -> None:
        self.retries.labels(task=task).inc()

    def failed(self, task: str, code: str) -> None:
        self.errors.labels(task=task, code=code).inc()

    @contextlib.contextmanager
    def timed(self, task: str) -> Iterator[None]:
        """Observe the block's duration; count it as an error if it raises an AbdoServeError."""
        started = self._clock()
        try:
            yield
        except AbdoServeError as error:
            self.failed(task, error.code)
            raise
        finally:
            self.latency.labels(task=task).observe(self._clock() - started)


def timed(metrics: ClientMetrics | None, task: str) -> contextlib.AbstractContextManager[None]:
    """`metrics.timed(task)`, or a no-op where the client has no metrics."""
    return contextlib.nullcontext() if metrics is None else metrics.timed(task)
