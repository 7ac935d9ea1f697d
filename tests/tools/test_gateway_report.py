"""The gateway's Structured Report: built from real phantom headers and real answers
(the server's own `study_answer`), checked by real tools (dcmtk's dsrdump, dicom3tools'
dciodvfy) and read back with highdicom: values, units, model identity, the untrained
notice, references to exactly the source instances, deterministic UIDs, and a JSON copy
with nothing of the patient in it."""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import re
import shutil
import subprocess
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr import (
    CodedConcept,
    Comprehensive3DSR,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
)
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, Comprehensive3DSRStorage

from abdoserve.deploy.gateway import report_codes as rc
from abdoserve.deploy.gateway.report import (
    NOT_FOR_CLINICAL_USE,
    ReportContext,
    build_report,
    report_series_uid,
    report_uid,
    result_json,
)
from abdoserve.export.configs import describe_task
from abdoserve.export.phantom.enhanced import enhanced_multiframe
from abdoserve.export.phantom.studies import build_study
from abdoserve.preprocessing.tasks import TASKS
from abdoserve.serving.answer import UNTRAINED_NOTICE, ModelIdentity, study_answer
from abdoserve_client.results import ImageResult, StudyResult, TaskInfo, parse_result

TASK_NAMES = tuple(TASKS)
SHA256 = "3f" * 32
# The UCUM code the report gives each unit an answer names.
SCORE_UNITS = {"g/cm2": "g/cm2", "stage": "{stage}", "": "1"}
# dciodvfy (dicom3tools 2022) knows no private coding scheme designators, though the
# standard allows "99" ones (PS3.16 8.2) and the report declares its own in the Coding
# Scheme Identification Sequence: a limitation of the validator. Any other warning fails.
ALLOWED_WARNINGS = (
    re.compile(
        r"^Warning - Unrecognized defined term <99ABDOSERVE> for value 1 of attribute "
        r"<Coding Scheme Designator>$"
    ),
)

needs_dcmtk = pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dcmtk not installed")
needs_dicom3tools = pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dicom3tools not installed"
)


def headers(instances: Sequence[bytes]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True) for data in instances]


@pytest.fixture(scope="module")
def phantom_sources() -> dict[str, list[pydicom.Dataset]]:
    """Each task's phantom study headers, in the order they were sent."""
    return {task: headers(build_study(task, seed=0).instances) for task in TASK_NAMES}


CARD_ID = "3f9c0a1b2d4e"


def identity(task: str, *, trained: bool) -> ModelIdentity:
    parameters = {
        "weights_source": "hospital-checkpoint" if trained else "reference-untrained",
        "weights_sha256": SHA256,
        "weights_untrained": "false" if trained else "true",
        "runtime": "onnxruntime",
        "runtime_precision": "fp32",
    }
    if trained:  # a hospital's version comes with its model card
        parameters["card_id"] = CARD_ID
    return ModelIdentity.from_parameters(task, "3", parameters)


def parse(task: str, answer: Mapping[str, Any], scores: Any, study: Any) -> StudyResult:
    """The client's typed result of a server's answer, as the gateway receives it."""
    info = TaskInfo.from_parameters(describe_task(TASKS[task]), "3")
    return parse_result(info, json.dumps(answer), scores, study)


def reparsed(typed: StudyResult, change: Callable[[dict[str, Any]], object]) -> StudyResult:
    """`typed` parsed again from its answer after `change` (same tensors)."""
    answer = copy.deepcopy(dict(typed.answer))
    change(answer)
    return parse(typed.task, answer, typed.image_values, typed.study_values)


