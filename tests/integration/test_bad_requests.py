"""Bad requests get INVALID_ARGUMENT naming the problem; good ones beside them are unaffected;
the server stays ready and its Python stubs never restart."""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pydicom
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from abdoserve.deploy.embedded import EmbeddedServer
from abdoserve.export.configs import Tuning
from abdoserve.export.phantom import build_study
from abdoserve.preprocessing.tasks import TASKS
from tests.integration.triton_calls import infer, request_inputs

PATIENT_IDENTIFIERS = ("PHANTOM^ABDOMEN", "PHANTOM-")


def edited(data: bytes, edit: Callable[[pydicom.Dataset], None]) -> bytes:
    dataset = pydicom.dcmread(io.BytesIO(data))
    edit(dataset)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def huge_header(dataset: pydicom.Dataset) -> None:
    dataset.Rows = 65000
    dataset.Columns = 65000


def stub_pids(server: EmbeddedServer) -> set[int]:
    """PIDs of the Python-backend stub processes that the server started."""
    assert server.process is not None
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read()
        except OSError:
            continue
        if int(fields[1]) == server.process.pid and b"triton_python_backend_stub" in command:
            pids.add(int(entry))
    return pids


@pytest.fixture(scope="module")
def stubs_before(server: EmbeddedServer) -> Iterator[set[int]]:
    before = stub_pids(server)
    # `serve`'s default: the fused model's instances (preprocessing's count), and one
    # stub for the explanation model
    per_task = Tuning().preprocess_instances + 1
    assert len(before) == per_task * len(TASKS)
    yield before
    assert stub_pids(server) == before, "a Python-backend stub restarted or died"
    assert server.is_ready()


@pytest.fixture(scope="module")
def client(grpc_url: str, stubs_before: set[int]) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(grpc_url)


def refused(
    client: grpcclient.InferenceServerClient,
    task: str,
    instances: list[bytes],
    clinical: dict[str, object],
) -> str:
    with pytest.raises(InferenceServerException) as caught:
        infer(client, task, instances, clinical)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    message = str(caught.value.message())
    assert not any(identifier in message for identifier in PATIENT_IDENTIFIERS)
    return message


def test_random_bytes(client: grpcclient.InferenceServerClient) -> None:
    noise = random.Random(1).randbytes(4096)
    message = refused(client, "bone_density_ct", [noise], {})
    assert "instance 0: not a DICOM dataset" in message


