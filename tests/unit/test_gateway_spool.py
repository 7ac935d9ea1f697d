"""The gateway's spool, retry loop and small parsers, on real files and real threads."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from abdoserve.deploy.gateway.inference import (
    GaveUp,
    Interrupted,
    PersistentInference,
    RetryOptions,
)
from abdoserve.deploy.gateway.metrics import GatewayMetrics
from abdoserve.deploy.gateway.sender import Destination, permanent, stored
from abdoserve.deploy.gateway.spool import Spool, SpoolError, check_uid
from abdoserve_client.errors import InvalidRequestError, ServerUnavailableError

STUDY = "1.2.826.0.1.3680043.8.498.1"
SOP = "1.2.826.0.1.3680043.8.498.1.1"


def test_an_instance_is_on_disk_under_its_study_before_store_returns(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    path = spool.store_instance(STUDY, SOP, b"DICM-bytes")
    assert (tmp_path / "spool").stat().st_mode & 0o777 == 0o700  # patient data: ours alone
    assert path.stat().st_mode & 0o777 == 0o600
    tmp_path = tmp_path / "spool"
    assert path == tmp_path / "incoming" / STUDY / f"{SOP}.dcm"
    assert path.read_bytes() == b"DICM-bytes"
    assert list((tmp_path / "tmp").iterdir()) == []  # nothing half-written left behind


@pytest.mark.parametrize(
    "value", ["", "../../etc/passwd", "1.2.03", "1..2", "a.b", "1." + "2" * 70, None]
)
def test_a_uid_that_is_not_a_uid_never_names_a_file(tmp_path: Path, value: Any) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(SpoolError, match="SOPInstanceUID is missing or not a valid UID") as caught:
        spool.store_instance(STUDY, value, b"x")
    assert str(value) not in str(caught.value) or not value
    assert not (tmp_path / "incoming" / STUDY).exists() or not any(
        (tmp_path / "incoming" / STUDY).iterdir()
    )


def test_check_uid_accepts_real_uids() -> None:
    assert check_uid("1.2.840.10008.5.1.4.1.1.2", "SOPClassUID") == "1.2.840.10008.5.1.4.1.1.2"


def test_a_study_is_quiet_after_its_last_arrival_and_claimed_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.store_instance(STUDY, SOP, b"a")
    folder = tmp_path / "incoming" / STUDY
    os.utime(folder, (1000.0, 1000.0))
    assert spool.quiet_studies(quiet_s=10, now=1005.0) == []
    assert spool.quiet_studies(quiet_s=10, now=1010.0) == [STUDY]
    claimed = spool.claim(STUDY)
    assert claimed is not None
    assert claimed.last_arrival == 1000.0
    assert [file.name for file in claimed.instance_files()] == [f"{SOP}.dcm"]
    assert spool.claim(STUDY) is None  # gone from incoming
    # after a restart the claim is found again, with its arrival time
    resumed = Spool(tmp_path).claimed_studies()
    assert [(s.study_uid, s.last_arrival) for s in resumed] == [(STUDY, 1000.0)]


def test_a_late_instance_starts_a_new_incoming_folder(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.store_instance(STUDY, SOP, b"a")
    first = spool.claim(STUDY)
    spool.store_instance(STUDY, SOP + ".2", b"b")
    second = spool.claim(STUDY)
    assert first is not None and second is not None
    assert first.folder != second.folder
    assert [f.name for f in second.instance_files()] == [f"{SOP}.2.dcm"]


def test_stores_racing_a_claim_lose_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    count = 200

    def store() -> None:
        for index in range(count):
            spool.store_instance(STUDY, f"{SOP}.{index + 1}", b"x")

    writer = threading.Thread(target=store)
    writer.start()
    claimed = []
    while writer.is_alive():
        study = spool.claim(STUDY)
        if study is not None:
            claimed.append(study)
    writer.join()
    last = spool.claim(STUDY)
    claimed += [last] if last is not None else []
    names = [file.name for study in claimed for file in study.instance_files()]
    assert sorted(names) == sorted(f"{SOP}.{index + 1}.dcm" for index in range(count))


def test_the_outbox_keeps_one_file_per_report_until_delivered(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.enqueue("PACS", "1.2.3", b"sr", {"last_arrival": 5.0})
    spool.enqueue("PACS", "1.2.3", b"sr", {"last_arrival": 5.0})  # re-queued after a crash
    spool.enqueue("PACS", "1.2.4", b"sr2", {})
    pending = spool.pending("PACS")
    assert [path.stem for path in pending] == ["1.2.3", "1.2.4"]
    assert spool.report_meta(pending[0]) == {"last_arrival": 5.0}
    spool.delivered(pending[0])
    assert [path.stem for path in spool.pending("PACS")] == ["1.2.4"]
    kept = spool.set_aside("PACS", spool.pending("PACS")[0], {"status": "0xA900"})
    assert spool.pending("PACS") == []
    assert (kept / "1.2.4.dcm").read_bytes() == b"sr2"


def test_outcomes_are_recorded_per_request(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.outcome(STUDY, "k1") is None
    spool.record_outcome(STUDY, "k1", {"status": "answered"})
    assert Spool(tmp_path).outcome(STUDY, "k1") == {"status": "answered"}


class FlakyServer:
    """Unavailable `failures` times, then answers (a server being restarted)."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.calls = 0
        self.error = error or ServerUnavailableError("restarting")

    def __call__(self, task: str, data: Sequence[bytes], clinical: Mapping[str, Any]) -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "answer"


