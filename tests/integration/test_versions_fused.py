"""Versions on the fused pipeline (issue 22: one model per task keeps the lifecycle):
`abdoserve serve` (fused by default) on a repository whose fused bone_density_ct holds an
imported version 2 beside its code, driven by the model commands as the operator who
started serve runs them. Canary splits studies by key and keeps a study on its version,
promote and rollback change the answering version with one reload each and no failed
request, and the repository keeps each change."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from abdoserve.deploy.version_sync import read_config, routing_on_disk
from abdoserve.export.model_import import import_model
from abdoserve.export.phantom import build_study
from abdoserve.export.weights import reference_network
from abdoserve.preprocessing.tasks import get_task
from abdoserve_client import AbdoServeClient
from tests.integration.serve_process import (
    ABDOSERVE,
    free_ports,
    small_serve,
    start_serve,
    stop_serve,
)
from tests.integration.test_versions_replicas import wait_until

TASK = "bone_density_ct"
STUDIES = 20


@dataclass
class Served:
    url: str
    home: Path
    repository: Path

    def model(self, *words: str) -> str:
        done = subprocess.run(
            [ABDOSERVE, "model", *words, "--url", self.url],
            capture_output=True,
            text=True,
            env={**os.environ, "HOME": str(self.home)},
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def versions(self) -> dict[int, str]:
        with AbdoServeClient(self.url, timeout_s=60) as client:
            return {
                seed: client.infer(TASK, study.instances, study.clinical).model.version
                for seed in range(STUDIES)
                for study in [build_study(TASK, seed=seed)]
            }


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from abdoserve.export.repository import build_repository

    folder = tmp_path_factory.mktemp("fused")
    repository = folder / "model_repository"
    build_repository(repository, [TASK])  # fused: the default with the CPU runtimes
    network = reference_network(get_task(TASK)).module
    with torch.no_grad():
        [*_, last] = [layer for layer in network.modules() if isinstance(layer, torch.nn.Linear)]
        last.bias += 0.05
    torch.save(network.state_dict(), folder / "hospital.pt")
    assert import_model(repository, TASK, folder / "hospital.pt").version == 2
    assert (repository / TASK / "2" / "model.onnx").is_file()
    home = tmp_path_factory.mktemp("operator")
    ports = free_ports()
    arguments = small_serve(repository, ports, folder)  # served in the shape it was built
    environment = {**os.environ, "HOME": str(home)}
    environment.pop("ABDOSERVE_ADMIN_KEY", None)
    output: list[str] = []
    process = start_serve(arguments, output, wait_s=240.0, env=environment)
    yield Served(f"127.0.0.1:{ports['grpc']}", home, repository)
    stop_serve(process, output)


class Traffic:
    """A thread of studies while the versions change; every failure kept."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.failures: list[str] = []
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        studies = [build_study(TASK, seed=seed) for seed in range(4)]
        with AbdoServeClient(self.url, timeout_s=60) as client:
            while not self._stop.is_set():
                study = studies[self.answered % len(studies)]
                try:
                    client.infer(TASK, study.instances, study.clinical)
                    self.answered += 1
                except Exception as error:  # every failure is a finding
                    self.failures.append(f"{type(error).__name__}: {error}")

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def test_canary_promote_and_rollback_on_the_fused_model_lose_nothing(served: Served) -> None:
    listed = served.model("list", TASK).splitlines()
    assert listed[1].split()[:4] == ["1", "serving", "IN", "PROCESS"], listed
    assert listed[2].split()[:2] == ["2", "retired"], listed
    with Traffic(served.url) as traffic:
        served.model("canary", TASK, "2", "--percent", "50")
        split = served.versions()
        assert set(split.values()) == {"1", "2"}, split
        assert served.versions() == split  # a study sent again keeps its version
        served.model("promote", TASK, "2", "--force", "--reason", "fused test: no cohort")
        assert set(served.versions().values()) == {"2"}
        served.model("rollback", TASK)
        assert set(served.versions().values()) == {"1"}
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.answered > 0
    wait_until(
        lambda: routing_on_disk(served.repository / TASK).reason.startswith("rolled back"),
        "the rollback written into the repository",
    )
    on_disk = routing_on_disk(served.repository / TASK)
    assert (on_disk.production, on_disk.previous) == (1, None)
    # The fused model's own Triton version stays its code's: 1.
    assert list(read_config(served.repository / TASK).version_policy.specific.versions) == [1]


def test_the_maps_of_a_fused_answer_come_from_the_version_that_answered(served: Served) -> None:
    """A fused build keeps the explanation model: it runs the version the answer names
    in its own process and checks the twin against it, for the build's version and for
    the imported one."""
    study = build_study(TASK, seed=3)
    with AbdoServeClient(served.url, timeout_s=120) as client:
        answered = client.infer(TASK, study.instances, study.clinical)
        assert answered.model.version == "1"  # rolled back by the test above, or never moved
        for version in ("1", "2"):
            named = replace(answered, model=replace(answered.model, version=version))
            explained = client.explain(TASK, study.instances, named)
            assert explained.description["version"] == version
            assert explained.description["twin"]["max_abs_difference"] <= 1e-4
            assert len(explained.pngs) == len(explained.captures) == len(study.instances)


def test_validation_through_the_fused_model_records_its_figures_and_baseline(
    served: Served, tmp_path: Path
) -> None:
    import json

    from abdoserve.export.model_card import CARD_FILE, read_card
    from abdoserve.export.phantom.cohort import write_cohort
    from abdoserve.serving.drift_bins import REFERENCE_FILE

    cohort = tmp_path / "cohort"
    write_cohort(TASK, 6, cohort, seed=5)
    lenient = tmp_path / "thresholds.json"
    lenient.write_text(json.dumps({TASK: {"mae": {"max": 100.0}}}))
    printed = served.model(
        "validate", TASK, "2",
        "--studies", str(cohort), "--labels", str(cohort / "labels.csv"),
        "--out", str(tmp_path / "report"), "--thresholds", str(lenient),
        "--repository", str(served.repository),
    )  # fmt: skip
    assert "6 studies" in printed and "passed" in printed, printed
    folder = served.repository / TASK / "2"
    assert read_card(folder / CARD_FILE).acceptance is not None
    assert json.loads((folder / REFERENCE_FILE).read_text())["studies"] == 6
    assert "validation passed" in served.model("list", TASK)
