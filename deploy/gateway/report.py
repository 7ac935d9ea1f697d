"""One study's answer as a DICOM Structured Report (and the JSON copy kept beside it).

The SR is a Comprehensive 3D SR (the SOP class IHE AIR names for AI results) holding a
TID 1500 Measurement Report:

- TID 1001 observation context: the gateway as the device observer;
- procedure reported (CID 100) and TID 1600 image library of every source instance;
- one TID 1501 measurement group for the study answer: the score, BMD or class
  probabilities (TID 300, coded concept and UCUM unit), the stage, class or flag as
  coded qualitative evaluations, the finding site, TID 4019 algorithm identification
  (model name, version, weights hash and source, runtime, precision) and the source
  images; and, for tasks that score each image, one group per image;
- with untrained reference weights, the answer's notice as a TEXT item in the study
  group and in the report's "Qualitative Evaluations" container, and visibly outside
  the content tree: Series Description, Preliminary Flag and Content Qualification.

The report reads the client's typed result (`abdoserve_client.results.StudyResult`), never
the raw ANSWER JSON: its numbers are stated as the ANSWER states them (`answer_number`).
`sources[i]` is the instance the answer calls `instance: i` (the order they were sent).
The SOP Instance and Series Instance UIDs are derived from the study, the task and the
instances, so that a study re-sent after a crash yields the same SR, which a PACS
deduplicates. Patient and study attributes are copied from the sources into the SR,
as DICOM requires; nothing here logs them.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, cast

import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    ImageLibrary,
    ImageLibraryEntryDescriptors,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from abdoserve.deploy.gateway import report_codes as rc
from abdoserve.preprocessing.tasks import TASKS
from abdoserve_client.model_identity import ModelIdentity
from abdoserve_client.results import (
    ClassificationResult,
    ImageResult,
    ScoreResult,
    StudyResult,
    answer_number,
)

NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"
MAX_LO = 64
# TID 1500 row "Qualitative Evaluations" (not in pydicom's code dictionary).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")


@dataclass(frozen=True)
class ReportContext:
    """What the gateway knows about a report beyond the answer and the images."""

    task: str
    rule: str  # the routing rule that chose the images
    series_number: int = 9901  # high, out of the way of the modality's series
    instance_number: int = 1
    institution: str | None = None
    device_name: str = "AbdoServe"  # manufacturer, device observer, algorithm manufacturer
    # TID 1600 describes every source image again (geometry and all): optional in TID 1500,
    # and it makes a report 3-4x slower to build in highdicom (0.46 vs 0.13 s for 9 images).
    # The evidence and each measurement's source images reference the instances either way.
    image_library: bool = False


def _algorithm(model: ModelIdentity, untrained: bool, manufacturer: str) -> AlgorithmIdentification:
    """TID 4019: name, version and the parameters that identify the weights."""
    parameters = [
        f"weights_sha256={model.weights_sha256}",
        f"weights_source={model.weights_source}",
        f"weights_untrained={str(untrained).lower()}",
        f"runtime={model.runtime}",
        f"precision={model.precision}",
    ]
    if model.deviation is not None:
        deviation = json.dumps(dict(model.deviation), sort_keys=True)
        parameters.append(f"deviation={deviation}")
    if model.card_id:  # an imported version: its model card (docs/models.md)
        parameters.append(f"model_card={model.card_id}")
    return AlgorithmIdentification(
        name=model.name,
        version=model.version or "unknown",
        parameters=parameters,
        manufacturer=manufacturer,
    )


@dataclass(frozen=True)
class _Parts:
    """What every measurement group of one report shares."""

    task: str
    algorithm: AlgorithmIdentification
    sites: list[FindingSite]
    sop_instance_uid: str


def report_uid(study_uid: str, task: str, instances: Sequence[str]) -> str:
    """The SR's SOP Instance UID: the same study, task and instances give the same UID.

    The instances are taken as a set (their order of arrival may differ on a re-send).
    """
    return _derived_uid("report", study_uid, task, *sorted(set(instances)))


def report_series_uid(study_uid: str, task: str) -> str:
    """The SR's Series Instance UID: one series per study and task."""
    return _derived_uid("series", study_uid, task)


