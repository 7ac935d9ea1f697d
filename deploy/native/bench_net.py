"""Issue 22: `<task>_net` on Triton's C++ ONNX Runtime backend vs the Python-backend net.

One embedded server serves, per task, the Python `<task>_net` (ONNX Runtime in a Python
stub, `abdoserve build-repository`) beside `<task>_native_net`: the `_net` that
`--net-runtime onnxruntime` builds (the study-batched graph of the same weights),
re-pointed at CPU instances of the backend that deploy/native/build_onnxruntime_backend.sh
installs, twice: `<task>_native_net` with the Python net's instances and intra-op threads,
`<task>_native1_net` with one intra-op thread. Each task's held-out phantom
studies, prepared as the served preprocess does, go straight to the nets over gRPC:
first once each to compare the outputs, then in interleaved rounds (python, native,
native1, python, ...) at each concurrency, so every side sees the same load.
Reported: studies/s, p50, and the server's CPU per study (tritonserver and its stubs,
from /proc), each native/python ratio as the median of the rounds with its min-max.

    .venv/bin/python deploy/native/bench_net.py --rounds 3 --requests 100 --concurrency 1,4,16

An experiment, not part of the package (docs/benchmarks.md has its conclusion).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from abdoserve.deploy.embedded import EmbeddedServer, ServerOptions, free_ports
from abdoserve.export.calibration import StudyTensors, phantom_tensors
from abdoserve.loadtests.bench.rounds import Spread, interleaved
from abdoserve.loadtests.bench.workload import Study, time_concurrent
from abdoserve.preprocessing.tasks import TASKS, get_task

WORK = Path("build/native")
# The backend's intra-op pool spins while it waits (r24.10 exposes no setting to stop
# it, unlike the Python net's session); with one thread there is no pool to spin.
SIDES = ("python", "native", "native1")
SEEDS = (2000, 2001, 2002, 2003)  # held-out phantom studies, as `bench runtimes` uses


def model_name(task: str, side: str) -> str:
    return f"{task}_net" if side == "python" else f"{task}_{side}_net"


def compose(python_repo: Path, native_repo: Path, out: Path, tasks: Sequence[str]) -> None:
    """Only the nets: the Python one as built, the backend's one beside it on CPU."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for task in tasks:
        shutil.copytree(python_repo / f"{task}_net", out / f"{task}_net")
        python = read_config(out / f"{task}_net" / "config.pbtxt")
        threads = python.parameters["intra_op_threads"].string_value
        for side, side_threads in (("native", threads), ("native1", "1")):
            folder = out / model_name(task, side)
            shutil.copytree(native_repo / f"{task}_net", folder)
            config = cpu_config(read_config(folder / "config.pbtxt"), python, side_threads)
            config.name = model_name(task, side)
            (folder / "config.pbtxt").write_text(text_format.MessageToString(config))


def read_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def cpu_config(native: mc.ModelConfig, python: mc.ModelConfig, threads: str) -> mc.ModelConfig:
    """The GPU server's ONNX Runtime `_net` on as many CPU instances as the Python net."""
    del native.instance_group[:]
    native.instance_group.add(
        kind=mc.ModelInstanceGroup.Kind.KIND_CPU, count=python.instance_group[0].count
    )
    native.parameters["intra_op_thread_count"].string_value = threads
    return native


def make_inputs(tensors: StudyTensors, with_features: bool) -> list[grpcclient.InferInput]:
    arrays = {"SAMPLES": tensors.samples[None, ...]}
    if with_features:
        arrays["FEATURES"] = tensors.features[None, ...]
    inputs = []
    for name, array in arrays.items():
        item = grpcclient.InferInput(name, list(array.shape), "FP32")
        item.set_data_from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        inputs.append(item)
    return inputs