def make_result(task: str, count: int, *, trained: bool = False, seed: int = 1) -> StudyResult:
    """The client's result of the server's answer for `count` sent instances, from
    per-sample network outputs drawn in the task's output range (softmax rows for the
    classifier)."""
    spec = TASKS[task]
    rng = np.random.default_rng(seed)
    model = identity(task, trained=trained)
    if spec.images.stacking == "channels":
        roles = {role: count - 1 - index for index, role in enumerate(spec.images.roles)}
        outputs = rng.random((1, spec.output.width))
        if spec.output.kind == "classification":
            outputs = np.exp(3 * outputs) / np.exp(3 * outputs).sum()
        else:
            outputs = outputs * spec.output.value_range[1]
        first = roles[spec.images.roles[0]]
        outputs = outputs.astype(np.float32)
        study, answer = study_answer(spec, outputs, [first], model, roles)
        return parse(task, answer, outputs, study)
    low, high = spec.output.value_range
    outputs = (low + (high - low) * rng.random((count, 1))).astype(np.float32)
    study, answer = study_answer(spec, outputs, list(range(count)), model)
    return parse(task, answer, outputs, study)


def context(task: str) -> ReportContext:
    return ReportContext(
        task=task, rule=f"{task}-rule", institution="Test Hospital", image_library=True
    )


def save(report: pydicom.Dataset, folder: Path, name: str = "report.dcm") -> Path:
    path = folder / name
    report.save_as(path, enforce_file_format=True)
    return path


