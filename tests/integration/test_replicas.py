"""`abdoserve serve --replicas 2` under mixed traffic: one replica's tritonserver
SIGKILLed, another replica drained with SIGTERM; the client through nginx sees no
failure, every answer equals the in-process reference, and the replicas rejoin."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from abdoserve.deploy import stubs
from abdoserve.deploy.embedded import free_port
from abdoserve.deploy.prometheus_server import PrometheusServer
from abdoserve.export.configs import Tuning
from abdoserve.export.phantom import build_study
from abdoserve.loadtests.bench.autoscale import adapter_query
from abdoserve.preprocessing.tasks import TASKS
from abdoserve.serving.answer import aggregate
from abdoserve_client import AbdoServeClient
from tests.integration.reference import RELATIVE_TOLERANCE, in_process_reference, relative_error
from tests.integration.serve_process import free_ports, small_serve, start_serve, stop_serve

SERVED = ("bone_density_ct", "liver_fibrosis_ct")
TUNING = Tuning(preprocess_instances=1, net_instances=1, net_intra_op_threads=1)
WAIT_S = 300.0
TRAFFIC_S = 30.0


@dataclass
class Launched:
    process: subprocess.Popen[str]
    grpc: int
    metrics: int
    health: int
    run_dir: Path
    output: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def replica_pid(self, index: int) -> int:
        spec = str(self.run_dir / f"replica-{index}" / "options.json")
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and self._argv(entry)[-1:] == [spec]:
                return int(entry.name)
        raise AssertionError(f"no process for replica {index}")

    def triton_pid(self, index: int) -> int:
        parent = self.replica_pid(index)
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and stubs.parent_of(int(entry.name)) == parent:
                argv = self._argv(entry)
                if argv and argv[0].endswith("tritonserver"):
                    return int(entry.name)
        raise AssertionError(f"no tritonserver under replica {index}")

    @staticmethod
    def _argv(entry: Path) -> list[str]:
        try:
            return (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
        except OSError:
            return []

    def ready(self, index: int) -> bool:
        """Replica `index`'s supervisor health, through the balancer's port for it."""
        url = f"http://127.0.0.1:{self.health + 10 * (index - 1)}/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def successes(self, index: int) -> float:
        """Ensemble successes counted by replica `index`'s own Triton."""
        url = f"http://127.0.0.1:{self.metrics + 10 * (index - 1)}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("nv_inference_request_success")
            and any(f'model="{task}"' in line for task in SERVED)
        )


