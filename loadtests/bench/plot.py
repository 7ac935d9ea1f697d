"""The PNG of `abdoserve bench serving`: served throughput and p95 vs concurrency per task,
with the in-process throughput dashed, and the cost-vs-images curve when swept."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from abdoserve.loadtests.bench.report import SweepPoint, TaskRounds
from abdoserve.loadtests.bench.workload import Measurement


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
    for axis, figure in ((throughput, _median_rate), (tail, _pooled_p95)):
        values = [figure(rows) for rows in served]
        axis.plot(levels, values, marker="o", color=colour, label=result.task)
    throughput.axhline(_median_rate(grouped["onnxruntime", 1]), color=colour, linestyle="--")


def _median_rate(rows: Sequence[Measurement]) -> float:
    return float(np.median([row.studies_per_second for row in rows]))


def _pooled_p95(rows: Sequence[Measurement]) -> float:
    return float(np.percentile(np.concatenate([row.latencies_ms for row in rows]), 95))


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
