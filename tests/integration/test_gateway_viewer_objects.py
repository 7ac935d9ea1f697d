"""The maps and key images beside the SR, against real peers: storescu as the modality
(to the gateway, and to Orthanc as it would to the PACS), a real Triton server,
`abdoserve gateway` as its own process, Orthanc as the PACS, dcmtk and dciodvfy.

For bone density, fibrosis CT and oesophageal cancer: the Secondary Captures and the Key
Object Selection reach Orthanc next to the SR; dcmj2pnm and Orthanc's preview render each
capture; dciodvfy finds no error in either; highdicom reads them back; every KOS reference
resolves to an instance Orthanc holds. A failure to make maps loses no SR.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import highdicom
import pydicom
import pytest
from highdicom.ko import KeyObjectSelectionDocument
from pydicom.dataset import Dataset

from abdoserve.deploy.embedded import EmbeddedServer
from abdoserve.loadtests.dicom_peers import Orthanc, storescu
from tests.integration.gateway_fixtures import built_repository, running_orthanc, running_triton
from tests.integration.gateway_process import GatewayProcess, wait_until
from tests.integration.test_gateway import (
    DISTINCTIVE_ID,
    DISTINCTIVE_NAME,
    RULES,
    pacs_destination,
    phantom,
    push,
    study_uid,
    url,
    wait_for_report,
)

TASKS = ("bone_density_ct", "liver_fibrosis_ct", "esophageal_cancer_ct")
# key images of the phantom studies (seed 0): every slice; every slice; the top 3
KEY_IMAGES = {"bone_density_ct": None, "liver_fibrosis_ct": None, "esophageal_cancer_ct": 3}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_repository(tmp_path_factory, "viewer-tasks", TASKS)


@pytest.fixture(scope="module")
def triton(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    with running_triton(repository, tmp_path_factory, "viewer-triton") as running:
        yield running


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path_factory, "viewer-orthanc") as instance:
        yield instance


@pytest.fixture
def gateway(tmp_path: Path, triton: EmbeddedServer, pacs: Orthanc) -> Iterator[GatewayProcess]:
    pacs.delete_all()
    process = GatewayProcess(
        folder=tmp_path / "gateway",
        rules=RULES,
        grpc_url=url(triton),
        destinations=pacs_destination(pacs),
        explanation_maps=True,
    )
    with process:
        yield process
    assert DISTINCTIVE_NAME.split("^", maxsplit=1)[0] not in process.log_text()
    assert DISTINCTIVE_ID not in process.log_text()


def modality_to_both(gateway: GatewayProcess, pacs: Orthanc, paths: list[Path]) -> None:
    """The modality sends the study to the PACS and to the gateway, as a site routes it."""
    storescu(paths, port=pacs.dicom_port, called_aet=pacs.aet)
    push(gateway, paths)


def stored(pacs: Orthanc, orthanc_id: str) -> Dataset:
    return pydicom.dcmread(io.BytesIO(pacs.instance_file(orthanc_id)))


def dciodvfy_errors(path: Path) -> list[str]:
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def kos_references(kos: Dataset) -> set[str]:
    """Every SOP Instance UID the KOS names: its content items and its evidence."""
    content = {
        str(reference.ReferencedSOPInstanceUID)
        for item in kos.ContentSequence
        for reference in item.get("ReferencedSOPSequence", [])
    }
    evidence = {
        str(sop.ReferencedSOPInstanceUID)
        for study in kos.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert content == evidence
    return content


def test_a_failure_to_make_maps_loses_no_sr(
    gateway: GatewayProcess, pacs: Orthanc, repository: Path, tmp_path: Path
) -> None:
    # First in the file: the explain model keeps a twin once loaded, so this task's is
    # taken away before any study of it was explained (and put back after).
    twin = repository / "liver_fibrosis_ct" / "1" / "twin.pt"  # fused: the version's folder
    aside = tmp_path / "twin.pt"
    shutil.move(twin, aside)
    try:
        paths = phantom("liver_fibrosis_ct", tmp_path / "study")
        modality_to_both(gateway, pacs, paths)
        report = wait_for_report(pacs, study_uid(paths))
        wait_until(
            lambda: (
                gateway.metric(
                    "abdoserve_gateway_explanation_failures_total", task="liver_fibrosis_ct"
                )
                == 1
            ),
            "the failed maps counted",
        )
    finally:
        shutil.move(aside, twin)
    assert report.StudyInstanceUID == study_uid(paths)
    assert pacs.find_instances(Modality="KO") == []
    assert (
        gateway.metric("abdoserve_gateway_requests_answered_total", task="liver_fibrosis_ct") == 1
    )
    assert "maps not made (" in gateway.log_text()


@pytest.mark.parametrize("task", TASKS)
def test_maps_and_key_images_reach_the_pacs_beside_the_sr(
    task: str, gateway: GatewayProcess, pacs: Orthanc, tmp_path: Path
) -> None:
    paths = phantom(task, tmp_path / "study")
    modality_to_both(gateway, pacs, paths)
    study = study_uid(paths)
    wait_for_report(pacs, study)
    found = pacs.wait_for_instances(lambda items: len(items) == 1, 120, Modality="KO")
    kos = stored(pacs, found[0]["ID"])
    held = {item["MainDicomTags"]["SOPInstanceUID"]: item["ID"] for item in pacs.find_instances()}
    references = kos_references(kos)
    assert references <= set(held), "a KOS reference Orthanc does not hold"
    captures = [stored(pacs, held[uid]) for uid in references]
    captures = [item for item in captures if item.SOPClassUID == SECONDARY_CAPTURE]
    expected = KEY_IMAGES[task] or len(paths)
    assert len(captures) == expected and len(references) == 2 * expected
    check_kos(kos, study, tmp_path)
    for capture in captures:
        check_capture(capture, held[str(capture.SOPInstanceUID)], pacs, tmp_path)
    check_spool(gateway, study, expected, {str(item.SOPInstanceUID) for item in captures})
    assert gateway.metric("abdoserve_gateway_explanations_sent_total", task=task) == 1
    wait_until(
        lambda: (
            gateway.metric("abdoserve_gateway_viewer_objects_stored_total", destination="ORTHANC")
            == expected + 1
        ),
        "the captures and the KOS counted as stored",
    )
    assert gateway.metric("abdoserve_gateway_reports_stored_total", destination="ORTHANC") == 1


def check_kos(kos: Dataset, study: str, tmp_path: Path) -> None:
    assert kos.StudyInstanceUID == study and kos.PatientID == DISTINCTIVE_ID
    path = tmp_path / "kos.dcm"
    kos.save_as(path)
    assert dciodvfy_errors(path) == []
    read_back = KeyObjectSelectionDocument.from_dataset(kos)
    assert read_back.SOPInstanceUID == kos.SOPInstanceUID
    assert "NOT FOR CLINICAL USE" in str(kos.SeriesDescription)


def check_capture(capture: Dataset, orthanc_id: str, pacs: Orthanc, tmp_path: Path) -> None:
    assert capture.BurnedInAnnotation == "YES" and capture.PatientID == DISTINCTIVE_ID
    path = tmp_path / f"{capture.SOPInstanceUID}.dcm"
    capture.save_as(path)
    assert dciodvfy_errors(path) == []
    rendered = path.with_suffix(".png")
    subprocess.run(["dcmj2pnm", "+on", str(path), str(rendered)], check=True)
    assert rendered.read_bytes()[:8] == PNG_MAGIC
    preview = pacs.request("GET", f"/instances/{orthanc_id}/preview")
    assert preview[:8] == PNG_MAGIC and len(preview) > 10_000
    image = highdicom.imread(path)
    assert image.get_frame(1).shape == (capture.Rows, capture.Columns, 3)


def check_spool(gateway: GatewayProcess, study: str, expected: int, captures: set[str]) -> None:
    folders = list((gateway.spool / "results" / study).glob("*.explain"))
    assert len(folders) == 1
    pngs = sorted(folders[0].glob("*.png"))
    assert len(pngs) == expected and all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    description = json.loads((folders[0] / "explanation.json").read_text())
    assert {key["capture_sop_instance_uid"] for key in description["key_images"]} == captures
    outcome = next((gateway.spool / "results" / study).glob("*.outcome.json"))
    assert set(json.loads(outcome.read_text())["viewer_objects"]["captures"]) == captures
