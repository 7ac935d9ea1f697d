"""Versions side by side on a live server (issue 20, item 3), through the model commands'
own code (abdoserve.deploy.versions) against Triton 2.51: a one-task ensemble repository
whose `_net` holds version 1 (the build) and version 2 (`model import`, other weights).
The ensemble is what a GPU server runs; `serve`'s default fused shape has its own
lifecycle tests (test_versions_fused.py, test_versions_replicas.py, test_versions_pod.py).

Each answer is checked against the PyTorch network of the version it names, so a
wrong label on the right numbers (or the reverse) fails. Traffic runs through every
transition and must lose nothing.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
from prometheus_client.parser import text_string_to_metric_families

from abdoserve.deploy.embedded import EmbeddedServer, ServerOptions, free_ports
from abdoserve.deploy.versions import VersionControl, VersionError, canary, promote, rollback
from abdoserve.deploy.versions import shadow as shadow_of
from abdoserve.export.architectures import build_network
from abdoserve.export.model_import import import_model
from abdoserve.export.phantom import build_study
from abdoserve.export.reference import TorchReference
from abdoserve.export.weights import initialise
from abdoserve.preprocessing.study import StudyPreparer
from abdoserve.preprocessing.tasks import get_task
from abdoserve.serving.routing import Routing
from tests.integration.triton_calls import Served, infer

TASK = "bone_density_ct"
SPEC = get_task(TASK)
STUDIES = 60  # distinct studies (seeds), each with its own key


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    module = build_network(SPEC)
    initialise(module, 99)
    path = tmp_path_factory.mktemp("hospital") / "hospital.pt"
    torch.save(module.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Path:
    from abdoserve.export.repository import build_repository

    out = tmp_path_factory.mktemp("versions") / "model_repository"
    build_repository(out, (TASK,), pipeline="ensemble")  # the fused shape: test_versions_fused
    assert import_model(out, TASK, checkpoint).version == 2
    return out


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    log_file = tmp_path_factory.mktemp("triton") / "triton.log"
    options = ServerOptions(repository=repository, ports=free_ports(), log_file=log_file)
    with EmbeddedServer(options) as running:
        yield running


@pytest.fixture(scope="module")
def references(checkpoint: Path) -> dict[int, dict[int, np.ndarray]]:
    """Per version, per study seed: the PyTorch network's per-sample values."""
    networks = {1: TorchReference(SPEC, None), 2: TorchReference(SPEC, checkpoint)}
    preparer = StudyPreparer(SPEC)
    found: dict[int, dict[int, np.ndarray]] = {1: {}, 2: {}}
    for seed in range(STUDIES):
        study = build_study(TASK, seed=seed)
        samples = preparer(study.instances, study.clinical).samples
        for version, network in networks.items():
            found[version][seed] = network(samples)
    return found


@pytest.fixture
def control(server: EmbeddedServer) -> Iterator[VersionControl]:
    client = triton_grpc.InferenceServerClient(f"{server.options.host}:{server.ports.grpc}")
    yield VersionControl(client, server.options.admin_key)
    # Back to version 1 alone for the next test, whatever this one left.
    control = VersionControl(client, server.options.admin_key)
    current = control.state(TASK).routing
    if current != Routing(production=1, generation=current.generation):
        control.apply(TASK, lambda r, _: Routing(production=1, generation=r.generation + 1))
    client.close()


def ask(server: EmbeddedServer, seed: int) -> Served:
    study = build_study(TASK, seed=seed)
    with triton_grpc.InferenceServerClient(f"{server.options.host}:{server.ports.grpc}") as client:
        return infer(client, TASK, study.instances, study.clinical)


def version_of(served: Served, seed: int, references: dict[int, dict[int, np.ndarray]]) -> int:
    """The version the answer names, checked against the numbers: they are that version's
    network's, and not the other's."""
    named = int(served.answer["model"]["version"])
    other = 2 if named == 1 else 1
    assert np.max(np.abs(served.scores - references[named][seed])) <= 1e-4
    assert np.max(np.abs(served.scores - references[other][seed])) > 1e-3
    return named


class Traffic:
    """Studies sent one after another from a thread, through every transition."""

    def __init__(self, server: EmbeddedServer) -> None:
        self.server = server
        self.failures: list[str] = []
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        seed = 0
        while not self._stop.is_set():
            try:
                ask(self.server, seed % STUDIES)
                self.answered += 1
            except Exception as error:
                self.failures.append(f"{type(error).__name__}: {error}")
            seed += 1


def metric(server: EmbeddedServer, name: str, **labels: str) -> float:
    """The sum of a metric's samples with these labels on Triton's /metrics."""
    url = f"http://{server.options.host}:{server.ports.metrics}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def test_the_built_version_serves_and_the_imported_one_waits(
    server: EmbeddedServer, control: VersionControl, references: dict[int, dict[int, np.ndarray]]
) -> None:
    state = control.state(TASK)
    assert state.routing.production == 1 and state.routing.candidate is None
    assert state.loaded == {1: "READY"}
    assert {version_of(ask(server, seed), seed, references) for seed in range(5)} == {1}


