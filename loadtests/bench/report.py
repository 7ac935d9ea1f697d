"""Results of `abdoserve bench serving`: the per-task tables, the targets, the JSON document
and the PNG (served throughput and p95 vs concurrency per task, the in-process throughput
dashed, and the cost-vs-images curve when swept)."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from abdoserve.export.configs import Tuning
from abdoserve.loadtests.bench.breakdown import (
    Breakdown,
    Probe,
    format_breakdown,
    format_split,
    splits,
)
from abdoserve.loadtests.bench.rounds import Spread, median_of, over_rounds, spread_of
from abdoserve.loadtests.bench.workload import PERCENTILES, Measurement

THROUGHPUT_TARGET = 0.95  # served saturating throughput / in-process
LATENCY_FACTOR, LATENCY_SLACK_MS = 1.15, 2.0  # served p50 at c=1 <= 1.15 x in-process + 2 ms
LABELS = {
    "onnxruntime": "in-process onnxruntime",
    "pytorch": "in-process pytorch",
    "served": "served gRPC",
    "grpc_bytes": "served gRPC, BYTES",
    "shared_memory": "served shared memory",
    "fused": "fused gRPC",
    "fused_shared_memory": "fused shared memory",
    "pytriton": "PyTriton, one callable",
    "transport_probe": "null model (transport)",
}


@dataclass(frozen=True)
class TaskResult:
    task: str
    studies: int  # distinct studies in the pool
    onnxruntime: Measurement
    pytorch: Measurement
    served: tuple[Measurement, ...]
    breakdown: tuple[Breakdown, ...] = ()  # per form and level, where statistics were read
    # the other forms' rows (`served` holds the client's default, packed gRPC)
    others: dict[str, tuple[Measurement, ...]] = field(default_factory=dict)
    probes: dict[str, Probe] = field(default_factory=dict)  # the null model, per transport

    def rows_of(self, form: str) -> tuple[Measurement, ...]:
        return self.others.get(form) or self.served

    def rows(self) -> list[Measurement]:
        """Every row of the round, in the order of the table."""
        others = (row for rows in self.others.values() for row in rows)
        return [self.onnxruntime, self.pytorch, *self.served, *others]

    def ratios(self) -> dict[str, Any]:
        """The side-by-side ratios and whether the serving targets are met."""
        local = self.onnxruntime
        best = max(self.served, key=lambda row: row.studies_per_second)
        first = min(self.served, key=lambda row: row.concurrency)
        throughput = best.studies_per_second / local.studies_per_second
        limit = LATENCY_FACTOR * local.percentile_ms(50) + LATENCY_SLACK_MS
        return {
            "best_concurrency": best.concurrency,
            "served_over_in_process_throughput": throughput,
            "throughput_target_met": throughput >= THROUGHPUT_TARGET,
            "latency_concurrency": first.concurrency,
            "served_p50_ms": first.percentile_ms(50),
            "in_process_p50_ms": local.percentile_ms(50),
            "served_over_in_process_p50": first.percentile_ms(50) / local.percentile_ms(50),
            "latency_limit_ms": limit,
            "latency_target_met": first.percentile_ms(50) <= limit,
            "pytorch_over_onnxruntime_time": local.studies_per_second
            / self.pytorch.studies_per_second,
            **self.peer_ratios(),
        }

    def peer_ratios(self) -> dict[str, Any]:
        """Throughput over PyTriton's at each level, for the ensemble and the fused pipeline
        (target: at least 1.0 at every level)."""
        peer = {row.concurrency: row for row in self.others.get("pytriton", ())}
        if not peer:
            return {}
        ratios: dict[str, Any] = {}
        for form in ("served", "fused"):
            rows = self.rows_of(form) if form == "served" or form in self.others else ()
            ratios[f"{form}_over_pytriton"] = {
                str(row.concurrency): row.studies_per_second
                / peer[row.concurrency].studies_per_second
                for row in rows
                if row.concurrency in peer
            }
        return ratios

    def summary(self) -> dict[str, Any]:
        return {
            "studies": self.studies,
            "onnxruntime": self.onnxruntime.summary(),
            "pytorch": self.pytorch.summary(),
            "served": [row.summary() for row in self.served],
            "ratios": self.ratios(),
            "breakdown": [part.summary() for part in self.breakdown],
            **{form: [row.summary() for row in rows] for form, rows in self.others.items()},
            "transport_probe": {form: probe.summary() for form, probe in self.probes.items()},
            "split": [split.summary() for split in splits(self)],
        }


@dataclass(frozen=True)
class SweepPoint:
    """Cost vs images per study: one study size, in process and served."""

    images: int
    onnxruntime: Measurement
    served: tuple[Measurement, ...]

    def rows(self) -> list[Measurement]:
        return [self.onnxruntime, *self.served]


@dataclass(frozen=True)
class TaskRounds:
    """One task measured in interleaved rounds (`rounds.py`): each ratio is taken within
    its round, then reported as the median of the rounds with their min-max."""

    task: str
    rounds: tuple[TaskResult, ...]

    @property
    def last(self) -> TaskResult:
        return self.rounds[-1]

    def grouped(self) -> dict[tuple[str, int], list[Measurement]]:
        """Each table row's measurements, one per round, in the table's order."""
        found: dict[tuple[str, int], list[Measurement]] = {}
        for result in self.rounds:
            for row in result.rows():
                found.setdefault((row.pipeline, row.concurrency), []).append(row)
        return found

    def ratios(self) -> dict[str, Any]:
        """The ratios of every round, combined; the targets judged on the medians."""
        combined = over_rounds([result.ratios() for result in self.rounds])
        throughput = median_of(combined, "served_over_in_process_throughput")
        combined["throughput_target_met"] = throughput >= THROUGHPUT_TARGET
        served_p50 = median_of(combined, "served_p50_ms")
        combined["latency_target_met"] = served_p50 <= median_of(combined, "latency_limit_ms")
        return combined

    def split(self) -> list[dict[str, Any]]:
        per_round = [[split.summary() for split in splits(result)] for result in self.rounds]
        return [over_rounds(list(forms)) for forms in zip(*per_round, strict=True)]

    def summary(self) -> dict[str, Any]:
        rounds = []
        for result in self.rounds:
            figures = result.summary()
            figures.pop("transport_probe")  # measured once per task, below
            rounds.append(figures)
        return {
            "studies": self.last.studies,
            "rounds": rounds,
            "ratios": self.ratios(),
            "transport_probe": {form: probe.summary() for form, probe in self.last.probes.items()},
            "split": self.split(),
        }


HEADER = (
    f"{'pipeline':<24} {'conc':>4} {'studies/s':>10} {'min-max':>13} {'images/s':>10} "
    + " ".join(f"{f'p{q} ms':>8}" for q in PERCENTILES)
)


def format_rounds(rows: Sequence[Measurement], prefix: str = "") -> str:
    """One table row from its rounds: the median rate and its min-max, then the
    percentiles of every round's latencies together."""
    rate = Spread.of([row.studies_per_second for row in rows])
    images = Spread.of([row.images_per_second for row in rows])
    first = rows[0]
    return (
        f"{prefix}{LABELS[first.pipeline]:<24} {first.concurrency:>4} "
        f"{rate.median:>10.2f} {f'{rate.low:.1f}-{rate.high:.1f}':>13} {images.median:>10.1f} "
        + " ".join(f"{pooled_percentile(rows, q):>8.1f}" for q in PERCENTILES)
    )


