"""The study's DICOM from a request: BYTES elements or one packed UINT8 block with offsets."""

from __future__ import annotations

import numpy as np
import pytest

from abdoserve.preprocessing.errors import IntakeError, MissingInputError
from abdoserve.preprocessing.specs import IntakeLimits
from abdoserve.serving.dicom_input import read_instances
from tests.unit.fake_pb_utils import FakePbUtils, FakeTensor

LIMITS = IntakeLimits()
INSTANCES = [b"first instance", b"2", b"the third and last"]


def packed(instances: list[bytes], offsets: list[int] | None = None) -> dict[str, FakeTensor]:
    block = np.frombuffer(b"".join(instances), dtype=np.uint8)[None]
    starts = offsets if offsets is not None else np.cumsum([0, *map(len, instances[:-1])])
    return {
        "DICOM_PACKED": FakeTensor("DICOM_PACKED", block),
        "DICOM_OFFSETS": FakeTensor("DICOM_OFFSETS", np.asarray([starts], dtype=np.int64)),
    }


def listed(instances: list[bytes]) -> dict[str, FakeTensor]:
    return {"DICOM": FakeTensor("DICOM", np.array([instances], dtype=np.object_))}


def test_both_forms_give_the_same_instances() -> None:
    pb_utils = FakePbUtils()
    assert read_instances(pb_utils, packed(INSTANCES), LIMITS) == INSTANCES
    assert read_instances(pb_utils, listed(INSTANCES), LIMITS) == INSTANCES


@pytest.mark.parametrize(
    ("offsets", "problem"),
    [
        ([1, 15, 16], "start at 0"),
        ([0, 15, 15], "strictly increase"),
        ([0, 16, 15], "strictly increase"),
        ([0, 15, 33], "within the 33 bytes"),
        ([0, 15, 99], "within the 33 bytes"),
        ([0, -4, 16], "strictly increase"),
        ([], "hold no instance"),
    ],
)
def test_offsets_that_do_not_cut_the_block_are_refused_by_name(
    offsets: list[int], problem: str
) -> None:
    with pytest.raises(IntakeError, match=r"DICOM_OFFSETS|DICOM_PACKED") as refused:
        read_instances(FakePbUtils(), packed(INSTANCES, offsets), LIMITS)
    assert problem.split(maxsplit=1)[0] in str(refused.value)


def test_more_offsets_than_the_instance_limit_are_refused_before_any_copy() -> None:
    limits = IntakeLimits(max_instances_per_request=2)
    with pytest.raises(IntakeError, match="lists 3 instances; at most 2"):
        read_instances(FakePbUtils(), packed(INSTANCES), limits)


@pytest.mark.parametrize(
    ("name", "array", "message"),
    [
        ("DICOM_PACKED", np.zeros((1, 33), dtype=np.int8), "must be UINT8"),
        ("DICOM_PACKED", np.zeros((1, 3, 11), dtype=np.uint8), "must be UINT8 of shape"),
        ("DICOM_OFFSETS", np.zeros((1, 3), dtype=np.int32), "must be INT64"),
    ],
)
def test_wrong_types_are_refused_by_name(name: str, array: np.ndarray, message: str) -> None:
    request = packed(INSTANCES)
    request[name] = FakeTensor(name, array)
    with pytest.raises(IntakeError, match=message):
        read_instances(FakePbUtils(), request, LIMITS)


def test_exactly_one_form_is_taken() -> None:
    with pytest.raises(IntakeError, match="not both"):
        read_instances(FakePbUtils(), {**packed(INSTANCES), **listed(INSTANCES)}, LIMITS)
    with pytest.raises(MissingInputError, match=r"'DICOM'.*'DICOM_PACKED'"):
        read_instances(FakePbUtils(), {}, LIMITS)
    request = packed(INSTANCES)
    del request["DICOM_OFFSETS"]
    with pytest.raises(MissingInputError, match="'DICOM_OFFSETS' is missing"):
        read_instances(FakePbUtils(), request, LIMITS)


def test_an_error_never_echoes_the_bytes() -> None:
    secret = [b"PATIENT^NAME^SECRET", b"x"]
    with pytest.raises(IntakeError) as refused:
        read_instances(FakePbUtils(), packed(secret, [0, 99]), LIMITS)
    assert b"SECRET".decode() not in str(refused.value)
