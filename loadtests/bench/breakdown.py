"""Where a served study's cost goes, for `abdoserve bench serving`.

The breakdown, per study, at each served concurrency level and form:

- the client's encode time (the request built once per study, as the bench sends it);
- the round trip the client measured, and of it what the server accounts for: the
  ensemble's request time from Triton's statistics API; the rest is gRPC transfer and
  the frontend (`transfer_ms`);
- queue and compute time per composing model (deltas of the statistics API, divided by
  that model's own request count: warm-up requests count on both sides);
- the CPU the server spent per study (tritonserver and every stub, from /proc), next to
  the client's own CPU per study, so a co-located load generator's cost is not taken
  for the server's; the in-process CPU per study sits beside them in the report.

The statistics API is an admin API (docs/security.md): the key is needed.

The split, per form, in three parts:

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

import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abdoserve.loadtests.bench.transports import FORMS, GRPC_PACKED, PYTRITON, transport_of
from abdoserve.loadtests.bench.workload import Measurement

if TYPE_CHECKING:
    from abdoserve.loadtests.bench.report import TaskResult, TaskRounds
    from abdoserve.loadtests.bench.served_target import Target

COMPOSING = ("preprocess", "net", "postprocess")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
EXECUTE_METRIC = "abdoserve_execute_duration_seconds"
ELSE_TARGET = 0.10  # everything else / work
CPU_TARGET = 1.10  # server CPU / (work + transport)
SHARED_MEMORY_THROUGHPUT_TARGET = 0.95


@dataclass(frozen=True)
class ModelCounters:
    """Cumulative counters of one model: requests, and nanoseconds by phase."""

    requests: int
    request_ns: int
    queue_ns: int
    compute_ns: int

    def minus(self, earlier: ModelCounters) -> ModelCounters:
        return ModelCounters(
            self.requests - earlier.requests,
            self.request_ns - earlier.request_ns,
            self.queue_ns - earlier.queue_ns,
            self.compute_ns - earlier.compute_ns,
        )

    def per_request_ms(self, nanoseconds: int) -> float:
        return nanoseconds / 1e6 / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Snapshot:
    models: dict[str, ModelCounters]
    server_cpu_s: float | None
    # per model: (calls, seconds) inside its Python execute, from /metrics where read
    executed: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Breakdown:
    concurrency: int
    round_trip_ms: float
    encode_ms: float
    server_ms: float  # the ensemble's own request time
    transfer_ms: float  # round trip less the server's time: gRPC and the frontend
    queue_ms: dict[str, float]  # per composing model
    compute_ms: dict[str, float]
    server_cpu_ms: float | None  # None: the server's process is not local
    client_cpu_ms: float
    form: str  # how the studies were sent (`transports.FORMS`)
    # per Python stage: ms inside its execute per call (compute less this: the backend's)
    execute_ms: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def stage_models(task: str, model: str) -> dict[str, str]:
    """The models a served study to `model` passes through, by stage: the ensemble's
    (`model` is the task) three composing models, or the fused pipeline as its one stage."""
    if model != task:
        return {"pipeline": model}
    return {stage: f"{task}_{stage}" for stage in COMPOSING}


def served_stages(task: str, model: str, counted: Mapping[str, object]) -> dict[str, str]:
    """`stage_models` as the server has them: a task served fused (`serve`'s default)
    has no composing models, and is its one stage."""
    stages = stage_models(task, model)
    if all(name in counted for name in stages.values()):
        return stages
    return {"pipeline": model}


def read_counters(
    url: str, task: str, headers: dict[str, str], model: str
) -> dict[str, ModelCounters]:
    """The statistics API's counters of `model` and of its stages."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    found = {}
    names = [model, *stage_models(task, model).values()]
    with grpcclient.InferenceServerClient(url) as client:
        for name in dict.fromkeys(names):
            try:
                stats = client.get_inference_statistics(name, headers=headers).model_stats
            except InferenceServerException:
                if name == model:
                    raise
                continue  # a fused task: no composing model of this name

            inference = stats[0].inference_stats
            compute = (
                inference.compute_input.ns + inference.compute_infer.ns
            ) + inference.compute_output.ns
            found[name] = ModelCounters(
                inference.success.count, inference.success.ns, inference.queue.ns, compute
            )
    return found


def server_cpu_seconds(server_pid: int) -> float:
    """User + system CPU of `server_pid` and its children (the stubs), from /proc."""
    from abdoserve.deploy import stubs

    total = _cpu_ticks(server_pid)
    for pid in stubs.stubs_of(server_pid):
        total += _cpu_ticks(pid)
    return total / CLOCK_TICKS


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)


def snapshot(target: Target, task: str, model: str) -> Snapshot | None:
    """Counters of the public model (`model`: the fused one, or the ensemble `task`) and
    of its stages, the server's CPU so far (where local) and the time inside each Python
    model's execute (where /metrics is known); None without the admin key."""
    if target.admin_headers is None:
        return None
    pid, metrics_url = target.server_pid, target.metrics_url
    cpu = None if pid is None else server_cpu_seconds(pid)
    executed = {} if metrics_url is None else read_executed(metrics_url)
    counters = read_counters(target.url, task, target.admin_headers, model)
    return Snapshot(counters, cpu, executed)


