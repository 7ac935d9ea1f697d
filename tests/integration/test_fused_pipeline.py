"""The fused CPU pipeline (`--pipeline fused`): one Python model per task that answers
exactly as the ensemble does, refuses bad studies alone, and keeps its intake metrics."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from abdoserve.deploy.embedded import EmbeddedServer, ServerOptions, free_ports
from abdoserve.export.phantom import build_study
from abdoserve.export.repository import BUILD_RECORD, build_repository
from abdoserve.preprocessing.tasks import TASKS
from abdoserve_client import AbdoServeClient
from abdoserve_client.errors import AbdoServeError


@pytest.fixture(scope="module")
def fused(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    folder = tmp_path_factory.mktemp("fused")
    repository = folder / "model_repository"
    build_repository(repository, tuple(TASKS), pipeline="fused")
    options = ServerOptions(repository=repository, ports=free_ports(), log_file=folder / "log")
    with EmbeddedServer(options) as server:
        yield server


def url(server: EmbeddedServer) -> str:
    return f"{server.options.host}:{server.ports.grpc}"


def test_the_fused_repository_holds_one_model_per_task(fused: EmbeddedServer) -> None:
    repository: Path = fused.options.repository
    # one model per task, and beside it the explanation model, which runs the version
    # it explains in its own process
    assert sorted(fused.model_names()) == sorted([*TASKS, *(f"{task}_explain" for task in TASKS)])
    assert json.loads((repository / BUILD_RECORD).read_text())["pipeline"] == "fused"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_fused_task_answers_exactly_as_its_ensemble(
    fused: EmbeddedServer, grpc_url: str, task: str
) -> None:
    study = build_study(task, seed=31)
    with AbdoServeClient(url(fused)) as one, AbdoServeClient(grpc_url) as ensemble:
        assert one.task_info(task) == ensemble.task_info(task)  # the same published contract
        got = one.infer(task, study.instances, study.clinical)
        want = ensemble.infer(task, study.instances, study.clinical)
    np.testing.assert_array_equal(got.study_values, want.study_values)
    np.testing.assert_array_equal(got.image_values, want.image_values)
    assert got.model == want.model and got.model.untrained


def test_a_bad_study_is_refused_alone_in_a_fused_batch(fused: EmbeddedServer) -> None:
    task = "bone_density_ct"
    good = build_study(task, seed=32).instances
    truncated = [*good[:-1], good[-1][: len(good[-1]) // 3]]
    with AbdoServeClient(url(fused), retries=0, timeout_s=120) as client:
        reference = client.bone_density_ct(good).study_values

        def send(number: int) -> np.ndarray | AbdoServeError:
            try:
                study = truncated if number % 3 == 1 else good
                return client.bone_density_ct(study).study_values
            except AbdoServeError as error:
                return error

        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(send, range(9)))
        assert client.is_ready()
    for number, reply in enumerate(replies):
        if number % 3 == 1:
            assert isinstance(reply, AbdoServeError) and reply.code == "INVALID_ARGUMENT"
        else:
            assert isinstance(reply, np.ndarray)
            np.testing.assert_array_equal(reply, reference)


def test_the_fused_model_keeps_the_intake_metrics(fused: EmbeddedServer) -> None:
    with AbdoServeClient(url(fused)) as client:
        client.bone_density_ct(build_study("bone_density_ct", seed=33).instances)
    address = f"http://{fused.options.host}:{fused.ports.metrics}/metrics"
    with urllib.request.urlopen(address, timeout=30) as reply:
        text = reply.read().decode()
    assert 'abdoserve_images_per_request_count{task="bone_density_ct"}' in text
    assert 'nv_inference_request_success{model="bone_density_ct",version="1"}' in text
    # the time inside execute, beside Triton's compute time for the same model
    executed = re.search(
        r"abdoserve_execute_duration_seconds_count"
        r'\{model="bone_density_ct",task="bone_density_ct"\} (\S+)',
        text,
    )
    assert executed is not None and float(executed.group(1)) >= 1
