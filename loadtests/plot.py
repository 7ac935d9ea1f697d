"""Latency percentiles and throughput over time, from locust's `<prefix>_stats_history.csv`."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from abdoserve.loadtests.slo import AGGREGATED

PERCENTILES = ("50%", "95%", "99%")


@dataclass(frozen=True)
class History:
    """The Aggregated rows of a history CSV, as columns; seconds from the first row."""

    seconds: tuple[float, ...]
    users: tuple[float, ...]
    requests_per_s: tuple[float, ...]
    failures_per_s: tuple[float, ...]
    percentiles_ms: Mapping[str, tuple[float, ...]]  # NaN where locust wrote N/A


def read_history(path: Path) -> History:
    with path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["Name"] == AGGREGATED]
    start = float(rows[0]["Timestamp"]) if rows else 0.0
    return History(
        seconds=tuple(float(row["Timestamp"]) - start for row in rows),
        users=_column(rows, "User Count"),
        requests_per_s=_column(rows, "Requests/s"),
        failures_per_s=_column(rows, "Failures/s"),
        percentiles_ms={name: _percentiles(rows, name) for name in PERCENTILES},
    )


def plot_history(history_csv: Path, out_png: Path, title: str = "") -> Path:
    """Write a two-panel PNG: p50/p95/p99 (ms), and requests/s, failures/s and users."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    from matplotlib import pyplot as plt

    history = read_history(history_csv)
    figure, (latency, throughput) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    for name, values in history.percentiles_ms.items():
        latency.plot(history.seconds, values, label=f"p{name.rstrip('%')}")
    latency.set_ylabel("response time (ms)")
    latency.legend(loc="upper left")
    latency.set_title(title or history_csv.name)
    throughput.plot(history.seconds, history.requests_per_s, label="requests/s")
    throughput.plot(history.seconds, history.failures_per_s, label="failures/s")
    throughput.set_ylabel("per second")
    throughput.set_xlabel("seconds since start")
    users = throughput.twinx()
    users.step(history.seconds, history.users, where="post", color="grey", label="users")
    users.set_ylabel("users")
    lines = throughput.get_lines() + users.get_lines()  # one legend for both y axes
    throughput.legend(lines, [line.get_label() for line in lines], loc="upper left")
    figure.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=100)
    plt.close(figure)
    return out_png


def _column(rows: Sequence[Mapping[str, str]], name: str) -> tuple[float, ...]:
    return tuple(_number(row[name]) for row in rows)


def _percentiles(rows: Sequence[Mapping[str, str]], name: str) -> tuple[float, ...]:
    """NaN where locust had no window of responses yet: it writes N/A or 0 there, and a
    0 ms gRPC round trip is no measurement."""
    return tuple(value if value > 0 else math.nan for value in _column(rows, name))


def _number(text: str) -> float:
    return math.nan if text.strip() in ("", "N/A") else float(text)