def _derived_uid(kind: str, *parts: str) -> str:
    # One newline-joined string: generate_uid concatenates its sources without a
    # separator, which would let ("1.2", "3") and ("1.23",) collide.
    text = "\n".join(("abdoserve-gateway-sr", kind, *parts))
    return str(generate_uid(entropy_srcs=[text]))


def build_report(
    result: StudyResult, sources: Sequence[pydicom.Dataset], context: ReportContext
) -> pydicom.Dataset:
    """The SR of one study's result, as the client parsed it; `sources` are the headers of
    the instances sent.

    Raises ValueError for a result or sources that cannot make a faithful report.
    """
    _check_sources(sources)
    if result.task != context.task:
        raise ValueError(f"the answer is for task {result.task!r}, not {context.task!r}")
    if not result.model.name:
        raise ValueError("the answer has no model name")
    # The client gives every untrained answer a notice (the server's or the standard one).
    notice = result.notice
    study_uid = str(sources[0].StudyInstanceUID)
    parts = _Parts(
        task=context.task,
        algorithm=_algorithm(result.model, notice is not None, context.device_name),
        sites=_finding_sites(context.task),
        sop_instance_uid=report_uid(study_uid, context.task, [s.SOPInstanceUID for s in sources]),
    )
    groups = [_study_group(result, sources, parts, notice), *_image_groups(result, sources, parts)]
    content = MeasurementReport(
        observation_context=_observation_context(context, result.model),
        procedure_reported=_procedures(sources),
        imaging_measurements=groups,
        title=rc.REPORT_TITLE,
    )
    library = _image_library(sources) if context.image_library else None
    if library is not None:  # TID 1500 order: before the Imaging Measurements container
        content[0].ContentSequence.insert(len(content[0].ContentSequence) - 1, library)
    if notice is not None:
        content[0].ContentSequence.append(_notice_container(notice))
    report = _document(content, sources, context, parts.sop_instance_uid, notice is not None)
    if sources[0].get("PatientName"):
        report.PatientName = sources[0].PatientName  # see _evidence
    return report


def _document(
    content: MeasurementReport,
    sources: Sequence[pydicom.Dataset],
    context: ReportContext,
    sop_instance_uid: str,
    untrained: bool,
) -> Comprehensive3DSR:
    """The SR document around `content`: patient, study, series, equipment, flags."""
    return Comprehensive3DSR(
        evidence=_evidence(sources),
        content=content,
        series_instance_uid=report_series_uid(str(sources[0].StudyInstanceUID), context.task),
        series_number=context.series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=context.instance_number,
        manufacturer=context.device_name,
        is_complete=True,
        # No person verified a model's output; untrained output is flagged preliminary.
        is_final=not untrained,
        is_verified=False,
        institution_name=context.institution,
        series_description=_series_description(context, untrained),
        content_qualification="RESEARCH" if untrained else None,
        coding_schemes=[rc.coding_scheme()],
        manufacturer_model_name=f"{context.device_name} gateway"[:MAX_LO],
        software_versions=_software_version(),
    )


def result_json(
    result: StudyResult, report: pydicom.Dataset, context: ReportContext
) -> dict[str, Any]:
    """The JSON copy of a report: the model, the answer's result object as sent, the SR's
    and the sources' UIDs. It carries no patient attribute (name, ID, birth date, ...)."""
    return {
        "task": context.task,
        "rule": context.rule,
        "title": result.title,
        "model": json.loads(json.dumps(result.model.to_answer())),
        "result": json.loads(json.dumps(result.answer.get("result", {}))),
        "notice": result.notice,
        "report": {
            "sop_class_uid": str(report.SOPClassUID),
            "sop_instance_uid": str(report.SOPInstanceUID),
            "series_instance_uid": str(report.SeriesInstanceUID),
            "study_instance_uid": str(report.StudyInstanceUID),
        },
        "sources": _evidence_uids(report),
    }