def quick(give_up_after_s: float = 60.0) -> RetryOptions:
    return RetryOptions(first_backoff_s=0.01, max_backoff_s=0.02, give_up_after_s=give_up_after_s)


def test_an_unavailable_server_is_waited_for() -> None:
    server = FlakyServer(failures=5)
    metrics = GatewayMetrics()
    infer = PersistentInference(server, quick(), metrics, threading.Event())
    assert infer("bone_density_ct", [b""], {}) == "answer"
    assert server.calls == 6
    assert metrics.registry.get_sample_value("abdoserve_gateway_inference_retries_total") == 5


def test_an_invalid_study_is_not_retried() -> None:
    server = FlakyServer(failures=1, error=InvalidRequestError("instance 0: (0028,0030)"))
    infer = PersistentInference(server, quick(), GatewayMetrics(), threading.Event())
    with pytest.raises(InvalidRequestError):
        infer("bone_density_ct", [b""], {})
    assert server.calls == 1


def test_the_wait_ends_at_the_give_up_time_or_the_stop() -> None:
    infer = PersistentInference(
        FlakyServer(10**9), quick(0.05), GatewayMetrics(), threading.Event()
    )
    with pytest.raises(GaveUp, match="server unreachable"):
        infer("bone_density_ct", [b""], {})
    stopping = threading.Event()
    stopping.set()
    stopped = PersistentInference(FlakyServer(10**9), quick(), GatewayMetrics(), stopping)
    with pytest.raises(Interrupted):
        stopped("bone_density_ct", [b""], {})


def test_destinations_parse_and_refuse_nonsense() -> None:
    assert Destination.parse("ORTHANC@127.0.0.1:4242") == Destination("ORTHANC", "127.0.0.1", 4242)
    assert Destination.parse("PACS@[::1]:104") == Destination("PACS", "::1", 104)
    for text in ("ORTHANC", "ORTHANC@host", "@h:1", "A@h:0", "WAYTOOLONGAETITLE17@h:1"):
        with pytest.raises(ValueError, match="destination"):
            Destination.parse(text)


def status(code: int) -> Dataset:
    answer = Dataset()
    answer.Status = code
    return answer


def test_which_store_statuses_count_as_stored_and_which_are_final() -> None:
    assert stored(status(0x0000)) and stored(status(0xB000)) and stored(status(0x0001))
    assert not stored(status(0xA700)) and not stored(Dataset()) and not stored(None)
    assert permanent(0xA900) and permanent(0xC000) and permanent(0x0122)
    assert not permanent(0xA700) and not permanent(0xA702)


class OneRule:
    """Takes every series whose description is not "Scout" (a stand-in for a RuleSet)."""

    def matching_rule(self, header: Dataset) -> str | None:
        return None if header.get("SeriesDescription") == "Scout" else "rule"


class Received:
    """What pynetdicom hands the handler under chunked receive: a file on disk."""

    def __init__(self, path: Path) -> None:
        self.dataset_path = path


@pytest.fixture
def received(tmp_path: Path) -> Path:
    from abdoserve.export.phantom.studies import build_study

    path = tmp_path / "received.dcm"
    path.write_bytes(build_study("bone_density_ct", seed=0, slices=1).instances[0])
    return path


def handler(tmp_path: Path, **options: Any) -> Any:
    from abdoserve.deploy.gateway.scp import StoreHandler

    return StoreHandler(Spool(tmp_path / "spool"), OneRule(), GatewayMetrics(), **options)


def refused(metrics: GatewayMetrics, reason: str) -> float | None:
    name = "abdoserve_gateway_instances_refused_total"
    return metrics.registry.get_sample_value(name, {"reason": reason})


def test_the_handler_spools_a_received_file_and_acknowledges(
    tmp_path: Path, received: Path
) -> None:
    store = handler(tmp_path)
    assert store(Received(received)) == 0x0000
    (spooled,) = (tmp_path / "spool" / "incoming").glob("*/*.dcm")
    assert spooled.read_bytes() == received.read_bytes()


def test_the_handler_refuses_what_it_must_and_stores_nothing(
    tmp_path: Path, received: Path
) -> None:
    store = handler(tmp_path, max_instance_bytes=1000)
    answer = store(Received(received))
    assert (answer.Status, answer.ErrorComment) == (0xC000, "instance larger than 1000 bytes")
    assert refused(store.metrics, "too_large") == 1
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 10)
    assert handler(tmp_path)(Received(junk)).ErrorComment == "data set could not be parsed"
    scout = pydicom.dcmread(received)
    scout.SeriesDescription = "Scout"
    scout.save_as(received)
    unmatched = handler(tmp_path)
    assert unmatched(Received(received)).ErrorComment == "no routing rule matches this series"
    assert unmatched(Received(received)).Status == 0xC000  # the same series: counted once
    assert (
        unmatched.metrics.registry.get_sample_value("abdoserve_gateway_series_unmatched_total") == 1
    )
    assert not list((tmp_path / "spool" / "incoming").glob("*/*.dcm"))


def test_a_nearly_full_spool_refuses_as_out_of_resources_so_the_sender_retries(
    tmp_path: Path, received: Path
) -> None:
    store = handler(tmp_path, min_free_bytes=2**62)  # more than any disk has free
    answer = store(Received(received))
    assert (answer.Status, answer.ErrorComment) == (0xA700, "spool disk nearly full")
    assert refused(store.metrics, "disk_full") == 1
    assert not list((tmp_path / "spool" / "incoming").glob("*/*.dcm"))
    assert handler(tmp_path, min_free_bytes=0)(Received(received)) == 0x0000
