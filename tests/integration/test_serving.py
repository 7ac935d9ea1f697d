"""The served answer, over real gRPC from a real tritonserver, equals the in-process reference."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from abdoserve.deploy.embedded import EmbeddedServer
from abdoserve.export.phantom import build_study
from abdoserve.preprocessing.tasks import TASKS
from abdoserve.serving.answer import UNTRAINED_NOTICE, aggregate
from tests.integration.reference import RELATIVE_TOLERANCE, in_process_reference, relative_error
from tests.integration.triton_calls import infer


@pytest.fixture(scope="module")
def client(grpc_url: str) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(grpc_url)


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("seed", [3, 11])
def test_served_answer_equals_in_process_pytorch(
    client: grpcclient.InferenceServerClient, task: str, seed: int
) -> None:
    study = build_study(task, seed=seed)
    served = infer(client, task, study.instances, study.clinical)
    reference = in_process_reference(task, study.instances, study.clinical)
    assert served.scores.shape == reference.shape
    assert relative_error(served.scores, reference) <= RELATIVE_TOLERANCE
    expected_study = aggregate(TASKS[task].output, reference)
    assert relative_error(served.study, expected_study) <= RELATIVE_TOLERANCE


@pytest.mark.parametrize("task", sorted(TASKS))
def test_answer_names_model_provenance_and_untrained_notice(
    client: grpcclient.InferenceServerClient, task: str
) -> None:
    study = build_study(task, seed=5)
    answer = infer(client, task, study.instances, study.clinical).answer
    assert answer["task"] == task
    assert answer["model"]["name"] == task
    assert answer["model"]["version"] == "1"
    assert answer["model"]["weights_source"] == "reference-untrained"
    assert len(answer["model"]["weights_sha256"]) == 64
    assert answer["notice"] == UNTRAINED_NOTICE
    served_instances = sorted(image["instance"] for image in answer["images"])
    if TASKS[task].images.stacking == "samples":
        assert served_instances == list(range(len(study.instances)))


def test_series_answer_is_independent_of_file_order(
    client: grpcclient.InferenceServerClient,
) -> None:
    study = build_study("bone_density_ct", seed=9)
    forward = infer(client, "bone_density_ct", study.instances, {})
    backward = infer(client, "bone_density_ct", study.instances[::-1], {})
    np.testing.assert_allclose(forward.study, backward.study, rtol=1e-6)


def test_server_lists_every_task_ready(server: EmbeddedServer) -> None:
    # `serve`'s default: one model per task, beside it the task's explanation model
    names = set(server.model_names())
    assert names == {*TASKS, *(f"{task}_explain" for task in TASKS)}
    assert server.is_ready()


def test_the_ensemble_lists_its_composing_models(ensemble_server: EmbeddedServer) -> None:
    names = set(ensemble_server.model_names())
    for task in TASKS:
        assert {task, f"{task}_preprocess", f"{task}_net", f"{task}_postprocess"} <= names
    assert ensemble_server.is_ready()
