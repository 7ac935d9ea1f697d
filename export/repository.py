"""Build the served Triton model repository: ONNX weights, configs, Python models.

The committed `model_repository/` holds the default configs and the shared Python
model sources; weights are never committed. A build renders every config from the
(possibly overridden) task specs, exports each network to ONNX with its parity
check, writes the weights' provenance into the configs' parameters (and from there
into every response), and copies the Python models into place. A CPU runtime other
than ONNX Runtime FP32 (`export.cpu_runtime`) adds its model file and its measured
deviation from PyTorch, which the configs' parameters carry into every answer. Each
`_net` config pins the version the build writes (1), so that a version imported beside
it later (`abdoserve model import`) is not served by a restart or a reload.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from tritonclient.grpc import model_config_pb2 as mc

from abdoserve.export.calibration import CalibrationPlan
from abdoserve.export.configs import Tuning, model_names, render_task, to_text
from abdoserve.export.cpu_runtime import RuntimeBuild, build_cpu_runtime
from abdoserve.export.errors import ExportError
from abdoserve.export.fused import Pipeline, default_pipeline, fuse_task
from abdoserve.export.gpu_net import (
    GpuRuntime,
    engine_script,
    export_study_batched,
    gpu_net_config,
    study_batched_error,
)
from abdoserve.export.locations import PYTHON_MODELS
from abdoserve.export.onnx_export import PARITY_TOLERANCE, ExportResult, export_task
from abdoserve.export.version_carry import carry_versions
from abdoserve.export.weights import load_network
from abdoserve.preprocessing.specs import TaskSpec
from abdoserve.preprocessing.tasks import TASKS, get_task
from abdoserve.serving.cpu_runtimes import (
    CPU_RUNTIMES,
    DEFAULT_CPU_RUNTIME,
    PRECISION_PARAMETER,
    RUNTIME_PARAMETER,
    CpuRuntime,
)
from abdoserve.serving.warmup import WARMUP_FOLDER, write_warmup

logger = logging.getLogger(__name__)

ROLE_SOURCES = {
    "preprocess": "preprocess.py",
    "net": "net.py",
    "postprocess": "postprocess.py",
    "explain": "explain.py",
}
# The `_net` version a build writes, and the only one its config lets Triton load.
SERVED_VERSION = 1
BUILD_RECORD = "BUILD.json"
DEFAULT_TUNING = Tuning()
DEFAULT_CALIBRATION = CalibrationPlan()
NetRuntime = Literal["python", "onnxruntime", "tensorrt"]
# What the answers name for a GPU server's `_net` (the TensorRT plan is built with --fp16).
GPU_RUNTIME_PARAMETERS = {
    "onnxruntime": {RUNTIME_PARAMETER: "onnxruntime-backend", PRECISION_PARAMETER: "fp32"},
    "tensorrt": {RUNTIME_PARAMETER: "tensorrt", PRECISION_PARAMETER: "fp16"},
}


def build_repository(
    out: Path,
    tasks: Iterable[str] = tuple(TASKS),
    *,
    checkpoints: Mapping[str, Path] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    tuning: Tuning = DEFAULT_TUNING,
    net_runtime: NetRuntime = "python",
    cpu_runtime: str = DEFAULT_CPU_RUNTIME,
    calibration: CalibrationPlan = DEFAULT_CALIBRATION,
    pipeline: Pipeline | None = None,
) -> dict[str, ExportResult]:
    """Write a complete repository to `out` (replaced atomically when done).

    `net_runtime` picks the `_net` model: "python" (a CPU runtime inside the Python
    backend, the embedded CPU server) or a GPU server's "onnxruntime" / "tensorrt".
    `cpu_runtime` picks the Python `_net`'s runtime (`abdoserve.serving.cpu_runtimes`);
    `calibration` how many phantom studies calibrate INT8 and measure the deviation.
    `pipeline`: "ensemble" (three composing models), or "fused" (one Python model per
    task, the same contract; CPU runtimes only, see abdoserve.export.fused); by default
    fused for the "python" net runtime and the ensemble for the GPU ones.
    """
    runtime = checked_cpu_runtime(net_runtime, cpu_runtime)
    pipeline = pipeline or default_pipeline(net_runtime)
    if pipeline == "fused" and net_runtime != "python":
        raise ExportError("the fused pipeline runs a CPU runtime: not with a GPU --net-runtime")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    results = {}
    runtimes = {}
    for task in tasks:
        task_overrides = dict((overrides or {}).get(task, {}))
        checkpoint = (checkpoints or {}).get(task)
        results[task], runtimes[task] = build_task(
            staging,
            task,
            checkpoint,
            task_overrides,
            tuning,
            runtime=runtime,
            gpu_runtime=None if net_runtime == "python" else net_runtime,
            calibration=calibration,
        )
        if net_runtime != "python":
            replace_net_for_gpu(
                staging,
                task,
                checkpoint=checkpoint,
                overrides=task_overrides,
                tuning=tuning,
                runtime=net_runtime,
            )
        if pipeline == "fused":
            fuse_task(staging, task, PYTHON_MODELS)
    record: dict[str, Any] = {
        task: _record(result, (overrides or {}).get(task), runtimes[task])
        for task, result in results.items()
    }
    record["pipeline"] = pipeline
    record["sources"] = source_digest()
    record["tuning"] = asdict(tuning)
    record["net_runtime"] = net_runtime
    record["cpu_runtime"] = _built_cpu_runtime(net_runtime, cpu_runtime)
    (staging / BUILD_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    if out.is_dir() and net_runtime == "python":  # a CPU build, of either shape
        carry_versions(out, staging, results, SERVED_VERSION)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    logger.info("model repository ready at %s (%d tasks)", out, len(results))
    return results


def checked_cpu_runtime(net_runtime: NetRuntime, cpu_runtime: str) -> CpuRuntime:
    """The CPU runtime asked for; only the Python `_net` has one to choose."""
    if cpu_runtime not in CPU_RUNTIMES:
        raise ExportError(f"unknown CPU runtime {cpu_runtime!r}; known: {', '.join(CPU_RUNTIMES)}")
    runtime = CPU_RUNTIMES[cpu_runtime]
    if net_runtime != "python" and not runtime.is_default:
        raise ExportError(
            f"the CPU runtime {cpu_runtime} runs in the Python _net of the embedded CPU "
            f"server; a {net_runtime} _net (GPU server) has none to choose"
        )
    return runtime


def build_task(
    root: Path,
    task: str,
    checkpoint: Path | None,
    overrides: Mapping[str, Any],
    tuning: Tuning,
    *,
    runtime: CpuRuntime = CPU_RUNTIMES[DEFAULT_CPU_RUNTIME],
    gpu_runtime: NetRuntime | None = None,
    calibration: CalibrationPlan = DEFAULT_CALIBRATION,
) -> tuple[ExportResult, RuntimeBuild]:
    spec = get_task(task, overrides)
    _, _, net, _ = model_names(task)
    result, built = write_net_version(
        spec,
        root / net / str(SERVED_VERSION),
        checkpoint,
        runtime=runtime,
        calibration=calibration,
        tuning=tuning,
    )
    runs = GPU_RUNTIME_PARAMETERS[gpu_runtime] if gpu_runtime else built.parameters()
    configs = render_task(spec, tuning, {**result.provenance.to_parameters(), **runs})
    pin_versions(configs[net], (SERVED_VERSION,))
    for name, config in configs.items():
        # Every Python model checks tensors against the spec, the `_net` included.
        if overrides and config.backend == "python":
            config.parameters["spec_overrides"].string_value = json.dumps(dict(overrides))
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.pbtxt").write_text(to_text(config))
        (folder / "1").mkdir(exist_ok=True)  # ensembles too: Triton needs a version folder
        role = name.removeprefix(task + "_")
        if role in ROLE_SOURCES and role != "net":  # the net's came with its version
            shutil.copyfile(PYTHON_MODELS / ROLE_SOURCES[role], folder / "1" / "model.py")
        if role == "preprocess":
            write_warmup_study(folder / "1", spec.name)
    return result, built


def write_net_version(
    spec: TaskSpec,
    folder: Path,
    checkpoint: Path | None,
    *,
    runtime: CpuRuntime,
    calibration: CalibrationPlan,
    tuning: Tuning,
) -> tuple[ExportResult, RuntimeBuild]:
    """One version folder of the CPU server's `_net`: `model.onnx` and `provenance.json`
    (the export, its parity checked), the CPU runtime's file and its measured deviation,
    and the Python model. A build writes version 1; `abdoserve model import` the next."""
    result = export_task(spec, folder, checkpoint)
    built = build_cpu_runtime(
        spec, folder, runtime, checkpoint=checkpoint, plan=calibration, tuning=tuning
    )
    copy_net_model(folder)
    return result, built


def copy_net_model(folder: Path) -> None:
    """The `_net` Python model (a CPU runtime in the Python backend) into a version folder."""
    shutil.copyfile(PYTHON_MODELS / ROLE_SOURCES["net"], folder / "model.py")


def pin_versions(config: mc.ModelConfig, versions: Iterable[int]) -> None:
    """Serve exactly these versions: a version folder added later (an import) is not
    loaded by a restart or a reload, as Triton's default policy (the latest) would."""
    pinned = config.version_policy.specific.versions
    del pinned[:]
    pinned.extend(sorted(set(versions)))


