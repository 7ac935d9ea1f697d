"""`abdoserve bench versions`: what versions side by side cost a study, side by side.

One embedded server on a one-task repository with version 1 (the build) and version 2
(version 1's network with its last bias shifted: a 'retrained' twin). The routing is
switched between states, in interleaved rounds, each measured at each concurrency with
the same distinct studies (each its own key, so sampling by key applies):

- production only: every study through the postprocess model's BLS call of version 1;
- shadow 10 % and 100 %: version 2 also runs on that share, after the answer;
- canary 25 %: version 2 answers a quarter, production runs beside each of those.

Printed: p50, p95 and throughput per state and level, each state's p50 over production
only's in the same round (median and spread over rounds), and, from Triton's
statistics, the routing step itself: the postprocess model's own time per study (its
compute less the BLS call of the net it awaits), next to the net's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TASK = "bone_density_ct"
STATES = ("production only", "shadow 10 %", "shadow 100 %", "canary 25 %")


@dataclass(frozen=True)
class Level:
    state: str
    concurrency: int
    round: int
    p50_ms: float
    p95_ms: float
    throughput: float  # studies per second
    post_own_ms: float  # the postprocess model's own compute per study
    net_ms: float  # the net's queue + compute per call


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default=TASK, help="the task (default %(default)s)")
    parser.add_argument("--requests", type=int, default=40, help="studies per level")
    parser.add_argument(
        "--concurrency", default="1,4", help="comma-separated levels (default %(default)s)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--json", type=Path, help="also write the levels as JSON here")


def run(args: argparse.Namespace) -> int:
    levels = measure(
        args.task,
        requests=args.requests,
        concurrency=[int(value) for value in args.concurrency.split(",")],
        rounds=args.rounds,
    )
    print(format_levels(levels))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(level) for level in levels], indent=2) + "\n")
    return 0


def transitions() -> dict[str, Callable[[Any, float], Any]]:
    from abdoserve.deploy.versions import canary, shadow
    from abdoserve.serving.routing import Routing

    def base(current: Any) -> Any:
        return Routing(production=1, generation=current.generation + 1)

    return {
        "production only": lambda current, _: base(current),
        "shadow 10 %": lambda current, _: shadow(base(current), 2, 10.0),
        "shadow 100 %": lambda current, _: shadow(base(current), 2, 100.0),
        "canary 25 %": lambda current, _: canary(base(current), 2, 25.0),
    }


def repository_with_two_versions(task: str, folder: Path) -> Path:
    import torch

    from abdoserve.export.model_import import import_model
    from abdoserve.export.repository import build_repository
    from abdoserve.export.weights import reference_network
    from abdoserve.preprocessing.tasks import get_task

    out = folder / "model_repository"
    build_repository(out, (task,))
    module = reference_network(get_task(task)).module
    last = [layer for layer in module.modules() if isinstance(layer, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias.add_(0.05)
    checkpoint = folder / "twin.pt"
    torch.save(module.state_dict(), checkpoint)
    import_model(out, task, checkpoint)
    return out


def measure(task: str, *, requests: int, concurrency: Sequence[int], rounds: int) -> list[Level]:
    import tritonclient.grpc as grpcclient

    from abdoserve.deploy.embedded import EmbeddedServer, ServerOptions, free_ports
    from abdoserve.deploy.versions import VersionControl
    from abdoserve.export.phantom import build_study

    studies = [build_study(task, seed=seed) for seed in range(requests)]
    levels = []
    with tempfile.TemporaryDirectory(prefix="abdoserve-bench-versions-") as folder:
        repository = repository_with_two_versions(task, Path(folder))
        options = ServerOptions(
            repository=repository, ports=free_ports(), log_file=Path(folder) / "triton.log"
        )
        with EmbeddedServer(options) as server:
            url = f"{options.host}:{server.ports.grpc}"
            client = grpcclient.InferenceServerClient(url)
            control = VersionControl(client, options.admin_key)
            statistics_of = Statistics(client, options.admin_key, task)
            for number in range(1, rounds + 1):
                for state, change in transitions().items():
                    control.apply(task, change)
                    send(url, task, studies[:4], 2)  # the reloaded model's first calls
                    for level in concurrency:
                        before = statistics_of()
                        latencies, seconds = send(url, task, studies, level)
                        post_own, net = statistics_of.since(before)
                        levels.append(
                            Level(
                                state,
                                level,
                                number,
                                1e3 * statistics.median(latencies),
                                1e3 * _percentile(latencies, 0.95),
                                len(latencies) / seconds,
                                post_own,
                                net,
                            )
                        )
            client.close()
    return levels


class Statistics:
    """Triton's cumulative statistics of the postprocess and net models (admin API)."""

    def __init__(self, client: Any, admin_key: str, task: str) -> None:
        from abdoserve.deploy.model_control import ADMIN_HEADER, GRPC_HEADER_PREFIX

        self.client = client
        self.headers = {GRPC_HEADER_PREFIX + ADMIN_HEADER: admin_key}
        self.task = task

    def __call__(self) -> dict[str, tuple[int, int, int]]:
        """model -> (requests, queue ns, compute ns), over every loaded version."""
        found = {}
        for role in ("postprocess", "net"):
            reply = self.client.get_inference_statistics(
                f"{self.task}_{role}", headers=self.headers, as_json=True
            )
            requests = queue = compute = 0
            for model in reply.get("model_stats", []):
                stats = model.get("inference_stats", {})
                requests += int(stats.get("success", {}).get("count", 0))
                queue += int(stats.get("queue", {}).get("ns", 0))
                compute += sum(
                    int(stats.get(part, {}).get("ns", 0))
                    for part in ("compute_input", "compute_infer", "compute_output")
                )
            found[role] = (requests, queue, compute)
        return found

    def since(self, before: dict[str, tuple[int, int, int]]) -> tuple[float, float]:
        """(postprocess own ms per study, net ms per call) since `before`."""
        after = self()
        post = [a - b for a, b in zip(after["postprocess"], before["postprocess"], strict=True)]
        net = [a - b for a, b in zip(after["net"], before["net"], strict=True)]
        net_per_call = (net[1] + net[2]) / max(net[0], 1)
        studies = max(post[0], 1)
        # The answer's BLS call is awaited inside the postprocess compute; companions run
        # after, from a thread, and are not inside it.
        own = (post[2] - net_per_call * studies) / studies
        return own / 1e6, net_per_call / 1e6


