"""`abdoserve bench runtimes`: the `_net`'s CPU runtimes side by side, per task.

For each task, in one process and one run: the task's network is exported and every
CPU runtime built as `abdoserve build-repository --cpu-runtime` builds it (the
seconds each adds to a build are reported); then PyTorch eager and the four runtimes
run the same held-out phantom studies (DICOM through the served preprocessing) in
rounds, the order of the runners rotated each round so that drift on a shared
machine hits all alike. Reported per runner: the median latency of one study, images
per second one study per call and with every held-out study in one call (as the
dynamic batcher joins queued studies), the speed ratios to ONNX Runtime FP32 and to
PyTorch eager, and the deviation from PyTorch FP32 on those same studies.
`--openvino-settings` adds OpenVINO FP32 under other settings than the served ones.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from abdoserve.export.calibration import CalibrationPlan, StudyTensors, phantom_tensors
from abdoserve.export.configs import Tuning
from abdoserve.export.deviation import DeviationReport, measure_deviation
from abdoserve.preprocessing.specs import TaskSpec
from abdoserve.preprocessing.tasks import TASKS, get_task
from abdoserve.serving.cpu_runtimes import CPU_RUNTIMES, DEFAULT_CPU_RUNTIME, open_runner
from abdoserve.serving.study_runner import StudyRunner

if TYPE_CHECKING:  # torch loads in `run` only: the CLI's parser must stay light
    from abdoserve.export.cpu_runtime import RuntimeBuild

TORCH = "pytorch-eager"
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


class TorchRunner(StudyRunner):
    """PyTorch eager behind the same batching as the runtimes (the FP32 reference)."""

    def __init__(self, spec: TaskSpec, max_samples: int) -> None:
        from abdoserve.export.reference import TorchReference

        self.reference = TorchReference(spec)
        self.with_features = spec.feature_width > 0
        self.max_samples = max_samples

    def run_rows(self, samples: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        return self.reference(samples, features)


@dataclass(frozen=True)
class RunnerResult:
    runner: str
    precision: str
    study_p50_ms: float
    images_per_s: float  # one study per call
    batched_images_per_s: float  # every held-out study in one call
    speedup_vs_onnxruntime: float  # ONNX Runtime FP32's time / this runner's (>1: faster)
    speedup_vs_pytorch: float
    build_seconds: float | None  # what this runtime adds to a build of the task
    deviation: dict[str, Any] | None


@dataclass(frozen=True)
class Timings:
    study_seconds: list[float]  # every study call of every round
    round_seconds: list[float]  # one study per call, a whole round
    batched_seconds: list[float]  # all studies in one call, per round


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tasks", nargs="+", choices=sorted(TASKS), default=list(TASKS), help="default: all five"
    )
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument(
        "--threads", type=int, default=Tuning().net_intra_op_threads, help="per runner (2)"
    )
    plan = CalibrationPlan()
    parser.add_argument(
        "--calibration-studies", type=int, default=plan.calibration_studies, help="INT8 (8)"
    )
    parser.add_argument(
        "--held-out-studies", type=int, default=plan.held_out_studies, help="timed, measured (6)"
    )
    parser.add_argument(
        "--openvino-settings",
        action="store_true",
        help="also time OpenVINO FP32 under other settings than the served ones "
        "(pinned, 1 thread, throughput hint, OpenVINO's defaults)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    plan = CalibrationPlan(args.calibration_studies, args.held_out_studies)
    tuning = Tuning(net_intra_op_threads=args.threads)
    results = {}
    for task in args.tasks:
        print(f"{task}: building the runtimes ...", flush=True)
        results[task] = bench_task(
            get_task(task), plan, tuning, args.rounds, args.openvino_settings
        )
        print(table(task, results[task]["runners"]), flush=True)
    if args.json:
        document = {"machine": machine(), "settings": settings(args), "tasks": results}
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def bench_task(
    spec: TaskSpec, plan: CalibrationPlan, tuning: Tuning, rounds: int, openvino_settings: bool
) -> dict[str, Any]:
    held_out = phantom_tensors(spec, plan.held_out_seeds())
    with tempfile.TemporaryDirectory(prefix=f"bench-runtimes-{spec.name}-") as folder:
        runners, builds = build_runners(spec, Path(folder), plan, tuning)
        if openvino_settings:
            runners |= openvino_variants(Path(folder), tuning)
        deviations = {
            name: measured(spec, name, runner, held_out, builds.get(name))
            for name, runner in runners.items()
        }
        timings = time_runners(runners, held_out, rounds)
    images = sum(len(study.samples) for study in held_out)
    return {
        "held_out_studies": len(held_out),
        "images_per_study": images / len(held_out),
        "runners": [asdict(result) for result in summarise(timings, images, deviations, builds)],
    }


def build_runners(
    spec: TaskSpec, folder: Path, plan: CalibrationPlan, tuning: Tuning
) -> tuple[dict[str, StudyRunner], dict[str, RuntimeBuild]]:
    """PyTorch and every runtime, each built as the repository build builds it."""
    from abdoserve.export.cpu_runtime import build_cpu_runtime
    from abdoserve.export.onnx_export import export_task

    export_task(spec, folder)
    runners: dict[str, StudyRunner] = {TORCH: TorchRunner(spec, tuning.max_samples_per_run)}
    builds: dict[str, RuntimeBuild] = {}
    for runtime in CPU_RUNTIMES.values():
        builds[runtime.name] = build_cpu_runtime(
            spec, folder, runtime, checkpoint=None, plan=plan, tuning=tuning
        )
        runners[runtime.name] = open_runner(
            runtime,
            folder,
            intra_op_threads=tuning.net_intra_op_threads,
            max_samples=tuning.max_samples_per_run,
        )
    return runners, builds


def openvino_variants(folder: Path, tuning: Tuning) -> dict[str, StudyRunner]:
    """OpenVINO FP32 under other settings than the served ones, for comparison."""
    from abdoserve.serving.openvino_runner import OpenVinoRunner, compile_options

    served = compile_options(tuning.net_intra_op_threads)
    variants: dict[str, dict[str, object]] = {
        "openvino pinned": {**served, "ENABLE_CPU_PINNING": True},
        "openvino 1 thread": compile_options(1),
        "openvino throughput": {**served, "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": 2},
        "openvino defaults": {},
    }
    path = folder / CPU_RUNTIMES["openvino"].model_file
    return {
        name: OpenVinoRunner(
            path, intra_op_threads=0, max_samples=tuning.max_samples_per_run, options=options
        )
        for name, options in variants.items()
    }


def measured(
    spec: TaskSpec,
    name: str,
    runner: StudyRunner,
    held_out: Sequence[StudyTensors],
    build: RuntimeBuild | None,
) -> DeviationReport | None:
    """The build's own report; measured here for the default, whose build measures none."""
    from abdoserve.export.reference import TorchReference

    if build is None:  # PyTorch itself, or other settings of a runtime measured already
        return None
    if build.deviation is not None:
        return build.deviation
    reference = TorchReference(spec)
    return measure_deviation(
        spec, build.runtime, runner, reference, held_out, untrained=reference.provenance.untrained
    )