def write_warmup_study(version_folder: Path, task: str) -> None:
    """The phantom study the preprocess model decodes at load (see abdoserve.serving.warmup)."""
    from abdoserve.export.phantom import build_study

    study = build_study(task, seed=0)
    write_warmup(version_folder, study.instances, study.clinical)


def replace_net_for_gpu(
    root: Path,
    task: str,
    *,
    checkpoint: Path | None,
    overrides: Mapping[str, Any],
    tuning: Tuning,
    runtime: GpuRuntime,
) -> None:
    """Swap the CPU `_net` (Python backend) for a GPU backend's; nothing else changes."""
    spec = get_task(task, overrides)
    folder = root / model_names(task)[2]
    loaded = load_network(spec, checkpoint)
    onnx_path = folder / "1" / "model.onnx"
    export_study_batched(spec, loaded.module, onnx_path)
    error = study_batched_error(spec, loaded.module, onnx_path)
    if error > PARITY_TOLERANCE:
        raise ExportError(f"{task}: study-batched ONNX differs from PyTorch by {error:.2e}")
    (folder / "1" / "model.py").unlink()
    provenance = {**loaded.provenance.to_parameters(), **GPU_RUNTIME_PARAMETERS[runtime]}
    config = gpu_net_config(spec, runtime, provenance, tuning)
    pin_versions(config, (SERVED_VERSION,))
    (folder / "config.pbtxt").write_text(to_text(config))
    if runtime == "tensorrt":
        script = folder / "build_engine.sh"
        script.write_text(engine_script(spec))
        script.chmod(0o755)
    logger.info("%s: %s net, study-batched parity %.1e", task, runtime, error)


