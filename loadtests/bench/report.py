"""Results of `abdoserve bench serving`: the per-task tables, the targets, the JSON document."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from abdoserve.export.configs import Tuning
from abdoserve.loadtests.bench.breakdown import Breakdown
from abdoserve.loadtests.bench.split import Probe, splits
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


HEADER = f"{'pipeline':<24} {'conc':>4} {'studies/s':>10} {'images/s':>10} " + " ".join(
    f"{f'p{q} ms':>8}" for q in PERCENTILES
)


def format_row(row: Measurement, prefix: str = "") -> str:
    return (
        f"{prefix}{LABELS[row.pipeline]:<24} {row.concurrency:>4} "
        f"{row.studies_per_second:>10.2f} {row.images_per_second:>10.1f} "
        + " ".join(f"{row.percentile_ms(q):>8.1f}" for q in PERCENTILES)
    )


def format_task(result: TaskResult) -> str:
    local = result.onnxruntime
    ratios = result.ratios()
    lines = [
        f"{result.task}: {local.images_per_study:g} images/study, {result.studies} distinct "
        f"studies, {local.requests} timed requests per row",
        HEADER,
        *(format_row(row) for row in (result.onnxruntime, result.pytorch, *result.served)),
        *(format_row(row) for rows in result.others.values() for row in rows),
        f"served / in-process throughput: {ratios['served_over_in_process_throughput']:.2f} "
        f"at c={ratios['best_concurrency']} (target >= {THROUGHPUT_TARGET}: "
        f"{_verdict(ratios['throughput_target_met'])})",
        f"served p50 at c={ratios['latency_concurrency']}: {ratios['served_p50_ms']:.1f} ms vs "
        f"in-process {ratios['in_process_p50_ms']:.1f} ms (limit {LATENCY_FACTOR} x "
        f"{ratios['in_process_p50_ms']:.1f} + {LATENCY_SLACK_MS:g} = "
        f"{ratios['latency_limit_ms']:.1f} ms: {_verdict(ratios['latency_target_met'])})",
        f"pytorch / onnxruntime time per study: {ratios['pytorch_over_onnxruntime_time']:.2f}",
        *(
            f"{form} / PyTriton throughput by concurrency: "
            + ", ".join(f"c={level} {value:.2f}" for level, value in by_level.items())
            for form, by_level in (
                (k.removesuffix("_over_pytriton"), v)
                for k, v in ratios.items()
                if k.endswith("_over_pytriton")
            )
            if by_level
        ),
    ]
    return "\n".join(lines)


def format_sweep(task: str, points: Sequence[SweepPoint]) -> str:
    lines = [f"cost vs images per study: {task}", f"{'images':>6} {'reqs':>5} {HEADER}"]
    for point in points:
        lines.extend(
            format_row(row, f"{point.images:>6} {row.requests:>5} ") for row in point.rows()
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
    results: Sequence[TaskResult],
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
