"""The prepared GPU check: one script, a hard time budget, a table and a JSON file.

On a machine with an NVIDIA GPU where abdoserve is installed (with a CUDA build of
PyTorch):

    abdoserve bench gpu --out gpu_check.json [--url HOST:8001]

What it measures (docs/gpu.md):

1. pytorch: each task's reference network, with the export path's constructor and
   seeded untrained weights, in FP32 eager, FP16 autocast and FP16 autocast replayed
   from a CUDA graph, at batch 1, 8 and 32: samples/s and p50 latency per call.
2. fp16 check: FP16 outputs against FP32 on the same inputs, after the output
   activation the served graph applies: max |FP16 - FP32| <= 1e-2 or FAIL.
3. preprocess: phantom studies through `StudyPreparer` in a process pool, one
   worker vs os.cpu_count() workers: studies/s and images/s.
4. tensorrt: the GPU `_net` of one task as the repository build makes it: the
   study-batched ONNX graph (export/gpu_net.py, parity with PyTorch checked) and its
   `build_engine.sh` (trtexec --fp16), the plan then timed through TensorRT's runtime.
5. served: phantom studies over gRPC to a running server (`--url`).

TensorRT and trtexec are used where they are found; rows that cannot run say
"skipped: <reason>". `--budget-s` (default 420) bounds the run:
each section checks the time left and writes "skipped: time budget" rows for what
it cannot fit, and a watchdog writes the table and JSON and exits (status 3) if a
step overruns the budget by more than a grace period. `--dry` runs the same code on
the CPU with tiny sizes, so CI can run the script end to end; its numbers are not
GPU figures. Exit status: 0 done, 1 a check failed or a step raised, 2 no CUDA
without `--dry`, 3 the watchdog stopped the run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn

    from abdoserve.preprocessing.specs import TaskSpec


def imported_from() -> str:
    """The installed package this check runs (its folder)."""
    from abdoserve.export import architectures

    return f"installed package, {Path(architectures.__file__).parent.parent}"


def load_specs(names: Sequence[str] | None) -> dict[str, TaskSpec]:
    from abdoserve.preprocessing.tasks import TASKS

    unknown = [name for name in names or () if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    return {name: TASKS[name] for name in names or TASKS}


# --- Plan, budget, rows -------------------------------------------------------------

FP16_TOLERANCE = 1e-2  # max |FP16 - FP32| on post-activation outputs
DEFAULT_BUDGET_S = 420.0
WATCHDOG_GRACE_S = 40.0
DEFAULT_TRT_TASK = "liver_fibrosis_ct"  # two inputs (samples and features)
SECTIONS = ("pytorch", "fp16 check", "preprocess", "tensorrt", "served")
MODES = ("fp32 eager", "fp16 autocast", "fp16 cuda graph")


@dataclass(frozen=True)
class Plan:
    dry: bool
    device: str  # "cuda" or "cpu" (dry run)
    batches: tuple[int, ...]
    warmup: int  # calls before timing
    iterations: int  # timed latency calls at most
    seconds: float  # time cap of each timing loop
    check_batch: int
    item_s: float  # what one timed row may cost, for the budget
    url: str | None
    trt_task: str
    rounds: int  # passes over the phantom mix per preprocessing worker
    served_seconds: float


def make_plan(args: argparse.Namespace) -> Plan:
    if args.dry:
        return Plan(
            dry=True,
            device="cpu",
            batches=tuple(dict.fromkeys(min(b, 2) for b in args.batch_sizes)),
            warmup=1,
            iterations=2,
            seconds=0.2,
            check_batch=2,
            item_s=1.0,
            url=args.url,
            trt_task=args.trt_task,
            rounds=1,
            served_seconds=2.0,
        )
    return Plan(
        dry=False,
        device="cuda",
        batches=tuple(args.batch_sizes),
        warmup=10,
        iterations=100,
        seconds=1.0,
        check_batch=8,
        item_s=4.0,
        url=args.url,
        trt_task=args.trt_task,
        rounds=8,
        served_seconds=5.0,
    )


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


@dataclass
class Row:
    section: str
    task: str
    mode: str
    batch: int | None = None
    rate: float | None = None
    unit: str = ""
    p50_ms: float | None = None
    result: str = "ok"  # "ok", "PASS ...", "FAIL ...", "error: ...", "skipped: <reason>"
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.result.startswith(("FAIL", "error"))


def skipped(section: str, task: str, mode: str, reason: str, batch: int | None = None) -> Row:
    return Row(section, task, mode, batch, result=f"skipped: {reason}")


TIME_BUDGET = "time budget"


class Report:
    """Rows as they come; the table and the JSON at the end, or when the watchdog fires."""

    def __init__(self, out: Path, environment: dict[str, Any]) -> None:
        self.out = out
        self.environment = environment
        self.rows: list[Row] = []
        self.started = time.monotonic()
        self.section = "start"
        self.lock = threading.Lock()
        self.finished = False

    def add(self, row: Row) -> None:
        with self.lock:
            self.rows.append(row)
        rate = "" if row.rate is None else f" {row.rate:.1f} {row.unit}"
        batch = "" if row.batch is None else f" b={row.batch}"
        print(f"  {row.section}: {row.task} {row.mode}{batch}{rate} {row.result}", file=sys.stderr)

    def finish(self) -> int:
        """Writes the JSON, prints the table; the exit status (1 if anything failed)."""
        with self.lock:
            if self.finished:
                return 0
            self.finished = True
            rows = list(self.rows)
        status = 1 if any(row.failed for row in rows) else 0
        record = {
            **self.environment,
            "elapsed_s": round(time.monotonic() - self.started, 1),
            "exit_status": status,
            "rows": [asdict(row) for row in rows],
        }
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(format_table(rows, self.environment))
        print(f"JSON written to {self.out}")
        sys.stdout.flush()
        return status

    def watchdog(self, seconds: float) -> threading.Timer:
        timer = threading.Timer(seconds, self._expire, args=(seconds,))
        timer.daemon = True
        timer.start()
        return timer

    def _expire(self, seconds: float) -> None:
        if self.finished:
            return
        self.add(
            skipped(
                "run",
                "-",
                "watchdog",
                f"{TIME_BUDGET}: stopped after {seconds:.0f} s during {self.section}",
            )
        )
        self.finish()
        os._exit(3)


def format_table(rows: Sequence[Row], environment: Mapping[str, Any]) -> str:
    lines = [
        f"GPU check: {environment['gpu']} | torch {environment['torch']} "
        f"(CUDA {environment['cuda']}) | {environment['cores']} cores | {environment['date']}",
        f"{'section':<10} {'task':<20} {'mode':<15} {'batch':>5} {'rate':>10} {'unit':<9} "
        f"{'p50 ms':>8}  result",
    ]
    order = {name: index for index, name in enumerate(SECTIONS)}
    for row in sorted(rows, key=lambda r: order.get(r.section, len(SECTIONS))):
        batch = "" if row.batch is None else str(row.batch)
        rate = "" if row.rate is None else f"{row.rate:.1f}"
        p50 = "" if row.p50_ms is None else f"{row.p50_ms:.2f}"
        lines.append(
            f"{row.section:<10} {row.task:<20} {row.mode:<15} {batch:>5} {rate:>10} "
            f"{row.unit:<9} {p50:>8}  {row.result}"
        )
    return "\n".join(lines)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _module_version(name: str) -> str | None:
    """The version of a module that imports (TensorRT ships under several wheel names)."""
    try:
        return str(importlib.import_module(name).__version__)
    except Exception:  # absent, or present and broken: either way not usable here
        return None


def environment(plan: Plan, budget_s: float) -> dict[str, Any]:
    import torch

    cuda = plan.device == "cuda"
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 - 3.10
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
        "dry_run": plan.dry,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,  # type: ignore[no-untyped-call]
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": _version("numpy"),
        "pydicom": _version("pydicom"),
        "tensorrt": _module_version("tensorrt"),
        "tritonclient": _version("tritonclient"),
        "abdoserve": imported_from(),
        "budget_s": budget_s,
        "batches": list(plan.batches),
        "fp16_tolerance": FP16_TOLERANCE,
        "fp32": "strict IEEE FP32 (TF32 off)",
    }


# --- Timing ----------------------------------------------------------------------


def _synchronizer(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def time_calls(call: Callable[[], object], plan: Plan) -> tuple[float, float]:
    """(p50 seconds per synchronised call, calls/s back to back), after warm-up."""
    sync = _synchronizer(plan.device)
    for _ in range(plan.warmup):
        call()
    sync()
    latencies: list[float] = []
    started = time.perf_counter()
    while len(latencies) < plan.iterations and (
        not latencies or time.perf_counter() - started < plan.seconds
    ):
        begin = time.perf_counter()
        call()
        sync()
        latencies.append(time.perf_counter() - begin)
    p50 = statistics.median(latencies)
    count = max(2, min(4 * plan.iterations, int(plan.seconds / max(p50, 1e-6))))
    begin = time.perf_counter()
    for _ in range(count):
        call()
    sync()
    return p50, count / (time.perf_counter() - begin)


# --- 1, 2: PyTorch eager, autocast, CUDA graphs; FP16 vs FP32 ----------------------


def strict_fp32() -> None:
    """FP32 rows and the FP16 check's reference are IEEE FP32: cuDNN's TF32 default off."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch prefers fp32_precision; both work
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True