def _evidence_uids(report: pydicom.Dataset) -> list[str]:
    return [
        str(instance.ReferencedSOPInstanceUID)
        for study in report.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    ]


def _check_sources(sources: Sequence[pydicom.Dataset]) -> None:
    if not sources:
        raise ValueError("a report needs at least one source instance")
    studies = {str(source.StudyInstanceUID) for source in sources}
    if len(studies) != 1:
        raise ValueError(f"the sources belong to {len(studies)} studies, not one")
    uids = [str(source.SOPInstanceUID) for source in sources]
    if len(set(uids)) != len(uids):
        raise ValueError("the sources repeat an instance")


def _finding_sites(task: str) -> list[FindingSite]:
    site = rc.FINDING_SITES.get(task)
    return [FindingSite(anatomic_location=site)] if site is not None else []


def _procedures(sources: Sequence[pydicom.Dataset]) -> list[Code]:
    modalities = sorted({str(source.get("Modality", "")) for source in sources})
    found = [rc.PROCEDURES[modality] for modality in modalities if modality in rc.PROCEDURES]
    return found or [rc.FALLBACK_PROCEDURE]


def _image_library(sources: Sequence[pydicom.Dataset]) -> ContainerContentItem | None:
    """TID 1600 (TID 1604 descriptors) of the sources highdicom can describe.

    highdicom reads the geometry at the top level only, where a multi-frame (Enhanced
    CT/MR) header has none: such a header is given its first frame's geometry from the
    functional groups. A header that still cannot be described is left out of the
    library (the evidence and its measurement group reference it all the same).
    """
    headers = [_with_frame_geometry(source) for source in sources]
    try:
        library = ImageLibrary(headers)
    except _UNDESCRIBABLE:
        # Built once when all is well; otherwise again with the describable headers.
        described = [header for header in headers if _describable(header)]
        if not described:
            return None
        library = ImageLibrary(described)
    return cast(ContainerContentItem, library[0])  # the one item ImageLibrary holds


_UNDESCRIBABLE = (AttributeError, KeyError, IndexError, TypeError, ValueError)


def _describable(header: pydicom.Dataset) -> bool:
    try:
        ImageLibraryEntryDescriptors(header)
    except _UNDESCRIBABLE:
        return False
    return True


_FRAME_GEOMETRY = {
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness"),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PlanePositionSequence": ("ImagePositionPatient",),
}


def _with_frame_geometry(source: pydicom.Dataset) -> pydicom.Dataset:
    """`source`, or for a multi-frame header a copy with its first frame's geometry on top."""
    if "SharedFunctionalGroupsSequence" not in source or "PixelSpacing" in source:
        return source
    header = _top_level_copy(source)
    frames = [
        *source.SharedFunctionalGroupsSequence,
        *source.get("PerFrameFunctionalGroupsSequence", [])[:1],
    ]
    for sequence, keywords in _FRAME_GEOMETRY.items():
        for group in frames:
            if sequence in group and group[sequence].value:
                item = group[sequence].value[0]
                for keyword in keywords:
                    if keyword in item:
                        header.add(copy.copy(item[keyword]))
                break
    return header


def _top_level_copy(source: pydicom.Dataset) -> pydicom.Dataset:
    """A new dataset with copies of `source`'s top-level elements, so that setting one
    leaves `source` be (setting an attribute changes its element in place)."""
    header = pydicom.Dataset()
    for element in source:
        header.add(copy.copy(element))
    return header


# Type 2 in every image IOD, yet missing from some headers; highdicom reads them from
# the first evidence item unconditionally.
_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_PATIENT_SEXES = ("M", "F", "O", "")


