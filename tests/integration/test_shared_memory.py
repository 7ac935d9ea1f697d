"""A co-located sender's shared-memory region on a real server started to see it: the
same answers as inline gRPC, slots shared by concurrent calls with inline fall-back, a
forgotten region registered again, and hostile references refused without harm."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from abdoserve.deploy.embedded import EmbeddedServer, ServerOptions, free_ports
from abdoserve.deploy.isolation import ShmIsolation
from abdoserve.export.phantom import build_study
from abdoserve_client import AbdoServeClient
from abdoserve_client.errors import AbdoServeError
from abdoserve_client.shared_memory import SHM_KEY_METADATA, SharedMemoryRegion

TASK = "bone_density_ct"  # 9 CT slices: about 4.7 MB a study
SLOT_BYTES = 6 * 1024 * 1024
SLOTS = 2
SHM_KEY = "sender-" + os.urandom(8).hex()


@pytest.fixture(scope="module")
def region() -> Iterator[SharedMemoryRegion]:
    created = SharedMemoryRegion.create(
        f"abdoserve-sender-{os.getpid()}", slot_bytes=SLOT_BYTES, slots=SLOTS
    )
    yield created
    created.close()


@pytest.fixture(scope="module")
def url(region: SharedMemoryRegion, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from abdoserve.export.repository import build_repository

    folder = tmp_path_factory.mktemp("shared-memory")
    repository = folder / "model_repository"
    build_repository(repository, (TASK,))
    options = ServerOptions(
        repository=repository,
        ports=free_ports(),
        log_file=folder / "triton.log",
        shm=ShmIsolation(shared_region=region.name),
        shm_key=SHM_KEY,
    )
    with EmbeddedServer(options) as server:
        yield f"{options.host}:{server.ports.grpc}"


def sender(url: str, region: SharedMemoryRegion) -> AbdoServeClient:
    return AbdoServeClient(url, shared_memory=region, shm_key=SHM_KEY, timeout_s=120)


def registered(url: str) -> list[str]:
    with grpcclient.InferenceServerClient(url) as triton:
        status = triton.get_system_shared_memory_status(headers={SHM_KEY_METADATA: SHM_KEY})
    return sorted(status.regions)


def test_studies_through_the_region_equal_the_same_studies_inline(
    url: str, region: SharedMemoryRegion
) -> None:
    studies = [build_study(TASK, seed=seed).instances for seed in (21, 22, 23)]
    with AbdoServeClient(url, timeout_s=120) as inline:
        expected = [inline.bone_density_ct(study).study_values for study in studies]
    with sender(url, region) as client:
        served = [client.bone_density_ct(study).study_values for study in studies]
        assert registered(url) == [region.name]
        # Four callers on two slots: some calls find every slot busy and go inline.
        with ThreadPoolExecutor(4) as pool:
            concurrent = list(
                pool.map(lambda n: client.bone_density_ct(studies[n % 3]).study_values, range(12))
            )
    assert registered(url) == []  # closing the client unregisters the region
    for got, want in zip(served, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    for number, got in enumerate(concurrent):
        np.testing.assert_array_equal(got, expected[number % 3])


def test_a_study_larger_than_a_slot_goes_inline(url: str, region: SharedMemoryRegion) -> None:
    study = build_study(TASK, seed=24)
    large = list(study.instances) * 2  # 18 slices, ~9.5 MB: more than a 6 MiB slot
    assert sum(map(len, large)) > SLOT_BYTES
    with AbdoServeClient(url, timeout_s=120) as inline, sender(url, region) as client:
        np.testing.assert_array_equal(
            client.bone_density_ct(large).study_values, inline.bone_density_ct(large).study_values
        )


def test_a_region_the_server_forgot_is_registered_again(
    url: str, region: SharedMemoryRegion
) -> None:
    study = build_study(TASK, seed=25).instances
    with sender(url, region) as client:
        first = client.bone_density_ct(study).study_values
        with grpcclient.InferenceServerClient(url) as triton:  # as a restarted server would
            triton.unregister_system_shared_memory(region.name, headers={SHM_KEY_METADATA: SHM_KEY})
        assert registered(url) == []
        np.testing.assert_array_equal(client.bone_density_ct(study).study_values, first)
        assert registered(url) == [region.name]


def test_references_outside_the_region_are_refused_and_the_server_stays_ready(
    url: str, region: SharedMemoryRegion
) -> None:
    headers = {SHM_KEY_METADATA: SHM_KEY}
    offsets = grpcclient.InferInput("DICOM_OFFSETS", [1, 1], "INT64")
    offsets.set_data_from_numpy(np.zeros((1, 1), dtype=np.int64))
    with grpcclient.InferenceServerClient(url) as triton:
        triton.register_system_shared_memory(region.name, region.key, region.size, headers=headers)
        try:
            for offset, size in ((region.size - 16, 64), (region.size + 4096, 16)):
                packed = grpcclient.InferInput("DICOM_PACKED", [1, size], "UINT8")
                packed.set_shared_memory(region.name, size, offset=offset)
                with pytest.raises(InferenceServerException) as refused:
                    triton.infer(TASK, [packed, offsets], client_timeout=60)
                assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert triton.is_server_ready()
        finally:
            triton.unregister_system_shared_memory(region.name, headers=headers)


def test_a_region_is_registered_only_with_the_key(url: str, region: SharedMemoryRegion) -> None:
    with grpcclient.InferenceServerClient(url) as triton, pytest.raises(InferenceServerException):
        triton.register_system_shared_memory(region.name, region.key, region.size)
    with (
        AbdoServeClient(url, shared_memory=region, shm_key="wrong", retries=0) as client,
        pytest.raises(AbdoServeError, match="restricted"),
    ):
        client.bone_density_ct(build_study(TASK, seed=26).instances)


def test_the_region_file_is_the_senders_own(region: SharedMemoryRegion) -> None:
    assert Path(f"/dev/shm/{region.name}").stat().st_mode & 0o077 == 0