def device_inputs(
    spec: TaskSpec, batch: int, device: str, seed: int
) -> tuple[Tensor, Tensor | None]:
    import torch

    from abdoserve.export.inputs import example_inputs

    samples, features = example_inputs(spec, batch=batch, seed=seed)
    return (
        torch.from_numpy(samples).to(device),
        None if features is None else torch.from_numpy(features).to(device),
    )


def _autocast(device: str, half: bool) -> contextlib.AbstractContextManager[object]:
    import torch

    if not half:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch.float16)


def eager(
    module: nn.Module, samples: Tensor, features: Tensor | None, half: bool
) -> Callable[[], Tensor]:
    import torch

    from abdoserve.export.architectures import run_network

    def call() -> Tensor:
        with torch.no_grad(), _autocast(samples.device.type, half):
            return run_network(module, samples, features)

    return call


def cuda_graph(module: nn.Module, samples: Tensor, features: Tensor | None) -> Callable[[], Tensor]:
    """The FP16 autocast forward captured once on static buffers; each call copies the
    batch into them and replays the graph."""
    import torch

    from abdoserve.export.architectures import run_network

    static_samples = samples.clone()
    static_features = None if features is None else features.clone()

    def forward() -> Tensor:
        # autocast's weight cache must stay off while capturing (PyTorch's CUDA graph notes)
        with torch.autocast(device_type="cuda", dtype=torch.float16, cache_enabled=False):
            return run_network(module, static_samples, static_features)

    with torch.no_grad():
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = forward()

    def replay() -> Tensor:
        static_samples.copy_(samples)
        if static_features is not None and features is not None:
            static_features.copy_(features)
        graph.replay()
        return static_output

    return replay


