"""The PNG of `abdoserve bench autoscale`: users, the autoscaling signal per pod against
the HPA's target, and the replica count the HPA would ask for, over time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from abdoserve.loadtests.bench.autoscale import Point


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
