"""The hand-written ModelInfer request is exactly what tritonclient would send."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.grpc._utils import _get_inference_request

from abdoserve_client.wire import _varint, encode_infer_request

OUTPUTS = ("SCORES", "STUDY", "ANSWER")


def tritonclient_request(
    task: str, dicom: list[bytes], clinical: bytes
) -> service_pb2.ModelInferRequest:
    inputs = []
    for name, elements in (("DICOM", dicom), ("CLINICAL", [clinical])):
        tensor = grpcclient.InferInput(name, [1, len(elements)], "BYTES")
        tensor.set_data_from_numpy(np.array([elements], dtype=np.object_))
        inputs.append(tensor)
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


@pytest.mark.parametrize("sizes", [[1], [3, 0, 200], [70_000, 5, 129]])
def test_wire_request_equals_tritonclient_request(sizes: list[int]) -> None:
    rng = np.random.default_rng(len(sizes))
    dicom = [rng.bytes(size) for size in sizes]
    clinical = b'{"age": 61, "sex": "F"}'
    ours = encode_infer_request(
        "liver_fibrosis_ct", [("DICOM", dicom), ("CLINICAL", [clinical])], OUTPUTS
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
