"""`abdoserve bench preprocess`: our per-slice preprocessing vs a bare pydicom decode.

Both sides run in one process, pinned to one core, on the same bytes (512x512
phantom CT slices), in alternating rounds so that drift on a shared machine hits
both alike. Reported: slices per second for each, and the ratio of our time per
slice to the bare decode's (target: at most 1.25).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom

from abdoserve.export.phantom import build_study
from abdoserve.preprocessing.study import StudyPreparer
from abdoserve.preprocessing.tasks import get_task

TARGET_RATIO = 1.25
SYNTAXES = ("ExplicitVRLittleEndian", "JPEG2000Lossless")
BENCH_TASK = "bone_density_ct"  # a free series of 512x512 CT slices


@dataclass(frozen=True)
class SyntaxResult:
    transfer_syntax: str
    slices: int
    bare_slices_per_second: float
    ours_slices_per_second: float
    ratio: float  # our time per slice / bare time per slice

    @property
    def meets_target(self) -> bool:
        return self.ratio <= TARGET_RATIO


def bare_decode(instances: Sequence[bytes]) -> None:
    for data in instances:
        pydicom.dcmread(io.BytesIO(data)).pixel_array  # noqa: B018 - decoding is the point


def measure_syntax(syntax: str, slices: int, rounds: int) -> SyntaxResult:
    """Median seconds per slice of each side over `rounds` alternating rounds."""
    instances = phantom_slices(syntax, slices)
    prepare = StudyPreparer(get_task(BENCH_TASK))
    ours: Callable[[], object] = lambda: prepare(instances, {})  # noqa: E731
    bare: Callable[[], object] = lambda: bare_decode(instances)  # noqa: E731
    ours(), bare()  # warm caches and decoder plugins
    ours_times, bare_times = [], []
    for _ in range(rounds):
        bare_times.append(_seconds(bare))
        ours_times.append(_seconds(ours))
    bare_per_slice = statistics.median(bare_times) / len(instances)
    ours_per_slice = statistics.median(ours_times) / len(instances)
    return SyntaxResult(
        transfer_syntax=syntax,
        slices=len(instances),
        bare_slices_per_second=1.0 / bare_per_slice,
        ours_slices_per_second=1.0 / ours_per_slice,
        ratio=ours_per_slice / bare_per_slice,
    )


def phantom_slices(syntax: str, count: int) -> list[bytes]:
    """`count` distinct 512x512 CT slices in one transfer syntax."""
    study = build_study(BENCH_TASK, seed=7, transfer_syntax=syntax, slices=count)
    return list(study.instances)


def _seconds(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def pin_to_one_core() -> int | None:
    """Run on a single core, as the target is stated; returns the core or None."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core


def format_table(results: Sequence[SyntaxResult]) -> str:
    lines = [
        f"{'transfer syntax':<20} {'slices':>6} {'bare slices/s':>14} {'ours slices/s':>14} "
        f"{'ratio':>6}  target <= {TARGET_RATIO}",
    ]
    for result in results:
        verdict = "met" if result.meets_target else "MISSED"
        lines.append(
            f"{result.transfer_syntax:<20} {result.slices:>6} "
            f"{result.bare_slices_per_second:>14.0f} {result.ours_slices_per_second:>14.0f} "
            f"{result.ratio:>6.2f}  {verdict}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slices", type=int, default=12, help="slices per round (default 12)")
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds (default 15)")
    parser.add_argument("--syntax", action="append", choices=SYNTAXES, help="repeatable")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")


def run(args: argparse.Namespace) -> int:
    core = pin_to_one_core()
    print(
        f"preprocessing benchmark: {BENCH_TASK} spec, pinned to core {core}, "
        f"{args.slices} slices x {args.rounds} rounds, median per round"
    )
    results = [
        measure_syntax(syntax, args.slices, args.rounds) for syntax in (args.syntax or SYNTAXES)
    ]
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(result) for result in results], indent=2) + "\n")
    return 0
