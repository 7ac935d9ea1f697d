"""Study pools and the two ways of timing them: one caller in sequence, or N threads at once.

Both record per-request latency with `time.perf_counter` and the wall time of the
timed requests only (warm-up excluded), so throughput and percentiles of the
in-process and the served pipelines come from the same arithmetic.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from abdoserve.export.phantom import build_study

PERCENTILES = (50, 95, 99)
Call = Callable[[int], object]  # request number -> one answered study


@dataclass(frozen=True, eq=False)
class Study:
    instances: tuple[bytes, ...]
    clinical: dict[str, object]


def study_pool(task: str, size: int, images: int | None = None) -> list[Study]:
    """`size` distinct phantom studies (seeds 1..size); `images` sets the sweep task's slices."""
    options: dict[str, Any] = {}
    if images is not None:
        # The phantom spans at most 400 mm; thinner spacing keeps large studies inside it.
        options = {"slices": images, "interval_mm": min(10.0, 400.0 / images)}
    built = [build_study(task, seed=seed, **options) for seed in range(1, size + 1)]
    return [Study(study.instances, dict(study.clinical)) for study in built]


@dataclass(frozen=True)
class Measurement:
    """One row: a pipeline at one concurrency, with every timed request's latency."""

    # "onnxruntime", "pytorch", or how it was served: "served" (packed gRPC), "grpc_bytes",
    # "shared_memory", or "transport_probe" (the null model)
    pipeline: str
    concurrency: int
    images_per_study: float
    wall_seconds: float
    cpu_seconds: float  # this process's, over the timed requests: pipeline or load generator
    latencies_ms: tuple[float, ...]

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def studies_per_second(self) -> float:
        return self.requests / self.wall_seconds

    @property
    def images_per_second(self) -> float:
        return self.studies_per_second * self.images_per_study

    @property
    def mean_ms(self) -> float:
        return sum(self.latencies_ms) / len(self.latencies_ms)

    @property
    def cpu_ms_per_study(self) -> float:
        """This process's CPU per timed request, in ms."""
        return 1e3 * self.cpu_seconds / self.requests

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))

    def summary(self) -> dict[str, Any]:
        """JSON-ready: derived figures first, then the raw latencies."""
        return {
            "pipeline": self.pipeline,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "images_per_study": self.images_per_study,
            "wall_seconds": self.wall_seconds,
            "this_process_cpu_ms_per_study": self.cpu_ms_per_study,
            "studies_per_second": self.studies_per_second,
            "images_per_second": self.images_per_second,
            **{f"p{q}_ms": self.percentile_ms(q) for q in PERCENTILES},
            "latencies_ms": list(self.latencies_ms),
        }


def images_per_study(pool: Sequence[Study]) -> float:
    return sum(len(study.instances) for study in pool) / len(pool)


def time_sequential(
    pipeline: str, call: Call, pool: Sequence[Study], requests: int, warmup: int
) -> Measurement:
    for number in range(warmup):
        call(number)
    latencies = []
    started, cpu = time.perf_counter(), time.process_time()
    for number in range(requests):
        sent = time.perf_counter()
        call(number)
        latencies.append(1e3 * (time.perf_counter() - sent))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    return Measurement(pipeline, 1, images_per_study(pool), wall, cpu, tuple(latencies))


class _Shared:
    """What the worker threads share: the next request number, latencies, the first error."""

    def __init__(self, requests: int, threads: int) -> None:
        self.requests = requests
        self.start = threading.Barrier(threads + 1)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.issued = 0
        self.latencies: list[float] = []
        self.errors: list[BaseException] = []

    def next_request(self) -> int | None:
        with self.lock:
            if self.issued >= self.requests or self.stop.is_set():
                return None
            self.issued += 1
            return self.issued - 1

    def fail(self, error: BaseException) -> None:
        with self.lock:
            self.errors.append(error)
        self.stop.set()
        self.start.abort()


def _worker(make_call: Callable[[], Call], shared: _Shared, warmup: int, offset: int) -> None:
    try:
        call = make_call()
        for number in range(warmup):  # each thread's own channel and connection get warm
            call(offset + number)
        shared.start.wait()
        while (request := shared.next_request()) is not None:
            sent = time.perf_counter()
            call(request)
            latency = 1e3 * (time.perf_counter() - sent)
            with shared.lock:
                shared.latencies.append(latency)
    except threading.BrokenBarrierError:
        return  # another worker failed before the start
    except Exception as error:
        shared.fail(error)


def time_concurrent(
    make_call: Callable[[], Call],
    pool: Sequence[Study],
    requests: int,
    concurrency: int,
    warmup: int,
    *,
    pipeline: str = "served",
) -> Measurement:
    """`concurrency` threads, each with its own caller, sending back to back until
    `requests` timed requests are done; every thread warms up with `warmup` first.
    `pipeline` names the row: "served" (packed gRPC) or another form."""
    shared = _Shared(requests, concurrency)
    threads = [
        threading.Thread(target=_worker, args=(make_call, shared, warmup, index), daemon=True)
        for index in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    try:
        shared.start.wait()
        started, cpu = time.perf_counter(), time.process_time()
        for thread in threads:
            thread.join()
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    except threading.BrokenBarrierError:
        wall = cpu = 0.0
    finally:
        shared.stop.set()  # on Ctrl-C the workers finish their request and leave
    if shared.errors:
        raise shared.errors[0]
    rows = tuple(shared.latencies)
    return Measurement(pipeline, concurrency, images_per_study(pool), wall, cpu, rows)
