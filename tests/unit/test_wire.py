"""The hand-written ModelInfer request is exactly what tritonclient would send."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.grpc._utils import _get_inference_request

from abdoserve_client.protocol import request_tensors
from abdoserve_client.wire import SharedMemoryRef, WireTensor, _varint, encode_infer_request

OUTPUTS = ("SCORES", "STUDY", "ANSWER")


def request_of(task: str, inputs: list[grpcclient.InferInput]) -> service_pb2.ModelInferRequest:
    """The ModelInferRequest tritonclient would send for `inputs`, asking for OUTPUTS."""
    outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]
    return _get_inference_request(
        model_name=task,
        inputs=inputs,
        model_version="",
        request_id="",
        outputs=outputs,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        parameters=None,
    )


def tritonclient_request(
    task: str, dicom: list[bytes], clinical: bytes
) -> service_pb2.ModelInferRequest:
    inputs = []
    for name, elements in (("DICOM", dicom), ("CLINICAL", [clinical])):
        tensor = grpcclient.InferInput(name, [1, len(elements)], "BYTES")
        tensor.set_data_from_numpy(np.array([elements], dtype=np.object_))
        inputs.append(tensor)
    return request_of(task, inputs)


@pytest.mark.parametrize("sizes", [[1], [3, 0, 200], [70_000, 5, 129]])
def test_wire_request_equals_tritonclient_request(sizes: list[int]) -> None:
    rng = np.random.default_rng(len(sizes))
    dicom = [rng.bytes(size) for size in sizes]
    clinical = b'{"age": 61, "sex": "F"}'
    dicom = [element or b"\0" for element in dicom]  # the client refuses empty instances
    ours = encode_infer_request(
        "liver_fibrosis_ct", request_tensors(dicom, {"age": 61, "sex": "F"}), OUTPUTS
    )
    parsed = service_pb2.ModelInferRequest.FromString(ours)
    assert parsed == tritonclient_request("liver_fibrosis_ct", dicom, clinical)
    assert list(parsed.inputs[0].shape) == [1, len(sizes)]


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**21, 2**35 + 7])
def test_varint_matches_protobuf(value: int) -> None:
    message = service_pb2.ModelInferRequest(id="")
    message.raw_input_contents.append(b"x" * 0)
    encoded = _varint(value)
    decoded, shift = 0, 0
    for byte in encoded:
        decoded |= (byte & 0x7F) << shift
        shift += 7
    assert decoded == value
    assert all(byte & 0x80 for byte in encoded[:-1]) and not encoded[-1] & 0x80


def packed_request(
    dicom: list[bytes], clinical: bytes, region: str | None
) -> service_pb2.ModelInferRequest:
    """tritonclient's request for the packed form, DICOM_PACKED inline or in `region`."""
    packed = np.frombuffer(b"".join(dicom), dtype=np.uint8)[None]
    offsets = np.cumsum([0] + [len(item) for item in dicom[:-1]]).astype(np.int64)[None]
    inputs = []
    tensor = grpcclient.InferInput("DICOM_PACKED", list(packed.shape), "UINT8")
    if region is None:
        tensor.set_data_from_numpy(packed)
    else:
        tensor.set_shared_memory(region, packed.size, offset=4096)
    inputs.append(tensor)
    for name, array, datatype in (
        ("DICOM_OFFSETS", offsets, "INT64"),
        ("CLINICAL", np.array([[clinical]], dtype=np.object_), "BYTES"),
    ):
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return request_of("bone_density_ct", inputs)


@pytest.mark.parametrize("region", [None, "abdoserve-sender"])
def test_packed_request_equals_tritonclient_request(region: str | None) -> None:
    rng = np.random.default_rng(7)
    dicom = [rng.bytes(size) for size in (5, 70_000, 129)]
    tensors = request_tensors(dicom, {}, packed=True)
    if region is not None:
        where = SharedMemoryRef(region, offset=4096, byte_size=tensors[0].size)
        tensors[0] = WireTensor("DICOM_PACKED", "UINT8", tensors[0].shape, shared_memory=where)
    ours = service_pb2.ModelInferRequest.FromString(
        encode_infer_request("bone_density_ct", tensors, OUTPUTS)
    )
    assert ours == packed_request(dicom, b"{}", region)
    offsets = np.frombuffer(ours.raw_input_contents[-2], dtype="<i8")
    assert offsets.tolist() == [0, 5, 70_005]
