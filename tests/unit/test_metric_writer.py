"""The metric writer: updates made from its own thread, in order, none lost, a failing
one logged once and never raised into the model."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

from abdoserve.serving.metric_writer import MetricsOffPath, MetricWriter
from tests.unit.fake_pb_utils import FakePbUtils
from tests.unit.test_postprocess_routing import RecordingFamily, recorded


class Family(RecordingFamily):
    GAUGE = "gauge"
    threads: list[str] = []  # noqa: RUF012 (the test's record)

    def Metric(self, labels: dict[str, str], buckets: list[float] | None = None) -> Any:
        self.threads.append(threading.current_thread().name)
        return super().Metric(labels, buckets)


class PbUtils(FakePbUtils):
    MetricFamily = Family


@pytest.fixture
def writer() -> Any:
    RecordingFamily.recorded.clear()
    Family.threads.clear()
    running = MetricWriter()
    yield running
    running.close()


def test_metrics_are_created_at_once_and_updated_in_order_by_the_writer(
    writer: MetricWriter,
) -> None:
    measured = MetricsOffPath(PbUtils(), writer)
    family = measured.MetricFamily(name="abdoserve_probe_total", description="d", kind="counter")
    metric = family.Metric(labels={"task": "t"})
    assert writer.flush()
    # the series exists before its first update: rate() sees that update
    assert ("abdoserve_probe_total", frozenset({("task", "t")})) in RecordingFamily.recorded
    for value in range(1, 6):
        metric.increment(float(value))
    assert writer.flush()
    assert recorded("abdoserve_probe_total", task="t") == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert Family.threads == ["abdoserve-metrics"]
    assert measured.TritonError is FakePbUtils.TritonError  # the rest is pb_utils itself
    assert "TritonError" in vars(measured)  # looked up once, not on every request


def test_a_failing_update_is_logged_once_and_the_writer_goes_on(
    writer: MetricWriter, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise RuntimeError("the server refused the metric")

    seen: list[int] = []
    with caplog.at_level(logging.ERROR):
        writer.submit(broken)
        writer.submit(broken)
        writer.submit(lambda: seen.append(1))
        assert writer.flush()
    assert seen == [1]
    assert len([r for r in caplog.records if "metric update failed" in r.getMessage()]) == 1


def test_close_makes_what_is_queued() -> None:
    writer = MetricWriter()
    seen: list[int] = []
    for number in range(100):
        writer.submit(lambda number=number: seen.append(number))  # type: ignore[misc]
    writer.close()
    assert seen == list(range(100))


def test_a_stalled_writer_drops_updates_past_its_bound_and_never_blocks() -> None:
    """A writer stuck on the server (the update never returns) costs bounded memory:
    updates past the bound are dropped and counted; submit never waits."""
    writer = MetricWriter(bound=10)
    stuck = threading.Event()
    writer.submit(stuck.wait)  # the writer's thread blocks here
    for _ in range(50):
        writer.submit(lambda: None)
    assert writer.dropped >= 39  # 10 queued (the first may already be taken), the rest dropped
    assert not writer.flush(timeout_s=0.1)
    stuck.set()
    assert writer.flush()
    writer.close()
