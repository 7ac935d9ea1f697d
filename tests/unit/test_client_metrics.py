"""Client-side metrics without a server: latency, retries and errors by gRPC code."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from abdoserve_client.aio import AsyncAbdoServeClient
from abdoserve_client.client import AbdoServeClient
from abdoserve_client.errors import AbdoServeError, InvalidRequestError, ServerUnavailableError
from abdoserve_client.metrics import ClientMetrics
from abdoserve_client.results import FibrosisResult
from tests.unit.test_client import FIBROSIS, answer, triton_error

TASK = "liver_fibrosis_ct"
STEP_S = 0.25


class Clock:
    """perf_counter stand-in: time moves only when the fake server works."""

    def __init__(self) -> None:
        self.now = 100.0


class FakeResponse:
    ARRAYS: dict[str, Any] = {  # noqa: RUF012 - read-only test data
        "SCORES": np.array([[[1.0], [1.4]]]),
        "STUDY": np.array([[1.2]]),
        "ANSWER": np.array([[answer({"S": 1.2, "unit": "stage"}, [[1.0], [1.4]])]], dtype=object),
    }

    def as_numpy(self, name: str) -> Any:
        return self.ARRAYS[name]


class FakeInfer:
    """The client's inference transport: fails `failures` times first; each try takes STEP_S."""

    def __init__(self, failures: list[str], clock: Clock) -> None:
        self.failures = list(failures)
        self.clock = clock
        self.calls = 0

    def infer(self, task: str, inputs: Any, outputs: Any, client_timeout: float) -> FakeResponse:
        self.calls += 1
        self.clock.now += STEP_S
        if self.failures:
            raise triton_error(self.failures.pop(0))
        return FakeResponse()

    def close(self) -> None:
        pass


class FakeAsyncInfer(FakeInfer):
    async def infer(  # type: ignore[override]
        self, task: str, inputs: Any, outputs: Any, client_timeout: float
    ) -> FakeResponse:
        return FakeInfer.infer(self, task, inputs, outputs, client_timeout)

    async def close(self) -> None:  # type: ignore[override]
        pass


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def client_metrics(registry: CollectorRegistry, clock: Clock) -> ClientMetrics:
    metrics = ClientMetrics(registry)
    metrics._clock = lambda: clock.now
    return metrics


def sync_client(failures: list[str], registry: CollectorRegistry) -> AbdoServeClient:
    clock = Clock()
    client = AbdoServeClient("127.0.0.1:1", retries=2, backoff_s=0.1)
    client.metrics = client_metrics(registry, clock)
    client._transport = FakeInfer(failures, clock)
    client._sleep = lambda _: None
    client._tasks[TASK] = FIBROSIS
    return client


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_family_names_follow_prometheus_rules(registry: CollectorRegistry) -> None:
    ClientMetrics(registry)
    names = {metric.name: metric.type for metric in registry.collect()}
    assert names == {
        "abdoserve_client_request_duration_seconds": "histogram",
        "abdoserve_client_retries": "counter",  # exposed as ..._retries_total
        "abdoserve_client_errors": "counter",
    }
    ClientMetrics(CollectorRegistry(), namespace="other").retried("t")


def test_success_after_retries_records_latency_and_retries(registry: CollectorRegistry) -> None:
    client = sync_client(["UNAVAILABLE", "UNAVAILABLE"], registry)
    result = client.infer(TASK, [b"dicom"], {"age": 60, "sex": "M"})
    assert isinstance(result, FibrosisResult) and result.score == pytest.approx(1.2)
    assert value(registry, "abdoserve_client_retries_total", task=TASK) == 2
    assert value(registry, "abdoserve_client_request_duration_seconds_count", task=TASK) == 1
    # Three tries of STEP_S each: the caller's view, retries included.
    assert value(
        registry, "abdoserve_client_request_duration_seconds_sum", task=TASK
    ) == pytest.approx(3 * STEP_S)
    assert value(registry, "abdoserve_client_request_duration_seconds_bucket", task=TASK, le="1.0")
    samples = [sample.name for family in registry.collect() for sample in family.samples]
    assert not any(name.startswith("abdoserve_client_errors") for name in samples)


def test_refused_study_counts_one_error_by_code_and_no_retry(registry: CollectorRegistry) -> None:
    client = sync_client(["INVALID_ARGUMENT"], registry)
    with pytest.raises(InvalidRequestError):
        client.infer(TASK, [b"dicom"], {})
    assert value(registry, "abdoserve_client_errors_total", task=TASK, code="INVALID_ARGUMENT") == 1
    assert value(registry, "abdoserve_client_retries_total", task=TASK) is None
    assert value(registry, "abdoserve_client_request_duration_seconds_count", task=TASK) == 1


def test_unavailable_through_every_retry_is_one_unavailable_error(
    registry: CollectorRegistry,
) -> None:
    client = sync_client(["UNAVAILABLE"] * 5, registry)
    with pytest.raises(ServerUnavailableError):
        client.infer(TASK, [b"dicom"], {})
    assert client._transport.calls == 3
    assert value(registry, "abdoserve_client_retries_total", task=TASK) == 2
    assert value(registry, "abdoserve_client_errors_total", task=TASK, code="UNAVAILABLE") == 1
    assert value(registry, "abdoserve_client_request_duration_seconds_sum", task=TASK) == (
        pytest.approx(3 * STEP_S)
    )


def test_client_side_errors_are_counted_too(registry: CollectorRegistry) -> None:
    client = sync_client([], registry)
    with pytest.raises(InvalidRequestError, match="no DICOM instances"):
        client.infer(TASK, [], {})
    assert value(registry, "abdoserve_client_errors_total", task=TASK, code="INVALID_ARGUMENT") == 1


def test_async_client_records_the_same(registry: CollectorRegistry) -> None:
    clock = Clock()

    async def scenario() -> None:
        async def no_sleep(_: float) -> None:
            pass

        async with AsyncAbdoServeClient("127.0.0.1:1", retries=2, backoff_s=0.1) as client:
            client.metrics = client_metrics(registry, clock)
            client._raw, client._sleep = FakeAsyncInfer(["UNAVAILABLE"], clock), no_sleep
            client._tasks[TASK] = FIBROSIS
            await client.infer(TASK, [b"dicom"], {})
            client._raw.failures = ["INTERNAL"]
            with pytest.raises(AbdoServeError, match="INTERNAL"):
                await client.infer(TASK, [b"dicom"], {})

    asyncio.run(scenario())
    assert value(registry, "abdoserve_client_retries_total", task=TASK) == 1
    assert value(registry, "abdoserve_client_errors_total", task=TASK, code="INTERNAL") == 1
    assert value(registry, "abdoserve_client_request_duration_seconds_count", task=TASK) == 2
    assert value(registry, "abdoserve_client_request_duration_seconds_sum", task=TASK) == (
        pytest.approx(3 * STEP_S)
    )


def test_a_client_without_metrics_records_nothing(registry: CollectorRegistry) -> None:
    client = sync_client(["UNAVAILABLE"], registry)
    client.metrics = None
    client.infer(TASK, [b"dicom"], {})
    assert value(registry, "abdoserve_client_retries_total", task=TASK) is None
