"""`abdoserve phantom TASK --out DIR`: write a phantom study as DICOM files."""

from __future__ import annotations

import argparse
from pathlib import Path

from abdoserve.export.phantom.common import write_study
from abdoserve.export.phantom.dicom_writer import TRANSFER_SYNTAXES
from abdoserve.export.phantom.studies import BUILDERS, build_study


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=sorted(BUILDERS), help="which task's study to write")
    parser.add_argument("--out", type=Path, required=True, help="folder for the study")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument(
        "--transfer-syntax",
        default="ExplicitVRLittleEndian",
        choices=sorted(TRANSFER_SYNTAXES),
        help="how pixel data is encoded (default ExplicitVRLittleEndian)",
    )


def run(args: argparse.Namespace) -> int:
    study = build_study(args.task, seed=args.seed, transfer_syntax=args.transfer_syntax)
    paths = write_study(study, args.out)
    print(f"wrote {len(study.instances)} instances of a {args.task} phantom study to {args.out}")
    print(f"clinical inputs: {args.out / 'request.json'} ({len(paths)} files in all)")
    return 0
