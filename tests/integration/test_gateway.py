"""The DICOM gateway against real peers: dcmtk's storescu as the modality, Orthanc as
the PACS, a real Triton server, and `abdoserve gateway` as its own process.

Each study is pushed with storescu; the test waits for the SR in Orthanc (REST API),
reads it back and compares it with what `abdoserve infer` answers for the same study.
The faults (gateway SIGKILLed, Triton stopped, Orthanc down) must lose no study and
end in the same SR.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID

from abdoserve.deploy.embedded import EmbeddedServer
from abdoserve.export.phantom.common import write_study
from abdoserve.export.phantom.studies import build_study
from abdoserve.loadtests.dicom_peers import DcmtkError, Orthanc, echoscu, storescu
from tests.htj2k import SYNTAXES as HTJ2K_SYNTAXES
from tests.htj2k import transcode
from tests.integration.gateway_fixtures import built_repository, running_orthanc, running_triton
from tests.integration.gateway_process import AE_TITLE, GatewayProcess, wait_until

RULES = Path(__file__).resolve().parents[2] / "deploy" / "gateway" / "rules.example.yaml"
TASKS = ("bone_density_ct", "liver_fibrosis_ct")
RESULT_KEYS = {"bone_density_ct": "BMD", "liver_fibrosis_ct": "F_DLCT"}
DISTINCTIVE_NAME = "Zyqxwv^Identifiable"
DISTINCTIVE_ID = "PID-8472-QX"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_repository(tmp_path_factory, "gateway-tasks", TASKS)


@pytest.fixture(scope="module")
def triton(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    with running_triton(repository, tmp_path_factory, "gateway-triton") as running:
        yield running


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path_factory, "orthanc") as instance:
        yield instance


@pytest.fixture
def orthanc(pacs: Orthanc) -> Iterator[Orthanc]:
    """The module's Orthanc, running and empty at the start of each test."""
    if not pacs.running:
        pacs.start()
    pacs.delete_all()
    yield pacs


def url(server: EmbeddedServer) -> str:
    return f"{server.options.host}:{server.ports.grpc}"


@pytest.fixture
def gateway(tmp_path: Path, triton: EmbeddedServer, orthanc: Orthanc) -> Iterator[GatewayProcess]:
    process = GatewayProcess(
        folder=tmp_path / "gateway",
        rules=RULES,
        grpc_url=url(triton),
        destinations=pacs_destination(orthanc),
    )
    with process:
        yield process
    assert DISTINCTIVE_NAME.split("^", maxsplit=1)[0] not in process.log_text()
    assert DISTINCTIVE_ID not in process.log_text()


def phantom(task: str, folder: Path, seed: int = 0, **options: Any) -> list[Path]:
    """A phantom study's DICOM files, carrying a distinctive patient name and ID."""
    study = build_study(task, seed=seed, **options)
    paths = [path for path in write_study(study, folder) if path.suffix == ".dcm"]
    for path in paths:
        dataset = pydicom.dcmread(path)
        dataset.PatientName = DISTINCTIVE_NAME
        dataset.PatientID = DISTINCTIVE_ID
        dataset.save_as(path)
    return paths


def push(gateway: GatewayProcess, paths: list[Path]) -> subprocess.CompletedProcess[str]:
    return storescu(paths, port=gateway.port, called_aet=AE_TITLE)


def infer(task: str, folder: Path, server: EmbeddedServer) -> dict[str, Any]:
    """What `abdoserve infer` answers for the study (clinical inputs from request.json)."""
    command = [sys.executable, "-m", "abdoserve.deploy.cli", "infer", task, str(folder)]
    done = subprocess.run(
        [*command, "--json", "--url", url(server)], capture_output=True, text=True, check=True
    )
    answer: dict[str, Any] = json.loads(done.stdout)["answer"]
    return answer


def wait_for_report(orthanc: Orthanc, study_uid: str, timeout_s: float = 120) -> Dataset:
    found = orthanc.wait_for_instances(
        lambda items: len(items) >= 1, timeout_s, Modality="SR", StudyInstanceUID=study_uid
    )
    assert len(found) == 1, f"{len(found)} reports for one study"
    return pydicom.dcmread(io.BytesIO(orthanc.instance_file(found[0]["ID"])))


