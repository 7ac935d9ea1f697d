"""`abdoserve phantom TASK --out DIR`: write a phantom study as DICOM files.

`abdoserve phantom cohort TASK --n N --out DIR`: N labelled studies (export/phantom/
cohort.py). `phantom` is one command, not a group, so `cohort` is a word the TASK
position also accepts, followed by the cohort's task: every existing call parses as before.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from abdoserve.export.labels import LABELS_FILE
from abdoserve.export.phantom.cohort import write_cohort
from abdoserve.export.phantom.common import write_study
from abdoserve.export.phantom.dicom_writer import TRANSFER_SYNTAXES
from abdoserve.export.phantom.studies import BUILDERS, build_study

COHORT = "cohort"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tasks = sorted(BUILDERS)
    parser.add_argument(
        "task",
        choices=[*tasks, COHORT],
        metavar="TASK",
        help=f"which task's study to write ({', '.join(tasks)}), "
        f"or `{COHORT}` followed by a task for N labelled studies",
    )
    parser.add_argument(
        "cohort_task",
        nargs="?",
        choices=tasks,
        metavar="COHORT_TASK",
        help=f"after `{COHORT}`: the cohort's task",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the study")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--n", type=int, help=f"with `{COHORT}`: how many studies")
    parser.add_argument(
        "--transfer-syntax",
        default="ExplicitVRLittleEndian",
        choices=sorted(TRANSFER_SYNTAXES),
        help="how pixel data is encoded (default ExplicitVRLittleEndian)",
    )


def run(args: argparse.Namespace) -> int:
    if args.task == COHORT:
        return run_cohort(args)
    if args.cohort_task is not None or args.n is not None:
        return _usage(f"a second task and --n go only with `abdoserve phantom {COHORT}`")
    study = build_study(args.task, seed=args.seed, transfer_syntax=args.transfer_syntax)
    paths = write_study(study, args.out)
    print(f"wrote {len(study.instances)} instances of a {args.task} phantom study to {args.out}")
    print(f"clinical inputs: {args.out / 'request.json'} ({len(paths)} files in all)")
    return 0


def run_cohort(args: argparse.Namespace) -> int:
    if args.cohort_task is None or args.n is None:
        return _usage(f"usage: abdoserve phantom {COHORT} TASK --n N --out DIR [--seed S]")
    try:
        rows = write_cohort(
            args.cohort_task,
            args.n,
            args.out,
            seed=args.seed,
            transfer_syntax=args.transfer_syntax,
        )
    except ValueError as error:
        return _usage(str(error))
    print(f"wrote {len(rows)} {args.cohort_task} phantom studies to {args.out}")
    print(f"labels: {args.out / LABELS_FILE}")
    return 0


def _usage(message: str) -> int:
    print(f"abdoserve phantom: {message}", file=sys.stderr)
    return 2
