"""The packed DICOM form (UINT8 + offsets) on the real server: the same answer as BYTES,
clear refusals that name the input, and a batch that keeps its good requests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from abdoserve.export.phantom import build_study
from abdoserve.preprocessing.tasks import TASKS
from abdoserve_client import AbdoServeClient
from abdoserve_client.wire import RawInfer, WireTensor, open_channel
from tests.integration.triton_calls import OUTPUTS, infer


def packed_inputs(
    instances: Sequence[bytes], clinical: object, offsets: Sequence[int] | None = None
) -> list[grpcclient.InferInput]:
    block = np.frombuffer(b"".join(instances), dtype=np.uint8)[None]
    starts = np.asarray(
        [offsets if offsets is not None else np.cumsum([0, *map(len, instances[:-1])])],
        dtype=np.int64,
    )
    inputs = []
    for name, array, datatype in (
        ("DICOM_PACKED", block, "UINT8"),
        ("DICOM_OFFSETS", starts, "INT64"),
        ("CLINICAL", np.array([[json.dumps(clinical).encode()]], dtype=np.object_), "BYTES"),
    ):
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def infer_packed(
    client: grpcclient.InferenceServerClient, task: str, inputs: list[grpcclient.InferInput]
) -> grpcclient.InferResult:
    outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]
    return client.infer(task, inputs, outputs=outputs, client_timeout=120)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_packed_study_is_answered_exactly_as_the_same_study_in_bytes(
    grpc_url: str, task: str
) -> None:
    study = build_study(task, seed=11)
    with grpcclient.InferenceServerClient(grpc_url) as client:
        listed = infer(client, task, study.instances, study.clinical)
        packed = infer_packed(client, task, packed_inputs(study.instances, study.clinical))
    np.testing.assert_array_equal(packed.as_numpy("STUDY")[0], listed.study)
    np.testing.assert_array_equal(packed.as_numpy("SCORES")[0], listed.scores)
    answer = json.loads(packed.as_numpy("ANSWER")[0, 0])
    assert answer["images"] == listed.answer["images"]


def test_the_client_sends_the_packed_form_to_a_server_that_takes_it(grpc_url: str) -> None:
    study = build_study("liver_fibrosis_ct", seed=12)
    with (
        AbdoServeClient(grpc_url) as client,
        grpcclient.InferenceServerClient(grpc_url) as raw,
    ):
        assert client.task_info("liver_fibrosis_ct").accepts_packed
        values = client.infer("liver_fibrosis_ct", study.instances, study.clinical).study_values
        reference = infer(raw, "liver_fibrosis_ct", study.instances, study.clinical).study
    np.testing.assert_array_equal(values, reference)


BAD_OFFSETS = {
    "not from 0": lambda sizes: [1, *np.cumsum(sizes[:-1])],
    "repeated": lambda sizes: [0, 0, *np.cumsum(sizes[:-2])],
    "past the end": lambda sizes: [0, sum(sizes) + 10],
    "negative": lambda sizes: [0, -5],
}


@pytest.mark.parametrize("case", sorted(BAD_OFFSETS))
def test_bad_offsets_are_refused_by_name_while_the_batch_around_them_is_answered(
    grpc_url: str, case: str
) -> None:
    task = "bone_density_ct"
    good = build_study(task, seed=13)
    sizes = [len(instance) for instance in good.instances]
    bad = packed_inputs(good.instances, {}, BAD_OFFSETS[case](sizes))
    with grpcclient.InferenceServerClient(grpc_url) as client:
        reference = infer(client, task, good.instances, good.clinical).study

        def send(number: int) -> np.ndarray | InferenceServerException:
            inputs = bad if number % 3 == 1 else packed_inputs(good.instances, {})
            try:
                return np.asarray(infer_packed(client, task, inputs).as_numpy("STUDY")[0])
            except InferenceServerException as error:
                return error

        with ThreadPoolExecutor(6) as pool:  # sent together: the dynamic batcher mixes them
            replies = list(pool.map(send, range(9)))
        for number, reply in enumerate(replies):
            if number % 3 == 1:
                assert isinstance(reply, InferenceServerException)
                assert reply.status() == "StatusCode.INVALID_ARGUMENT"
                assert "'DICOM_OFFSETS'" in str(reply.message())
            else:
                assert isinstance(reply, np.ndarray)
                np.testing.assert_array_equal(reply, reference)
        assert client.is_server_ready()


def test_a_region_nobody_registered_is_refused_and_the_server_stays_ready(
    grpc_url: str,
) -> None:
    study = build_study("bone_density_ct", seed=14)
    inputs = packed_inputs(study.instances, {})
    inputs[0] = grpcclient.InferInput("DICOM_PACKED", [1, 4096], "UINT8")
    inputs[0].set_shared_memory("triton_python_backend_shm_region_1", 4096)
    with grpcclient.InferenceServerClient(grpc_url) as client:
        with pytest.raises(InferenceServerException) as refused:
            infer_packed(client, "bone_density_ct", inputs)
        assert "Unable to find shared memory region" in str(refused.value.message())
        assert client.is_server_ready()


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        # A shape that promises more bytes than the request carries.
        (
            lambda block, starts: [
                WireTensor("DICOM_PACKED", "UINT8", (1, 1 << 30), [block]),
                WireTensor("DICOM_OFFSETS", "INT64", (1, 1), [starts]),
            ],
            "byte size",
        ),
        # Offsets of the wrong type: refused by the config, before any model runs.
        (
            lambda block, starts: [
                WireTensor("DICOM_PACKED", "UINT8", (1, len(block)), [block]),
                WireTensor("DICOM_OFFSETS", "INT32", (1, 2), [starts]),
            ],
            "DICOM_OFFSETS",
        ),
    ],
)
def test_malformed_packed_tensors_are_refused_and_the_server_stays_ready(
    grpc_url: str, tensors: object, message: str
) -> None:
    block = b"".join(build_study("bone_density_ct", seed=15).instances)
    starts = np.zeros(1, dtype="<i8").tobytes()
    assert callable(tensors)
    channel = open_channel(
        grpc_url, ssl=False, root_certificates=None, private_key=None, certificate_chain=None
    )
    raw = RawInfer(channel)
    try:
        with pytest.raises(InferenceServerException) as refused:
            raw.infer("bone_density_ct", tensors(block, starts), OUTPUTS, 60.0)
    finally:
        raw.close()
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in str(refused.value.message())
    with grpcclient.InferenceServerClient(grpc_url) as client:
        assert client.is_server_ready()