def pooled_percentile(rows: Sequence[Measurement], q: float) -> float:
    """The `q`th percentile of every round's latencies together."""
    return float(np.percentile(np.concatenate([row.latencies_ms for row in rows]), q))


def format_task(result: TaskRounds) -> str:
    local = result.last.onnxruntime
    ratios = result.ratios()
    count = len(result.rounds)
    lines = [
        f"{result.task}: {local.images_per_study:g} images/study, {result.last.studies} "
        f"distinct studies, {local.requests} timed requests per row and round, {count} "
        "interleaved rounds (studies/s: median and min-max of the rounds)",
        HEADER,
        *(format_rounds(rows) for rows in result.grouped().values()),
        f"served / in-process throughput: "
        f"{spread_of(ratios, 'served_over_in_process_throughput').text()} at "
        f"c={ratios['best_concurrency']} (median and min-max of {count} rounds; target >= "
        f"{THROUGHPUT_TARGET}: {_verdict(ratios['throughput_target_met'])})",
        f"served p50 at c={ratios['latency_concurrency']}: "
        f"{spread_of(ratios, 'served_p50_ms').text(1)} ms vs in-process "
        f"{spread_of(ratios, 'in_process_p50_ms').text(1)} ms (limit {LATENCY_FACTOR} x p50 + "
        f"{LATENCY_SLACK_MS:g} = {median_of(ratios, 'latency_limit_ms'):.1f} ms: "
        f"{_verdict(ratios['latency_target_met'])})",
        "pytorch / onnxruntime time per study: "
        f"{spread_of(ratios, 'pytorch_over_onnxruntime_time').text()}",
        *_peer_lines(ratios),
    ]
    return "\n".join(lines)


def _peer_lines(ratios: Mapping[str, Any]) -> list[str]:
    return [
        f"{key.removesuffix('_over_pytriton')} / PyTriton throughput by concurrency: "
        + ", ".join(f"c={level} {spread_of(by_level, level).text()}" for level in by_level)
        for key, by_level in ratios.items()
        if key.endswith("_over_pytriton") and by_level
    ]


