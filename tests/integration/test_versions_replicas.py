"""Versions through `abdoserve serve --replicas 2` and the `abdoserve model` commands, as an
operator runs them (issue 20, item 3), under the hospital-day locust traffic: each
command reaches one replica through the balancer, the supervisors carry it to the
other, the repository keeps it, traffic loses nothing, and a broken candidate in canary
is rolled back by the disagreement bound with the alert firing in a real Prometheus.

The repository holds bone_density_ct version 1 (the build), 2 (version 1 shifted by
0.05 g/cm2, `model import` of a PyTorch checkpoint) and 3 (an ONNX graph that answers
0.3 g/cm^2 whatever it sees: osteoporosis for every study, where version 1 flags none of
the phantoms).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, save
from prometheus_client.parser import text_string_to_metric_families

from abdoserve.deploy.embedded import free_port
from abdoserve.deploy.prometheus_server import PrometheusServer
from abdoserve.deploy.version_sync import routing_on_disk
from abdoserve.export.model_card import CARD_FILE, read_card
from abdoserve.export.model_import import import_model
from abdoserve.export.onnx_export import OPSET
from abdoserve.export.phantom import TASK_NAMES, build_study
from abdoserve.export.reference import TorchReference
from abdoserve.export.weights import reference_network
from abdoserve.loadtests.slo import AGGREGATED, read_stats
from abdoserve.preprocessing.study import StudyPreparer
from abdoserve.preprocessing.tasks import get_task
from abdoserve.serving.task_models import TaskModels, on_disk
from abdoserve_client import AbdoServeClient
from tests.integration.serve_process import (
    ABDOSERVE,
    free_ports,
    small_serve,
    start_serve,
    stop_serve,
)
from tests.integration.test_loadtests import Run, run_scenario

TASK = "bone_density_ct"
SPEC = get_task(TASK)
# `serve`'s default shape: the fused model holds the routing, and its versions lie
# beside its code (abdoserve.serving.task_models)
MODELS = TaskModels(TASK, fused=True)
STUDIES = 40
WAIT_S = 240.0


def constant_graph(path: Path, value: float) -> Path:
    """A `_net` that fits the contract and answers `value` for every sample."""
    samples = helper.make_tensor_value_info("samples", TensorProto.FLOAT, ["N", 1, 192, 192])
    output = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1])
    nodes = [
        helper.make_node("ReduceMean", ["samples"], ["mean"], axes=[2, 3], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["zeroed"]),
        helper.make_node("Add", ["zeroed", "value"], ["output"]),
    ]
    constants = [
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("value", TensorProto.FLOAT, [], [value]),
    ]
    graph = helper.make_graph(nodes, "constant", [samples], [output], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    save(model, str(path))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version 2: version 1's network with its last bias raised by 0.05 g/cm2, a
    'retrained' network that differs measurably and agrees on every phantom's flag (a
    canary of it must not trip the disagreement bound)."""
    module = reference_network(SPEC).module
    last = [layer for layer in module.modules() if isinstance(layer, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias += 0.05
    path = tmp_path_factory.mktemp("hospital") / "hospital.pt"
    torch.save(module.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Path:
    from abdoserve.export.repository import build_repository

    out = tmp_path_factory.mktemp("versions") / "model_repository"
    build_repository(out)  # every task: the hospital-day traffic sends them all
    assert on_disk(out, TASK) == MODELS
    assert import_model(out, TASK, checkpoint).version == 2
    broken = constant_graph(tmp_path_factory.mktemp("broken") / "broken.onnx", 0.3)
    assert import_model(out, TASK, broken).version == 3
    return out


@pytest.fixture(scope="module")
def references(checkpoint: Path) -> dict[int, dict[int, np.ndarray]]:
    networks = {1: TorchReference(SPEC, None), 2: TorchReference(SPEC, checkpoint)}
    preparer = StudyPreparer(SPEC)
    found: dict[int, dict[int, np.ndarray]] = {1: {}, 2: {}, 3: {}}
    for seed in range(STUDIES):
        study = build_study(TASK, seed=seed)
        samples = preparer(study.instances, study.clinical).samples
        for version, network in networks.items():
            found[version][seed] = network(samples)
        found[3][seed] = np.full((samples.shape[0], 1), 0.3, dtype=np.float32)
    return found


@dataclass
class Launched:
    process: subprocess.Popen[str]
    ports: dict[str, int]
    home: Path
    output: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def model(self, *words: str, code: int = 0) -> str:
        """`abdoserve model ...` as the operator who started serve runs it (same HOME:
        the admin key serve kept), through the balancer."""
        done = subprocess.run(
            [ABDOSERVE, "model", *words, "--url", self.url],
            capture_output=True,
            text=True,
            env={**os.environ, "HOME": str(self.home)},
            timeout=600,
            check=False,
        )
        assert done.returncode == code, done.stdout + done.stderr
        return done.stdout

    def metric(self, replica: int, name: str, **labels: str) -> float:
        """A replica's own Triton metric (its public metrics port), summed over samples."""
        port = self.ports["metrics"] + 10 * (replica - 1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )


@pytest.fixture(scope="module")
def launched(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    folder = tmp_path_factory.mktemp("serve")
    home = tmp_path_factory.mktemp("operator")
    ports = free_ports()
    arguments = [
        "--replicas=2",
        *small_serve(repository, ports, folder),
        "--rollback-window-s=30",
        "--rollback-min-studies=8",
    ]
    environment = {**os.environ, "HOME": str(home)}
    environment.pop("ABDOSERVE_ADMIN_KEY", None)
    output: list[str] = []
    process = start_serve(arguments, output, wait_s=WAIT_S, env=environment)
    yield Launched(process, ports, home, output)
    stop_serve(process, output)
    assert not (home / ".abdoserve" / f"admin-key-{ports['grpc']}").exists()


def wait_until(condition: object, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.5)


class Traffic:
    """Two threads of distinct studies through the balancer; every failure kept."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.studies = [build_study(TASK, seed=seed) for seed in range(STUDIES)]
        self.failures: list[str] = []
        self.answered = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(2)]

    def _run(self, offset: int) -> None:
        with AbdoServeClient(self.url, timeout_s=60) as client:
            turn = offset
            while not self._stop.is_set():
                study = self.studies[turn % STUDIES]
                turn += 2
                try:
                    client.infer(TASK, study.instances, study.clinical)
                    self.answered += 1
                except Exception as error:  # every failure is a finding
                    self.failures.append(f"{type(error).__name__}: {error}")

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def answered_versions(
    launched: Launched, references: dict[int, dict[int, np.ndarray]], seeds: range
) -> dict[int, int]:
    """Per study: the version its answer names, checked against that version's numbers."""
    found = {}
    with AbdoServeClient(launched.url, timeout_s=60) as client:
        for seed in seeds:
            study = build_study(TASK, seed=seed)
            result = client.infer(TASK, study.instances, study.clinical)
            version = int(result.model.version)
            scores = np.asarray(result.image_values, dtype=np.float32).reshape(-1, 1)
            assert np.max(np.abs(scores - references[version][seed])) <= 1e-4, (seed, version)
            found[seed] = version
    return found


def versions_kept_when_sent_again(
    launched: Launched, references: dict[int, dict[int, np.ndarray]]
) -> dict[int, int]:
    """Each study twice (round robin: the other replica the second time); a study keeps
    its version, unless its candidate call failed and production answered it (route
    fallback, by design: counted, never a lost study). The first pass's versions."""
    fallbacks = fallback_answers(launched)
    first = answered_versions(launched, references, range(STUDIES))
    again = answered_versions(launched, references, range(STUDIES))
    changed = {seed for seed in first if again[seed] != first[seed]}
    assert all({first[seed], again[seed]} == {1, 2} for seed in changed), (first, again)
    assert len(changed) <= fallback_answers(launched) - fallbacks, (first, again)
    return first


def fallback_answers(launched: Launched) -> float:
    """Studies production answered because the candidate failed, on both replicas."""
    return sum(
        launched.metric(replica, "abdoserve_version_answers_total", route="fallback")
        for replica in (1, 2)
    )


def both_replicas_serve(
    launched: Launched, references: dict[int, dict[int, np.ndarray]], wanted: set[int]
) -> bool:
    """Round robin: 6 studies in a row reach both replicas; all answered as `wanted`."""
    return set(answered_versions(launched, references, range(6)).values()) <= wanted


def card_of(repository: Path, version: int) -> str:
    return read_card(repository / MODELS.versions / str(version) / CARD_FILE).card_id


def test_list_shows_the_built_version_serving_and_the_imported_ones_with_cards(
    launched: Launched, repository: Path
) -> None:
    lines = launched.model("list", TASK).splitlines()
    assert lines[0] == TASK
    assert lines[1].split()[:4] == ["1", "serving", "IN", "PROCESS"]
    for line, version in zip(lines[2:4], ("2", "3"), strict=True):
        words = line.split()
        assert words[:4] == [version, "retired", "not", "loaded"]
        assert words[-4:] == ["card", card_of(repository, int(version)), "validation", "-"]


def test_import_validate_shadow_canary_promote_rollback_across_replicas_with_nothing_lost(
    launched: Launched,
    repository: Path,
    references: dict[int, dict[int, np.ndarray]],
    tmp_path: Path,
) -> None:
    from abdoserve.export.phantom.cohort import write_cohort

    cohort = tmp_path / "cohort"
    write_cohort(TASK, 10, cohort, seed=3)
    # Phantom labels test the plumbing, not the weights: thresholds any network passes.
    lenient = tmp_path / "thresholds.json"
    lenient.write_text(json.dumps({TASK: {"mae": {"max": 100.0}}}))
    runs: list[Run] = []
    locust = threading.Thread(
        target=lambda: runs.append(hospital_day(launched.url, tmp_path / "locust", "150s"))
    )
    locust.start()
    with Traffic(launched.url) as traffic:
        launched.model("promote", TASK, "2", code=2)  # never validated: refused
        printed = launched.model(
            "validate",
            TASK,
            "2",
            "--studies",
            str(cohort),
            "--labels",
            str(cohort / "labels.csv"),
            "--out",
            str(tmp_path / "report"),
            "--thresholds",
            str(lenient),
            "--repository",
            str(repository),
        )
        assert "10 studies" in printed and "passed" in printed, printed
        assert (tmp_path / "report" / "report.md").is_file()
        assert read_card(repository / MODELS.versions / "2" / CARD_FILE).acceptance is not None
        wait_until(
            lambda: "validation passed" in launched.model("list", TASK), "the verdict read in"
        )
        launched.model("shadow", TASK, "2", "--percent", "100")
        pair = {"task": TASK, "answering": "1", "companion": "2"}
        wait_until(
            lambda: all(
                launched.metric(replica, "abdoserve_version_score_delta_count", **pair) > 0
                for replica in (1, 2)
            ),
            "both replicas comparing version 2 with version 1",
        )
        assert both_replicas_serve(launched, references, {1})

        launched.model("canary", TASK, "2", "--percent", "25")
        wait_until(
            lambda: all(
                launched.metric(replica, "abdoserve_version_answers_total", route="canary") > 0
                for replica in (1, 2)
            ),
            "both replicas answering the canary",
        )
        first = versions_kept_when_sent_again(launched, references)
        share = sum(version == 2 for version in first.values()) / STUDIES
        assert 0.10 <= share <= 0.45, share
        assert routing_on_disk(repository / MODELS.router).mode == "canary"

        launched.model("promote", TASK, "2")
        wait_until(lambda: both_replicas_serve(launched, references, {2}), "version 2 everywhere")
        listed = launched.model("list", TASK)
        assert "previous" in listed and "serving" in listed

        launched.model("rollback", TASK)
        wait_until(lambda: both_replicas_serve(launched, references, {1}), "version 1 again")
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.answered > 0
    on_disk = routing_on_disk(repository / MODELS.router)
    assert (on_disk.production, on_disk.candidate) == (1, None)
    # The hospital day through the guard, all five tasks, across every transition.
    locust.join()
    [run] = runs
    assert run.exit_code == 0
    rows = read_stats(run.out / "stats_stats.csv")
    assert {row.name for row in rows} == {*TASK_NAMES, AGGREGATED}
    assert all(row.failures == 0 and row.requests > 0 for row in rows), rows


def hospital_day(url: str, out: Path, run_time: str) -> Run:
    return run_scenario(
        url, out, "hospital_day", "--users", "4", "--spawn-rate", "4", "--run-time", run_time
    )


def test_a_broken_canary_is_rolled_back_by_disagreement_and_the_alert_fires(
    launched: Launched, repository: Path, tmp_path: Path
) -> None:
    supervisors = [f"127.0.0.1:{launched.ports['health'] + 10 * i}" for i in range(2)]
    with (
        PrometheusServer(
            [f"127.0.0.1:{launched.ports['metrics'] + 10 * i}" for i in range(2)],
            port=free_port(),
            data_dir=tmp_path,
            interval_s=1,
            supervisor_targets=supervisors,
        ) as prometheus,
        Traffic(launched.url) as traffic,
    ):
        assert "version 3 was never validated" in launched.model("promote", TASK, "3", code=2)
        launched.model("canary", TASK, "3", "--percent", "50")
        wait_until(
            lambda: (
                "automatic rollback of version 3: disagreement"
                in routing_on_disk(repository / MODELS.router).reason
            ),
            "the supervisors to roll version 3 back",
        )
        firing = 'ALERTS{alertname="AbdoServeCanaryRolledBack",alertstate="firing"}'
        wait_until(lambda: prometheus.query(firing) != [], "the alert to fire")
        [alert, *_] = prometheus.query(firing)
    assert traffic.failures == [], traffic.failures[:5]
    assert (alert.labels["task"], alert.labels["version"], alert.labels["bound"]) == (
        TASK,
        "3",
        "disagreement",
    )
    listed = launched.model("list", TASK)
    assert "automatic rollback of version 3: disagreement with production" in listed