def test_a_canary_answers_its_share_each_study_keeps_its_version_and_nothing_fails(
    server: EmbeddedServer, control: VersionControl, references: dict[int, dict[int, np.ndarray]]
) -> None:
    with Traffic(server) as traffic:
        routing = control.apply(TASK, lambda r, _: canary(r, 2, 25.0))
        answered = {
            seed: version_of(ask(server, seed), seed, references) for seed in range(STUDIES)
        }
        again = {seed: version_of(ask(server, seed), seed, references) for seed in range(STUDIES)}
    assert traffic.failures == [] and traffic.answered > 0
    assert again == answered
    share = sum(version == 2 for version in answered.values()) / STUDIES
    assert 0.10 <= share <= 0.40, share
    assert routing.mode == "canary" and control.state(TASK).loaded == {1: "READY", 2: "READY"}
    # Production ran beside each canary answer: their comparisons are on /metrics.
    pair = {"task": TASK, "answering": "2", "companion": "1"}
    assert metric(server, "abdoserve_version_comparisons_total", **pair) > 0
    assert metric(server, "abdoserve_version_answers_total", version="2", route="canary") > 0


def test_a_shadow_never_answers_and_its_agreement_reaches_prometheus(
    server: EmbeddedServer, control: VersionControl, references: dict[int, dict[int, np.ndarray]]
) -> None:
    control.apply(TASK, lambda r, _: shadow_of(r, 2, 100.0))
    named = {version_of(ask(server, seed), seed, references) for seed in range(10)}
    assert named == {1}
    pair = {"task": TASK, "answering": "1", "companion": "2"}
    deadline = time.monotonic() + 60  # the comparisons run after the answers
    while metric(server, "abdoserve_version_score_delta_count", **pair) < 10:
        assert time.monotonic() < deadline, "the shadow's comparisons never reached /metrics"
        time.sleep(0.2)
    # |Δ| between two different networks: measurably above zero.
    assert metric(server, "abdoserve_version_score_delta_sum", **pair) > 10 * 1e-3


def test_promote_then_rollback_with_no_request_lost(
    server: EmbeddedServer, control: VersionControl, references: dict[int, dict[int, np.ndarray]]
) -> None:
    with Traffic(server) as traffic:
        promoted = control.apply(TASK, lambda r, now: promote(r, 2, now, 600.0))
        after_promote = {version_of(ask(server, seed), seed, references) for seed in range(8)}
        assert control.state(TASK).loaded == {1: "READY", 2: "READY"}  # kept for rollback
        rolled = control.apply(TASK, rollback)
        after_rollback = {version_of(ask(server, seed), seed, references) for seed in range(8)}
    assert (after_promote, after_rollback) == ({2}, {1})
    assert promoted.previous == 1 and rolled.production == 1 and rolled.previous is None
    assert traffic.failures == [] and traffic.answered > 0
    with pytest.raises(VersionError, match="nothing to roll back"):
        control.apply(TASK, rollback)


def test_a_version_that_is_not_there_is_refused_and_nothing_changes(
    server: EmbeddedServer, control: VersionControl, references: dict[int, dict[int, np.ndarray]]
) -> None:
    before = control.state(TASK).routing
    with pytest.raises(
        VersionError, match=r"bone_density_ct_net could not load version 7 \(not in"
    ):
        control.apply(TASK, lambda r, _: canary(r, 7, 10.0))
    assert control.state(TASK).routing == before
    assert {version_of(ask(server, seed), seed, references) for seed in range(3)} == {1}


def test_validate_sends_the_cohort_alone_to_the_version_and_reports_its_metrics(
    server: EmbeddedServer,
    control: VersionControl,
    repository: Path,
    tmp_path: Path,
    references: dict[int, dict[int, np.ndarray]],
) -> None:
    """`abdoserve model validate`'s work against the server: the cohort's answers come
    from version 2 through the whole served path, every other study stays on version 1,
    and the routing is as before once it is done."""
    from abdoserve.deploy.validation import validate
    from abdoserve.export.phantom.cohort import write_cohort

    cohort = tmp_path / "cohort"
    write_cohort("bone_density_ct", 12, cohort, seed=5)
    before = control.state(TASK).routing
    answered: list[str] = []
    others: list[int] = []

    def send(study: object) -> dict[str, Any]:
        served = infer_study(server, study)
        answered.append(str(served["model"]["version"]))
        others.append(version_of(ask(server, 0), 0, references))  # a patient's study meanwhile
        return served

    report, verdict, path = validate(
        control,
        send,
        SPEC,
        2,
        studies=cohort,
        labels=cohort / "labels.csv",
        out=tmp_path / "report",
    )
    assert set(answered) == {"2"} and set(others) == {1}
    assert report.studies == 12 and {e.name for e in report.estimates} >= {"mae", "pearson_r"}
    assert path.read_text().startswith("# bone_density_ct version 2: acceptance on 12")
    assert (tmp_path / "report" / "bland_altman.png").is_file()
    assert len(verdict.lines) == 3
    after = control.state(TASK).routing
    assert (after.validating, after.validation_keys, after.production) == (None, (), 1)
    assert after.generation == before.generation + 2


def infer_study(server: EmbeddedServer, study: object) -> dict[str, Any]:
    with triton_grpc.InferenceServerClient(f"{server.options.host}:{server.ports.grpc}") as client:
        served = infer(client, TASK, study.instances, study.clinical)  # type: ignore[attr-defined]
    return served.answer
