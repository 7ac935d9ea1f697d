"""The client and `abdoserve infer` against the real Triton server (session fixture)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from abdoserve.deploy.cli import main as abdoserve_main
from abdoserve.deploy.embedded import free_port
from abdoserve.export.phantom import TASK_NAMES, build_study, write_study
from abdoserve.export.phantom.enhanced import enhanced_multiframe
from abdoserve.preprocessing.tasks import get_task
from abdoserve.serving.answer import UNTRAINED_NOTICE
from abdoserve_client.aio import AsyncAbdoServeClient
from abdoserve_client.client import AbdoServeClient
from abdoserve_client.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    ServerUnavailableError,
)
from abdoserve_client.results import (
    BoneDensityResult,
    ClassificationResult,
    EsophagealCancerResult,
    FibrosisResult,
    LiverMassResult,
    ScoreResult,
    StudyResult,
)

SEED = 11


@pytest.fixture(scope="module")
def client(grpc_url: str) -> Iterator[AbdoServeClient]:
    with AbdoServeClient(grpc_url, timeout_s=60.0) as opened:
        yield opened


def typed_call(client: AbdoServeClient, task: str) -> StudyResult:
    """The task's own method, with the phantom's clinical inputs."""
    study = build_study(task, seed=SEED)
    clinical: dict[str, Any] = dict(study.clinical)
    calls: dict[str, Callable[[], StudyResult]] = {
        "liver_mass_ct": lambda: client.liver_mass_ct(study.instances, roi=clinical["roi"]),
        "liver_fibrosis_ct": lambda: client.liver_fibrosis_ct(study.instances, **clinical),
        "liver_fibrosis_mri": lambda: client.liver_fibrosis_mri(study.instances, **clinical),
        "bone_density_ct": lambda: client.bone_density_ct(study.instances),
        "esophageal_cancer_ct": lambda: client.esophageal_cancer_ct(study.instances),
    }
    return calls[task]()


def published_labels(grpc_url: str, task: str) -> list[str]:
    with grpcclient.InferenceServerClient(grpc_url) as raw:
        config = raw.get_model_config(task).config
    return list(json.loads(config.parameters["labels"].string_value))


EXPECTED_TYPES = {
    "liver_mass_ct": LiverMassResult,
    "liver_fibrosis_ct": FibrosisResult,
    "liver_fibrosis_mri": FibrosisResult,
    "bone_density_ct": BoneDensityResult,
    "esophageal_cancer_ct": EsophagealCancerResult,
}


@pytest.mark.parametrize("task", TASK_NAMES)
def test_every_task_answers_in_range_with_the_servers_labels(
    client: AbdoServeClient, grpc_url: str, task: str
) -> None:
    result = typed_call(client, task)
    assert isinstance(result, EXPECTED_TYPES[task])
    assert list(result.labels) == published_labels(grpc_url, task)
    assert result.notice == UNTRAINED_NOTICE and result.model == client.model_info(task)
    low, high = get_task(task).output.value_range
    assert np.all((result.image_values >= low) & (result.image_values <= high))
    assert result.image_values.shape == (len(result.images), result.study_values.shape[0])
    if isinstance(result, ClassificationResult):
        assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert result.label == result.labels[int(np.argmax(result.study_values))]
        rounded = result.answer["result"]["probabilities"]
    else:
        assert isinstance(result, ScoreResult)
        assert low <= result.value <= high
        rounded = {result.name: result.answer["result"][result.name]}
        assert result.unit == result.answer["result"]["unit"]
    # the rounded JSON answer and the full-precision STUDY tensor agree
    assert list(rounded.values()) == pytest.approx(result.study_values.tolist(), abs=1e-6)


def test_async_client_gives_the_same_numbers_as_the_sync_one(
    client: AbdoServeClient, grpc_url: str
) -> None:
    tasks = ("liver_mass_ct", "liver_fibrosis_mri", "esophageal_cancer_ct")
    studies = {task: build_study(task, seed=SEED) for task in tasks}
    blocking = {
        task: client.infer(task, study.instances, study.clinical) for task, study in studies.items()
    }

    async def run_all() -> dict[str, StudyResult]:
        async with AsyncAbdoServeClient(grpc_url, timeout_s=60.0) as aio:
            assert await aio.is_ready()
            assert await aio.model_info("liver_mass_ct") == client.model_info("liver_mass_ct")
            return {
                task: await aio.infer(task, study.instances, study.clinical)
                for task, study in studies.items()
            }

    for task, result in asyncio.run(run_all()).items():
        assert type(result) is type(blocking[task])
        np.testing.assert_array_equal(result.study_values, blocking[task].study_values)
        np.testing.assert_array_equal(result.image_values, blocking[task].image_values)
        assert result.answer == blocking[task].answer


def test_bad_study_raises_invalid_request_naming_the_problem(client: AbdoServeClient) -> None:
    study = build_study("liver_fibrosis_mri", seed=SEED)
    broken = (study.instances[0], b"not a DICOM file", study.instances[2])
    with pytest.raises(InvalidRequestError, match="instance 1") as raised:
        client.liver_fibrosis_mri(broken, hbv="negative", hcv="negative")
    assert raised.value.code == "INVALID_ARGUMENT"
    with pytest.raises(InvalidRequestError, match="3 images"):
        client.liver_fibrosis_mri(study.instances[:2], hbv="negative", hcv="negative")
    assert client.is_ready()  # the server shrugs it off


def test_unreachable_server_raises_after_the_configured_retries() -> None:
    sleeps: list[float] = []
    with AbdoServeClient(f"127.0.0.1:{free_port()}", retries=2, backoff_s=0.01) as nobody:
        nobody._sleep = sleeps.append
        assert not nobody.is_ready()
        with pytest.raises(ServerUnavailableError, match="after 3 attempts"):
            nobody.bone_density_ct([b"never sent"])
    assert sleeps == pytest.approx([0.01, 0.02])


def test_deadline_is_enforced_and_not_retried(grpc_url: str) -> None:
    study = build_study("bone_density_ct", seed=SEED)
    sleeps: list[float] = []
    with AbdoServeClient(grpc_url, timeout_s=1e-4) as hasty:
        hasty._sleep = sleeps.append
        with pytest.raises(DeadlineExceededError):
            hasty.bone_density_ct(study.instances)
    assert sleeps == []


@pytest.fixture
def abdoserve() -> Callable[[Sequence[str]], int]:
    """The `abdoserve` console command, in process."""
    return abdoserve_main


def test_cli_end_to_end(
    abdoserve: Callable[[Sequence[str]], int],
    grpc_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    main = abdoserve
    folder = tmp_path / "study"
    write_study(build_study("liver_fibrosis_ct", seed=SEED), folder)
    assert main(["infer", "liver_fibrosis_ct", str(folder), "--url", grpc_url]) == 0
    text = capsys.readouterr().out
    assert get_task("liver_fibrosis_ct").title in text
    assert UNTRAINED_NOTICE in text and "F_DLCT = " in text and "0001.dcm" in text
    assert "reference-untrained" in text

    assert main(["infer", "liver_fibrosis_ct", str(folder), "--url", grpc_url, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["answer"]["task"] == "liver_fibrosis_ct"
    assert document["answer"]["notice"] == UNTRAINED_NOTICE
    assert document["study_values"][0] == pytest.approx(document["answer"]["result"]["F_DLCT"])

    # a flag overrides request.json, and the server's refusal reaches stderr with exit code 2
    assert main(["infer", "liver_fibrosis_ct", str(folder), "--url", grpc_url, "--sex", "X"]) == 2
    assert "'sex'" in capsys.readouterr().err


@pytest.mark.parametrize("per_frame_lut", [False, True])
def test_an_enhanced_ct_study_is_answered_as_its_single_frame_equivalent(
    client: AbdoServeClient, per_frame_lut: bool
) -> None:
    study = build_study("bone_density_ct", seed=SEED)
    enhanced = enhanced_multiframe(study.instances, per_frame_lut=per_frame_lut)
    single = client.bone_density_ct(study.instances)
    multi = client.bone_density_ct([enhanced])
    assert np.isfinite(multi.bmd)
    np.testing.assert_allclose(multi.study_values, single.study_values, rtol=1e-6)
    assert len(multi.images) == len(single.images) == len(study.instances)