def runner(
    mode: str, module: nn.Module, inputs: tuple[Tensor, Tensor | None]
) -> Callable[[], Tensor]:
    if mode == "fp16 cuda graph":
        return cuda_graph(module, *inputs)
    return eager(module, *inputs, half=mode != "fp32 eager")


def mode_unavailable(mode: str, plan: Plan, fp16_problem: str | None) -> str | None:
    if mode == "fp16 cuda graph" and plan.device != "cuda":
        return "CUDA graphs need a GPU (dry run on CPU)"
    if mode != "fp32 eager":
        return fp16_problem
    return None


def fp16_problem(plan: Plan) -> str | None:
    """Why FP16 autocast cannot run here, or None (it always can on CUDA)."""
    import torch

    if plan.device == "cuda":
        return None
    try:
        with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.float16):
            torch.nn.Conv2d(1, 1, 3)(torch.ones(1, 1, 8, 8))
    except RuntimeError as error:
        return f"float16 autocast fails on this CPU ({str(error)[:80]})"
    return None


def max_abs_difference(call: Callable[[], Tensor], reference: Tensor) -> float:
    import torch

    output = call().float()
    if output.shape != reference.shape:
        raise ValueError(f"output {tuple(output.shape)} vs FP32 {tuple(reference.shape)}")
    return float(torch.max(torch.abs(output - reference)).item())


