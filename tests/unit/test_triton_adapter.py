"""The Triton adapter against a fake pb_utils: per-request errors, inputs, JSON."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pytest

from abdoserve.preprocessing.errors import (
    AttributeProblem,
    IntakeError,
    MissingInputError,
    StatusCode,
)
from abdoserve.serving.triton_adapter import (
    TritonLogHandler,
    bytes_elements,
    error_response,
    json_object,
    json_tensor,
    model_parameters,
    require_input,
    response,
    single_study,
)
from tests.unit.fake_pb_utils import (
    FakePbUtils,
    FakeTensor,
    FakeTritonError,
)

PB = FakePbUtils()


def test_intake_errors_become_invalid_argument_with_their_message() -> None:
    error = AttributeProblem(0x00280030, "is missing", instance=2)
    reply = error_response(PB, error)
    assert reply.output_tensors == []
    assert reply.error is not None
    assert reply.error.code == FakeTritonError.INVALID_ARG
    assert reply.error.message == "instance 2: (0028,0030) Pixel Spacing is missing"


def test_unimplemented_and_internal_intake_codes_map_to_triton_codes() -> None:
    class Unsupported(IntakeError):
        code = StatusCode.UNIMPLEMENTED

    class Internal(IntakeError):
        code = StatusCode.INTERNAL

    unsupported = error_response(PB, Unsupported("no such syntax")).error
    internal = error_response(PB, Internal("broken")).error
    assert unsupported is not None and unsupported.code == FakeTritonError.UNSUPPORTED
    assert internal is not None and internal.code == FakeTritonError.INTERNAL


def test_unexpected_errors_are_internal_and_never_echo_their_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "PHANTOM^ABDOMEN 19480101"
    try:
        raise KeyError(secret)
    except KeyError as error:
        with caplog.at_level(logging.ERROR, logger="abdoserve.serving.triton_adapter"):
            reply = error_response(PB, error)
    assert reply.error is not None and reply.error.code == FakeTritonError.INTERNAL
    assert reply.error.message == "internal error (KeyError); see the server log"
    assert secret not in reply.error.message
    assert all(secret not in record.getMessage() for record in caplog.records)
    assert any("KeyError" in record.getMessage() for record in caplog.records)


def test_require_input_returns_numpy_and_refuses_a_missing_input() -> None:
    value = np.array([[b"x"]], dtype=np.object_)
    request = {"DICOM": FakeTensor("DICOM", value)}
    assert require_input(PB, request, "DICOM") is value
    with pytest.raises(MissingInputError, match="input tensor 'CLINICAL' is missing") as caught:
        require_input(PB, request, "CLINICAL")
    assert caught.value.code is StatusCode.INVALID_ARGUMENT
    reply = error_response(PB, caught.value)
    assert reply.error is not None and reply.error.code == FakeTritonError.INVALID_ARG


def test_single_study_drops_the_batch_axis_or_refuses() -> None:
    np.testing.assert_array_equal(single_study(np.arange(6).reshape(1, 6), "X"), np.arange(6))
    with pytest.raises(IntakeError, match=r"input 'X' must hold one study per request .* \[2, 3\]"):
        single_study(np.zeros((2, 3)), "X")
    with pytest.raises(IntakeError, match="got shape \\[\\]"):
        single_study(np.float32(1.0), "X")  # type: ignore[arg-type]


def test_bytes_elements_flatten_a_bytes_tensor() -> None:
    array = np.array([[b"a", np.bytes_(b"bc")]], dtype=np.object_)
    assert bytes_elements(array) == [b"a", b"bc"]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [(b'{"age": 61, "sex": "F"}', {"age": 61, "sex": "F"}), (b"", {}), (b"  ", {})],
)
def test_json_object_reads_one_object(payload: bytes, expected: dict[str, Any]) -> None:
    assert json_object(np.array([[payload]], dtype=np.object_), "CLINICAL") == expected


@pytest.mark.parametrize(
    ("elements", "message"),
    [
        ([b"{", b"}"], "input 'CLINICAL' must hold exactly one JSON object"),
        ([b"{not json"], r"input 'CLINICAL' is not valid JSON \(JSONDecodeError\)"),
        ([b'{"a": "\xc3\x28"}'], r"input 'CLINICAL' is not valid JSON \(UnicodeDecodeError\)"),
        ([b"[1, 2]"], "input 'CLINICAL' must be a JSON object"),
        ([b'"text"'], "input 'CLINICAL' must be a JSON object"),
    ],
)
def test_json_object_errors(elements: list[bytes], message: str) -> None:
    with pytest.raises(IntakeError, match=message) as caught:
        json_object(np.array(elements, dtype=np.object_), "CLINICAL")
    assert caught.value.code is StatusCode.INVALID_ARGUMENT


def test_json_tensor_round_trips_through_json_object() -> None:
    tensor = json_tensor({"b": [1, 2], "a": "x"})
    assert tensor.shape == (1, 1) and tensor.dtype == np.object_
    assert json.loads(tensor[0, 0]) == {"b": [1, 2], "a": "x"}
    assert json_object(tensor, "ANSWER") == {"b": [1, 2], "a": "x"}


def test_response_wraps_named_outputs() -> None:
    reply = response(PB, {"SAMPLES": np.zeros((1, 2)), "SOURCES": np.array([3])})
    assert [tensor.name for tensor in reply.output_tensors] == ["SAMPLES", "SOURCES"]
    assert reply.error is None
    assert int(reply.output_tensors[1].value[0]) == 3


def test_model_parameters_flatten_string_values() -> None:
    config = {"parameters": {"weights_source": {"string_value": "seeded"}, "empty": {}}}
    assert model_parameters(config) == {"weights_source": "seeded", "empty": ""}
    assert model_parameters({}) == {} and model_parameters({"parameters": None}) == {}


def test_log_handler_forwards_by_level() -> None:
    pb = FakePbUtils()
    logger = logging.getLogger("abdoserve.preprocessing.tests.adapter")
    logger.propagate = False
    handler = TritonLogHandler(pb)
    logger.addHandler(handler)
    try:
        logger.setLevel(logging.INFO)
        logger.info("one")
        logger.warning("two")
        logger.error("three")
    finally:
        logger.removeHandler(handler)
    assert pb.Logger.lines == [("info", "one"), ("warn", "two"), ("error", "three")]
