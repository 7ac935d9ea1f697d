"""`python -m export OUT_DIR [--task NAME] [--checkpoint PATH]`: ONNX for each task.

Writes OUT_DIR/<task>/model.onnx and provenance.json and logs each network's
parameters, GFLOPs per sample and parity error.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from abdoserve.export.onnx_export import export_task
from abdoserve.preprocessing.tasks import TASKS, get_task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--task", action="append", choices=sorted(TASKS), dest="tasks")
    parser.add_argument("--checkpoint", type=Path, help="a hospital's checkpoint (one task)")
    args = parser.parse_args(argv)
    tasks: list[str] = args.tasks or sorted(TASKS)
    if args.checkpoint is not None and len(tasks) != 1:
        parser.error("--checkpoint needs exactly one --task")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in tasks:
        export_task(get_task(name), args.out_dir / name, args.checkpoint)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
