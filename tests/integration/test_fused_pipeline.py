"""The two pipeline shapes side by side: the fused model per task (`serve`'s default on
the embedded CPU server) answers exactly as the ensemble (`--pipeline ensemble`, and a
GPU server's shape) does, with the same contract; each refuses a bad study alone in its
batch, and the fused model keeps the intake metrics."""

from __future__ import annotations

import json
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from abdoserve.deploy.embedded import EmbeddedServer
from abdoserve.export.phantom import build_study
from abdoserve.export.repository import BUILD_RECORD
from abdoserve.preprocessing.tasks import TASKS
from abdoserve_client import AbdoServeClient
from abdoserve_client.errors import AbdoServeError


@pytest.fixture(scope="module")
def fused(server: EmbeddedServer) -> EmbeddedServer:
    """`serve`'s default shape: the session's server."""
    return server


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
    fused: EmbeddedServer, ensemble_server: EmbeddedServer, task: str
) -> None:
    study = build_study(task, seed=31)
    with AbdoServeClient(url(fused)) as one, AbdoServeClient(url(ensemble_server)) as ensemble:
        assert one.task_info(task) == ensemble.task_info(task)  # the same published contract
        got = one.infer(task, study.instances, study.clinical)
        want = ensemble.infer(task, study.instances, study.clinical)
    np.testing.assert_array_equal(got.study_values, want.study_values)
    np.testing.assert_array_equal(got.image_values, want.image_values)
    assert got.model == want.model and got.model.untrained


@pytest.mark.parametrize("shape", ["fused", "ensemble"])
def test_a_bad_study_is_refused_alone_in_its_batch(
    fused: EmbeddedServer, ensemble_server: EmbeddedServer, shape: str
) -> None:
    task = "bone_density_ct"
    good = build_study(task, seed=32).instances
    truncated = [*good[:-1], good[-1][: len(good[-1]) // 3]]
    served = fused if shape == "fused" else ensemble_server
    with AbdoServeClient(url(served), retries=0, timeout_s=120) as client:
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
