"""The canary's automatic rollback: the candidate's errors, latency and disagreement with
production over a trailing window, read from the server's own /metrics.

The postprocess model counts, per version (abdoserve.serving.routing_metrics): the
canary's answers, each version's failed calls, each call's duration, and, for every
canary answer, production's verdict on the same study beside it. Over the last
`window_s`, once the candidate has `min_studies`:
- its failed calls over all its calls above `max_error_ratio`;
- its p95 call time above `max_latency_ratio` times production's (and above
  `latency_floor_s`, so that 2 ms against 1 ms is not a breach);
- its disagreements with production over its compared studies above
  `max_disagreement`
each name a breach, and the supervisor sends the canary to 0 % (VersionSync).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from abdoserve.serving.routing import Routing

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]


@dataclass(frozen=True)
class RollbackBounds:
    window_s: float = 60.0
    min_studies: int = 20
    max_error_ratio: float = 0.05
    max_latency_ratio: float = 3.0
    latency_floor_s: float = 0.25
    max_disagreement: float = 0.25


@dataclass(frozen=True)
class Breach:
    bound: str  # errors | latency | disagreement: the metric label
    detail: str  # the measured figure against its bound, in words


@dataclass(frozen=True)
class CanaryCounts:
    """Cumulative counters of one canary (candidate against production)."""

    answers: float = 0.0
    failures: float = 0.0
    agree: float = 0.0
    disagree: float = 0.0
    candidate_buckets: tuple[tuple[float, float], ...] = ()
    production_buckets: tuple[tuple[float, float], ...] = ()

    def minus(self, earlier: CanaryCounts) -> CanaryCounts:
        return CanaryCounts(
            self.answers - earlier.answers,
            self.failures - earlier.failures,
            self.agree - earlier.agree,
            self.disagree - earlier.disagree,
            _bucket_delta(self.candidate_buckets, earlier.candidate_buckets),
            _bucket_delta(self.production_buckets, earlier.production_buckets),
        )


def parse_metrics(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def canary_counts(samples: Samples, task: str, routing: Routing) -> CanaryCounts:
    assert routing.candidate is not None
    candidate, production = str(routing.candidate), str(routing.production)

    def total(name: str, **labels: str) -> float:
        wanted = {"task": task, **labels}.items()
        return sum(
            value for (found, pairs), value in samples.items() if found == name and wanted <= pairs
        )

    def buckets(version: str) -> tuple[tuple[float, float], ...]:
        found = [
            (float(dict(pairs)["le"]), value)
            for (name, pairs), value in samples.items()
            if name == "abdoserve_version_duration_seconds_bucket"
            and {("task", task), ("version", version)} <= pairs
        ]
        return tuple(sorted(found))

    pair = {"answering": candidate, "companion": production}
    return CanaryCounts(
        answers=total("abdoserve_version_answers_total", version=candidate, route="canary"),
        failures=total("abdoserve_version_failures_total", version=candidate),
        agree=total("abdoserve_version_comparisons_total", result="agree", **pair),
        disagree=total("abdoserve_version_comparisons_total", result="disagree", **pair),
        candidate_buckets=buckets(candidate),
        production_buckets=buckets(production),
    )


@dataclass
class RollbackWatch:
    bounds: RollbackBounds = field(default_factory=RollbackBounds)
    history: dict[tuple[str, int], deque[tuple[float, CanaryCounts]]] = field(default_factory=dict)

    def breach(self, task: str, routing: Routing, samples: Samples, now: float) -> Breach | None:
        """The first bound the task's canary passes over the window, if any."""
        key = (task, routing.generation)
        if routing.mode != "canary" or routing.candidate is None:
            self.history.pop(key, None)
            return None
        seen = self.history.setdefault(key, deque())
        seen.append((now, canary_counts(samples, task, routing)))
        while len(seen) > 2 and seen[1][0] <= now - self.bounds.window_s:
            seen.popleft()  # the oldest kept is the window's base
        delta = seen[-1][1].minus(seen[0][1])
        return judge(delta, self.bounds, now - seen[0][0])


def judge(delta: CanaryCounts, bounds: RollbackBounds, span_s: float) -> Breach | None:
    calls = delta.answers + delta.failures
    if calls < bounds.min_studies:
        return None
    over = f"over {span_s:.0f} s ({calls:.0f} canary studies)"
    errors = delta.failures / calls
    if errors > bounds.max_error_ratio:
        return Breach("errors", f"error ratio {errors:.2f} > {bounds.max_error_ratio:g} {over}")
    compared = delta.agree + delta.disagree
    if compared >= bounds.min_studies:
        disagreement = delta.disagree / compared
        if disagreement > bounds.max_disagreement:
            return Breach(
                "disagreement",
                f"disagreement with production {disagreement:.2f} > "
                f"{bounds.max_disagreement:g} {over}",
            )
    candidate = quantile(delta.candidate_buckets, 0.95)
    production = quantile(delta.production_buckets, 0.95)
    if (
        candidate is not None
        and production is not None
        and candidate > bounds.latency_floor_s
        and candidate > bounds.max_latency_ratio * production
    ):
        return Breach(
            "latency",
            f"p95 {candidate:.3f} s > {bounds.max_latency_ratio:g} x production's "
            f"{production:.3f} s {over}",
        )
    return None


def quantile(buckets: Iterable[tuple[float, float]], q: float) -> float | None:
    """The upper bound of the bucket holding the q-quantile (cumulative buckets)."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    wanted = q * ordered[-1][1]
    for bound, count in ordered:
        if count >= wanted:
            return bound if math.isfinite(bound) else ordered[-2][0] if len(ordered) > 1 else None
    return None


def _bucket_delta(
    now: tuple[tuple[float, float], ...], earlier: tuple[tuple[float, float], ...]
) -> tuple[tuple[float, float], ...]:
    before: Mapping[float, float] = dict(earlier)
    return tuple((bound, count - before.get(bound, 0.0)) for bound, count in now)
