"""`abdoserve configs`: re-render the committed `model_repository/*/config.pbtxt`.

Run it after changing a task spec or the config rendering; the contract test
compares the committed files with a fresh rendering and names this command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# The committed configs live in the checkout this command is run from.
COMMITTED_REPOSITORY = Path("model_repository")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=COMMITTED_REPOSITORY,
        help="the repository folder to write into (default: model_repository/ of the "
        "checkout it runs in)",
    )


def run(args: argparse.Namespace) -> int:
    from abdoserve.export.repository import write_source_configs

    if not (args.out / "_python_models").is_dir():
        print(f"configs: {args.out} is not a checkout's model_repository/ (run it from one)")
        return 2
    written = write_source_configs(args.out)
    print(f"{len(written)} configs written under {args.out}")
    return 0