def check_row(task: str, mode: str, difference: float, batch: int) -> Row:
    within = difference <= FP16_TOLERANCE  # False for NaN too
    verdict = "PASS" if within else "FAIL"
    comparison = "<=" if within else ">"
    return Row(
        "fp16 check",
        task,
        mode,
        batch,
        result=f"{verdict} max|fp16-fp32| {difference:.2e} {comparison} {FP16_TOLERANCE:g}",
        values={"max_abs_difference": difference, "tolerance": FP16_TOLERANCE},
    )


def fp16_checks(
    spec: TaskSpec, module: nn.Module, plan: Plan, problem: str | None, report: Report
) -> None:
    """FP16 autocast (and its CUDA graph) against FP32, post-activation, same inputs."""
    inputs = device_inputs(spec, plan.check_batch, plan.device, seed=1)
    reference = eager(module, *inputs, half=False)().float()
    for mode in MODES[1:]:
        reason = mode_unavailable(mode, plan, problem)
        if reason is not None:
            report.add(skipped("fp16 check", spec.name, mode, reason, plan.check_batch))
            continue
        try:
            difference = max_abs_difference(runner(mode, module, inputs), reference)
        except Exception as error:  # any failure is a row, never a lost run
            report.add(Row("fp16 check", spec.name, mode, plan.check_batch, result=_error(error)))
            continue
        report.add(check_row(spec.name, mode, difference, plan.check_batch))


def _error(error: BaseException) -> str:
    return (
        f"error: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
    )


def timed_row(spec: TaskSpec, module: nn.Module, mode: str, batch: int, plan: Plan) -> Row:
    try:
        call = runner(mode, module, device_inputs(spec, batch, plan.device, seed=0))
        p50, calls_per_s = time_calls(call, plan)
    except Exception as error:  # e.g. out of memory: a row, and the run goes on
        return Row("pytorch", spec.name, mode, batch, result=_error(error))
    return Row(
        "pytorch",
        spec.name,
        mode,
        batch,
        rate=calls_per_s * batch,
        unit="samples/s",
        p50_ms=p50 * 1e3,
        values={"calls_per_s": calls_per_s},
    )


def reference_module(spec: TaskSpec, device: str) -> nn.Module:
    """The export path's network: same constructor, same seed from the task's name."""
    from abdoserve.export.weights import reference_network

    return reference_network(spec).module.to(device).eval()


def pytorch_section(
    plan: Plan, specs: Mapping[str, TaskSpec], budget: Budget, report: Report
) -> None:
    import torch

    if plan.device == "cuda":
        strict_fp32()
    problem = fp16_problem(plan)
    for spec in specs.values():
        if not budget.allows(plan.item_s * 3):
            _skip_task(spec.name, plan, report, TIME_BUDGET)
            continue
        module = reference_module(spec, plan.device)
        fp16_checks(spec, module, plan, problem, report)
        for batch in plan.batches:
            for mode in MODES:
                reason = mode_unavailable(mode, plan, problem)
                if reason is None and not budget.allows(plan.item_s):
                    reason = TIME_BUDGET
                if reason is not None:
                    report.add(skipped("pytorch", spec.name, mode, reason, batch))
                    continue
                report.add(timed_row(spec, module, mode, batch, plan))
        del module
        if plan.device == "cuda":
            torch.cuda.empty_cache()


def _skip_task(task: str, plan: Plan, report: Report, reason: str) -> None:
    for mode in MODES[1:]:
        report.add(skipped("fp16 check", task, mode, reason, plan.check_batch))
    for batch in plan.batches:
        for mode in MODES:
            report.add(skipped("pytorch", task, mode, reason, batch))


# --- 3: preprocessing throughput in a process pool ---------------------------------

PhantomItem = tuple[str, tuple[bytes, ...], dict[str, object]]
_DRY_PHANTOM: dict[str, dict[str, Any]] = {
    "bone_density_ct": {"slices": 2},
    "esophageal_cancer_ct": {"slices": 2},
    "liver_fibrosis_ct": {"slices": 2},
}
_WORKER: dict[str, Any] = {}


