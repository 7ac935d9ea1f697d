"""`abdoserve bench replicas --autoscale`: the autoscaling signal, measured on real replicas.

Starts `--replicas` local replicas behind nginx (as `abdoserve serve --replicas`), a
real Prometheus scraping each replica with the `namespace`/`pod` labels a PodMonitor
gives on Kubernetes, and a locust step ramp of the hospital-day mix. Every
`--sample-s` it evaluates the prometheus-adapter rule's own query (read from
deploy/k8s/prometheus-adapter/rules.yaml, its template filled in as the adapter
would for the pods) and the replica count the HorizontalPodAutoscaler would ask for
with the target of deploy/k8s/base/horizontalpodautoscaler.yaml:

    desired = ceil(current replicas x mean over pods / target)   (HPA's formula,
    unchanged within its 10 % tolerance)

It prints the series, writes them as JSON and plots them (users, signal per pod,
desired replicas over time). Not a command of its own: an option of `bench replicas`,
which starts the same replicas.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from abdoserve.deploy.embedded import PROJECT_ROOT, Ports, free_port
from abdoserve.deploy.guard import GuardLimits
from abdoserve.deploy.prometheus_server import PrometheusServer
from abdoserve.deploy.replicas import ReplicaSet, ReplicaSetOptions
from abdoserve.deploy.serve import prepared_repository
from abdoserve.export.locations import BUILD_DIR
from abdoserve.loadtests.cli import SCENARIOS_DIR, execute
from abdoserve.loadtests.profiles import step_users

ADAPTER_RULES = PROJECT_ROOT / "deploy" / "k8s" / "prometheus-adapter" / "rules.yaml"
HPA = PROJECT_ROOT / "deploy" / "k8s" / "base" / "horizontalpodautoscaler.yaml"
HPA_TOLERANCE = 0.1  # the controller's default: no change within 10 % of the target
NAMESPACE = "local"


@dataclass(frozen=True)
class Point:
    at_s: float
    users: int
    signal_by_pod: dict[str, float]
    desired_replicas: int


def adapter_query(rules: Path = ADAPTER_RULES, namespace: str = NAMESPACE) -> str:
    """The adapter's metricsQuery with its template filled in for every pod of a
    namespace, grouped by pod, as the custom metrics API asks it."""
    match = re.search(r"metricsQuery:\s*'([^']+)'", rules.read_text())
    if match is None:
        raise ValueError(f"no metricsQuery in {rules}")
    query = match.group(1).replace("<<.GroupBy>>", "pod")
    return query.replace("<<.LabelMatchers>>", f'namespace="{namespace}",pod!=""')


def hpa_target(hpa: Path = HPA) -> float:
    """The HPA's averageValue target as a number ("200m" is 0.2)."""
    match = re.search(r"averageValue:\s*\"?([0-9.]+)(m?)\"?", hpa.read_text())
    if match is None:
        raise ValueError(f"no averageValue target in {hpa}")
    value = float(match.group(1))
    return value / 1000 if match.group(2) == "m" else value


def desired_replicas(current: int, values: list[float], target: float) -> int:
    """The HorizontalPodAutoscaler's formula for a Pods metric (mean over the pods)."""
    if not values:
        return current
    ratio = sum(values) / len(values) / target
    if abs(ratio - 1.0) <= HPA_TOLERANCE:
        return current
    return max(1, math.ceil(current * ratio))


def add_ramp_arguments(parser: argparse.ArgumentParser) -> None:
    """The ramp's options, for `bench replicas --autoscale` (--replicas and --repository
    are the replicas bench's own)."""
    ramp_options = parser.add_argument_group("with --autoscale: the HPA signal under a ramp")
    ramp_options.add_argument(
        "--autoscale",
        action="store_true",
        help="instead of the topologies: a locust step ramp on --replicas replicas with a "
        "real Prometheus, sampling the HPA's signal and the replicas it would ask for",
    )
    ramp_options.add_argument("--users", type=int, default=16, help="peak users (default 16)")
    ramp_options.add_argument("--run-time", default="4m", help="the ramp, 4 steps (default 4m)")
    ramp_options.add_argument("--sample-s", type=float, default=5.0, help="sampling period (5 s)")
    ramp_options.add_argument(
        "--out", type=Path, default=BUILD_DIR / "autoscale", help="JSON, PNG, locust files"
    )
    ramp_options.add_argument("--plot", type=Path, help="also write the PNG here (docs/...)")