def test_truncated_file(client: grpcclient.InferenceServerClient) -> None:
    study = build_study("bone_density_ct", seed=1, slices=2)
    cut = study.instances[1][: len(study.instances[1]) // 2]
    message = refused(client, "bone_density_ct", [study.instances[0], cut], {})
    assert "instance 1: (7FE0,0010) Pixel Data holds" in message


def test_mr_image_sent_to_a_ct_task(client: grpcclient.InferenceServerClient) -> None:
    mri = build_study("liver_fibrosis_mri", seed=1)
    message = refused(client, "bone_density_ct", list(mri.instances[:1]), {})
    assert "instance 0: (0008,0060) Modality is not CT; bone_density_ct reads CT" in message


def test_missing_roi(client: grpcclient.InferenceServerClient) -> None:
    study = build_study("liver_mass_ct", seed=1)
    message = refused(client, "liver_mass_ct", list(study.instances), {})
    assert "needs 'roi'" in message


def test_too_many_instances_refused_before_decoding(
    client: grpcclient.InferenceServerClient,
) -> None:
    limit = TASKS["esophageal_cancer_ct"].limits.max_instances_per_request
    message = refused(client, "esophageal_cancer_ct", [b"x"] * (limit + 1), {})
    assert f"{limit + 1} instances exceed the limit of {limit}" in message


def test_oversized_image_header_refused_before_decoding(
    client: grpcclient.InferenceServerClient,
) -> None:
    study = build_study("bone_density_ct", seed=1, slices=1)
    message = refused(client, "bone_density_ct", [edited(study.instances[0], huge_header)], {})
    assert "instance 0: (0028,0010) Rows x (0028,0011) Columns" in message
    assert "exceeds the limit" in message


def test_missing_clinical_input(client: grpcclient.InferenceServerClient) -> None:
    study = build_study("liver_fibrosis_ct", seed=1)
    message = refused(client, "liver_fibrosis_ct", list(study.instances), {"age": 50})
    assert "clinical input 'sex' is missing" in message


def test_clinical_input_that_is_not_json(client: grpcclient.InferenceServerClient) -> None:
    study = build_study("bone_density_ct", seed=1, slices=1)
    inputs = request_inputs(study.instances, {})
    inputs[1].set_data_from_numpy(np.array([[b"{not json"]], dtype=np.object_))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("bone_density_ct", inputs)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'CLINICAL' is not valid JSON" in str(caught.value.message())


def test_bad_request_among_concurrent_good_ones(grpc_url: str, stubs_before: set[int]) -> None:
    good = build_study("esophageal_cancer_ct", seed=4)
    expected = infer(
        grpcclient.InferenceServerClient(grpc_url), "esophageal_cancer_ct", good.instances, {}
    )

    def call(index: int) -> object:
        client = grpcclient.InferenceServerClient(grpc_url)
        instances = [b"not dicom"] if index == 5 else list(good.instances)
        try:
            return infer(client, "esophageal_cancer_ct", instances, {}).study
        except InferenceServerException as error:
            return error

    with ThreadPoolExecutor(max_workers=12) as pool:
        outcomes = list(pool.map(call, range(12)))
    bad = outcomes.pop(5)
    assert isinstance(bad, InferenceServerException)
    assert bad.status() == "StatusCode.INVALID_ARGUMENT"
    for outcome in outcomes:
        assert isinstance(outcome, np.ndarray)
        np.testing.assert_allclose(outcome, expected.study, rtol=1e-6)


def test_200_concurrent_mixed_requests_all_succeed(
    grpc_url: str, stubs_before: set[int], admin_headers: dict[str, str]
) -> None:
    studies = {task: build_study(task, seed=2) for task in TASKS}
    client = grpcclient.InferenceServerClient(grpc_url)
    expected = {
        task: infer(client, task, study.instances, study.clinical).study
        for task, study in studies.items()
    }
    tasks = sorted(TASKS) * 40

    def call(task: str) -> tuple[str, np.ndarray]:
        study = studies[task]
        local = grpcclient.InferenceServerClient(grpc_url)
        return task, infer(local, task, study.instances, study.clinical).study

    before = execution_counts(client, admin_headers)
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(call, tasks))
    assert len(results) == 200
    for task, study in results:
        np.testing.assert_allclose(study, expected[task], rtol=1e-6)
    # Dynamic batching really batches: queued studies reached the fused model's
    # `execute` together (one network batch per version for each).
    after = execution_counts(client, admin_headers)
    inferences, executions = (
        sum(after[task][n] - before[task][n] for task in TASKS) for n in (0, 1)
    )
    assert inferences == 200 and executions < 200, (inferences, executions)


def execution_counts(
    client: grpcclient.InferenceServerClient, headers: dict[str, str]
) -> dict[str, tuple[int, int]]:
    """(inference_count, execution_count) of every task's model (statistics are an
    admin API: the key opens them)."""
    counts = {}
    for task in TASKS:
        found = client.get_inference_statistics(task, headers=headers).model_stats
        counts[task] = (
            sum(item.inference_count for item in found),
            sum(item.execution_count for item in found),
        )
    return counts


def test_no_patient_identifier_in_server_log(server: EmbeddedServer) -> None:
    log = server.options.log_file.read_text(errors="replace")
    assert "successfully loaded" in log
    assert not any(identifier in log for identifier in PATIENT_IDENTIFIERS)


def test_answer_json_carries_no_patient_identifier(
    client: grpcclient.InferenceServerClient,
) -> None:
    study = build_study("liver_fibrosis_ct", seed=1)
    answer = infer(client, "liver_fibrosis_ct", study.instances, study.clinical).answer
    text = json.dumps(answer)
    assert not any(identifier in text for identifier in PATIENT_IDENTIFIERS)
