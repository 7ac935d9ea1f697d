"""`abdoserve bench replicas`: throughput of one Triton, of one replica behind nginx and
of N replicas behind nginx, side by side in one run on the same studies and repository.

(a) vs (b) is what the balancer costs per request; (b) vs (c) is what more replicas buy
on this machine. Each topology is measured as `abdoserve bench serving --url` measures a
running server (the same served_levels: fresh clients per level, a warm-up per thread).

`--autoscale` measures the same replicas another way: the HPA's signal under a locust
step ramp (`autoscale.py`, docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from abdoserve.deploy.embedded import (
    EmbeddedServer,
    Ports,
    ServerOptions,
    free_port,
    free_ports,
)
from abdoserve.deploy.guard import GuardLimits
from abdoserve.deploy.replicas import ReplicaSet, ReplicaSetOptions
from abdoserve.deploy.serve import prepared_repository
from abdoserve.export.locations import BUILD_DIR, DEFAULT_REPOSITORY
from abdoserve.loadtests.bench.autoscale import add_ramp_arguments, run_ramp
from abdoserve.loadtests.bench.serving import served_levels
from abdoserve.loadtests.bench.workload import Measurement, study_pool

TOPOLOGIES = ("one Triton, direct", "1 replica behind nginx", "{n} replicas behind nginx")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replicas", type=int, default=2, help="the larger topology (2)")
    parser.add_argument("--task", default="bone_density_ct", help="task (bone_density_ct)")
    parser.add_argument("--requests", type=int, default=120, help="per level (default 120)")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 4, 16], help="levels (1 4 16)"
    )
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    add_ramp_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.autoscale:
        return run_ramp(args)
    repository = prepared_repository(
        args.repository, args.replicas
    )  # sized for the larger topology; all three use it
    pool = study_pool(args.task, 4)
    results: dict[str, list[Measurement]] = {}
    for name, topology in (
        (TOPOLOGIES[0], direct(repository)),
        (TOPOLOGIES[1], balanced(repository, 1)),
        (TOPOLOGIES[2].format(n=args.replicas), balanced(repository, args.replicas)),
    ):
        with topology as url:
            print(f"{name} at {url} ...", flush=True)
            levels = tuple(args.concurrency)
            results[name] = served_levels(url, args.task, pool, levels, args.requests)
    print(table(results, args.concurrency))
    if args.json:
        rows = {name: [row.summary() for row in rows] for name, rows in results.items()}
        args.json.write_text(json.dumps({"task": args.task, "topologies": rows}, indent=2))
    return 0


@contextmanager
def direct(repository: Path) -> Iterator[str]:
    log = BUILD_DIR / "bench-replicas" / "direct.log"
    options = ServerOptions(repository=repository, ports=free_ports(), log_file=log)
    with EmbeddedServer(options) as server:
        yield f"127.0.0.1:{server.ports.grpc}"


@contextmanager
def balanced(repository: Path, replicas: int) -> Iterator[str]:
    options = ReplicaSetOptions(
        replicas=replicas,
        repository=repository,
        public_host="127.0.0.1",
        public_ports=Ports(grpc=free_port(), http=free_port(), metrics=free_port()),
        health_port=free_port(),
        run_dir=BUILD_DIR / "bench-replicas" / f"replicas-{replicas}",
        guard=GuardLimits(max_body_bytes=257 * 1024 * 1024),
    )
    with ReplicaSet(options):
        yield f"127.0.0.1:{options.public_ports.grpc}"


def table(results: dict[str, list[Measurement]], levels: list[int]) -> str:
    """Studies/s and p50 per topology and level, then the ratios that answer the questions."""
    names = list(results)
    lines = ["| topology | concurrency | studies/s | p50 ms | p95 ms |", "|---|---|---|---|---|"]
    for name in names:
        for level, row in zip(levels, results[name], strict=True):
            lines.append(
                f"| {name} | {level} | {row.studies_per_second:.2f} | "
                f"{row.percentile_ms(50):.0f} | {row.percentile_ms(95):.0f} |"
            )
    direct_rows, one, many = (results[name] for name in names)
    lines.append("")
    for level, a, b, c in zip(levels, direct_rows, one, many, strict=True):
        lines.append(
            f"c={level}: {names[2]} / 1 replica = "
            f"{c.studies_per_second / b.studies_per_second:.2f}x throughput; "
            f"nginx adds {b.percentile_ms(50) - a.percentile_ms(50):+.1f} ms at p50 "
            f"({b.studies_per_second / a.studies_per_second:.2f}x of direct throughput)"
        )
    return "\n".join(lines)
