"""One study through the network version its routing picks: the answer's network call,
its fallback, and the companion run beside it (abdoserve.serving.routing says which).

A candidate that fails is asked once more (a version being swapped by a reload can
refuse a call in between); failing again costs no study: production answers it instead
(route `fallback`), and each failure counts against the candidate. A production
failure is the request's error, as before there were versions.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from abdoserve.serving.companion import CompanionRunner, Job
from abdoserve.serving.net_versions import NetFailed
from abdoserve.serving.routing import Routing
from abdoserve.serving.routing_metrics import RoutingMetrics

AsyncCall = Callable[[int, np.ndarray, np.ndarray], Awaitable[np.ndarray]]


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