def _record(
    result: ExportResult, overrides: Mapping[str, Any] | None, runtime: RuntimeBuild
) -> dict[str, Any]:
    return {
        **result.provenance.to_parameters(),
        "parameters": result.parameters,
        "flops_per_sample": result.flops_per_sample,
        "parity_relative_error": result.parity.relative_error,
        "overrides": dict(overrides or {}),
        "runtime": runtime.record(),
    }


def _built_cpu_runtime(net_runtime: NetRuntime, cpu_runtime: str) -> str | None:
    """BUILD.json's `cpu_runtime`: the Python `_net`'s runtime; None on a GPU `_net`."""
    return cpu_runtime if net_runtime == "python" else None


def write_source_configs(root: Path) -> list[Path]:
    """Render the default configs into the committed repository (a developer command)."""
    written = []
    for spec in TASKS.values():
        for name, config in render_task(spec).items():
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "config.pbtxt"
            path.write_text(to_text(config))
            written.append(path)
            role = name.removeprefix(spec.name + "_")
            if role in ROLE_SOURCES:
                _link_model(folder, ROLE_SOURCES[role])
    return written


def _link_model(folder: Path, source: str) -> None:
    """`1/model.py` -> the shared source, so a reader of the folder finds its code."""
    link = folder / "1" / "model.py"
    link.parent.mkdir(exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path("..", "..", "_python_models", source))


def built_tasks(out: Path) -> tuple[str, ...]:
    """The tasks a finished build in `out` holds (none if there is no build)."""
    record = out / BUILD_RECORD
    if not record.is_file():
        return ()
    return tuple(name for name in json.loads(record.read_text()) if name in TASKS)


def built_pipeline(out: Path) -> Pipeline | None:
    """The shape of the finished build in `out` (None if there is no build)."""
    record = out / BUILD_RECORD
    if not record.is_file():
        return None
    shape = json.loads(record.read_text()).get("pipeline", "ensemble")
    return "fused" if shape == "fused" else "ensemble"


def source_digest() -> str:
    """A hash of what a build copies or renders from code: the Python models and the
    config renderer. A build made before a change to either is rebuilt."""
    digest = hashlib.sha256()
    models = [path for path in sorted(PYTHON_MODELS.glob("*.py")) if path.name != "__init__.py"]
    sources = [*models, Path(__file__).with_name("configs.py")]
    for path in sources:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


FUSED_FILES = ("model.py", "model.onnx")  # a fused model's code and network, in version 1


def is_built(
    out: Path,
    tasks: Iterable[str] = tuple(TASKS),
    tuning: Tuning = DEFAULT_TUNING,
    *,
    net_runtime: NetRuntime = "python",
    cpu_runtime: str = DEFAULT_CPU_RUNTIME,
    pipeline: Pipeline | None = None,
) -> bool:
    """Whether `out` holds a finished build of these tasks with this tuning, runtimes and
    pipeline, from the current sources (a build from older code is stale)."""
    record = out / BUILD_RECORD
    if not record.is_file():
        return False
    built = json.loads(record.read_text())
    pipeline = pipeline or default_pipeline(net_runtime)
    if built.get("pipeline", "ensemble") != pipeline or built.get("sources") != source_digest():
        return False
    if built.get("tuning") != asdict(tuning) or built.get("net_runtime") != net_runtime:
        return False
    if built.get("cpu_runtime") != _built_cpu_runtime(net_runtime, cpu_runtime):
        return False  # also a build from before the CPU runtimes: its answers name none
    model_file = CPU_RUNTIMES[cpu_runtime].model_file if net_runtime == "python" else "model.onnx"
    if pipeline == "fused":
        return all(
            task in built
            and all((out / task / "1" / name).is_file() for name in (*FUSED_FILES, model_file))
            for task in tasks
        )
    return all(
        task in built
        and (out / f"{task}_net" / "1" / "model.onnx").is_file()
        and (out / f"{task}_net" / "1" / model_file).is_file()
        and (out / f"{task}_preprocess" / "1" / WARMUP_FOLDER).is_dir()
        for task in tasks
    )