def numbers(item: Dataset) -> list[tuple[str, float]]:
    """Every NUM content item of an SR, depth first: (concept meaning, value)."""
    found: list[tuple[str, float]] = []
    for child in item.get("ContentSequence", []):
        if child.ValueType == "NUM" and "MeasuredValueSequence" in child:
            meaning = str(child.ConceptNameCodeSequence[0].CodeMeaning)
            found.append((meaning, float(child.MeasuredValueSequence[0].NumericValue)))
        found += numbers(child)
    return found


def texts(item: Dataset) -> list[str]:
    found = [
        str(child.TextValue) for child in item.get("ContentSequence", []) if "TextValue" in child
    ]
    for child in item.get("ContentSequence", []):
        found += texts(child)
    return found


def evidence(report: Dataset) -> set[str]:
    """SOP Instance UIDs the report names as its evidence."""
    return {
        str(sop.ReferencedSOPInstanceUID)
        for study in report.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }


def sop_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in paths}


def study_uid(paths: list[Path]) -> str:
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def assert_report_answers(report: Dataset, answer: dict[str, Any], task: str) -> None:
    """The SR's value is the served answer's, with the model and the untrained notice."""
    expected = float(answer["result"][RESULT_KEYS[task]])
    assert any(
        abs(value - expected) <= 1e-6 * max(1.0, abs(expected)) for _, value in numbers(report)
    ), f"{expected} not among the report's values {numbers(report)}"
    notice = answer["notice"]
    assert any(notice in text for text in texts(report))
    values = " ".join(str(element.value) for element in report.iterall())
    assert answer["model"]["weights_sha256"] in values


# The main path --------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_a_pushed_study_comes_back_as_an_sr_equal_to_abdoserve_infer(
    task: str, gateway: GatewayProcess, orthanc: Orthanc, triton: EmbeddedServer, tmp_path: Path
) -> None:
    paths = phantom(task, tmp_path / "study")
    push(gateway, paths)
    report = wait_for_report(orthanc, study_uid(paths))
    assert_report_answers(report, infer(task, tmp_path / "study", triton), task)
    assert evidence(report) == sop_uids(paths)
    assert report.StudyInstanceUID == study_uid(paths)
    assert report.PatientID == DISTINCTIVE_ID  # the SR belongs to the study's patient
    assert gateway.metric("abdoserve_gateway_requests_answered_total", task=task) == 1
    assert gateway.metric("abdoserve_gateway_reports_stored_total", destination="ORTHANC") == 1
    assert (
        gateway.metric("abdoserve_gateway_result_latency_seconds_count", destination="ORTHANC") == 1
    )
    copies = list((gateway.spool / "results" / study_uid(paths)).glob("*.json"))
    result_copy = next(
        json.loads(p.read_text()) for p in copies if not p.name.endswith("outcome.json")
    )
    assert DISTINCTIVE_ID not in json.dumps(result_copy)


def test_the_report_passes_the_iod_validators(
    gateway: GatewayProcess, orthanc: Orthanc, tmp_path: Path
) -> None:
    paths = phantom("bone_density_ct", tmp_path / "study")
    push(gateway, paths)
    report_file = tmp_path / "report.dcm"
    wait_for_report(orthanc, study_uid(paths)).save_as(report_file)
    dump = subprocess.run(
        ["dsrdump", str(report_file)], check=False, capture_output=True, text=True
    )
    assert dump.returncode == 0, dump.stderr
    assert "UNTRAINED REFERENCE WEIGHTS" in dump.stdout
    verify = subprocess.run(
        ["dciodvfy", str(report_file)], check=False, capture_output=True, text=True
    )
    errors = [line for line in verify.stderr.splitlines() if line.startswith("Error")]
    assert errors == []


# Faults ---------------------------------------------------------------------------------