def caller(
    url: str, model: str, studies: Sequence[StudyTensors], with_features: bool
) -> Callable[[], Callable[[int], np.ndarray]]:
    """A factory of per-thread callers: each its own channel, request n -> study n % len."""
    payloads = [make_inputs(study, with_features) for study in studies]

    def make_call() -> Callable[[int], np.ndarray]:
        client = grpcclient.InferenceServerClient(url)

        def call(number: int) -> np.ndarray:
            result = client.infer(model, payloads[number % len(payloads)])
            output: np.ndarray = result.as_numpy("OUTPUT")
            return output

        return call

    return make_call


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU of a process and all its live descendants (the server's stubs)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        tree.update(children)
        frontier.extend(children)
    return sum(times.get(pid, 0.0) for pid in tree)


def parity(url: str, task: str, studies: Sequence[StudyTensors], side: str) -> float:
    """The largest |side - python| over the studies' outputs."""
    with_features = get_task(task).feature_width > 0
    python = caller(url, model_name(task, "python"), studies, with_features)()
    native = caller(url, model_name(task, side), studies, with_features)()
    return max(float(np.max(np.abs(python(n) - native(n)))) for n in range(len(studies)))


def measure_task(
    url: str, pid: int, task: str, studies: Sequence[StudyTensors], plan: argparse.Namespace
) -> list[dict[str, Any]]:
    """Per concurrency: both sides' figures per round and the native/python ratios."""
    with_features = get_task(task).feature_width > 0
    pool = [Study(tuple(b"" for _ in s.samples), {}) for s in studies]  # images per study
    rows = []
    for concurrency in plan.concurrency:
        rounds: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
        for _, side in interleaved(plan.rounds, SIDES):
            make_call = caller(url, model_name(task, side), studies, with_features)
            cpu = tree_cpu_seconds(pid)
            row = time_concurrent(make_call, pool, plan.requests, concurrency, warmup=3)
            cpu = tree_cpu_seconds(pid) - cpu
            rounds[side].append(
                {
                    "studies_per_s": row.studies_per_second,
                    "p50_ms": row.percentile_ms(50),
                    "server_cpu_ms_per_study": 1e3 * cpu / row.requests,
                }
            )
        rows.append(summarize(task, concurrency, rounds))
        print(line(rows[-1]), flush=True)
    return rows


def summarize(
    task: str, concurrency: int, rounds: dict[str, list[dict[str, float]]]
) -> dict[str, Any]:
    figures: dict[str, Any] = {"task": task, "concurrency": concurrency, "rounds": rounds}
    for key in ("studies_per_s", "p50_ms", "server_cpu_ms_per_study"):
        for side in SIDES:
            figures[f"{side}_{key}"] = Spread.of([r[key] for r in rounds[side]]).median
        for side in SIDES[1:]:
            pairs = zip(rounds["python"], rounds[side], strict=True)
            figures[f"{side}_ratio_{key}"] = Spread.of([n[key] / p[key] for p, n in pairs])
    return figures


def line(row: dict[str, Any]) -> str:
    """One printed row: python's figures, then each native side's with its ratio."""
    parts = [f"{row['task']:<22} c={row['concurrency']:<3}"]
    for key, unit in (("studies_per_s", "studies/s"), ("p50_ms", "p50 ms")):
        figures = [f"python {row[f'python_{key}']:6.1f}"]
        for side in SIDES[1:]:
            ratio = row[f"{side}_ratio_{key}"].text()
            figures.append(f"{side} {row[f'{side}_{key}']:6.1f} (x{ratio})")
        parts.append(f"{unit}: " + ", ".join(figures))
    key = "server_cpu_ms_per_study"
    cpu = [f"{side} {row[f'{side}_{key}']:5.1f}" for side in SIDES]
    parts.append("server CPU ms/study: " + ", ".join(cpu))
    return "  ".join(parts)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-repository", type=Path, default=WORK / "repository-python")
    parser.add_argument("--native-repository", type=Path, default=WORK / "repository-ort")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument(
        "--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 4, 16]
    )
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=WORK / "bench_net.json")
    return parser.parse_args()


def main() -> None:
    plan = arguments()
    repository = WORK / "bench-repository"
    compose(plan.python_repository, plan.native_repository, repository, plan.tasks)
    studies = {task: phantom_tensors(get_task(task), SEEDS) for task in plan.tasks}
    options = ServerOptions(
        repository=repository.resolve(),
        ports=free_ports(),
        log_file=(WORK / "bench_triton.log").resolve(),
    )
    with EmbeddedServer(options) as server:
        assert server.process is not None
        url = f"127.0.0.1:{options.ports.grpc}"
        differences = {
            f"{task} {side}": parity(url, task, studies[task], side)
            for task in plan.tasks
            for side in SIDES[1:]
        }
        for name, difference in differences.items():
            print(f"{name:<30} max |native - python| = {difference:.2e}", flush=True)
        rows = [
            row
            for task in plan.tasks
            for row in measure_task(url, server.process.pid, task, studies[task], plan)
        ]
    report = {"parity": differences, "rows": rows, "plan": {**vars(plan)}}
    plan.json.write_text(json.dumps(report, indent=2, default=as_json) + "\n")


def as_json(value: object) -> object:
    return value.summary() if isinstance(value, Spread) else str(value)


if __name__ == "__main__":
    main()
