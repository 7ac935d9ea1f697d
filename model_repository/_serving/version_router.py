"""One study through the network version its routing picks: the answer's network call,
its fallback, and the companion run beside it (abdoserve.serving.routing says which).

A candidate that fails is asked once more (a version being swapped by a reload can
refuse a call in between); failing again costs no study: production answers it instead
(route `fallback`), and each failure counts against the candidate. A production
failure is the request's error, as before there were versions.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from abdoserve.serving.companion import CompanionRunner, Job
from abdoserve.serving.net_versions import NetFailed
from abdoserve.serving.routing import Routing
from abdoserve.serving.routing_metrics import RoutingMetrics

AsyncCall = Callable[[int, np.ndarray, np.ndarray], Awaitable[np.ndarray]]
# A fused model's in-process run: a version and its studies' samples and features in,
# one output per study out, as one batch (abdoserve.serving.local_versions).
BatchRun = Callable[[int, Sequence[np.ndarray], Sequence[np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True, eq=False)
class Routed:
    version: int
    output: np.ndarray  # per-sample network output (s, K)


class VersionRouter:
    def __init__(
        self,
        routing: Routing,
        call: AsyncCall,
        metrics: RoutingMetrics,
        companions: CompanionRunner,
    ) -> None:
        self.routing = routing
        self.call = call
        self.metrics = metrics
        self.companions = companions

    async def run(self, key: str, samples: np.ndarray, features: np.ndarray) -> Routed:
        routing = self.routing
        version = routing.answering(key)
        route = "production" if version == routing.production else "canary"
        try:
            output = await self._timed(version, samples, features)
        except NetFailed:
            self.metrics.failed(version)
            if version == routing.production:
                raise
            try:
                output = await self._timed(version, samples, features)
            except NetFailed:
                self.metrics.failed(version)
                version, route = routing.production, "fallback"
                output = await self._timed(version, samples, features)
        self.metrics.answered(version, route)
        return Routed(version, output)

    def run_batch(
        self,
        keys: Sequence[str],
        samples: Sequence[np.ndarray],
        features: Sequence[np.ndarray],
        run: BatchRun,
    ) -> list[Routed | NetFailed]:
        """`run` for studies run in-process: grouped by the version each gets, one run per
        group so that each stays one batch, with `run`'s fallback for a whole group. Each
        study's result is its Routed answer, or the NetFailed that is its error."""
        groups: dict[int, list[int]] = {}
        for index, key in enumerate(keys):
            groups.setdefault(self.routing.answering(key), []).append(index)
        results: list[Routed | NetFailed | None] = [None] * len(keys)
        for version, members in groups.items():
            studies = ([samples[i] for i in members], [features[i] for i in members])
            try:
                routed = self._group(version, *studies, run)
            except NetFailed as failed:
                routed = [failed] * len(members)
            for index, result in zip(members, routed, strict=True):
                results[index] = result
        return [result for result in results if result is not None]

    def _group(
        self,
        version: int,
        samples: list[np.ndarray],
        features: list[np.ndarray],
        run: BatchRun,
    ) -> list[Routed | NetFailed]:
        production = self.routing.production
        route = "production" if version == production else "canary"
        attempts = [(version, route)] if version == production else [(version, route)] * 2
        if version != production:
            attempts.append((production, "fallback"))
        for number, (tried, tried_route) in enumerate(attempts):
            try:
                outputs = self._timed_run(tried, samples, features, run)
            except NetFailed:
                for _ in samples:  # each study's call failed, as with one call per study
                    self.metrics.failed(tried)
                if number == len(attempts) - 1:
                    raise
                continue
            for _ in outputs:
                self.metrics.answered(tried, tried_route)
            return [Routed(tried, output) for output in outputs]
        raise AssertionError("unreachable: the last attempt raises")

    def _timed_run(
        self, version: int, samples: list[np.ndarray], features: list[np.ndarray], run: BatchRun
    ) -> list[np.ndarray]:
        started = time.perf_counter()
        outputs = run(version, samples, features)
        seconds = time.perf_counter() - started
        for _ in outputs:  # every study of the batch waited for the whole run
            self.metrics.called(version, seconds)
        return outputs

    def compare_later(
        self,
        key: str,
        routed: Routed,
        samples: np.ndarray,
        features: np.ndarray,
        answered: np.ndarray,
    ) -> None:
        """Queue the study for its companion version, if the routing gives it one."""
        companion = self.routing.companion(key)
        if companion is None or companion == routed.version:
            return
        self.companions.submit(Job(routed.version, companion, samples, features, answered))

    async def _timed(self, version: int, samples: np.ndarray, features: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        output = await self.call(version, samples, features)
        self.metrics.called(version, time.perf_counter() - started)
        return output