def reference_report(gateway: GatewayProcess, orthanc: Orthanc, paths: list[Path]) -> Dataset:
    """The SR of an undisturbed run, then Orthanc emptied for the disturbed one."""
    push(gateway, paths)
    report = wait_for_report(orthanc, study_uid(paths))
    orthanc.delete_all()
    for answered in (gateway.spool / "results").iterdir():  # the same study is new again
        shutil.rmtree(answered)
    return report


def pacs_destination(orthanc: Orthanc) -> list[str]:
    return [f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"]


def undisturbed_report(
    folder: Path, triton: EmbeddedServer, orthanc: Orthanc, paths: list[Path]
) -> Dataset:
    """The SR a gateway of its own makes of the study, undisturbed."""
    with GatewayProcess(folder, RULES, url(triton), pacs_destination(orthanc)) as calm:
        return reference_report(calm, orthanc, paths)


def assert_same_report(report: Dataset, reference: Dataset) -> None:
    assert report.SOPInstanceUID == reference.SOPInstanceUID
    assert numbers(report) == numbers(reference)
    assert evidence(report) == evidence(reference)


def test_a_gateway_killed_mid_study_loses_nothing(
    tmp_path: Path, triton: EmbeddedServer, orthanc: Orthanc
) -> None:
    paths = phantom("bone_density_ct", tmp_path / "study")
    destination = pacs_destination(orthanc)
    reference = undisturbed_report(tmp_path / "reference", triton, orthanc, paths)
    # Half the study arrives, the gateway dies (SIGKILL), the rest arrives after the restart.
    gateway = GatewayProcess(tmp_path / "killed", RULES, url(triton), destination, quiet_s=20)
    gateway.start()
    push(gateway, paths[:4])
    gateway.kill()
    assert len(list((gateway.spool / "incoming").glob("*/*.dcm"))) == 4  # acknowledged = kept
    with gateway:  # started again: same ports, same spool
        push(gateway, paths[4:])
        assert_same_report(wait_for_report(orthanc, study_uid(paths)), reference)


def test_a_gateway_killed_while_the_study_is_in_work_resumes_it(
    tmp_path: Path, triton: EmbeddedServer, orthanc: Orthanc
) -> None:
    paths = phantom("bone_density_ct", tmp_path / "study")
    destination = pacs_destination(orthanc)
    reference = undisturbed_report(tmp_path / "reference", triton, orthanc, paths)
    gateway = GatewayProcess(tmp_path / "killed", RULES, url(triton), destination)
    triton.stop()  # the study is claimed and waits in the retry loop
    try:
        with gateway:
            push(gateway, paths)
            wait_until(
                lambda: gateway.metric("abdoserve_gateway_inference_retries_total") > 0, "a retry"
            )
            assert list((gateway.spool / "claimed").iterdir())
            gateway.kill()
    finally:
        triton.start()
    with gateway:  # started again: the claimed study is resumed
        assert_same_report(wait_for_report(orthanc, study_uid(paths)), reference)
    assert not any(p.is_dir() for p in (gateway.spool / "claimed").iterdir())


def test_triton_stopped_and_started_during_a_study_delays_the_report(
    gateway: GatewayProcess, triton: EmbeddedServer, orthanc: Orthanc, tmp_path: Path
) -> None:
    paths = phantom("bone_density_ct", tmp_path / "study")
    reference = reference_report(gateway, orthanc, paths)
    triton.stop()
    try:
        push(gateway, paths)
        wait_until(
            lambda: gateway.metric("abdoserve_gateway_inference_retries_total") > 0,
            "the gateway to retry the stopped server",
        )
        assert orthanc.sop_instance_uids("SR") == set()
    finally:
        triton.start()
    assert_same_report(wait_for_report(orthanc, study_uid(paths)), reference)
    assert (
        gateway.metric(
            "abdoserve_gateway_requests_failed_total", task="bone_density_ct", reason="gave_up"
        )
        == 0
    )


def test_a_pacs_that_is_down_delays_the_report_and_never_drops_it(
    gateway: GatewayProcess, orthanc: Orthanc, tmp_path: Path
) -> None:
    paths = phantom("bone_density_ct", tmp_path / "study")
    reference = reference_report(gateway, orthanc, paths)
    orthanc.stop()
    try:
        push(gateway, paths)
        wait_until(
            lambda: (
                gateway.metric(
                    "abdoserve_gateway_report_send_failures_total", destination="ORTHANC"
                )
                > 0
            ),
            "a failed send",
        )
        assert gateway.metric("abdoserve_gateway_outbox_reports", destination="ORTHANC") == 1
    finally:
        orthanc.start()
    assert_same_report(wait_for_report(orthanc, study_uid(paths)), reference)
    wait_until(
        lambda: gateway.metric("abdoserve_gateway_outbox_reports", destination="ORTHANC") == 0,
        "the outbox to empty",
    )


# Refusals -------------------------------------------------------------------------------


def test_a_series_no_rule_matches_is_refused_politely_and_counted(
    gateway: GatewayProcess, orthanc: Orthanc, tmp_path: Path
) -> None:
    paths = phantom("bone_density_ct", tmp_path / "study")
    for path in paths:
        dataset = pydicom.dcmread(path)
        dataset.SeriesDescription = "Scout localizer"
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        dataset.save_as(path)
    with pytest.raises(DcmtkError) as refused:
        push(gateway, paths)
    assert refused.value.returncode == 0xC0  # storescu exits with the status' high byte
    assert "Error: CannotUnderstand" in refused.value.stderr
    assert gateway.metric("abdoserve_gateway_series_unmatched_total") == 1
    assert gateway.metric("abdoserve_gateway_instances_refused_total", reason="unmatched") == 1
    assert not list((gateway.spool / "incoming").glob("*/*.dcm"))
    assert orthanc.instances() == []
    push(gateway, phantom("bone_density_ct", tmp_path / "good", seed=1))  # still serving
    wait_until(lambda: bool(orthanc.sop_instance_uids("SR")), "the next study's report")


def test_a_study_without_a_clinical_input_needs_input_and_is_not_guessed(
    gateway: GatewayProcess, orthanc: Orthanc, tmp_path: Path
) -> None:
    paths = phantom("liver_fibrosis_ct", tmp_path / "study")
    for path in paths:
        dataset = pydicom.dcmread(path)
        del dataset.PatientAge
        dataset.save_as(path)
    push(gateway, paths)
    wait_until(
        lambda: (
            gateway.metric("abdoserve_gateway_requests_needs_input_total", task="liver_fibrosis_ct")
            == 1
        ),
        "needs input",
    )
    outcomes = list((gateway.spool / "results" / study_uid(paths)).glob("*.outcome.json"))
    outcome = json.loads(outcomes[0].read_text())
    assert outcome["status"] == "needs_input"
    assert outcome["missing"] == ["age"]
    assert orthanc.sop_instance_uids("SR") == set()


def test_a_study_the_server_refuses_goes_to_failed_with_the_reason(
    gateway: GatewayProcess, orthanc: Orthanc, tmp_path: Path
) -> None:
    paths = phantom("bone_density_ct", tmp_path / "study")
    dataset = pydicom.dcmread(paths[2])
    del dataset.PixelSpacing
    dataset.save_as(paths[2])
    push(gateway, paths)
    wait_until(
        lambda: (
            gateway.metric(
                "abdoserve_gateway_requests_failed_total",
                task="bone_density_ct",
                reason="invalid_argument",
            )
            == 1
        ),
        "the refusal",
    )
    reasons = list((gateway.spool / "failed" / study_uid(paths)).glob("*/reason.json"))
    reason = json.loads(reasons[0].read_text())
    assert reason["code"] == "INVALID_ARGUMENT"
    assert "(0028,0030) Pixel Spacing" in reason["message"]
    assert len(list(reasons[0].parent.glob("*.dcm"))) == len(paths)  # the study is kept
    assert DISTINCTIVE_ID not in reasons[0].read_text()
    assert orthanc.sop_instance_uids("SR") == set()


# What else a modality sends, and what an intruder sends -------------------------------


@pytest.mark.parametrize("syntax", ["JPEG2000Lossless", "RLELossless"])
def test_a_compressed_study_is_answered_as_abdoserve_infer_answers_it(
    syntax: str, gateway: GatewayProcess, orthanc: Orthanc, triton: EmbeddedServer, tmp_path: Path
) -> None:
    paths = phantom("bone_density_ct", tmp_path / "study", transfer_syntax=syntax)
    push(gateway, paths)
    report = wait_for_report(orthanc, study_uid(paths))
    assert_report_answers(
        report, infer("bone_density_ct", tmp_path / "study", triton), "bone_density_ct"
    )
    assert evidence(report) == sop_uids(paths)


def push_with_pynetdicom(gateway: GatewayProcess, paths: list[Path]) -> list[int]:
    """The files' C-STOREs in one association from pynetdicom, each in its own transfer
    syntax. For HTJ2K: this machine's storescu (dcmtk 3.6.7) knows no HTJ2K UID and fails
    "unable to convert dataset" before it sends; dcmtk learned them in 3.6.8."""
    from pynetdicom import AE

    datasets = [pydicom.dcmread(path) for path in paths]
    ae = AE(ae_title="MODALITY")
    for context in {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}:
        ae.add_requested_context(*context)
    association = ae.associate("127.0.0.1", gateway.port, ae_title=AE_TITLE)
    assert association.is_established
    try:
        return [int(association.send_c_store(dataset).Status) for dataset in datasets]
    finally:
        association.release()


@pytest.mark.parametrize("syntax", HTJ2K_SYNTAXES, ids=lambda syntax: syntax[-3:])
def test_an_htj2k_study_comes_back_as_the_uncompressed_studys_sr(
    syntax: UID, gateway: GatewayProcess, orthanc: Orthanc, triton: EmbeddedServer, tmp_path: Path
) -> None:
    paths = phantom("bone_density_ct", tmp_path / "study")
    (tmp_path / "htj2k").mkdir()
    coded = [tmp_path / "htj2k" / path.name for path in paths]
    for path, target in zip(paths, coded, strict=True):
        target.write_bytes(transcode(path.read_bytes(), syntax))
    assert push_with_pynetdicom(gateway, coded) == [0x0000] * len(coded)
    report = wait_for_report(orthanc, study_uid(coded))
    # the value the uncompressed files get from `abdoserve infer`
    uncompressed = infer("bone_density_ct", tmp_path / "study", triton)
    assert_report_answers(report, uncompressed, "bone_density_ct")
    assert evidence(report) == sop_uids(coded) == sop_uids(paths)
    assert gateway.metric("abdoserve_gateway_requests_answered_total", task="bone_density_ct") == 1


def test_an_enhanced_ct_instance_is_routed_whole_and_answered(
    gateway: GatewayProcess, orthanc: Orthanc, triton: EmbeddedServer, tmp_path: Path
) -> None:
    from abdoserve.export.phantom.enhanced import enhanced_multiframe

    study = build_study("bone_density_ct", seed=3)
    folder = tmp_path / "enhanced"
    folder.mkdir()
    path = folder / "enhanced.dcm"
    path.write_bytes(enhanced_multiframe(study.instances))
    push(gateway, [path])
    report = wait_for_report(orthanc, study_uid([path]))
    assert_report_answers(report, infer("bone_density_ct", folder, triton), "bone_density_ct")
    assert evidence(report) == sop_uids([path])


def test_echo_answers_and_only_allowed_callers_may_send(
    tmp_path: Path, triton: EmbeddedServer, orthanc: Orthanc
) -> None:
    paths = phantom("bone_density_ct", tmp_path / "study")
    allowed = ["--allow-caller", "MODALITY"]
    with GatewayProcess(tmp_path / "gateway", RULES, url(triton), [], extra=allowed) as gateway:
        echoscu(port=gateway.port, called_aet=AE_TITLE, calling_aet="MODALITY")
        with pytest.raises(DcmtkError):
            echoscu(port=gateway.port, called_aet=AE_TITLE, calling_aet="INTRUDER")
        with pytest.raises(DcmtkError):
            storescu(paths, port=gateway.port, called_aet=AE_TITLE, calling_aet="INTRUDER")
        assert not list((gateway.spool / "incoming").glob("*/*.dcm"))
        assert gateway.metric("abdoserve_gateway_instances_received_total") == 0


def send_raw(gateway: GatewayProcess, dataset: Dataset) -> int:
    """One C-STORE from pynetdicom, whatever the data set holds (an attacker's client)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, dataset.file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", gateway.port, ae_title=AE_TITLE)
    assert association.is_established
    try:
        status = association.send_c_store(dataset)
    finally:
        association.release()
    return int(status.Status)


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID"])
def test_a_uid_that_is_a_path_is_refused_and_nothing_leaves_the_spool(
    keyword: str, gateway: GatewayProcess, orthanc: Orthanc, tmp_path: Path
) -> None:
    paths = phantom("bone_density_ct", tmp_path / "study")
    dataset = pydicom.dcmread(paths[0])
    setattr(dataset, keyword, "../../../../escaped")
    with pydicom.config.disable_value_validation():
        assert send_raw(gateway, dataset) == 0xC000
    assert gateway.metric("abdoserve_gateway_instances_refused_total", reason="invalid_uid") == 1
    assert not [path for path in tmp_path.parent.rglob("*escaped*")]
    push(gateway, paths)  # the gateway goes on serving
    wait_for_report(orthanc, study_uid(paths))


def test_an_instance_over_the_size_limit_is_refused_before_it_is_spooled(
    tmp_path: Path, triton: EmbeddedServer, orthanc: Orthanc
) -> None:
    paths = phantom("bone_density_ct", tmp_path / "study")
    limit = ["--max-instance-mib", "0.25"]  # a 512 x 512 x 16-bit slice is 0.5 MiB
    with GatewayProcess(tmp_path / "gateway", RULES, url(triton), [], extra=limit) as gateway:
        with pytest.raises(DcmtkError) as refused:
            push(gateway, paths)
        assert refused.value.returncode == 0xC0
        assert gateway.metric("abdoserve_gateway_instances_refused_total", reason="too_large") == 1
        assert not list((gateway.spool / "incoming").glob("*/*.dcm"))


def test_a_real_prometheus_scrapes_the_gateways_counts_and_no_identifier(
    gateway: GatewayProcess, orthanc: Orthanc, tmp_path: Path
) -> None:
    from abdoserve.deploy.embedded import free_port
    from abdoserve.deploy.prometheus_server import GATEWAY_JOB, PrometheusServer

    target = f"127.0.0.1:{gateway.metrics_port}"
    with PrometheusServer(
        [],
        port=free_port(),
        data_dir=tmp_path / "prometheus",
        interval_s=1,
        gateway_targets=[target],
    ) as prometheus:
        paths = phantom("bone_density_ct", tmp_path / "study")
        push(gateway, paths)
        wait_for_report(orthanc, study_uid(paths))
        answered = f'sum(abdoserve_gateway_requests_answered_total{{job="{GATEWAY_JOB}"}})'
        stored = f'sum(abdoserve_gateway_result_latency_seconds_count{{job="{GATEWAY_JOB}"}})'

        def settled() -> bool:
            values = [prometheus.query(expr) for expr in (answered, stored)]
            return all(result and result[0].value == 1 for result in values)

        wait_until(settled, "Prometheus to see one answered and one stored report")
        received = prometheus.query(
            f'sum(abdoserve_gateway_instances_received_total{{job="{GATEWAY_JOB}"}})'
        )
        assert received[0].value == len(paths)
        everything = prometheus.query(f'{{job="{GATEWAY_JOB}"}}')
        labels = " ".join(str(sample.labels) for sample in everything)
        assert DISTINCTIVE_ID not in labels and "Zyqxwv" not in labels
        assert study_uid(paths) not in labels  # UIDs go to logs, never to labels