def time_runners(
    runners: dict[str, StudyRunner], held_out: Sequence[StudyTensors], rounds: int
) -> dict[str, Timings]:
    """Alternating rounds; each round runs every runner, starting one later each time."""
    names = list(runners)
    timings = {name: Timings([], [], []) for name in names}
    for name in names:  # warm-up: first-call costs, shapes compiled once
        _run_each(runners[name], held_out)
        _run_joined(runners[name], held_out)
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            studies = _run_each(runners[name], held_out)
            timings[name].study_seconds.extend(studies)
            timings[name].round_seconds.append(sum(studies))
            timings[name].batched_seconds.append(_run_joined(runners[name], held_out))
    return timings


def _run_each(runner: StudyRunner, held_out: Sequence[StudyTensors]) -> list[float]:
    seconds = []
    for study in held_out:
        started = time.perf_counter()
        runner.run_studies([study.samples], [study.features])
        seconds.append(time.perf_counter() - started)
    return seconds


def _run_joined(runner: StudyRunner, held_out: Sequence[StudyTensors]) -> float:
    started = time.perf_counter()
    runner.run_studies([s.samples for s in held_out], [s.features for s in held_out])
    return time.perf_counter() - started


def summarise(
    timings: dict[str, Timings],
    images: int,
    deviations: dict[str, DeviationReport | None],
    builds: dict[str, RuntimeBuild],
) -> list[RunnerResult]:
    round_median = {name: statistics.median(t.round_seconds) for name, t in timings.items()}
    results = []
    for name, timing in timings.items():
        build = builds.get(name)
        deviation = deviations.get(name)
        results.append(
            RunnerResult(
                runner=name,
                precision=CPU_RUNTIMES[name].precision if name in CPU_RUNTIMES else "fp32",
                study_p50_ms=round(1e3 * statistics.median(timing.study_seconds), 2),
                images_per_s=round(images / round_median[name], 1),
                batched_images_per_s=round(images / statistics.median(timing.batched_seconds), 1),
                speedup_vs_onnxruntime=round(
                    round_median[DEFAULT_CPU_RUNTIME] / round_median[name], 2
                ),
                speedup_vs_pytorch=round(round_median[TORCH] / round_median[name], 2),
                build_seconds=None if build is None else round(build.seconds, 2),
                deviation=None if deviation is None else deviation.to_json(),
            )
        )
    return results