def phantom_mix(tasks: Sequence[str], dry: bool) -> list[PhantomItem]:
    """One phantom study per task (512x512 CT slices), as a hospital would send them."""
    from abdoserve.export.phantom import build_study

    mix = []
    for number, task in enumerate(tasks):
        options = _DRY_PHANTOM.get(task, {}) if dry else {}
        study = build_study(task, seed=number, **options)
        mix.append((task, tuple(study.instances), dict(study.clinical)))
    return mix


def _init_worker(studies: list[PhantomItem]) -> None:
    from abdoserve.preprocessing.study import StudyPreparer
    from abdoserve.preprocessing.tasks import get_task

    _WORKER["studies"] = studies
    _WORKER["preparers"] = {task: StudyPreparer(get_task(task)) for task, _, _ in studies}


def _prepare(index: int) -> int:
    task, instances, clinical = _WORKER["studies"][index]
    prepared = _WORKER["preparers"][task](instances, clinical)
    return len(prepared.samples)


def pool_seconds(studies: list[PhantomItem], workers: int, jobs: Sequence[int]) -> float:
    """Seconds for `jobs` (study indices) over `workers` warm processes."""
    import multiprocessing

    # spawn, never fork: the parent may hold a CUDA context and torch's threads
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, context, _init_worker, (studies,)) as pool:
        list(pool.map(_prepare, [i % len(studies) for i in range(2 * workers)]))  # warm-up
        started = time.perf_counter()
        list(pool.map(_prepare, jobs, chunksize=1))
        return time.perf_counter() - started


def preprocess_section(
    plan: Plan, specs: Mapping[str, TaskSpec], budget: Budget, report: Report
) -> None:
    cores = os.cpu_count() or 1
    counts = tuple(dict.fromkeys((1, cores)))
    label = f"mix of {len(specs)} task{'s' if len(specs) > 1 else ''}"
    if not budget.allows(10 if plan.dry else 40):
        for workers in counts:
            report.add(skipped("preprocess", label, f"{workers} worker(s)", TIME_BUDGET))
        return
    studies = phantom_mix(tuple(specs), plan.dry)
    baseline = None
    for workers in counts:
        if not budget.allows(5 if plan.dry else 20):
            report.add(skipped("preprocess", label, f"{workers} worker(s)", TIME_BUDGET))
            continue
        jobs = [i % len(studies) for i in range(len(studies) * plan.rounds * workers)]
        try:
            seconds = pool_seconds(studies, workers, jobs)
        except Exception as error:
            report.add(Row("preprocess", label, f"{workers} worker(s)", result=_error(error)))
            continue
        images = sum(len(studies[i][1]) for i in jobs)
        baseline = baseline or len(jobs) / seconds
        report.add(
            Row(
                "preprocess",
                label,
                f"{workers} worker(s)",
                rate=len(jobs) / seconds,
                unit="studies/s",
                result=f"ok {images / seconds:.1f} images/s, x{len(jobs) / seconds / baseline:.2f}",
                values={
                    "workers": workers,
                    "studies": len(jobs),
                    "images": images,
                    "seconds": seconds,
                    "studies_per_s": len(jobs) / seconds,
                    "images_per_s": images / seconds,
                    "speedup_vs_1_worker": len(jobs) / seconds / baseline,
                },
            )
        )


# --- 4: TensorRT, as the repository build prepares it ----------------------------------


