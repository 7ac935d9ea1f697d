"""`abdoserve model ...`: the versions of a task's network in a model repository.

`abdoserve model import TASK FILE [--version N]` writes a hospital's network as a new
version of `<task>_net` beside the one that serves, without changing what the server
answers with (abdoserve.export.model_import does the work). The group is meant to grow
(`list`, `validate`, `shadow`, `canary`, `promote`, `rollback`): each subcommand is one
`COMMANDS` entry in deploy/cli.py, `("model", NAME)`, whose module exposes
`add_arguments` and `run`, and takes the repository with `add_repository_argument`
so that every `model` command finds the repository `serve` uses by default.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from abdoserve.export.locations import DEFAULT_REPOSITORY
from abdoserve.preprocessing.tasks import TASKS

if TYPE_CHECKING:
    from abdoserve.export.model_import import ImportResult


def add_repository_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repository",
        type=Path,
        default=DEFAULT_REPOSITORY,
        help=f"the model repository (default {DEFAULT_REPOSITORY}, what `abdoserve serve` "
        "serves with its defaults; a build with other options lies beside it, e.g. "
        "model_repository-openvino)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", metavar="TASK", choices=sorted(TASKS), help="the task")
    parser.add_argument(
        "file",
        metavar="FILE",
        type=Path,
        help="the network: .onnx (any architecture whose inputs and output fit the task's "
        "_net), or for the reference architecture a .pt/.pth (state_dict or TorchScript) "
        "or a Chainer .npz",
    )
    parser.add_argument(
        "--version",
        type=int,
        help="the version to write (default: the highest existing + 1); an existing one is refused",
    )
    add_repository_argument(parser)
    parser.add_argument(
        "--intended-use",
        metavar="TEXT",
        help="what the hospital means the network for, in its words (the model card says "
        "'not given' without it)",
    )
    parser.add_argument(
        "--training-data",
        metavar="TEXT",
        help="the training data as the hospital describes it (the model card says "
        "'not given' without it)",
    )


def run(args: argparse.Namespace) -> int:
    from abdoserve.export.errors import ExportError
    from abdoserve.export.model_import import import_model

    try:
        result = import_model(
            args.repository,
            args.task,
            args.file,
            version=args.version,
            intended_use=args.intended_use,
            training_data=args.training_data,
        )
    except ExportError as error:
        print(f"error: {error}")
        return 2
    for line in summary(result):
        print(line)
    return 0


def summary(result: ImportResult) -> list[str]:
    """What an import wrote and measured, and what serves, for the operator."""
    card = result.card
    parity = card.parity
    check = parity.ort_self_check
    if parity.max_abs_diff is None:
        measured = "n/a (an ONNX file: no source framework to compare with)"
    else:
        measured = (
            f"max |eager - served| {parity.max_abs_diff:.2g} on {len(parity.study_seeds)} "
            f"phantom studies ({parity.samples} samples), at most {parity.tolerance:g}"
        )
    served = ", ".join(map(str, result.pin.versions))
    lines = [
        f"{card.model} version {result.version} written to {result.folder} in "
        f"{result.seconds:.1f} s (model card {card.card_id})",
        f"  source      {card.source.file_name} ({card.source.framework}, "
        f"sha256 {card.source.sha256[:16]}...)",
        f"  parity      {measured}",
        f"  self-check  ONNX Runtime on phantom study {check.study_seed}: "
        f"output {check.output_shape}, finite",
        f"  serving     version {served} (pinned); version {result.version} is not served",
    ]
    if result.pin.changed:
        lines.append(
            f"  note        the config pinned no version before ({result.pin.before}): a "
            f"server started from this repository before now still holds that policy and "
            f"would load version {result.version} on its next reload of {card.model}; "
            "restart it"
        )
    return lines