def table(task: str, rows: Sequence[dict[str, Any]]) -> str:
    header = (
        f"{task}\n"
        f"{'runner':<21}{'study p50':>11}{'img/s':>9}{'batched':>9}{'vs ORT':>8}{'vs torch':>9}"
        f"{'max|d|':>10}{'mean|d|':>10}{'agree':>7}{'build s':>9}"
    )
    lines = [header]
    for row in rows:
        deviation = row["deviation"] or {}
        agreement = deviation.get("study_agreement")
        lines.append(
            f"{row['runner']:<21}{row['study_p50_ms']:>9.2f}ms{row['images_per_s']:>9.1f}"
            f"{row['batched_images_per_s']:>9.1f}{row['speedup_vs_onnxruntime']:>7.2f}x"
            f"{row['speedup_vs_pytorch']:>8.2f}x"
            f"{_number(deviation.get('max_abs')):>10}{_number(deviation.get('mean_abs')):>10}"
            f"{'-' if agreement is None else f'{agreement:.0%}':>7}"
            f"{_number(row['build_seconds']):>9}"
        )
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def machine() -> dict[str, Any]:
    """The CPU (and whether it has the VNNI instructions INT8 is fast with) and versions."""
    import nncf
    import onnxruntime
    import openvino
    import torch

    flags: set[str] = set()
    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "avx2": "avx2" in flags,
        "int8_dot_product": sorted(flag for flag in VNNI_FLAGS if flag in flags),
        "versions": {
            "onnxruntime": onnxruntime.__version__,
            "openvino": openvino.__version__,
            "nncf": nncf.__version__,
            "torch": torch.__version__,
        },
    }


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "command": "abdoserve bench runtimes " + " ".join(_flags(args)),
        "date": datetime.date.today().isoformat(),
        "rounds": args.rounds,
        "threads": args.threads,
        "calibration_seeds": list(
            CalibrationPlan(args.calibration_studies, args.held_out_studies).calibration_seeds()
        ),
        "held_out_seeds": list(
            CalibrationPlan(args.calibration_studies, args.held_out_studies).held_out_seeds()
        ),
    }


def _flags(args: argparse.Namespace) -> list[str]:
    flags = ["--tasks", *args.tasks, "--rounds", str(args.rounds), "--threads", str(args.threads)]
    flags += ["--calibration-studies", str(args.calibration_studies)]
    flags += ["--held-out-studies", str(args.held_out_studies)]
    flags += ["--openvino-settings"] if args.openvino_settings else []
    return flags + (["--json", str(args.json)] if args.json else [])