def _evidence(sources: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The sources as highdicom takes them: it copies the patient and study from the
    first, needs its Type 2 attributes present and a valid sex, and warns (with the name
    in the message) about a one-component patient name. So the first is a copy with any
    missing Type 2 attribute empty, an invalid sex emptied, and no name: `build_report`
    puts the source's name, unchanged, into the report afterwards."""
    first = sources[0]
    sex = str(first.get("PatientSex", "") or "")
    name = str(first.get("PatientName", "") or "")
    complete = all(keyword in first for keyword in _STUDY_TYPE2)
    if complete and sex in _PATIENT_SEXES and ("^" in name or not name):
        return list(sources)
    header = _top_level_copy(first)
    for keyword in _STUDY_TYPE2:
        if keyword not in header:
            setattr(header, keyword, None)
    if sex not in _PATIENT_SEXES:
        header.PatientSex = None
    header.PatientName = None
    return [header, *sources[1:]]


def _observation_context(context: ReportContext, model: ModelIdentity) -> ObservationContext:
    device = DeviceObserverIdentifyingAttributes(
        uid=_derived_uid("device", context.device_name),
        name=context.device_name,
        manufacturer_name=context.device_name,
        model_name=f"{model.name} {model.version}".strip(),
    )
    observer = ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device
    )
    return ObservationContext(observer_device_context=observer)


def _series_description(context: ReportContext, untrained: bool) -> str:
    # The statement leads, so that truncation to LO's 64 characters never cuts it.
    prefix = f"{NOT_FOR_CLINICAL_USE} - " if untrained else ""
    text = f"{prefix}{context.device_name} {context.task}".replace("\\", "/")
    return text[:MAX_LO]


def _software_version() -> str:
    try:
        return f"abdoserve {metadata.version('abdoserve')}"[:MAX_LO]
    except metadata.PackageNotFoundError:
        return "abdoserve unknown"


def _notice_container(notice: str) -> ContainerContentItem:
    """TID 1500 'Qualitative Evaluations' holding the notice as TEXT."""
    container = ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = ContentSequence([_notice_item(notice)])
    return container


def _notice_item(notice: str) -> TextContentItem:
    return TextContentItem(
        name=rc.NOTICE, value=notice, relationship_type=RelationshipTypeValues.CONTAINS
    )


def _number(value: float, what: str) -> float:
    """A finite number as the ANSWER states it (DICOM DS/FD cannot say NaN)."""
    number = answer_number(float(value))
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return number


def _checked_instances(indices: Sequence[int], count: int) -> list[int]:
    """The request-instance indices, each once, in order; each must have been sent."""
    used: list[int] = []
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise ValueError(f"the answer names instance {index!r}; {count} were sent")
        if index not in used:
            used.append(index)
    return used


def _used_instances(result: StudyResult, count: int) -> list[int]:
    """The request-instance indices the answer used, in order: roles first, then images."""
    indices = [*result.roles.values(), *(image.instance for image in result.images)]
    return _checked_instances(indices, count) or list(range(count))


def _source_images(
    sources: Sequence[pydicom.Dataset], indices: Sequence[int]
) -> list[SourceImageForMeasurementGroup]:
    return [SourceImageForMeasurementGroup.from_source_image(sources[i]) for i in indices]


def _tracking(parts: _Parts, number: int, label: str) -> TrackingIdentifier:
    uid = _derived_uid("tracking", parts.sop_instance_uid, str(number))
    return TrackingIdentifier(uid=uid, identifier=label)


def _study_group(
    result: StudyResult,
    sources: Sequence[pydicom.Dataset],
    parts: _Parts,
    notice: str | None,
) -> MeasurementsAndQualitativeEvaluations:
    derivation = _derivation(parts.task) if len(result.images) > 1 else None
    measurements, evaluations = _study_findings(parts, result, derivation)
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(parts, 0, f"{result.title or parts.task}: study"),
        algorithm_id=parts.algorithm,
        finding_sites=parts.sites,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=_source_images(sources, _used_instances(result, len(sources))),
    )
    if notice is not None:
        # TID 1501 allows TEXT qualitative evaluations: the notice beside the value.
        group[0].ContentSequence.append(_notice_item(notice))
    return group


