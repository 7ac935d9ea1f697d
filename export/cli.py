"""`abdoserve build-repository`: export every network and build the served repository."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from abdoserve.preprocessing.tasks import TASKS

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "build" / "model_repository"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"where to write the repository (default {DEFAULT_OUT})",
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
    from abdoserve.export.repository import build_repository

    checkpoints = {
        task: Path(path) for task, path in _pairs(args.checkpoint, "--checkpoint").items()
    }
    overrides: dict[str, dict[str, Any]] = {
        task: json.loads(Path(path).read_text())
        for task, path in _pairs(args.spec_overrides, "--spec-overrides").items()
    }
    results = build_repository(
        args.out,
        args.tasks or tuple(TASKS),
        checkpoints=checkpoints,
        overrides=overrides,
        net_runtime=args.net_runtime,
    )
    for task, result in results.items():
        print(
            f"{task:<22} params={result.parameters:>9,}  "
            f"GFLOPs/sample={result.flops_per_sample / 1e9:.3f}  "
            f"parity={result.parity.relative_error:.1e}  weights={result.provenance.source}"
        )
    print(f"model repository ready at {args.out}")
    return 0