def dsrdump(path: Path) -> str:
    # +Pl: print long text values whole (the notice is longer than the default cut)
    done = subprocess.run(
        ["dsrdump", "+Pl", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    # dsrdump checks the IOD's relationship constraints and the VRs, and warns on stderr;
    # a malformed code would print as "invalid code"
    assert not [line for line in done.stderr.splitlines() if line[:2] in ("E:", "W:", "F:")]
    assert "invalid code" not in done.stdout
    return done.stdout


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's error and warning lines (it prints them to stderr)."""
    done = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (done.stderr + done.stdout).splitlines()
    return [line for line in lines if line.startswith(("Error", "Warning"))]


def assert_valid(path: Path) -> None:
    findings = dciodvfy(path)
    errors = [line for line in findings if line.startswith("Error")]
    assert not errors, "\n".join(errors)
    unexpected = [
        line for line in findings if not any(pattern.match(line) for pattern in ALLOWED_WARNINGS)
    ]
    assert not unexpected, "\n".join(unexpected)


def read_back(path: Path) -> Comprehensive3DSR:
    """The saved report as highdicom reads it."""
    report = hd.sr.srread(path)
    assert isinstance(report, Comprehensive3DSR)
    return report


def measurement_groups(report: Comprehensive3DSR) -> list[MeasurementsAndQualitativeEvaluations]:
    content = report.content
    assert isinstance(content, MeasurementReport)  # TID 1500 read as such
    return content.get_image_measurement_groups()


def study_group(report: Comprehensive3DSR) -> MeasurementsAndQualitativeEvaluations:
    groups = measurement_groups(report)
    found = [group for group in groups if (group.tracking_identifier or "").endswith(": study")]
    assert len(found) == 1
    return found[0]


def image_groups(report: Comprehensive3DSR) -> list[MeasurementsAndQualitativeEvaluations]:
    groups = measurement_groups(report)
    return [group for group in groups if not (group.tracking_identifier or "").endswith(": study")]


def texts(item: pydicom.Dataset, name: Code) -> list[str]:
    found = hd.sr.utils.find_content_items(item, name=name, recursive=True)
    return [str(entry.TextValue) for entry in found]


def coded(item: pydicom.Dataset, name: Code) -> CodedConcept:
    evaluations = [
        entry
        for entry in hd.sr.utils.find_content_items(item, name=name, recursive=True)
        if entry.ValueType == "CODE"
    ]
    assert len(evaluations) == 1
    return CodedConcept.from_dataset(evaluations[0].ConceptCodeSequence[0])


def referenced_uids(group: MeasurementsAndQualitativeEvaluations) -> list[str]:
    return [str(image.referenced_sop_instance_uid) for image in group.source_images]


def score_key(result: Mapping[str, Any]) -> str:
    (key,) = [k for k, v in result.items() if isinstance(v, float) and not isinstance(v, bool)]
    return key


@needs_dcmtk
@pytest.mark.parametrize("task", TASK_NAMES)
def test_dsrdump_reads_the_value_the_unit_and_the_notice(
    task: str, phantom_sources: dict[str, list[pydicom.Dataset]], tmp_path: Path
) -> None:
    sources = phantom_sources[task]
    typed = make_result(task, len(sources))
    answer = typed.answer
    text = dsrdump(save(build_report(typed, sources, context(task)), tmp_path))
    result = answer["result"]
    if "probabilities" in result:
        for label, probability in result["probabilities"].items():
            assert f'category {label}")="{probability}" (1,UCUM,"no units")' in text
        assert f"(LMC-{result['label']},99ABDOSERVE," in text
    else:
        unit = SCORE_UNITS[result["unit"]]
        assert f'="{result[score_key(result)]}" ({unit},UCUM,' in text
    if "stage" in result:
        assert f"(FIB-{result['stage']},99ABDOSERVE," in text
    assert answer["notice"] == UNTRAINED_NOTICE
    assert text.count(UNTRAINED_NOTICE) == 2  # in the study group and the report's evaluations
    assert f"Series              : {NOT_FOR_CLINICAL_USE}" in text
    assert "Preliminary Flag    : PRELIMINARY" in text
    assert f'"Algorithm Parameters")="weights_sha256={SHA256}"' in text


@needs_dicom3tools
@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("task", TASK_NAMES)
def test_dciodvfy_finds_no_error(
    task: str, trained: bool, phantom_sources: dict[str, list[pydicom.Dataset]], tmp_path: Path
) -> None:
    sources = phantom_sources[task]
    typed = make_result(task, len(sources), trained=trained)
    assert_valid(save(build_report(typed, sources, context(task)), tmp_path))


@pytest.mark.parametrize("task", TASK_NAMES)
def test_highdicom_reads_back_the_answer(
    task: str, phantom_sources: dict[str, list[pydicom.Dataset]], tmp_path: Path
) -> None:
    sources = phantom_sources[task]
    typed = make_result(task, len(sources))
    answer = typed.answer
    report = read_back(save(build_report(typed, sources, context(task)), tmp_path))
    assert isinstance(report, Comprehensive3DSR)
    assert report.SOPClassUID == Comprehensive3DSRStorage
    group = study_group(report)
    result = answer["result"]
    if "probabilities" in result:
        for label, probability in result["probabilities"].items():
            (measurement,) = group.get_measurements(name=rc.CATEGORY_PROBABILITIES[label])
            assert measurement.value == probability
            assert measurement.unit == codes.UCUM.NoUnits
        assert coded(group[0], rc.LIVER_MASS_CATEGORY) == rc.CATEGORIES[result["label"]]
    else:
        key = score_key(result)
        (measurement,) = group.get_measurements(name=rc.SCORES[key])
        assert measurement.value == result[key]
        assert measurement.unit.value == SCORE_UNITS[result["unit"]]
        assert measurement.unit.scheme_designator == "UCUM"
    if "stage" in result:
        assert coded(group[0], rc.FIBROSIS_STAGE) == rc.STAGES[result["stage"]]
    for flag in ("osteoporosis", "suspicious"):
        if flag in result:
            expected = codes.SCT.Yes if result[flag] else codes.SCT.No
            assert coded(group[0], rc.FLAGS[flag]) == expected
    assert [site.value for site in group.finding_sites] == [rc.FINDING_SITES[task]]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_the_model_is_identified(
    task: str, phantom_sources: dict[str, list[pydicom.Dataset]], tmp_path: Path
) -> None:
    sources = phantom_sources[task]
    report = read_back(
        save(build_report(make_result(task, len(sources)), sources, context(task)), tmp_path)
    )
    group = study_group(report)
    # TID 4019 at the group and on each of its measurements
    holders = [group[0], *(measurement[0] for measurement in group.get_measurements())]
    for holder in holders:
        direct = hd.sr.utils.find_content_items(holder, name=codes.DCM.AlgorithmName)
        assert [item.TextValue for item in direct] == [task]
        versions = hd.sr.utils.find_content_items(holder, name=codes.DCM.AlgorithmVersion)
        assert [item.TextValue for item in versions] == ["3"]
        parameters = hd.sr.utils.find_content_items(holder, name=codes.DCM.AlgorithmParameters)
        assert {item.TextValue for item in parameters} == {
            f"weights_sha256={SHA256}",
            "weights_source=reference-untrained",
            "weights_untrained=true",
            "runtime=onnxruntime",
            "precision=fp32",
        }


def test_an_imported_version_names_its_model_card(
    phantom_sources: dict[str, list[pydicom.Dataset]], tmp_path: Path
) -> None:
    task = "bone_density_ct"
    sources = phantom_sources[task]
    typed = make_result(task, len(sources), trained=True)
    report = read_back(save(build_report(typed, sources, context(task)), tmp_path))
    group = study_group(report)
    parameters = hd.sr.utils.find_content_items(group[0], name=codes.DCM.AlgorithmParameters)
    assert f"model_card={CARD_ID}" in {item.TextValue for item in parameters}


@pytest.mark.parametrize("task", TASK_NAMES)
def test_references_are_exactly_the_source_instances(
    task: str, phantom_sources: dict[str, list[pydicom.Dataset]], tmp_path: Path
) -> None:
    sources = phantom_sources[task]
    typed = make_result(task, len(sources))
    report = read_back(save(build_report(typed, sources, context(task)), tmp_path))
    sent = [str(source.SOPInstanceUID) for source in sources]
    evidence = report.get_evidence(current_procedure_only=True)
    assert sorted(str(item[2]) for item in evidence) == sorted(sent)
    assert "PertinentOtherEvidenceSequence" not in report
    assert sorted(referenced_uids(study_group(report))) == sorted(sent)
    library = hd.sr.utils.find_content_items(
        report.content[0], name=Code("260753009", "SCT", "Source"), recursive=True
    )
    assert sorted(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in library) == (
        sorted(sent)
    )
    assert report.StudyInstanceUID == sources[0].StudyInstanceUID
    assert report.PatientID == sources[0].PatientID


@pytest.mark.parametrize("task", ["bone_density_ct", "liver_fibrosis_ct", "esophageal_cancer_ct"])
def test_each_scored_image_has_its_own_group(
    task: str, phantom_sources: dict[str, list[pydicom.Dataset]], tmp_path: Path
) -> None:
    sources = phantom_sources[task]
    typed = make_result(task, len(sources))
    answer = typed.answer
    report = read_back(save(build_report(typed, sources, context(task)), tmp_path))
    groups = image_groups(report)
    assert len(groups) == len(answer["images"]) > 1
    for group, image in zip(groups, answer["images"], strict=True):
        (measurement,) = group.get_measurements()
        assert measurement.value == image["values"][0]
        assert referenced_uids(group) == [sources[image["instance"]].SOPInstanceUID]
    # the study value is their mean (BMD, F_DLCT) or maximum (oesophageal cancer)
    (study,) = study_group(report).get_measurements()
    derivation = {"mean": codes.SCT.Mean, "max": codes.SCT.Maximum}
    assert study.derivation == derivation[TASKS[task].output.aggregation]


@pytest.mark.parametrize("task", ["liver_mass_ct", "liver_fibrosis_mri"])
def test_channel_tasks_have_one_group_for_their_role_images(
    task: str, phantom_sources: dict[str, list[pydicom.Dataset]], tmp_path: Path
) -> None:
    sources = phantom_sources[task]
    typed = make_result(task, len(sources))
    answer = typed.answer
    report = read_back(save(build_report(typed, sources, context(task)), tmp_path))
    assert image_groups(report) == []
    roles = [answer["roles"][role] for role in TASKS[task].images.roles]
    expected = [sources[index].SOPInstanceUID for index in roles]
    assert referenced_uids(study_group(report)) == expected


def test_untrained_weights_are_flagged_outside_the_content_tree_too(
    phantom_sources: dict[str, list[pydicom.Dataset]],
) -> None:
    sources = phantom_sources["bone_density_ct"]
    report = build_report(
        make_result("bone_density_ct", len(sources)), sources, context("bone_density_ct")
    )
    assert report.SeriesDescription.startswith(NOT_FOR_CLINICAL_USE)
    assert report.ContentQualification == "RESEARCH"
    assert report.PreliminaryFlag == "PRELIMINARY"
    assert report.VerificationFlag == "UNVERIFIED" and report.CompletionFlag == "COMPLETE"
    assert texts(report, rc.NOTICE) == [UNTRAINED_NOTICE, UNTRAINED_NOTICE]
    (evaluations,) = hd.sr.utils.find_content_items(
        report, name=Code("C0034375", "UMLS", "Qualitative Evaluations")
    )
    assert texts(evaluations, rc.NOTICE) == [UNTRAINED_NOTICE]
    root = [item.ConceptNameCodeSequence[0].CodeMeaning for item in report.ContentSequence]
    assert root[-4:] == [
        "Procedure reported",
        "Image Library",
        "Imaging Measurements",
        "Qualitative Evaluations",
    ]  # TID 1500 order
    declared = [item.CodingSchemeDesignator for item in report.CodingSchemeIdentificationSequence]
    assert declared == [rc.SCHEME]


@needs_dcmtk
@pytest.mark.parametrize("task", TASK_NAMES)
def test_trained_weights_carry_no_notice(
    task: str, phantom_sources: dict[str, list[pydicom.Dataset]], tmp_path: Path
) -> None:
    sources = phantom_sources[task]
    typed = make_result(task, len(sources), trained=True)
    answer = typed.answer
    assert "notice" not in answer and answer["model"]["untrained"] is False
    report = build_report(typed, sources, context(task))
    text = dsrdump(save(report, tmp_path))
    assert "UNTRAINED" not in text and NOT_FOR_CLINICAL_USE not in text
    assert texts(report, rc.NOTICE) == []
    assert "Qualitative Evaluations" not in text
    assert report.PreliminaryFlag == "FINAL"
    assert "ContentQualification" not in report
    assert NOT_FOR_CLINICAL_USE not in report.SeriesDescription


def test_an_answer_not_marked_trained_carries_the_notice(
    phantom_sources: dict[str, list[pydicom.Dataset]],
) -> None:
    sources = phantom_sources["bone_density_ct"]
    trained = make_result("bone_density_ct", len(sources), trained=True)
    # anything not explicitly trained is untrained
    typed = reparsed(trained, lambda answer: answer["model"].pop("untrained"))
    report = build_report(typed, sources, context("bone_density_ct"))
    assert texts(report, rc.NOTICE) == [UNTRAINED_NOTICE, UNTRAINED_NOTICE]


def test_an_int8_answer_names_its_measured_deviation(
    phantom_sources: dict[str, list[pydicom.Dataset]],
) -> None:
    sources = phantom_sources["liver_fibrosis_ct"]
    deviation = {"reference": "PyTorch FP32", "max_abs": 0.0123, "held_out_studies": 6}
    runtime = {"name": "openvino-int8", "precision": "int8", "deviation": deviation}
    typed = reparsed(
        make_result("liver_fibrosis_ct", len(sources), trained=True),
        lambda answer: answer["model"].update(runtime=runtime),
    )
    report = build_report(typed, sources, context("liver_fibrosis_ct"))
    parameters = texts(report, codes.DCM.AlgorithmParameters)
    assert "runtime=openvino-int8" in parameters and "precision=int8" in parameters
    assert f"deviation={json.dumps(deviation, sort_keys=True)}" in parameters


def test_report_uid_is_deterministic_and_distinguishes_its_inputs() -> None:
    study, instances = "1.2.3.4", ["1.2.3.4.5.1", "1.2.3.4.5.2"]
    uid = report_uid(study, "bone_density_ct", instances)
    assert UID(uid).is_valid and len(uid) <= 64
    assert report_uid(study, "bone_density_ct", list(reversed(instances))) == uid
    others = {
        report_uid(study, "liver_fibrosis_ct", instances),
        report_uid(study, "bone_density_ct", instances[:1]),
        report_uid("1.2.3.5", "bone_density_ct", instances),
        # the same characters split otherwise
        report_uid(study, "bone_density_ct", ["1.2.3.4.5.11", ".2"]),
    }
    assert uid not in others and len(others) == 4
    assert report_series_uid(study, "bone_density_ct") != report_series_uid(study, "x")


def test_a_resent_study_gets_the_same_report_uids(
    phantom_sources: dict[str, list[pydicom.Dataset]],
) -> None:
    sources = phantom_sources["esophageal_cancer_ct"]
    typed = make_result("esophageal_cancer_ct", len(sources))
    first = build_report(typed, sources, context("esophageal_cancer_ct"))
    again = build_report(typed, sources, context("esophageal_cancer_ct"))
    study = sources[0].StudyInstanceUID
    instances = [source.SOPInstanceUID for source in sources]
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert first.SOPInstanceUID == report_uid(study, "esophageal_cancer_ct", instances)
    assert first.SeriesInstanceUID == again.SeriesInstanceUID
    assert first.SeriesInstanceUID == report_series_uid(study, "esophageal_cancer_ct")
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    fewer = make_result("esophageal_cancer_ct", len(sources) - 1)
    other = build_report(fewer, sources[:-1], context("esophageal_cancer_ct"))
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert other.SeriesInstanceUID == first.SeriesInstanceUID


def renamed(sources: Sequence[pydicom.Dataset], name: str) -> list[pydicom.Dataset]:
    copies = headers([encode(source) for source in sources])
    for header in copies:
        header.PatientName = name
        header.PatientID = "PID-QUOKKA-8731"
        header.PatientBirthDate = "19020304"
    return copies


def encode(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_result_json_names_the_result_and_nothing_of_the_patient(
    phantom_sources: dict[str, list[pydicom.Dataset]],
) -> None:
    sources = renamed(phantom_sources["liver_fibrosis_ct"], "ZEBRAFINCH^QUOKKA")
    task = "liver_fibrosis_ct"
    typed = make_result(task, len(sources))
    answer = typed.answer
    report = build_report(typed, sources, context(task))
    assert str(report.PatientName) == "ZEBRAFINCH^QUOKKA"  # the DICOM file carries it
    copy = result_json(typed, report, context(task))
    text = json.dumps(copy)
    for secret in ("ZEBRAFINCH", "QUOKKA", "19020304"):
        assert secret not in text
    assert not {"PatientName", "PatientID", "PatientBirthDate"} & set(copy)
    assert copy["task"] == task and copy["rule"] == f"{task}-rule"
    assert copy["result"] == answer["result"] and copy["model"] == answer["model"]
    assert copy["notice"] == UNTRAINED_NOTICE
    assert copy["report"] == {
        "sop_class_uid": Comprehensive3DSRStorage,
        "sop_instance_uid": report.SOPInstanceUID,
        "series_instance_uid": report.SeriesInstanceUID,
        "study_instance_uid": sources[0].StudyInstanceUID,
    }
    assert sorted(copy["sources"]) == sorted(source.SOPInstanceUID for source in sources)
    trained = make_result(task, len(sources), trained=True)
    assert result_json(trained, report, context(task))["notice"] is None


def test_no_log_record_or_warning_names_the_patient(
    phantom_sources: dict[str, list[pydicom.Dataset]], caplog: pytest.LogCaptureFixture
) -> None:
    # highdicom warns with the name itself about a one-component name ("QUOKKAFINCH"
    # is a valid PN): the report is built without letting it see the name.
    sources = renamed(phantom_sources["bone_density_ct"], "QUOKKAFINCH")
    before = copy.deepcopy(sources)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = build_report(
            make_result("bone_density_ct", len(sources)), sources, context("bone_density_ct")
        )
    assert caplog.records  # highdicom does log (UIDs and keywords)
    messages = [record.getMessage() for record in caplog.records]
    messages += [str(warning.message) for warning in caught]
    assert not [message for message in messages if "QUOKKA" in message]
    assert str(report.PatientName) == "QUOKKAFINCH"  # unchanged in the file
    assert sources == before  # the caller's headers are left as they were


@needs_dicom3tools
@pytest.mark.parametrize("thickness", [True, False])
def test_an_enhanced_multiframe_source(thickness: bool, tmp_path: Path) -> None:
    """Enhanced CT keeps its geometry in functional groups and (this phantom) lacks some
    Type 2 study attributes: the report still builds, validates and references it. The
    image library describes it by its first frame, or leaves it out when highdicom cannot
    describe it (pixel measures without a slice thickness)."""
    study = build_study("bone_density_ct", seed=0)
    sources = headers([enhanced_multiframe(study.instances)])
    assert "PixelSpacing" not in sources[0] and "AccessionNumber" not in sources[0]
    measures = sources[0].SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    if thickness:
        measures.SliceThickness = 5
    elif "SliceThickness" in measures:
        del measures.SliceThickness
    spec, model = TASKS["bone_density_ct"], identity("bone_density_ct", trained=False)
    outputs = np.linspace(0.6, 1.2, len(study.instances), dtype=np.float32)[:, None]
    values, answer = study_answer(spec, outputs, [0] * len(study.instances), model)
    typed = parse("bone_density_ct", answer, outputs, values)
    before = copy.deepcopy(sources)
    report = build_report(typed, sources, context("bone_density_ct"))
    assert sources == before
    path = save(report, tmp_path)
    assert_valid_but_study_id(path)
    read = read_back(path)
    assert [str(item[2]) for item in read.get_evidence()] == [sources[0].SOPInstanceUID]
    assert len(image_groups(read)) == len(study.instances)
    library = hd.sr.utils.find_content_items(
        read.content[0], name=codes.DCM.ImageLibrary, recursive=True
    )
    assert len(library) == (1 if thickness else 0)
    if thickness:
        positions = hd.sr.utils.find_content_items(
            library[0], name=codes.DCM.ImagePositionPatientZ, recursive=True
        )
        first = sources[0].PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
        assert [item.MeasuredValueSequence[0].NumericValue for item in positions] == [
            first.ImagePositionPatient[2]
        ]


def assert_valid_but_study_id(path: Path) -> None:
    # The phantom's enhanced header has no Study ID; the report copies it empty.
    findings = [line for line in dciodvfy(path) if "DICOMDIR - Study ID" not in line]
    assert not [line for line in findings if line.startswith("Error")]
    assert all(any(p.match(line) for p in ALLOWED_WARNINGS) for line in findings)


def _first_image_elsewhere(typed: StudyResult) -> StudyResult:
    first, *rest = typed.images
    return replace(typed, images=(ImageResult(99, first.values), *rest))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: replace(r, task="bone_density_ct"), "is for task"),
        (_first_image_elsewhere, "names instance 99"),
        (lambda r: replace(r, value=math.nan), "must be finite"),
        (lambda r: replace(r, model=replace(r.model, name="")), "no model name"),
    ],
)
def test_an_inconsistent_result_is_refused(
    change: Callable[[StudyResult], StudyResult],
    message: str,
    phantom_sources: dict[str, list[pydicom.Dataset]],
) -> None:
    sources = phantom_sources["liver_fibrosis_ct"]
    typed = change(make_result("liver_fibrosis_ct", len(sources)))
    with pytest.raises(ValueError, match=message):
        build_report(typed, sources, context("liver_fibrosis_ct"))