def _derivation(task: str) -> Code | None:
    spec = TASKS.get(task)
    return rc.DERIVATIONS.get(spec.output.aggregation) if spec is not None else None


def _study_findings(
    parts: _Parts, result: StudyResult, derivation: Code | None
) -> tuple[list[Measurement], list[QualitativeEvaluation]]:
    if isinstance(result, ClassificationResult):
        return _classification(parts, result)
    if not isinstance(result, ScoreResult):
        raise ValueError(f"a {type(result).__name__} is neither a class nor a score")
    value = _number(result.value, f"result {result.name!r}")
    unit = rc.unit_code(result.unit)
    measurements = [_measurement(parts, rc.score_concept(result.name), value, unit, derivation)]
    evaluations = []
    if result.stage is not None:
        stage = rc.stage_code(result.stage)
        evaluations.append(QualitativeEvaluation(name=rc.FIBROSIS_STAGE, value=stage))
    for name, flag in result.flags.items():
        value_code = rc.YES if flag else rc.NO
        evaluations.append(QualitativeEvaluation(name=rc.flag_concept(name), value=value_code))
    return measurements, evaluations


def _classification(
    parts: _Parts, result: ClassificationResult
) -> tuple[list[Measurement], list[QualitativeEvaluation]]:
    probabilities = result.probabilities
    if not probabilities:
        raise ValueError("the result's probabilities must not be empty")
    measurements = [
        _measurement(
            parts,
            rc.category_probability(label),
            _number(probability, f"probability of {label!r}"),
            rc.PROBABILITY_UNIT,
        )
        for label, probability in probabilities.items()
    ]
    if result.label not in probabilities:
        raise ValueError(f"the result's label {result.label!r} is not among its probabilities")
    category = rc.category_code(result.label, result.description)
    concept = rc.LIVER_MASS_CATEGORY if parts.task == "liver_mass_ct" else rc.fallback("category")
    return measurements, [QualitativeEvaluation(name=concept, value=category)]


def _measurement(
    parts: _Parts, concept: Code, value: float, unit: Code, derivation: Code | None = None
) -> Measurement:
    """TID 300; the study's measurements name their algorithm themselves too (TID 4019),
    for readers that take a measurement out of its group."""
    return Measurement(
        name=concept, value=value, unit=unit, derivation=derivation, algorithm_id=parts.algorithm
    )


def _image_groups(
    result: StudyResult, sources: Sequence[pydicom.Dataset], parts: _Parts
) -> list[MeasurementsAndQualitativeEvaluations]:
    """One group per scored image, for tasks that score each image (BMD, fibrosis CT,
    oesophageal cancer); tasks whose images are one sample's channels have none."""
    if result.roles or not isinstance(result, ScoreResult):
        return []
    concept, unit = rc.score_concept(result.name), rc.unit_code(result.unit)
    return [
        _image_group(parts, number, image, sources, concept=concept, unit=unit)
        for number, image in enumerate(result.images, start=1)
    ]


def _image_group(
    parts: _Parts,
    number: int,
    image: ImageResult,
    sources: Sequence[pydicom.Dataset],
    *,
    concept: Code,
    unit: Code,
) -> MeasurementsAndQualitativeEvaluations:
    if len(image.values) != 1:
        raise ValueError(f"image {number} of the answer must hold one value")
    value = _number(image.values[0], f"image {number} value")
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(parts, number, f"{parts.task}: image {number}"),
        algorithm_id=parts.algorithm,
        finding_sites=parts.sites,
        measurements=[Measurement(name=concept, value=value, unit=unit)],
        source_images=_source_images(sources, _checked_instances([image.instance], len(sources))),
    )