def task_blocks(result: TaskRounds) -> list[str]:
    """What is printed for a task: its table and ratios; the last round's breakdown; the
    split's medians (the last two where they were measured)."""
    blocks = [format_task(result)]
    last, count = result.last, len(result.rounds)
    if last.breakdown:
        table = format_breakdown(
            result.task, list(last.breakdown), last.onnxruntime.cpu_ms_per_study
        )
        blocks.append(f"round {count} of {count}: {table}")
    if last.probes:
        blocks.append(format_split(result))
    return blocks


def format_sweep(task: str, points: Sequence[SweepPoint]) -> str:
    lines = [f"cost vs images per study: {task}", f"{'images':>6} {'reqs':>5} {HEADER}"]
    for point in points:
        lines.extend(
            format_rounds([row], f"{point.images:>6} {row.requests:>5} ") for row in point.rows()
        )
    return "\n".join(lines)


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "cpu_model": cpu_model(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def document(
    settings: Mapping[str, Any],
    tuning: Tuning,
    results: Sequence[TaskRounds],
    sweep: Sequence[SweepPoint],
    sweep_task: str,
) -> dict[str, Any]:
    """Everything measured, raw latencies included, with the machine and the tuning."""
    return {
        "command": "abdoserve bench serving",
        "machine": machine(),
        "settings": dict(settings),
        "tuning": asdict(tuning),
        "tasks": {result.task: result.summary() for result in results},
        "images_sweep": {
            "task": sweep_task,
            "points": [
                {
                    "images": point.images,
                    "onnxruntime": point.onnxruntime.summary(),
                    "served": [row.summary() for row in point.served],
                }
                for point in sweep
            ],
        }
        if sweep
        else None,
    }


def write_plot(path: Path, results: Sequence[TaskRounds], sweep: Sequence[SweepPoint]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    panels = 3 if sweep else 2
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.5), squeeze=False)
    throughput, tail = axes[0][0], axes[0][1]
    for index, result in enumerate(results):
        _plot_task(throughput, tail, result, f"C{index % 10}")
    throughput.set(title="throughput (dashed: in-process)", ylabel="studies/s")
    tail.set(title="p95 latency", ylabel="ms")
    _plain_log_y(tail)
    levels = sorted({row.concurrency for result in results for row in result.last.served})
    for axis in (throughput, tail):
        _log_axis(axis, levels, "concurrency")
        axis.legend(fontsize="small")
        axis.grid(True, alpha=0.3)
    if sweep:
        _plot_sweep(axes[0][2], sweep)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, format="png")
    plt.close(figure)


def _plot_task(throughput: Any, tail: Any, result: TaskRounds, colour: str) -> None:
    """The medians of the rounds; p95 over every round's latencies together."""
    grouped = result.grouped()
    served = [grouped[row.pipeline, row.concurrency] for row in result.last.served]
    levels = [rows[0].concurrency for rows in served]
    for axis, figure in ((throughput, _median_rate), (tail, partial(pooled_percentile, q=95))):
        values = [figure(rows) for rows in served]
        axis.plot(levels, values, marker="o", color=colour, label=result.task)
    throughput.axhline(_median_rate(grouped["onnxruntime", 1]), color=colour, linestyle="--")


def _median_rate(rows: Sequence[Measurement]) -> float:
    return float(np.median([row.studies_per_second for row in rows]))


def _plot_sweep(axis: Any, sweep: Sequence[SweepPoint]) -> None:
    images = [point.images for point in sweep]
    axis.plot(
        images,
        [1e3 / point.onnxruntime.studies_per_second for point in sweep],
        linestyle="--",
        color="k",
        label="in-process",
    )
    for index, row in enumerate(sweep[0].served):
        axis.plot(
            images,
            [1e3 / point.served[index].studies_per_second for point in sweep],
            marker="o",
            label=f"served c={row.concurrency}",
        )
    axis.set(title="cost vs images per study", ylabel="ms per study (1 / throughput)")
    _plain_log_y(axis)
    _log_axis(axis, images, "images per study")
    axis.legend(fontsize="small")
    axis.grid(True, alpha=0.3)


def _log_axis(axis: Any, ticks: Sequence[int], label: str) -> None:
    """Log x axis ticked at the measured values, written as plain numbers."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    axis.set_xscale("log", base=2)
    axis.set_xticks(list(ticks))
    axis.xaxis.set_major_formatter(ScalarFormatter())
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.set_xlabel(label)


def _plain_log_y(axis: Any) -> None:
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    axis.set_yscale("log")
    axis.yaxis.set_major_formatter(ScalarFormatter())
    axis.yaxis.set_minor_formatter(NullFormatter())
