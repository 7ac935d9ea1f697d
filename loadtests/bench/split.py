"""A served study's cost in three parts: work, transport, everything else.

- work: the same study in process (our preprocessing, the network, the answer);
- transport: the null model (`transport_probe`) on the same bytes in the same form;
- everything else: what remains of the served figure (Python-backend hops, copies
  between models, queueing, the ensemble).

One at a time (c=1) the parts are times, per study. At saturation the cores are the
limit, so the parts are CPU per study: the server's (tritonserver and every stub, from
/proc) against the in-process CPU plus the probe's server CPU. The targets: everything
else at most 10 % of the work, the server CPU at most 1.10 x (work + transport), and,
through shared memory, served throughput at least 0.95 x in process.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from abdoserve.loadtests.bench.workload import Measurement

if TYPE_CHECKING:
    from abdoserve.loadtests.bench.report import TaskResult, TaskRounds

ELSE_TARGET = 0.10  # everything else / work
CPU_TARGET = 1.10  # server CPU / (work + transport)
SHARED_MEMORY_THROUGHPUT_TARGET = 0.95


@dataclass(frozen=True)
class Probe:
    """The null model at c=1 in one form: its latencies and the server CPU per study."""

    form: str
    row: Measurement
    server_cpu_ms: float | None

    @property
    def mean_ms(self) -> float:
        return mean(self.row.latencies_ms)

    def summary(self) -> dict[str, Any]:
        return {"form": self.form, "server_cpu_ms": self.server_cpu_ms, **self.row.summary()}


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


@dataclass(frozen=True)
class Split:
    """One form's three parts, at c=1 (ms) and at its saturating level (CPU ms)."""

    form: str
    served_ms: float
    work_ms: float
    transport_ms: float
    saturation_concurrency: int
    throughput_ratio: float  # best served studies/s over in-process studies/s
    server_cpu_ms: float | None
    work_cpu_ms: float
    transport_cpu_ms: float | None

    @property
    def else_ms(self) -> float:
        return self.served_ms - self.work_ms - self.transport_ms

    @property
    def else_fraction(self) -> float:
        return self.else_ms / self.work_ms

    @property
    def cpu_ratio(self) -> float | None:
        if self.server_cpu_ms is None or self.transport_cpu_ms is None:
            return None
        return self.server_cpu_ms / (self.work_cpu_ms + self.transport_cpu_ms)

    @property
    def else_cpu_fraction(self) -> float | None:
        if self.server_cpu_ms is None or self.transport_cpu_ms is None:
            return None
        return (self.server_cpu_ms - self.work_cpu_ms - self.transport_cpu_ms) / self.work_cpu_ms

    def summary(self) -> dict[str, Any]:
        cpu_ratio, else_cpu = self.cpu_ratio, self.else_cpu_fraction
        return {
            "form": self.form,
            "c1": {
                "served_ms": self.served_ms,
                "work_ms": self.work_ms,
                "transport_ms": self.transport_ms,
                "else_ms": self.else_ms,
                "else_over_work": self.else_fraction,
                "else_target_met": self.else_fraction <= ELSE_TARGET,
            },
            "saturation": {
                "concurrency": self.saturation_concurrency,
                "served_over_in_process_throughput": self.throughput_ratio,
                "server_cpu_ms": self.server_cpu_ms,
                "work_cpu_ms": self.work_cpu_ms,
                "transport_cpu_ms": self.transport_cpu_ms,
                "server_cpu_over_work_and_transport": cpu_ratio,
                "cpu_target_met": None if cpu_ratio is None else cpu_ratio <= CPU_TARGET,
                "else_cpu_over_work": else_cpu,
                "else_cpu_target_met": None if else_cpu is None else else_cpu <= ELSE_TARGET,
            },
        }


def splits(result: TaskResult) -> list[Split]:
    """Every measured form whose transport has a probe, in the order of `FORMS`."""
    from abdoserve.loadtests.bench.transports import FORMS, GRPC_PACKED, PYTRITON, transport_of

    measured = [GRPC_PACKED, *result.others]
    found = []
    for form in (form for form in FORMS if form in measured and form != PYTRITON):
        probe = result.probes.get(transport_of(form))
        if probe is None:
            continue
        rows = result.rows_of(form)
        first = min(rows, key=lambda row: row.concurrency)
        best = max(rows, key=lambda row: row.studies_per_second)
        part = next(
            (p for p in result.breakdown if p.form == form and p.concurrency == best.concurrency),
            None,
        )
        local = result.onnxruntime
        found.append(
            Split(
                form=form,
                served_ms=mean(first.latencies_ms),
                work_ms=mean(local.latencies_ms),
                transport_ms=probe.mean_ms,
                saturation_concurrency=best.concurrency,
                throughput_ratio=best.studies_per_second / local.studies_per_second,
                server_cpu_ms=None if part is None else part.server_cpu_ms,
                work_cpu_ms=1e3 * local.cpu_seconds / local.requests,
                transport_cpu_ms=probe.server_cpu_ms,
            )
        )
    return found


def median_split(rounds: Sequence[Split]) -> Split:
    """One form's split with each figure the median of the rounds (None where a round
    could not read it); the saturating level is the last round's."""
    medians: dict[str, Any] = {}
    for item in fields(Split):
        values = [getattr(split, item.name) for split in rounds]
        if item.name in ("form", "saturation_concurrency"):
            continue
        known = [value for value in values if value is not None]
        medians[item.name] = statistics.median(known) if len(known) == len(values) else None
    return replace(rounds[-1], **medians)


def format_split(result: TaskRounds) -> str:
    per_round = [splits(one) for one in result.rounds]
    lines = [
        f"{result.task}: work, transport and everything else (c=1: ms per study; "
        f"saturation: CPU ms per study; medians of {len(per_round)} rounds)",
        "form            served   work  transport  else (else/work) | sat.conc  "
        "throughput  server-CPU  work+transport  ratio  else-CPU/work",
    ]
    for split in (median_split(forms) for forms in zip(*per_round, strict=True)):
        ratio, else_cpu = split.cpu_ratio, split.else_cpu_fraction
        server_cpu = "-" if split.server_cpu_ms is None else f"{split.server_cpu_ms:.1f}"
        transport_cpu = split.transport_cpu_ms
        both = "-" if transport_cpu is None else f"{split.work_cpu_ms + transport_cpu:.1f}"
        lines.append(
            f"{split.form:<14} {split.served_ms:7.1f} {split.work_ms:6.1f} "
            f"{split.transport_ms:10.1f} {split.else_ms:5.1f} ({split.else_fraction:6.1%}) | "
            f"{split.saturation_concurrency:>8}  {split.throughput_ratio:10.2f}  "
            f"{server_cpu:>10}  {both:>14}  "
            f"{'-' if ratio is None else f'{ratio:.2f}':>5}  "
            f"{'-' if else_cpu is None else f'{else_cpu:.1%}':>13}"
        )
    lines.append(
        f"targets: else <= {ELSE_TARGET:.0%} of work; server CPU <= {CPU_TARGET} x "
        f"(work + transport); shared_memory throughput >= {SHARED_MEMORY_THROUGHPUT_TARGET}"
    )
    return "\n".join(lines)