def run_ramp(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    args.repository = prepared_repository(
        args.repository, args.replicas
    )  # sized for the replicas, as `serve` does
    options = ReplicaSetOptions(
        replicas=args.replicas,
        repository=args.repository,
        public_host="127.0.0.1",
        public_ports=Ports(grpc=free_port(), http=free_port(), metrics=free_port()),
        health_port=free_port(),
        run_dir=args.out / "replicas",
        guard=GuardLimits(max_body_bytes=257 * 1024 * 1024),
    )
    query, target = adapter_query(), hpa_target()
    print(f"signal: {query}\nHPA target: {target} s per study", flush=True)
    with ReplicaSet(options) as replicas:
        targets = replicas.scrape_targets()
        with PrometheusServer(
            list(targets),
            port=free_port(),
            data_dir=args.out / "prometheus",
            interval_s=2.0,
            target_labels=targets,
        ) as prometheus:
            points = ramp(args, prometheus, query, target, replicas.options.public_ports.grpc)
    report(args, points, query, target)
    return 0


def ramp(
    args: argparse.Namespace,
    prometheus: PrometheusServer,
    query: str,
    target: float,
    grpc_port: int,
) -> list[Point]:
    """Locust's step ramp in the background, the signal sampled meanwhile."""
    locust = argparse.Namespace(
        scenario=SCENARIOS_DIR / "step_ramp.py",
        users=args.users,
        spawn_rate=float(args.users),
        run_time=args.run_time,
        host=f"127.0.0.1:{grpc_port}",
        deadline_s=120.0,
        root_cert=None,
        client_key=None,
        client_cert=None,
        tls=False,
        user_class=[],
    )
    done = threading.Event()
    codes: list[int] = []

    def run_locust() -> None:
        codes.append(execute(locust, args.out))
        done.set()

    worker = threading.Thread(target=run_locust)
    duration = _seconds(args.run_time)
    started = time.monotonic()
    worker.start()
    points = []
    while not done.wait(args.sample_s):
        at = time.monotonic() - started
        users = step_users(at, args.users, duration)
        if users is None:  # the ramp is over; locust is stopping
            continue
        values = {sample.labels["pod"]: sample.value for sample in prometheus.query(query)}
        desired = desired_replicas(args.replicas, list(values.values()), target)
        points.append(Point(round(at, 1), users, values, desired))
        signal = ", ".join(f"{pod} {value * 1e3:.0f} ms" for pod, value in sorted(values.items()))
        print(f"{at:6.0f} s  {users:3d} users  {signal}  -> {desired} replicas", flush=True)
    worker.join()
    if codes and codes[0] not in (0, 1):
        print(f"warning: locust exited with {codes[0]}; see {args.out / 'locust.log'}")
    return points


def _seconds(run_time: str) -> float:
    from abdoserve.loadtests.cli import run_time_s

    return float(run_time_s(run_time))


def report(args: argparse.Namespace, points: list[Point], query: str, target: float) -> None:
    result = {
        "query": query,
        "target_s": target,
        "replicas": args.replicas,
        "users": args.users,
        "points": [asdict(point) for point in points],
    }
    (args.out / "autoscale.json").write_text(json.dumps(result, indent=2) + "\n")
    for path in (args.out / "autoscale.png", args.plot):
        if path is not None:
            plot(points, target, path)
            print(f"plot: {path}")


def plot(points: Sequence[Point], target_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    times = [point.at_s for point in points]
    figure, (load, signal, replicas) = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    load.step(times, [point.users for point in points], where="post", color="C0")
    load.set(ylabel="locust users", title="step ramp of the hospital-day mix")
    pods = sorted({pod for point in points for pod in point.signal_by_pod})
    for index, pod in enumerate(pods):
        values = [1e3 * point.signal_by_pod.get(pod, float("nan")) for point in points]
        signal.plot(times, values, label=pod, color=f"C{index + 1}")
    signal.axhline(1e3 * target_s, color="k", linestyle="--", label="HPA target")
    signal.set(ylabel="queue ms per study", title="the adapter's metric, per pod")
    signal.legend(fontsize="small")
    replicas.step(times, [point.desired_replicas for point in points], where="post", color="C3")
    replicas.set(ylabel="replicas", xlabel="s", title="what the HPA would ask for")
    for axis in (load, signal, replicas):
        axis.grid(True, alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, format="png")
    plt.close(figure)