def test_the_report_reads_the_typed_result_not_the_raw_answer(
    phantom_sources: dict[str, list[pydicom.Dataset]],
) -> None:
    """The same report from the client's result whether or not its raw ANSWER is kept:
    every value, unit, stage, flag, role and the model come from the typed fields."""
    for task in ("liver_fibrosis_ct", "liver_mass_ct"):
        sources = phantom_sources[task]
        typed = make_result(task, len(sources), trained=True)
        whole = timeless(build_report(typed, sources, context(task)))
        bare = timeless(build_report(replace(typed, answer={}), sources, context(task)))
        assert bare == whole
        assert len(bare.ContentSequence) == len(whole.ContentSequence) > 3


# Set from the clock when a report is built.
_BUILD_TIMES = ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime")


def timeless(report: pydicom.Dataset) -> pydicom.Dataset:
    for keyword in (*_BUILD_TIMES, "ContributingEquipmentSequence"):
        del report[keyword]
    return report


def test_sources_must_be_one_study(phantom_sources: dict[str, list[pydicom.Dataset]]) -> None:
    mixed = [*phantom_sources["bone_density_ct"][:2], phantom_sources["liver_fibrosis_ct"][0]]
    typed = make_result("bone_density_ct", len(mixed))
    with pytest.raises(ValueError, match="2 studies"):
        build_report(typed, mixed, context("bone_density_ct"))
    with pytest.raises(ValueError, match="at least one"):
        build_report(typed, [], context("bone_density_ct"))