def study_shape(batch: int, most_images: int) -> tuple[int, int] | None:
    """`batch` samples as (studies, images per study) within the plan's profile: at most
    MAX_BATCH_SIZE studies and the spec's most images each; None where they do not fit."""
    from abdoserve.export.configs import MAX_BATCH_SIZE

    studies = min(batch, MAX_BATCH_SIZE)
    images = -(-batch // studies)
    return None if images > most_images else (studies, images)


def study_inputs(spec: TaskSpec, shape: tuple[int, int], seed: int) -> tuple[Tensor, Tensor | None]:
    """SAMPLES [b, n, C, H, W] and FEATURES [b, F] on the GPU, as the plan takes them."""
    studies, images = shape
    samples, features = device_inputs(spec, studies * images, "cuda", seed)
    batched = samples.reshape(studies, images, *spec.sample_shape)
    return batched, None if features is None else features[:studies].contiguous()


def most_images(spec: TaskSpec) -> int:
    return spec.images.max_images if spec.images.stacking == "samples" else 1


def engine_runner(
    engine: Any, spec: TaskSpec, inputs: tuple[Tensor, Tensor | None]
) -> Callable[[], Tensor]:
    import torch

    context = engine.create_execution_context()
    if not hasattr(context, "execute_async_v3"):
        raise RuntimeError("this TensorRT lacks execute_async_v3 (needs 8.5 or later)")
    samples, features = inputs
    studies, images = samples.shape[:2]
    output = torch.empty((studies, images, spec.output.width), device="cuda")
    tensors = {"SAMPLES": samples.contiguous()}
    if features is not None:
        tensors["FEATURES"] = features.contiguous()
    for name, tensor in tensors.items():
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    context.set_tensor_address("OUTPUT", output.data_ptr())
    stream = torch.cuda.current_stream()

    def call() -> Tensor:
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        _ = tensors  # keep the buffers alive as long as the call
        return output

    return call


def tensorrt_section(
    plan: Plan, specs: Mapping[str, TaskSpec], budget: Budget, report: Report
) -> None:
    spec = specs.get(plan.trt_task) or next(iter(specs.values()))
    reason = None if plan.device == "cuda" else "no CUDA (dry run on CPU)"
    if not budget.allows(120 if reason is None else 10 * plan.item_s):
        reason = TIME_BUDGET
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder:
        net = Path(folder) / f"{spec.name}_net"
        if reason != TIME_BUDGET:
            reason = _exported(spec, net, report) or reason
        reason = reason or _engine_problem()
        if reason is not None:
            _skip_engine(spec.name, plan, report, reason)
            return
        engine = _built_engine(net, spec, plan, report)
        if engine is not None:
            _engine_rows(engine, spec, plan, budget, report)


def _exported(spec: TaskSpec, net: Path, report: Report) -> str | None:
    """The study-batched graph and build_engine.sh, as `build-repository --net-runtime
    tensorrt` writes them (a row); why the engine cannot follow, or None."""
    from abdoserve.export.gpu_net import engine_script, export_study_batched, study_batched_error
    from abdoserve.export.onnx_export import OPSET

    path = net / "1" / "model.onnx"
    try:
        started = time.perf_counter()
        path.parent.mkdir(parents=True)
        module = reference_module(spec, "cpu")
        export_study_batched(spec, module, path)
        error = study_batched_error(spec, module, path)
        (net / "build_engine.sh").write_text(engine_script(spec))
    except Exception as problem:
        report.add(Row("tensorrt", spec.name, "onnx export", result=_error(problem)))
        return "the ONNX export failed"
    seconds = time.perf_counter() - started
    size = path.stat().st_size
    report.add(
        Row(
            "tensorrt",
            spec.name,
            "onnx export",
            result=f"ok {size / 1e6:.1f} MB in {seconds:.1f} s (opset {OPSET}, "
            f"relative error vs PyTorch {error:.1e})",
            values={"onnx_bytes": size, "seconds": seconds, "relative_error": error},
        )
    )
    return None


def _engine_problem() -> str | None:
    import shutil

    if shutil.which("trtexec") is None:
        return "trtexec not on PATH (the NGC tritonserver container has it)"
    try:
        importlib.import_module("tensorrt")
    except ImportError:
        return "tensorrt (Python) not installed: the plan cannot be timed"
    return None


def _skip_engine(task: str, plan: Plan, report: Report, reason: str) -> None:
    report.add(skipped("fp16 check", task, "tensorrt fp16", reason, plan.check_batch))
    for batch in plan.batches:
        report.add(skipped("tensorrt", task, "tensorrt fp16", reason, batch))


def _built_engine(net: Path, spec: TaskSpec, plan: Plan, report: Report) -> Any:
    """The plan build_engine.sh makes, deserialized (a row either way), or None."""
    import subprocess

    trt = importlib.import_module("tensorrt")
    started = time.perf_counter()
    try:
        subprocess.run(
            ["bash", str(net / "build_engine.sh")], check=True, capture_output=True, timeout=600
        )
        logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(logger).deserialize_cuda_engine(
            (net / "1" / "model.plan").read_bytes()
        )
        if engine is None:
            raise RuntimeError("TensorRT could not load the plan trtexec wrote")
    except Exception as error:
        report.add(Row("tensorrt", spec.name, "engine build", result=_error(error)))
        _skip_engine(spec.name, plan, report, "no engine")
        return None
    seconds = time.perf_counter() - started
    report.add(
        Row(
            "tensorrt",
            spec.name,
            "engine build",
            result=f"ok in {seconds:.1f} s (build_engine.sh, TensorRT {trt.__version__}, FP16)",
            values={"seconds": seconds},
        )
    )
    return engine


def _engine_rows(engine: Any, spec: TaskSpec, plan: Plan, budget: Budget, report: Report) -> None:
    """The plan's FP16 check against PyTorch FP32 on the same study-batched graph, then
    its timings per batch size (samples, as studies x images)."""
    from abdoserve.export.gpu_net import StudyBatched

    module = StudyBatched(reference_module(spec, "cuda")).eval()
    shape = study_shape(plan.check_batch, most_images(spec)) or (1, 1)
    inputs = study_inputs(spec, shape, seed=1)
    try:
        reference = eager(module, *inputs, half=False)().float()
        difference = max_abs_difference(engine_runner(engine, spec, inputs), reference)
        report.add(check_row(spec.name, "tensorrt fp16", difference, plan.check_batch))
    except Exception as error:
        report.add(
            Row("fp16 check", spec.name, "tensorrt fp16", plan.check_batch, result=_error(error))
        )
    for batch in plan.batches:
        fits = study_shape(batch, most_images(spec))
        reason = "beyond the plan's shape profile" if fits is None else None
        if reason is None and not budget.allows(plan.item_s):
            reason = TIME_BUDGET
        if reason is not None or fits is None:
            report.add(skipped("tensorrt", spec.name, "tensorrt fp16", str(reason), batch))
            continue
        try:
            call = engine_runner(engine, spec, study_inputs(spec, fits, seed=0))
            p50, calls_per_s = time_calls(call, plan)
        except Exception as error:
            report.add(Row("tensorrt", spec.name, "tensorrt fp16", batch, result=_error(error)))
            continue
        rate = calls_per_s * batch
        report.add(Row("tensorrt", spec.name, "tensorrt fp16", batch, rate, "samples/s", p50 * 1e3))


# --- 5: the served path -----------------------------------------------------------

SERVED_CONCURRENCY = (1, 8)


def _served_call(client: Any, grpc: Any, study: PhantomItem) -> None:
    import numpy as np

    task, instances, clinical = study
    dicom = np.empty((1, len(instances)), dtype=np.object_)
    dicom[0, :] = list(instances)
    clinical_json = np.empty((1, 1), dtype=np.object_)
    clinical_json[0, 0] = json.dumps(clinical).encode()
    inputs = []
    for name, array in (("DICOM", dicom), ("CLINICAL", clinical_json)):
        item = grpc.InferInput(name, list(array.shape), "BYTES")
        item.set_data_from_numpy(array)
        inputs.append(item)
    client.infer(task, inputs, outputs=[grpc.InferRequestedOutput("ANSWER")], client_timeout=60)


def _served_latencies(url: str, study: PhantomItem, deadline: float, most: int) -> list[float]:
    grpc = importlib.import_module("tritonclient.grpc")
    client = grpc.InferenceServerClient(url)
    try:
        _served_call(client, grpc, study)  # warm-up
        latencies: list[float] = []
        while len(latencies) < most and time.monotonic() < deadline:
            begin = time.perf_counter()
            _served_call(client, grpc, study)
            latencies.append(time.perf_counter() - begin)
        return latencies
    finally:
        client.close()


def served_row(url: str, study: PhantomItem, concurrency: int, plan: Plan) -> Row:
    deadline = time.monotonic() + plan.served_seconds
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as threads:
        futures = [
            threads.submit(_served_latencies, url, study, deadline, 40) for _ in range(concurrency)
        ]
        latencies = [value for future in futures for value in future.result()]
    seconds = time.perf_counter() - started
    task, instances = study[0], study[1]
    rate = len(latencies) / seconds
    return Row(
        "served",
        task,
        f"grpc c={concurrency}",
        rate=rate,
        unit="studies/s",
        p50_ms=statistics.median(latencies) * 1e3 if latencies else None,
        result=f"ok {rate * len(instances):.1f} images/s, {len(latencies)} studies",
        values={"studies": len(latencies), "images_per_s": rate * len(instances)},
    )


def _served_problem(plan: Plan) -> str | None:
    if plan.url is None:
        return "no --url given"
    try:
        grpc = importlib.import_module("tritonclient.grpc")
    except ImportError:
        return "tritonclient not installed"
    client = grpc.InferenceServerClient(plan.url)
    try:
        ready = bool(client.is_server_ready(client_timeout=5))
    except Exception as error:
        return f"server at {plan.url} unreachable ({_error(error)[7:90]})"
    finally:
        client.close()
    return None if ready else f"server at {plan.url} not ready"


def served_section(
    plan: Plan, specs: Mapping[str, TaskSpec], budget: Budget, report: Report
) -> None:
    problem = _served_problem(plan)
    if problem is not None:
        for task in specs:
            report.add(skipped("served", task, "grpc", problem))
        return
    assert plan.url is not None
    for study in phantom_mix(tuple(specs), plan.dry):
        for concurrency in SERVED_CONCURRENCY:
            if not budget.allows(plan.served_seconds + 5):
                report.add(skipped("served", study[0], f"grpc c={concurrency}", TIME_BUDGET))
                continue
            try:
                report.add(served_row(plan.url, study, concurrency, plan))
            except Exception as error:
                report.add(Row("served", study[0], f"grpc c={concurrency}", result=_error(error)))


# --- Command ----------------------------------------------------------------------

if TYPE_CHECKING:
    Section = Callable[[Plan, Mapping[str, TaskSpec], Budget, Report], None]


def batch_sizes(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(item) for item in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected sizes like 1,8,32, got {text!r}") from error
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("every batch size must be at least 1")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("gpu_check.json"), help="JSON file (gpu_check.json)"
    )
    parser.add_argument(
        "--dry", action="store_true", help="the same code on the CPU with tiny sizes (for CI)"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"seconds; rows that would run past it are skipped (default {DEFAULT_BUDGET_S:g})",
    )
    parser.add_argument("--url", help="HOST:PORT of a running server's gRPC port: served rows")
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help="tasks (default: all five)")
    parser.add_argument(
        "--batch-sizes", type=batch_sizes, default=(1, 8, 32), help="default 1,8,32"
    )
    parser.add_argument(
        "--trt-task", default=DEFAULT_TRT_TASK, help=f"TensorRT's task (default {DEFAULT_TRT_TASK})"
    )