def read_executed(metrics_url: str) -> dict[str, tuple[float, float]]:
    """(calls, seconds) inside execute per model: abdoserve_execute_duration_seconds."""
    import urllib.request

    with urllib.request.urlopen(metrics_url, timeout=30) as reply:
        return parse_executed(reply.read().decode())


def parse_executed(text: str) -> dict[str, tuple[float, float]]:
    """(calls, seconds) per model from the `EXECUTE_METRIC` histogram in /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != EXECUTE_METRIC:
            continue
        for sample in family.samples:
            slot = {"_count": 0, "_sum": 1}.get(sample.name.removeprefix(family.name))
            if slot is not None:
                found.setdefault(sample.labels["model"], [0.0, 0.0])[slot] = sample.value
    return {model: (calls, seconds) for model, (calls, seconds) in found.items()}


def execute_ms(before: Snapshot, after: Snapshot, model: str) -> float | None:
    """Mean ms inside `model`'s execute per call between two snapshots."""
    if model not in after.executed:
        return None
    calls, seconds = after.executed[model]
    earlier_calls, earlier_seconds = before.executed.get(model, (0.0, 0.0))
    if calls <= earlier_calls:
        return None
    return 1e3 * (seconds - earlier_seconds) / (calls - earlier_calls)


def breakdown(
    task: str, model: str, before: Snapshot, after: Snapshot, *, row: Measurement, encode_ms: float
) -> Breakdown:
    """One level's breakdown: `row` is the client's timing of the level (its form and
    concurrency), `before` and `after` the server read around it."""
    delta = {name: after.models[name].minus(before.models[name]) for name in after.models}
    ensemble = delta[model]
    server_ms = ensemble.per_request_ms(ensemble.request_ns)
    studies = max(ensemble.requests, 1)
    server_cpu = None
    if before.server_cpu_s is not None and after.server_cpu_s is not None:
        server_cpu = 1e3 * (after.server_cpu_s - before.server_cpu_s) / studies
    stage_names = served_stages(task, model, delta)
    stages = {stage: delta[name] for stage, name in stage_names.items()}
    queue_ms = {
        stage: counters.per_request_ms(counters.queue_ns) for stage, counters in stages.items()
    }
    compute_ms = {
        stage: counters.per_request_ms(counters.compute_ns) for stage, counters in stages.items()
    }
    if "net" in compute_ms and "postprocess" in compute_ms:
        # The postprocess calls the net (BLS) inside its own compute: shown apart.
        nested = queue_ms["net"] + compute_ms["net"]
        compute_ms["postprocess"] = max(compute_ms["postprocess"] - nested, 0.0)
    return Breakdown(
        concurrency=row.concurrency,
        round_trip_ms=row.mean_ms,
        encode_ms=encode_ms,
        server_ms=server_ms,
        transfer_ms=row.mean_ms - server_ms,
        queue_ms=queue_ms,
        compute_ms=compute_ms,
        server_cpu_ms=server_cpu,
        client_cpu_ms=1e3 * row.cpu_seconds / studies,
        form=row.pipeline,
        execute_ms={
            stage: value
            for stage, name in stage_names.items()
            if (value := execute_ms(before, after, name)) is not None
        },
    )


def format_breakdown(task: str, rows: list[Breakdown], in_process_cpu_ms: float) -> str:
    """One line per level: where a study's time went, and the CPU each side spent."""
    header = (
        "form           conc  round-trip  encode  transfer  server |"
        "  pre q/c      net q/c      post q/c   | server-CPU  client-CPU  in-process-CPU (ms)"
    )
    title = f"{task}: where a study's time goes (ms per study; fused: its one model in 'pre')"
    lines = [title, header]
    for row in rows:
        # A fused row has one stage, the whole pipeline: shown in the first column.
        shown = list(row.compute_ms) if "pipeline" in row.compute_ms else list(COMPOSING)
        cells = [f"{row.queue_ms[stage]:5.1f}/{row.compute_ms[stage]:5.1f}" for stage in shown]
        stages = "  ".join(cells + [f"{'-':>11}"] * (len(COMPOSING) - len(cells)))
        server_cpu = "-" if row.server_cpu_ms is None else f"{row.server_cpu_ms:.1f}"
        inside = ", ".join(f"{stage} {ms:.1f}" for stage, ms in row.execute_ms.items())
        lines.append(
            f"{row.form:<14} {row.concurrency:>4}  {row.round_trip_ms:10.1f}  "
            f"{row.encode_ms:6.1f}  {row.transfer_ms:8.1f}  {row.server_ms:6.1f} |  {stages} | "
            f"{server_cpu:>10}  "
            f"{row.client_cpu_ms:10.1f}  {in_process_cpu_ms:14.1f}"
            + (f" | in execute: {inside}" if inside else "")
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Probe:
    """The null model at c=1 in one form: its latencies and the server CPU per study."""

    form: str
    row: Measurement
    server_cpu_ms: float | None

    def summary(self) -> dict[str, Any]:
        return {"form": self.form, "server_cpu_ms": self.server_cpu_ms, **self.row.summary()}


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
                served_ms=first.mean_ms,
                work_ms=local.mean_ms,
                transport_ms=probe.row.mean_ms,
                saturation_concurrency=best.concurrency,
                throughput_ratio=best.studies_per_second / local.studies_per_second,
                server_cpu_ms=None if part is None else part.server_cpu_ms,
                work_cpu_ms=local.cpu_ms_per_study,
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