def test_private_codes_fit_their_value_representations() -> None:
    tables: list[Mapping[str, Code]] = [
        rc.SCORES,
        rc.STAGES,
        rc.CATEGORIES,
        rc.CATEGORY_PROBABILITIES,
        rc.FLAGS,
    ]
    private = [
        code for table in tables for code in table.values() if code.scheme_designator == rc.SCHEME
    ]
    private += [rc.FIBROSIS_STAGE, rc.LIVER_MASS_CATEGORY, rc.NOTICE]
    assert len({code.value for code in private}) == len(private)  # unique within the scheme
    assert all(len(code.value) <= 16 and len(code.meaning) <= 64 for code in private)
    # every task's labels have their codes
    assert set(rc.CATEGORIES) == set(TASKS["liver_mass_ct"].output.labels)
    assert set(rc.STAGES) == set(TASKS["liver_fibrosis_ct"].output.labels[1:])
    for task, spec in TASKS.items():
        assert task in rc.FINDING_SITES
        if spec.output.kind != "classification":
            assert spec.output.labels[0] in rc.SCORES and spec.output.unit in rc.UNITS
        if spec.output.flag_name:
            assert spec.output.flag_name in rc.FLAGS


@needs_dicom3tools
def test_by_default_the_report_has_no_image_library_and_still_references_every_source(
    phantom_sources: dict[str, list[pydicom.Dataset]], tmp_path: Path
) -> None:
    sources = phantom_sources["bone_density_ct"]
    typed = make_result("bone_density_ct", len(sources))
    lean = ReportContext(task="bone_density_ct", rule="bone_density_ct-rule")
    path = save(build_report(typed, sources, lean), tmp_path)
    assert_valid_but_study_id(path)
    report = read_back(path)
    assert not hd.sr.utils.find_content_items(
        report.content[0], name=codes.DCM.ImageLibrary, recursive=True
    )
    sent = sorted(str(source.SOPInstanceUID) for source in sources)
    assert sorted(str(item[2]) for item in report.get_evidence()) == sent
    assert sorted(referenced_uids(study_group(report))) == sent
