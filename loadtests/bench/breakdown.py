"""Where a served study's milliseconds go, for `abdoserve bench serving`.

Per study, at each served concurrency level:

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
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

COMPOSING = ("preprocess", "net", "postprocess")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


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
    form: str = "served"  # how the studies were sent (abdoserve.loadtests.bench.transports)
    # per Python stage: ms inside its execute per call (compute less this: the backend's)
    execute_ms: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def stage_models(task: str, model: str | None = None) -> dict[str, str]:
    """The models a served study passes through, by stage: the ensemble's three composing
    models, or the fused pipeline model `model` as its one stage."""
    if model is not None and model != task:
        return {"pipeline": model}
    return {stage: f"{task}_{stage}" for stage in COMPOSING}


def read_counters(
    url: str, task: str, headers: dict[str, str], model: str | None = None
) -> dict[str, ModelCounters]:
    import tritonclient.grpc as grpcclient

    found = {}
    names = [model or task, *stage_models(task, model).values()]
    with grpcclient.InferenceServerClient(url) as client:
        for name in dict.fromkeys(names):
            stats = client.get_inference_statistics(name, headers=headers).model_stats
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


def snapshot(
    url: str,
    task: str,
    headers: dict[str, str],
    server_pid: int | None,
    model: str | None = None,
    *,
    metrics_url: str | None = None,
) -> Snapshot:
    """Counters of the public model (`model`: the fused one, else the ensemble `task`) and
    of its stages, the server's CPU so far, and (with `metrics_url`) the time inside each
    Python model's execute."""
    cpu = None if server_pid is None else server_cpu_seconds(server_pid)
    executed = {} if metrics_url is None else read_executed(metrics_url)
    return Snapshot(read_counters(url, task, headers, model), cpu, executed)


def read_executed(metrics_url: str) -> dict[str, tuple[float, float]]:
    """(calls, seconds) inside execute per model: abdoserve_execute_duration_seconds."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=30) as reply:
        text = reply.read().decode()
    found: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "abdoserve_execute_duration_seconds":
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
    task: str,
    before: Snapshot,
    after: Snapshot,
    *,
    concurrency: int,
    round_trip_ms: float,
    encode_ms: float,
    client_cpu_s: float,
    form: str = "served",
    model: str | None = None,
) -> Breakdown:
    delta = {name: after.models[name].minus(before.models[name]) for name in after.models}
    ensemble = delta[model or task]
    server_ms = ensemble.per_request_ms(ensemble.request_ns)
    studies = max(ensemble.requests, 1)
    server_cpu = None
    if before.server_cpu_s is not None and after.server_cpu_s is not None:
        server_cpu = 1e3 * (after.server_cpu_s - before.server_cpu_s) / studies
    stages = {stage: delta[name] for stage, name in stage_models(task, model).items()}
    return Breakdown(
        concurrency=concurrency,
        round_trip_ms=round_trip_ms,
        encode_ms=encode_ms,
        server_ms=server_ms,
        transfer_ms=round_trip_ms - server_ms,
        queue_ms={
            stage: counters.per_request_ms(counters.queue_ns) for stage, counters in stages.items()
        },
        compute_ms={
            stage: counters.per_request_ms(counters.compute_ns)
            for stage, counters in stages.items()
        },
        server_cpu_ms=server_cpu,
        client_cpu_ms=1e3 * client_cpu_s / studies,
        form=form,
        execute_ms={
            stage: value
            for stage, name in stage_models(task, model).items()
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
