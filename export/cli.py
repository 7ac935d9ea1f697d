"""`abdoserve build-repository`: export every network and build the served repository."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from abdoserve.export.fused import PIPELINES
from abdoserve.export.locations import DEFAULT_REPOSITORY
from abdoserve.preprocessing.tasks import TASKS
from abdoserve.serving.cpu_runtimes import CPU_RUNTIMES, DEFAULT_CPU_RUNTIME


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_REPOSITORY,
        help=f"where to write the repository (default {DEFAULT_REPOSITORY})",
    )
    parser.add_argument(
        "--task",
        action="append",
        choices=sorted(TASKS),
        dest="tasks",
        help="build only these tasks (repeatable; default all five)",
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="TASK=PATH",
        help="a hospital's trained checkpoint for TASK (state_dict or TorchScript); repeatable",
    )
    parser.add_argument(
        "--net-runtime",
        choices=("python", "onnxruntime", "tensorrt"),
        default="python",
        help="the _net model: python (embedded CPU server, default), or a GPU server's "
        "onnxruntime / tensorrt (TensorRT plans are built on the GPU host)",
    )
    parser.add_argument(
        "--cpu-runtime",
        choices=tuple(CPU_RUNTIMES),
        default=DEFAULT_CPU_RUNTIME,
        help="the python _net's runtime: onnxruntime (FP32, default), onnxruntime-int8 "
        "(static QDQ, per-channel weights), openvino (FP32) or openvino-int8 (NNCF). INT8 "
        "is an opt-in: its deviation from the FP32 network, measured on held-out phantom "
        "studies, goes into BUILD.json and every answer's provenance",
    )
    parser.add_argument(
        "--pipeline",
        choices=PIPELINES,
        default=None,
        help="fused: one Python model per task with the ensemble's inputs, outputs and "
        "parameters, two Python-backend hops fewer (CPU runtimes only; the default with "
        "--net-runtime python); ensemble: preprocess, net and postprocess models per task "
        "(the default with a GPU --net-runtime, whose native backend runs the net)",
    )
    parser.add_argument(
        "--spec-overrides",
        action="append",
        default=[],
        metavar="TASK=JSON",
        help="a JSON file of dotted spec overrides for TASK, e.g. "
        '{"geometry.matrix": 224}; repeatable',
    )


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        task, separator, path = value.partition("=")
        if not separator or task not in TASKS:
            raise SystemExit(f"{flag} takes TASK=PATH with TASK one of {', '.join(TASKS)}")
        pairs[task] = path
    return pairs


def run(args: argparse.Namespace) -> int:
    from abdoserve.export.errors import ExportError
    from abdoserve.export.repository import BUILD_RECORD, build_repository

    checkpoints = {
        task: Path(path) for task, path in _pairs(args.checkpoint, "--checkpoint").items()
    }
    overrides: dict[str, dict[str, Any]] = {
        task: json.loads(Path(path).read_text())
        for task, path in _pairs(args.spec_overrides, "--spec-overrides").items()
    }
    try:
        results = build_repository(
            args.out,
            args.tasks or tuple(TASKS),
            checkpoints=checkpoints,
            overrides=overrides,
            net_runtime=args.net_runtime,
            cpu_runtime=args.cpu_runtime,
            pipeline=args.pipeline,
        )
    except ExportError as error:
        print(f"error: {error}")
        return 2
    record = json.loads((args.out / BUILD_RECORD).read_text())
    for task, result in results.items():
        print(
            f"{task:<22} params={result.parameters:>9,}  "
            f"GFLOPs/sample={result.flops_per_sample / 1e9:.3f}  "
            f"parity={result.parity.relative_error:.1e}  weights={result.provenance.source}"
        )
        print(runtime_line(record[task]["runtime"]))
    print(f"model repository ready at {args.out}")
    return 0


def runtime_line(runtime: dict[str, Any]) -> str:
    """The runtime, and its measured deviation where the build measured one."""
    line = f"{'':<22} runtime={runtime['name']} ({runtime['precision']})"
    deviation = runtime.get("deviation")
    if deviation is None:
        return line
    line += (
        f"  vs {deviation['reference']}: max |diff| {deviation['max_abs']:.3g}, "
        f"mean {deviation['mean_abs']:.3g} on {deviation['held_out_studies']} held-out studies"
    )
    if "agreement_of" in deviation:
        line += f", {deviation['agreement_of']} agreement {deviation['study_agreement']:.0%}"
    return line
