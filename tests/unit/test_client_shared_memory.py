"""The sender's shared-memory region: slots, fall-back to inline, the file's lifetime."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

import numpy as np
import pytest

from abdoserve_client.errors import AbdoServeError, InvalidRequestError
from abdoserve_client.protocol import dicom_tensors
from abdoserve_client.shared_memory import RegionSender, SharedMemoryRegion, forgotten_region


@pytest.fixture
def region() -> Iterator[SharedMemoryRegion]:
    created = SharedMemoryRegion.create(f"abdoserve-unit-{os.getpid()}", slot_bytes=64, slots=2)
    yield created
    created.close()


def test_the_region_is_private_to_its_owner_and_removed_on_close() -> None:
    name = f"abdoserve-unit-life-{os.getpid()}"
    region = SharedMemoryRegion.create(name, slot_bytes=16, slots=3)
    path = f"/dev/shm/{name}"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.path.getsize(path) == 48 and region.slots == 3 and region.key == f"/{name}"
    with pytest.raises(FileExistsError):  # never write into someone else's region
        SharedMemoryRegion.create(name, slot_bytes=16, slots=1)
    opened = SharedMemoryRegion.open(name, slot_bytes=16)
    assert opened.slots == 3
    opened.close()
    assert os.path.exists(path)  # only the creator removes it
    region.close()
    assert not os.path.exists(path)


@pytest.mark.parametrize("name", ["", "a/b", "..", "."])
def test_a_region_name_is_a_plain_file_name(name: str) -> None:
    with pytest.raises(InvalidRequestError):
        SharedMemoryRegion.create(name, slot_bytes=16, slots=1)


def test_slots_are_held_until_released_and_a_study_too_large_gets_none(
    region: SharedMemoryRegion,
) -> None:
    with region.slot(64) as first, region.slot(10) as second, region.slot(10) as third:
        assert {first, second} == {0, 64} and third is None  # two slots, both busy
    with region.slot(65) as too_large:
        assert too_large is None
    with region.slot(1) as again:
        assert again in (0, 64)  # released


def test_what_is_written_is_what_the_server_reads(region: SharedMemoryRegion) -> None:
    pieces = [b"abc", b"", b"defg"]
    with region.slot(7) as offset:
        assert offset in (0, 64)  # one of the two slots
        assert region.write(offset, pieces) == 7
        assert region.read(offset, 7) == b"abcdefg"


def test_the_sender_refers_to_its_slot_and_falls_back_inline(region: SharedMemoryRegion) -> None:
    registered: list[str] = []
    sender = RegionSender(region, lambda: registered.append(region.name))
    instances = [b"0123456789", b"abcdef"]
    with sender.study(instances) as tensors:
        placed, offsets = tensors
        assert placed.name == "DICOM_PACKED" and placed.pieces == ()
        assert placed.shared_memory is not None and placed.shared_memory.byte_size == 16
        start = placed.shared_memory.offset
        assert region.read(start, 16) == b"0123456789abcdef"
        assert np.frombuffer(b"".join(offsets.pieces), "<i8").tolist() == [0, 10]
        with sender.study([b"x" * 65]) as inline:  # does not fit a slot: sent inline
            assert inline[0].shared_memory is None and inline[0].size == 65
    assert registered == [region.name]  # once, until the server forgets it
    sender.forget()
    with sender.study(instances):
        pass
    assert registered == [region.name, region.name]


def test_the_server_forgetting_the_region_is_recognised(region: SharedMemoryRegion) -> None:
    forgot = AbdoServeError(f"Unable to find shared memory region: '{region.name}'", "NOT_FOUND")
    other = AbdoServeError("input 'DICOM_OFFSETS' must start at 0", "INVALID_ARGUMENT")
    assert forgotten_region(forgot, region) and not forgotten_region(other, region)


def test_an_empty_instance_is_refused_before_sending() -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        dicom_tensors([b"abc", b""], packed=True)
    with pytest.raises(InvalidRequestError, match="no DICOM"):
        dicom_tensors([], packed=True)