@contextlib.contextmanager
def _section(report: Report, name: str) -> Iterator[None]:
    report.section = name
    print(f"{name} ...", file=sys.stderr)
    try:
        yield
    except Exception as error:  # a section that raises is a row; the rest still run
        report.add(Row(name, "-", "-", result=_error(error)))


def run(args: argparse.Namespace) -> int:
    import torch

    if not args.dry and not torch.cuda.is_available():
        print(
            "gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False). "
            "Run it on a GPU machine with a CUDA build of PyTorch, or pass --dry for the "
            "CPU dry run (not a GPU figure).",
            file=sys.stderr,
        )
        return 2
    budget = Budget(args.budget_s)
    plan = make_plan(args)
    try:
        specs = load_specs(args.tasks)
    except ValueError as error:
        print(f"gpu_check: {error}", file=sys.stderr)
        return 2
    report = Report(args.out, environment(plan, args.budget_s))
    watchdog = report.watchdog(args.budget_s + WATCHDOG_GRACE_S)
    sections: tuple[tuple[str, Section], ...] = (
        ("pytorch", pytorch_section),
        ("preprocess", preprocess_section),
        ("tensorrt", tensorrt_section),
        ("served", served_section),
    )
    for name, section in sections:
        with _section(report, name):
            section(plan, specs, budget, report)
    watchdog.cancel()
    return report.finish()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="abdoserve bench gpu", description="The prepared GPU check (docs/gpu.md)."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
