"""The SLO gate: locust's `<prefix>_stats.csv` against a failure ratio and latency budgets.

Budgets are per request name; the name `*` applies to every row, the aggregate
included. A budgeted name that never appears in the stats fails the gate, so a
typo cannot pass silently. Locust-free, standard library only.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

AGGREGATED = "Aggregated"  # locust's name for the all-requests row
EVERY_NAME = "*"
PERCENTILE_COLUMNS = {"p95": "95%", "p99": "99%"}


@dataclass(frozen=True)
class Budget:
    """What a run must meet: failures / requests at most `max_failure_ratio` on every row,
    and p95/p99 in ms at most the budget for the names given."""

    max_failure_ratio: float = 0.0
    p95_ms: Mapping[str, float] = field(default_factory=dict)
    p99_ms: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_failure_ratio <= 1.0:
            raise ValueError("max_failure_ratio must lie in 0..1")
        if any(ms <= 0 for ms in (*self.p95_ms.values(), *self.p99_ms.values())):
            raise ValueError("latency budgets must be positive milliseconds")


@dataclass(frozen=True)
class Row:
    """One row of locust's stats CSV (percentiles None where locust wrote N/A)."""

    name: str
    requests: int
    failures: int
    percentiles_ms: Mapping[str, float | None]

    @property
    def failure_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Check:
    name: str
    metric: str
    measured: float | None
    limit: float
    passed: bool


@dataclass(frozen=True)
class Verdict:
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def table(self) -> str:
        """A fixed-width table of every check, then one line with the verdict."""
        width = max([len("request name"), *(len(check.name) for check in self.checks)])
        lines = [f"{'request name':<{width}}  {'check':<13} {'measured':>10} {'limit':>10}  result"]
        lines += [_line(check, width) for check in self.checks]
        failed = sum(not check.passed for check in self.checks)
        summary = "PASS" if self.passed else f"FAIL ({failed} of {len(self.checks)} checks)"
        lines.append(f"SLO gate: {summary}")
        return "\n".join(lines)


def read_stats(path: Path) -> list[Row]:
    """Every row of locust's `<prefix>_stats.csv`, the Aggregated row last as locust writes it."""
    with path.open(newline="") as handle:
        return [_row(record) for record in csv.DictReader(handle)]


def evaluate(rows: Sequence[Row], budget: Budget) -> Verdict:
    """Checks grouped by request name in the CSV's order, then budgets for absent names."""
    latency = {"p95": budget.p95_ms, "p99": budget.p99_ms}
    checks: list[Check] = []
    for row in rows:
        checks.append(_failure_check(row, budget.max_failure_ratio))
        for metric, budgets in latency.items():
            limit = budgets.get(row.name, budgets.get(EVERY_NAME))
            if limit is not None:
                checks.append(_latency_check(row, metric, limit))
    present = {row.name for row in rows} | {EVERY_NAME}
    for metric, budgets in latency.items():
        checks += [
            Check(name, f"{metric} ms", None, limit, False)
            for name, limit in budgets.items()
            if name not in present
        ]
    return Verdict(tuple(checks))


def gate(stats_csv: Path, budget: Budget) -> Verdict:
    return evaluate(read_stats(stats_csv), budget)


def _row(record: Mapping[str, str]) -> Row:
    percentiles = {
        metric: _milliseconds(record[column]) for metric, column in PERCENTILE_COLUMNS.items()
    }
    return Row(
        name=record["Name"],
        requests=int(record["Request Count"]),
        failures=int(record["Failure Count"]),
        percentiles_ms=percentiles,
    )


def _milliseconds(text: str) -> float | None:
    return None if text.strip() in ("", "N/A") else float(text)


def _failure_check(row: Row, limit: float) -> Check:
    ratio = row.failure_ratio
    return Check(row.name, "failure ratio", ratio, limit, ratio <= limit)


def _latency_check(row: Row, metric: str, limit: float) -> Check:
    measured = row.percentiles_ms[metric]
    passed = measured is not None and measured <= limit
    return Check(row.name, f"{metric} ms", measured, limit, passed)


def _line(check: Check, width: int) -> str:
    precise = check.metric == "failure ratio"
    measured = "missing" if check.measured is None else _number(check.measured, precise)
    limit = _number(check.limit, precise)
    result = "pass" if check.passed else "FAIL"
    return f"{check.name:<{width}}  {check.metric:<13} {measured:>10} {limit:>10}  {result}"


def _number(value: float, precise: bool) -> str:
    return f"{value:.4f}" if precise else f"{value:.0f}"