def wait_until(condition: object, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from abdoserve.export.repository import build_repository

    out = tmp_path_factory.mktemp("replicas") / "model_repository"
    build_repository(out, SERVED, tuning=TUNING)
    return out


@pytest.fixture(scope="module")
def launched(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    folder = tmp_path_factory.mktemp("serve")
    ports = free_ports()
    arguments = [
        "--replicas=2",
        *small_serve(repository, ports, folder),
    ]
    output: list[str] = []
    process = start_serve(arguments, output, wait_s=WAIT_S)
    run = Launched(
        process, ports["grpc"], ports["metrics"], ports["health"], folder / "replicas", output
    )
    yield run
    stop_serve(process, output)
    leftovers = [
        entry.name
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit()
        and any(str(path) in " ".join(Launched._argv(entry)) for path in (run.run_dir, repository))
    ]
    assert not leftovers, "replicas, servers or stubs outlived the launcher"


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    """Per task, the study answer the in-process reference gives for the traffic's study."""
    found = {}
    for task in SERVED:
        study = build_study(task, seed=7)
        scores = in_process_reference(task, study.instances, dict(study.clinical))
        found[task] = aggregate(TASKS[task].output, scores)
    return found


class Traffic:
    """Four threads of mixed studies through the balancer, each answer checked."""

    def __init__(self, url: str, expected: dict[str, np.ndarray]) -> None:
        self.url = url
        self.expected = expected
        self.studies = {task: build_study(task, seed=7) for task in SERVED}
        self.answered = 0
        self.longest_s = 0.0  # the longest call, answered or not
        self.failures: list[str] = []
        self.wrong: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(4)]

    def _run(self, offset: int) -> None:
        with AbdoServeClient(self.url, timeout_s=60) as client:
            turn = offset
            while not self._stop.is_set():
                task = SERVED[turn % len(SERVED)]
                turn += 1
                study = self.studies[task]
                started = time.monotonic()
                try:
                    values = client.infer(task, study.instances, study.clinical).study_values
                except Exception as error:  # every failure is a finding: keep it
                    self.failures.append(f"{task}: {error}")
                    continue
                finally:
                    self.longest_s = max(self.longest_s, time.monotonic() - started)
                self.answered += 1
                if relative_error(values, self.expected[task]) > RELATIVE_TOLERANCE:
                    self.wrong.append(task)

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def test_a_killed_replica_loses_no_request_and_rejoins(
    launched: Launched, expected: dict[str, np.ndarray]
) -> None:
    killed = launched.triton_pid(1)
    with Traffic(launched.url, expected) as traffic:
        time.sleep(TRAFFIC_S / 3)
        before = traffic.answered
        stubs.kill(killed)
        time.sleep(TRAFFIC_S * 2 / 3)
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.wrong == []
    assert before > 0 and traffic.answered > before
    # Replica 1 runs a new server and takes requests again.
    wait_until(lambda: launched.ready(1) and launched.ready(2), "both replicas ready")
    assert launched.triton_pid(1) != killed
    served_before = launched.successes(1)
    with AbdoServeClient(launched.url, timeout_s=60) as client:
        study = build_study(SERVED[0], seed=7)
        for _ in range(8):  # round robin: half of them reach replica 1
            client.infer(SERVED[0], study.instances)
    assert launched.successes(1) > served_before


def test_a_frozen_replica_is_restarted_and_its_calls_fail_over(
    launched: Launched, expected: dict[str, np.ndarray]
) -> None:
    """SIGSTOP of one replica's tritonserver for 30 s: before, the calls on it waited
    their whole deadline and none completed for 30 s; nothing restarted it."""
    wait_until(lambda: launched.ready(1) and launched.ready(2), "both replicas ready")
    frozen = launched.triton_pid(1)
    with Traffic(launched.url, expected) as traffic:
        time.sleep(TRAFFIC_S / 3)
        before = traffic.answered
        os.kill(frozen, signal.SIGSTOP)
        time.sleep(TRAFFIC_S)  # as long as the freeze that stalled every call before
        with contextlib.suppress(ProcessLookupError):  # it should be long gone
            os.kill(frozen, signal.SIGCONT)
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.wrong == []
    assert traffic.answered > before
    assert traffic.longest_s < TRAFFIC_S / 2, f"a call took {traffic.longest_s:.1f} s"
    assert stubs.process_state(frozen) is None, "the frozen server was not killed"
    wait_until(lambda: launched.ready(1) and launched.ready(2), "both replicas ready")
    assert launched.triton_pid(1) != frozen


def test_a_drained_replica_loses_no_request(
    launched: Launched, expected: dict[str, np.ndarray]
) -> None:
    wait_until(lambda: launched.ready(1) and launched.ready(2), "both replicas ready")
    drained = launched.replica_pid(2)
    with Traffic(launched.url, expected) as traffic:
        time.sleep(TRAFFIC_S / 3)
        before = traffic.answered
        os.kill(drained, signal.SIGTERM)
        time.sleep(TRAFFIC_S * 2 / 3)
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.wrong == []
    assert traffic.answered > before > 0
    log = (launched.run_dir / "replica-2" / "replica.log").read_text()
    assert "replica 2 draining" in log and "replica 2 stopped (tritonserver exit code 0)" in log
    wait_until(lambda: launched.replica_pid(2) != drained and launched.ready(2), "replica 2 back")


def test_the_generated_scrape_config_feeds_the_autoscaling_signal_per_replica(
    launched: Launched, expected: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """A real Prometheus on the launcher's scrape config (each replica labelled as a pod),
    the recording rules loaded: the prometheus-adapter's own query answers per replica,
    and it reads a queue once studies wait."""
    config = json.loads((launched.run_dir / "prometheus.yml").read_text())
    [triton, supervisors] = config["scrape_configs"]
    groups = triton["static_configs"]
    targets = {group["targets"][0]: group["labels"] for group in groups}
    assert {labels["pod"] for labels in targets.values()} == {
        "abdoserve-replica-1",
        "abdoserve-replica-2",
    }
    assert len(supervisors["static_configs"][0]["targets"]) == 2
    query = adapter_query()
    with PrometheusServer(
        list(targets), port=free_port(), data_dir=tmp_path, interval_s=1, target_labels=targets
    ) as prometheus:
        pods = {"abdoserve-replica-1", "abdoserve-replica-2"}

        def signal() -> dict[str, float]:
            return {sample.labels["pod"]: sample.value for sample in prometheus.query(query)}

        with Traffic(launched.url, expected) as traffic:  # four at once: studies queue
            wait_until(
                lambda: set(signal()) == pods and any(value > 0 for value in signal().values()),
                "both replicas in the signal, one with a queue",
            )
        values = signal()
    assert traffic.failures == []
    assert set(values) == {"abdoserve-replica-1", "abdoserve-replica-2"}
    assert all(value >= 0 for value in values.values())


def test_a_killed_balancer_is_started_again_and_loses_no_request(
    launched: Launched, expected: dict[str, np.ndarray]
) -> None:
    """nginx's master SIGKILLed (its workers would hold the ports): the launcher kills
    what is left of it, starts it again, and the client's retries ride it out."""
    wait_until(lambda: launched.ready(1) and launched.ready(2), "both replicas ready")
    pid_file = launched.run_dir / "balancer" / "nginx.pid"
    killed = int(pid_file.read_text())
    with Traffic(launched.url, expected) as traffic:
        time.sleep(TRAFFIC_S / 3)
        os.kill(killed, signal.SIGKILL)
        wait_until(
            lambda: pid_file.is_file() and pid_file.read_text().strip() not in ("", str(killed)),
            "a new balancer",
        )
        time.sleep(TRAFFIC_S / 3)
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.wrong == [] and traffic.answered > 0