def send(
    url: str, task: str, studies: Sequence[Any], concurrency: int
) -> tuple[list[float], float]:
    """Each study once, `concurrency` at a time; (latencies s, wall s)."""
    from abdoserve_client import AbdoServeClient

    latencies: list[float] = []
    lock = threading.Lock()
    queue = list(studies)

    def worker() -> None:
        with AbdoServeClient(url, timeout_s=120) as client:
            while True:
                with lock:
                    if not queue:
                        return
                    study = queue.pop()
                started = time.perf_counter()
                client.infer(task, study.instances, study.clinical)
                with lock:
                    latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - started


def format_levels(levels: Sequence[Level]) -> str:
    """Per state and level: medians over rounds, and p50 over production only's in the
    same round (median, min-max)."""
    lines = [
        "state            conc   p50 ms   p95 ms   studies/s   p50 / production only "
        "(rounds)      postprocess own ms   net ms per call"
    ]
    base = {(row.round, row.concurrency): row.p50_ms for row in levels if row.state == STATES[0]}
    for state in STATES:
        for level in sorted({row.concurrency for row in levels}):
            rows = [row for row in levels if row.state == state and row.concurrency == level]
            if not rows:
                continue
            ratios = [row.p50_ms / base[row.round, level] for row in rows]
            spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
            lines.append(
                f"{state:<16} {level:>4} {_median(rows, 'p50_ms'):8.1f} "
                f"{_median(rows, 'p95_ms'):8.1f} {_median(rows, 'throughput'):11.1f}   "
                f"{statistics.median(ratios):5.2f} ({spread})            "
                f"{_median(rows, 'post_own_ms'):8.2f}             {_median(rows, 'net_ms'):8.2f}"
            )
    return "\n".join(lines)


def _median(rows: Sequence[Level], name: str) -> float:
    return float(statistics.median(getattr(row, name) for row in rows))


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
