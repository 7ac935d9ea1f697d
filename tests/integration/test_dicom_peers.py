"""The gateway's test peers against the real programs: dcmtk's storescu sends phantom
studies into Debian's Orthanc, which keeps them in their transfer syntax, survives a
stop and start, indexes an SR as Modality SR, and refuses what a PACS refuses.
No Triton here: these tests use none of conftest's server fixtures."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from abdoserve.export.phantom.common import write_study
from abdoserve.export.phantom.dicom_writer import TRANSFER_SYNTAXES
from abdoserve.export.phantom.studies import build_study
from abdoserve.loadtests.dicom_peers import (
    Orthanc,
    echoscu,
    free_port,
    orthanc,
    storescu,
)
from tests.dicom_sr import write_basic_text_sr

TASK = "bone_density_ct"
SLICES = 9  # bone_density_ct's phantom series
WAIT_S = 30.0


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    with orthanc(tmp_path / "orthanc") as running:
        yield running


def phantom_files(folder: Path, seed: int, syntax: str = "ExplicitVRLittleEndian") -> list[Path]:
    """The study's .dcm files only (write_study also writes request.json, truth.json)."""
    written = write_study(build_study(TASK, seed=seed, transfer_syntax=syntax), folder)
    return [path for path in written if path.suffix == ".dcm"]


def sop_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in paths}


def send(pacs: Orthanc, paths: list[Path], **options: Any) -> subprocess.CompletedProcess[str]:
    return storescu(paths, port=pacs.dicom_port, called_aet=pacs.aet, **options)


def has(count: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda found: len(found) >= count


def test_storescu_sends_a_study_in_one_association(pacs: Orthanc, tmp_path: Path) -> None:
    files = phantom_files(tmp_path / "study", seed=0)
    assert len(files) == SLICES
    result = send(pacs, files)
    assert result.stderr.count("Requesting Association") == 1
    assert result.stderr.count("Received Store Response (Success)") == SLICES
    found = pacs.wait_for_instances(has(SLICES), WAIT_S)
    assert len(found) == SLICES == len(pacs.instances())
    assert pacs.sop_instance_uids() == sop_uids(files) == pacs.sop_instance_uids("CT")
    metadata = pacs.metadata(found[0]["ID"])
    assert (metadata["RemoteAET"], metadata["CalledAET"]) == ("MODALITY", pacs.aet)
    # Only our configuration: none of Debian's plugins (worklists, serve-folders) loaded.
    assert set(pacs.get("/plugins")) <= {"explorer.js"}


@pytest.mark.parametrize("syntax", ["JPEG2000Lossless", "RLELossless"])
def test_a_compressed_study_arrives_in_its_syntax(
    pacs: Orthanc, tmp_path: Path, syntax: str
) -> None:
    """storescu's default would refuse JPEG 2000 and decompress RLE; the profile keeps both."""
    files = phantom_files(tmp_path / "study", seed=0, syntax=syntax)
    send(pacs, files)
    found = pacs.wait_for_instances(has(SLICES), WAIT_S)
    assert pacs.sop_instance_uids() == sop_uids(files)
    sent = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, files)}
    for item in found:
        stored = pydicom.dcmread(io.BytesIO(pacs.instance_file(item["ID"])))
        assert stored.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[syntax]
        assert pacs.metadata(item["ID"])["TransferSyntax"] == TRANSFER_SYNTAXES[syntax]
        assert stored.PixelData == sent[str(stored.SOPInstanceUID)].PixelData


def test_an_sr_is_found_as_modality_sr(pacs: Orthanc, tmp_path: Path) -> None:
    """An SR and its JPEG 2000 study in one association: two SOP classes, two syntaxes."""
    files = phantom_files(tmp_path / "study", seed=0, syntax="JPEG2000Lossless")
    sr = write_basic_text_sr(tmp_path / "sr.dcm", like=files[0], text="L1 density: normal")
    send(pacs, [*files, tmp_path / "sr.dcm"])
    pacs.wait_for_instances(has(SLICES + 1), WAIT_S)
    found = pacs.find_instances(Modality="SR", StudyInstanceUID=sr.StudyInstanceUID)
    assert [item["MainDicomTags"]["SOPInstanceUID"] for item in found] == [sr.SOPInstanceUID]
    assert pacs.sop_instance_uids("SR") == {sr.SOPInstanceUID}
    assert pacs.sop_instance_uids("CT") == sop_uids(files)
    stored = pydicom.dcmread(io.BytesIO(pacs.instance_file(found[0]["ID"])))
    assert stored.ContentSequence[0].TextValue == "L1 density: normal"


def test_echoscu_and_the_called_aet(pacs: Orthanc, tmp_path: Path) -> None:
    assert echoscu(port=pacs.dicom_port, called_aet=pacs.aet).returncode == 0
    with pytest.raises(subprocess.CalledProcessError, match="Called AE Title Not Recognized"):
        echoscu(port=pacs.dicom_port, called_aet="NOT-ORTHANC")
    files = phantom_files(tmp_path / "study", seed=0)
    with pytest.raises(subprocess.CalledProcessError, match="Called AE Title Not Recognized"):
        storescu(files[:1], port=pacs.dicom_port, called_aet="NOT-ORTHANC")
    assert pacs.instances() == []


def test_stop_refuses_and_start_keeps_the_storage(pacs: Orthanc, tmp_path: Path) -> None:
    first = phantom_files(tmp_path / "first", seed=0)
    send(pacs, first)
    pacs.wait_for_instances(has(SLICES), WAIT_S)
    ports = (pacs.dicom_port, pacs.http_port)

    pacs.stop()
    second = phantom_files(tmp_path / "second", seed=1)
    with pytest.raises(subprocess.CalledProcessError, match="Connection refused") as refused:
        send(pacs, second)
    assert refused.value.returncode != 0
    with pytest.raises(subprocess.CalledProcessError, match="Connection refused"):
        echoscu(port=pacs.dicom_port, called_aet=pacs.aet)

    pacs.start()
    assert (pacs.dicom_port, pacs.http_port) == ports
    assert pacs.sop_instance_uids() == sop_uids(first)
    send(pacs, second)
    pacs.wait_for_instances(has(2 * SLICES), WAIT_S)
    assert pacs.sop_instance_uids() == sop_uids(first) | sop_uids(second)
    assert len(pacs.instances()) == 2 * SLICES


def test_allowed_callers_only(tmp_path: Path) -> None:
    gateway = ("127.0.0.1", free_port())
    files = phantom_files(tmp_path / "study", seed=0)
    with orthanc(tmp_path / "orthanc", aet="PACS", allowed_callers={"GATEWAY": gateway}) as pacs:
        assert pacs.get("/modalities") == ["GATEWAY"]
        with pytest.raises(subprocess.CalledProcessError, match="Calling AE Title Not Recog"):
            send(pacs, files, calling_aet="MODALITY")
        send(pacs, files, calling_aet="GATEWAY")
        assert pacs.sop_instance_uids() == sop_uids(files)


def test_delete_all_and_the_wait_timeout(pacs: Orthanc, tmp_path: Path) -> None:
    send(pacs, phantom_files(tmp_path / "study", seed=0))
    pacs.wait_for_instances(has(SLICES), WAIT_S)
    pacs.delete_all()
    assert pacs.instances() == []
    with pytest.raises(AssertionError, match=r"0 instance\(s\) matching \{'Modality': 'SR'\}"):
        pacs.wait_for_instances(has(1), 0.5, Modality="SR")
