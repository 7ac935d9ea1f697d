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
from collections.abc import Mapping, Sequence
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
from abdoserve.serving.answer import UNTRAINED_NOTICE

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


@dataclass(frozen=True)
class _Model:
    """The answer's model block, checked."""

    name: str
    version: str
    weights_sha256: str
    weights_source: str
    runtime: Mapping[str, Any]
    untrained: bool

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> _Model:
        model = answer.get("model")
        if not isinstance(model, Mapping) or not model.get("name"):
            raise ValueError("the answer has no model name")
        runtime = model.get("runtime")
        return cls(
            name=str(model["name"]),
            version=str(model.get("version", "")),
            weights_sha256=str(model.get("weights_sha256", "")),
            weights_source=str(model.get("weights_source", "unknown")),
            runtime=runtime if isinstance(runtime, Mapping) else {},
            # As the server does: anything not explicitly trained is untrained.
            untrained=model.get("untrained", True) is not False or "notice" in answer,
        )

    def algorithm(self, manufacturer: str) -> AlgorithmIdentification:
        """TID 4019: name, version and the parameters that identify the weights."""
        parameters = [
            f"weights_sha256={self.weights_sha256}",
            f"weights_source={self.weights_source}",
            f"weights_untrained={str(self.untrained).lower()}",
            f"runtime={self.runtime.get('name', 'unknown')}",
            f"precision={self.runtime.get('precision', 'unknown')}",
        ]
        if "deviation" in self.runtime:
            deviation = json.dumps(self.runtime["deviation"], sort_keys=True)
            parameters.append(f"deviation={deviation}")
        return AlgorithmIdentification(
            name=self.name,
            version=self.version or "unknown",
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
    answer: Mapping[str, Any], sources: Sequence[pydicom.Dataset], context: ReportContext
) -> pydicom.Dataset:
    """The SR of one study's answer; `sources` are the headers of the instances sent.

    Raises ValueError for an answer or sources that cannot make a faithful report.
    """
    _check_sources(sources)
    if answer.get("task") != context.task:
        raise ValueError(f"the answer is for task {answer.get('task')!r}, not {context.task!r}")
    model = _Model.from_answer(answer)
    study_uid = str(sources[0].StudyInstanceUID)
    parts = _Parts(
        task=context.task,
        algorithm=model.algorithm(context.device_name),
        sites=_finding_sites(context.task),
        sop_instance_uid=report_uid(study_uid, context.task, [s.SOPInstanceUID for s in sources]),
    )
    notice = _notice(answer, model)
    groups = [_study_group(answer, sources, parts, notice), *_image_groups(answer, sources, parts)]
    content = MeasurementReport(
        observation_context=_observation_context(context, model),
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
    answer: Mapping[str, Any], report: pydicom.Dataset, context: ReportContext
) -> dict[str, Any]:
    """The JSON copy of a report: the answer's result and model, the SR's and the
    sources' UIDs. It carries no patient attribute (name, ID, birth date, ...)."""
    return {
        "task": context.task,
        "rule": context.rule,
        "title": answer.get("title"),
        "model": json.loads(json.dumps(answer.get("model", {}))),
        "result": json.loads(json.dumps(answer.get("result", {}))),
        "notice": answer.get("notice"),
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


def _notice(answer: Mapping[str, Any], model: _Model) -> str | None:
    """The statement untrained weights carry (the server's, else its standard text)."""
    if not model.untrained:
        return None
    notice = answer.get("notice")
    return str(notice) if notice else UNTRAINED_NOTICE


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


def _observation_context(context: ReportContext, model: _Model) -> ObservationContext:
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


def _number(value: Any, what: str) -> float:
    """A finite float (DICOM DS/FD cannot say NaN; bools are flags, not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return number


def _images(answer: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    images = answer.get("images", [])
    if not isinstance(images, list) or not all(isinstance(item, Mapping) for item in images):
        raise ValueError("the answer's images must be a list of objects")
    return images


def _used_instances(answer: Mapping[str, Any], count: int) -> list[int]:
    """The request-instance indices the answer used, in order: roles first, then images."""
    roles = answer.get("roles") or {}
    indices = [*roles.values(), *(item.get("instance") for item in _images(answer))]
    used: list[int] = []
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise ValueError(f"the answer names instance {index!r}; {count} were sent")
        if index not in used:
            used.append(index)
    return used or list(range(count))


def _source_images(
    sources: Sequence[pydicom.Dataset], indices: Sequence[int]
) -> list[SourceImageForMeasurementGroup]:
    return [SourceImageForMeasurementGroup.from_source_image(sources[i]) for i in indices]


def _tracking(parts: _Parts, number: int, label: str) -> TrackingIdentifier:
    uid = _derived_uid("tracking", parts.sop_instance_uid, str(number))
    return TrackingIdentifier(uid=uid, identifier=label)


def _study_group(
    answer: Mapping[str, Any],
    sources: Sequence[pydicom.Dataset],
    parts: _Parts,
    notice: str | None,
) -> MeasurementsAndQualitativeEvaluations:
    result = answer.get("result")
    if not isinstance(result, Mapping):
        raise ValueError("the answer has no result object")
    derivation = _derivation(parts.task) if len(_images(answer)) > 1 else None
    measurements, evaluations = _study_findings(parts, result, derivation)
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(parts, 0, f"{answer.get('title') or parts.task}: study"),
        algorithm_id=parts.algorithm,
        finding_sites=parts.sites,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=_source_images(sources, _used_instances(answer, len(sources))),
    )
    if notice is not None:
        # TID 1501 allows TEXT qualitative evaluations: the notice beside the value.
        group[0].ContentSequence.append(_notice_item(notice))
    return group


def _derivation(task: str) -> Code | None:
    spec = TASKS.get(task)
    return rc.DERIVATIONS.get(spec.output.aggregation) if spec is not None else None


def _study_findings(
    parts: _Parts, result: Mapping[str, Any], derivation: Code | None
) -> tuple[list[Measurement], list[QualitativeEvaluation]]:
    if "probabilities" in result:
        return _classification(parts, result)
    key = _score_key(result)
    value = _number(result[key], f"result {key!r}")
    unit = rc.unit_code(str(result.get("unit", "")))
    measurements = [_measurement(parts, rc.score_concept(key), value, unit, derivation)]
    evaluations = []
    if "stage" in result:
        stage = rc.stage_code(str(result["stage"]))
        evaluations.append(QualitativeEvaluation(name=rc.FIBROSIS_STAGE, value=stage))
    for name, flag in result.items():
        if isinstance(flag, bool):
            value_code = rc.YES if flag else rc.NO
            evaluations.append(QualitativeEvaluation(name=rc.flag_concept(name), value=value_code))
    return measurements, evaluations


def _score_key(result: Mapping[str, Any]) -> str:
    """The one numeric entry of a regression or probability result (e.g. BMD, F_DLCT)."""
    keys = [
        key
        for key, value in result.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]
    if len(keys) != 1:
        raise ValueError(f"the result holds {len(keys)} numeric values, expected one")
    return keys[0]


def _classification(
    parts: _Parts, result: Mapping[str, Any]
) -> tuple[list[Measurement], list[QualitativeEvaluation]]:
    probabilities = result["probabilities"]
    if not isinstance(probabilities, Mapping) or not probabilities:
        raise ValueError("the result's probabilities must be a non-empty object")
    measurements = [
        _measurement(
            parts,
            rc.category_probability(str(label)),
            _number(probability, f"probability of {label!r}"),
            rc.PROBABILITY_UNIT,
        )
        for label, probability in probabilities.items()
    ]
    label = str(result.get("label", ""))
    if label not in probabilities:
        raise ValueError(f"the result's label {label!r} is not among its probabilities")
    category = rc.category_code(label, str(result.get("description", "")))
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
    answer: Mapping[str, Any], sources: Sequence[pydicom.Dataset], parts: _Parts
) -> list[MeasurementsAndQualitativeEvaluations]:
    """One group per scored image, for tasks that score each image (BMD, fibrosis CT,
    oesophageal cancer); tasks whose images are one sample's channels have none."""
    result = answer.get("result")
    if answer.get("roles") or not isinstance(result, Mapping) or "probabilities" in result:
        return []
    key = _score_key(result)
    concept, unit = rc.score_concept(key), rc.unit_code(str(result.get("unit", "")))
    images = _images(answer)
    groups = []
    for number, image in enumerate(images, start=1):
        values = image.get("values")
        if not isinstance(values, list) or len(values) != 1:
            raise ValueError(f"image {number} of the answer must hold one value")
        value = _number(values[0], f"image {number} value")
        indices = _used_instances({"images": [image]}, len(sources))
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(parts, number, f"{parts.task}: image {number}"),
            algorithm_id=parts.algorithm,
            finding_sites=parts.sites,
            measurements=[Measurement(name=concept, value=value, unit=unit)],
            source_images=_source_images(sources, indices),
        )
        groups.append(group)
    return groups
