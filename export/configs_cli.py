"""`abdoserve configs`: re-render the committed `model_repository/*/config.pbtxt`.

Run it after changing a task spec or the config rendering; the contract test
compares the committed files with a fresh rendering and names this command.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from abdoserve.export.repository import SOURCE_REPOSITORY

    parser.add_argument(
        "--out",
        type=Path,
        default=SOURCE_REPOSITORY,
        help=f"the repository folder to write into (default {SOURCE_REPOSITORY})",
    )


def run(args: argparse.Namespace) -> int:
    from abdoserve.export.repository import write_source_configs

    written = write_source_configs(args.out)
    print(f"{len(written)} configs written under {args.out}")
    return 0
