"""`abdoserve bench explain`: what `infer --explain` costs beside `infer`, per task.

For each task the same phantom studies go through the client both ways, one study at a
time, in interleaved rounds (rounds.py): `infer` alone, then `infer` followed by the
explain model for the version that answered, as `abdoserve infer --explain` does. Each
round's figure is the ratio of the two medians, measured side by side on the same machine;
the report gives the median ratio over the rounds with its min-max, and the milliseconds
behind it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from abdoserve.export.locations import DEFAULT_REPOSITORY
from abdoserve.loadtests.bench.rounds import DEFAULT_ROUNDS, Spread, interleaved

SIDES = ("infer", "infer+explain")
DEFAULT_TASKS = ("bone_density_ct", "liver_fibrosis_ct", "esophageal_cancer_ct")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="tasks")
    parser.add_argument("--studies", type=int, default=5, help="studies per side and round (5)")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="interleaved rounds")
    parser.add_argument("--url", help="a running server's gRPC address (default: start one)")
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--json", type=Path, help="write the raw numbers here")


def run(args: argparse.Namespace) -> int:
    from abdoserve.loadtests.bench.gateway import own_server

    with (
        tempfile.TemporaryDirectory(prefix="abdoserve-bench-explain-") as scratch,
        ExitStack() as stack,
    ):
        url = args.url or stack.enter_context(own_server(args.repository, Path(scratch)))
        results = {task: measure(url, task, args.studies, args.rounds) for task in args.tasks}
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"raw numbers: {args.json}")
    return 0


def measure(url: str, task: str, studies: int, rounds: int) -> dict[str, Any]:
    """Per round and side, the median seconds of one study; per round the ratio."""
    from abdoserve.export.phantom import build_study
    from abdoserve_client.client import AbdoServeClient

    prepared = [build_study(task, seed=seed) for seed in range(1, studies + 1)]
    seconds: dict[str, list[float]] = {side: [] for side in SIDES}
    with AbdoServeClient(url, timeout_s=300.0) as client:
        client.explain(
            task,
            prepared[0].instances,
            client.infer(task, prepared[0].instances, prepared[0].clinical),
            prepared[0].clinical,
        )  # warm: the twin loads once
        for _, side in interleaved(rounds, SIDES):
            seconds[side].append(statistics.median(one_side(client, task, prepared, side)))
    ratios = [with_maps / alone for alone, with_maps in zip(*seconds.values(), strict=True)]
    return {
        "studies": studies,
        "seconds": seconds,
        "ratio": Spread.of(ratios).summary(),
    }


def one_side(client: Any, task: str, studies: Sequence[Any], side: str) -> list[float]:
    timings = []
    for study in studies:
        started = time.perf_counter()
        result = client.infer(task, study.instances, study.clinical)
        if side == "infer+explain":
            client.explain(task, study.instances, result, study.clinical)
        timings.append(time.perf_counter() - started)
    return timings


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'task':24} {'infer ms':>9} {'+explain ms':>12} {'ratio (min-max)':>18}"]
    for task, figures in results.items():
        alone, with_maps = (1e3 * statistics.median(figures["seconds"][side]) for side in SIDES)
        ratio = Spread.of(figures["ratio"]["rounds"]).text()
        lines.append(f"{task:24} {alone:9.1f} {with_maps:12.1f} {ratio:>18}")
    return "\n".join(lines)
