"""Error messages carry no sender-controlled text.

An intake error goes back to the client as INVALID_ARGUMENT and may reach logs, so it
names tags, keywords, counts, geometry and the server's own expectations, never a
string the sender wrote: a crafted Modality, UID or CLINICAL key could carry anything,
and a decoder's exception may quote the file's bytes. Each case plants a marker in one
field the sender controls (on top of a study whose identifiers, UIDs and descriptions
all carry it), sends it through the real intake and through the real preprocess model,
and looks for the marker in everything that comes back.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames

from abdoserve.export.phantom import PhantomStudy, build_study
from abdoserve.preprocessing.errors import IntakeError
from abdoserve.preprocessing.nesting import load_clinical_json
from abdoserve.preprocessing.study import StudyPreparer
from abdoserve.preprocessing.tasks import TASKS
from abdoserve.serving.triton_adapter import TritonLogHandler, error_response
from tests.unit.fake_pb_utils import FakePbUtils, FakeTensor, FakeTritonError

# Invalid values (UIDs, dates) are the point here; pydicom warns about each one as we
# write them. The intake's own warnings are recorded and checked in the test.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MARKER = "ZZSECRETQQ"
PATIENT_NAME = f"Doe^Jane^{MARKER}"
MARKER_UID = f"1.2.826.0.1.{MARKER}"  # not a valid UID: a crafted one can carry text
PREPROCESS = Path(__file__).parents[2] / "model_repository" / "_python_models" / "preprocess.py"
TASK_NAMES = ("bone_density_ct", "liver_fibrosis_ct", "liver_fibrosis_mri", "liver_mass_ct")


def marker_forms() -> tuple[str, ...]:
    """The marker as text, and as the hex and integer forms a decoder might print."""
    raw = MARKER.encode()
    return (
        MARKER.lower(),
        raw.hex(),
        str(int.from_bytes(raw[:4], "little")),
        str(int.from_bytes(raw[:4], "big")),
    )


def carries_marker(text: str) -> bool:
    lowered = text.lower()
    return any(form in lowered for form in marker_forms())


# --- hostile requests ---------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    """One request: the task, its DICOM instances and CLINICAL as sent on the wire."""

    task: str
    instances: tuple[bytes, ...]
    clinical: bytes


def clinical_bytes(value: object) -> bytes:
    return json.dumps(value).encode()


def poison(ds: Dataset) -> None:
    """Every identifier, UID and free-text field the intake might read carries the marker."""
    ds.PatientName = PATIENT_NAME
    ds.PatientID = MARKER
    ds.PatientBirthDate = MARKER
    ds.AccessionNumber = MARKER
    ds.StudyDate = MARKER
    ds.StudyDescription = MARKER
    ds.SeriesDescription = MARKER
    ds.BodyPartExamined = MARKER
    ds.InstitutionName = MARKER
    ds.ReferringPhysicianName = PATIENT_NAME
    ds.StudyInstanceUID = MARKER_UID
    ds.SeriesInstanceUID = MARKER_UID + ".1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = MARKER_UID + ".2"


def edit(data: bytes, *changes: Callable[[Dataset], None]) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    for change in changes:
        change(ds)
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    """A byte-level edit, for values pydicom refuses to write."""
    assert data.count(old) == 1, f"{old!r} occurs {data.count(old)} times"
    return data.replace(old, new)


@dataclass(frozen=True)
class Studies:
    """Valid phantom studies, every instance poisoned, with their valid clinical inputs."""

    plain: Mapping[str, PhantomStudy]
    compressed: Mapping[str, bytes]  # one poisoned bone slice per compressed syntax

    def instances(self, task: str) -> tuple[bytes, ...]:
        return tuple(edit(data, poison) for data in self.plain[task].instances)

    def clinical(self, task: str, **changes: object) -> bytes:
        values = dict(self.plain[task].clinical) | changes
        return clinical_bytes(values)

    def with_first(self, task: str, data: bytes, clinical: bytes | None = None) -> Hostile:
        """The poisoned study with its first instance replaced."""
        rest = self.instances(task)[1:]
        return Hostile(task, (data, *rest), self.clinical(task) if clinical is None else clinical)

    def first_edited(self, task: str, *changes: Callable[[Dataset], None]) -> Hostile:
        return self.with_first(task, edit(self.instances(task)[0], *changes))


def _set(keyword: str, value: object) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        setattr(ds, keyword, value)

    return change


def _drop_pixels(ds: Dataset) -> None:
    del ds.PixelData


def _frame_of_marker(ds: Dataset) -> None:
    ds.PixelData = encapsulate([MARKER.encode() * 400])


def _marker_after_frame_header(ds: Dataset) -> None:
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:200] + MARKER.encode() * 400])


def _packed_bits(ds: Dataset) -> None:
    """1-bit pixels: pydicom unpacks these itself, reading Photometric Interpretation."""
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.PixelData = bytes(int(ds.Rows) * int(ds.Columns) // 8)


def _coronal(ds: Dataset) -> None:
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]


PLACEHOLDER_DS = "9.87654321"  # a valid DS as long as the marker, swapped for it after writing


def _raw_text(studies: Studies, task: str, keyword: str) -> bytes:
    """The first instance with `keyword` holding the marker as its raw (invalid) value."""
    assert len(PLACEHOLDER_DS) == len(MARKER)
    data = edit(studies.instances(task)[0], _set(keyword, PLACEHOLDER_DS))
    return replace_once(data, PLACEHOLDER_DS.encode(), MARKER.encode())


def _transfer_syntax(data: bytes) -> bytes:
    """The instance with an unknown Transfer Syntax UID of the same length, carrying text."""
    syntax = str(
        pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta[0x00020010].value
    )
    old = syntax.encode() + b"\0" * (len(syntax) % 2)
    new = (f"1.2.{MARKER}.".encode() + b"9" * len(old))[: len(old)]
    return replace_once(data, old, new)


def _group_length(data: bytes) -> bytes:
    """(0002,0000) of 11 bytes holding the marker: pydicom's error quotes the value."""
    old = data[data.index(b"\x02\x00\x00\x00UL") :][:12]
    return replace_once(data, old, b"\x02\x00\x00\x00UL\x0b\x00" + MARKER.encode() + b"\0")


def _cut_in_patient_name(data: bytes) -> bytes:
    return data[: data.index(PATIENT_NAME.encode()) + len(PATIENT_NAME) - 2]


Build = Callable[[Studies], Hostile]


@dataclass(frozen=True)
class Case:
    """A hostile request and the refusal reasons it may get (the path it must reach)."""

    reasons: tuple[str, ...]
    build: Build


def _study(task: str, **clinical: object) -> Build:
    """The whole poisoned study of `task` with its clinical inputs changed."""
    return lambda s: Hostile(task, s.instances(task), s.clinical(task, **clinical))


def _raw_clinical(task: str, clinical: bytes) -> Build:
    return lambda s: Hostile(task, s.instances(task), clinical)


def _first(task: str, *changes: Callable[[Dataset], None]) -> Build:
    return lambda s: s.first_edited(task, *changes)


BONE, FIBROSIS, MRI, MASS = TASK_NAMES

DICOM_CASES: dict[str, Case] = {
    "modality": Case(("wrong_modality",), _first(BONE, _set("Modality", MARKER))),
    "modality_as_a_patient_name": Case(
        ("wrong_modality",), _first(MRI, _set("Modality", PATIENT_NAME))
    ),
    "sop_class_uid": Case(
        ("unsupported_object",), _first(BONE, _set("SOPClassUID", MARKER_UID), _drop_pixels)
    ),
    "sop_class_uid_claiming_image": Case(
        ("unsupported_object",),
        _first(BONE, _set("SOPClassUID", f"1.2.{MARKER}.Image"), _drop_pixels),
    ),
    "transfer_syntax_uid_native": Case(
        ("pixel_decode",), lambda s: s.with_first(BONE, _transfer_syntax(s.instances(BONE)[0]))
    ),
    "transfer_syntax_uid_encapsulated": Case(
        ("pixel_decode",),
        lambda s: s.with_first(BONE, _transfer_syntax(s.compressed["JPEG2000Lossless"])),
    ),
    "photometric_interpretation_jpeg2000": Case(
        ("pixel_decode",),
        lambda s: s.with_first(
            BONE, edit(s.compressed["JPEG2000Lossless"], _set("PhotometricInterpretation", MARKER))
        ),
    ),
    "photometric_interpretation_packed_bits": Case(
        ("pixel_decode",), _first(BONE, _packed_bits, _set("PhotometricInterpretation", MARKER))
    ),
    "pixel_data_rle": Case(
        ("pixel_decode",),
        lambda s: s.with_first(BONE, edit(s.compressed["RLELossless"], _frame_of_marker)),
    ),
    "pixel_data_jpeg2000": Case(
        ("pixel_decode",),
        lambda s: s.with_first(
            BONE, edit(s.compressed["JPEG2000Lossless"], _marker_after_frame_header)
        ),
    ),
    "pixel_data_jpegls": Case(
        ("pixel_decode",),
        lambda s: s.with_first(BONE, edit(s.compressed["JPEGLSLossless"], _frame_of_marker)),
    ),
    "element_value_quoted_by_the_parser": Case(
        ("truncated_dicom",), lambda s: s.with_first(BONE, _group_length(s.instances(BONE)[0]))
    ),
    "file_cut_in_the_patient_name": Case(
        ("truncated_dicom", "no_pixel_data"),
        lambda s: s.with_first(BONE, _cut_in_patient_name(s.instances(BONE)[0])),
    ),
    "not_dicom_at_all": Case(
        ("not_dicom",), lambda s: s.with_first(BONE, PATIENT_NAME.encode() * 50)
    ),
    "pixel_spacing": Case(
        ("attribute_problem",), lambda s: s.with_first(BONE, _raw_text(s, BONE, "PixelSpacing"))
    ),
    "magnetic_field_strength_fallback": Case(
        ("clinical_input", "attribute_problem"),
        lambda s: s.with_first(
            MRI,
            _raw_text(s, MRI, "MagneticFieldStrength"),
            clinical_bytes({"hbv": "negative", "hcv": "positive"}),
        ),
    ),
    "identifiers_and_uids_of_a_refused_series": Case(
        ("inconsistent_geometry",), _first(BONE, _coronal)
    ),
}

CLINICAL_CASES: dict[str, Case] = {
    "clinical_unknown_key": Case(("clinical_input",), _study(FIBROSIS, **{MARKER: 1})),
    "clinical_unknown_key_patient_name": Case(
        ("clinical_input",), _study(FIBROSIS, **{PATIENT_NAME: "F"})
    ),
    "clinical_unknown_key_where_none_are_taken": Case(
        ("clinical_input",), _raw_clinical(BONE, clinical_bytes({MARKER: MARKER}))
    ),
    "clinical_number_as_text": Case(("clinical_input",), _study(FIBROSIS, age=MARKER)),
    "clinical_number_as_object": Case(("clinical_input",), _study(FIBROSIS, age={MARKER: 50})),
    "clinical_choice_as_text": Case(("clinical_input",), _study(FIBROSIS, sex=MARKER)),
    "clinical_choice_as_list": Case(("clinical_input",), _study(FIBROSIS, sex=[PATIENT_NAME])),
    "clinical_choice_mri": Case(("clinical_input",), _study(MRI, hbv=MARKER)),
    "roi_as_text": Case(("roi",), _study(MASS, roi=MARKER)),
    "roi_with_text": Case(("roi",), _study(MASS, roi=[MARKER, 1, 2, 3])),
    "roi_as_object": Case(("roi",), _study(MASS, roi={MARKER: 1})),
    "clinical_json_malformed": Case(
        ("clinical_input",), _raw_clinical(FIBROSIS, f'{{"age": 50, "sex": {MARKER}}}'.encode())
    ),
    "clinical_json_not_utf8": Case(
        ("clinical_input",), _raw_clinical(FIBROSIS, f'{{"sex": "{MARKER}'.encode() + b'\xff"}')
    ),
    "clinical_json_not_an_object": Case(
        ("clinical_input",), _raw_clinical(FIBROSIS, clinical_bytes([MARKER, PATIENT_NAME]))
    ),
    "clinical_json_too_deep": Case(
        ("nesting_too_deep",),
        _raw_clinical(FIBROSIS, f'{{"{MARKER}": {"[" * 20}1{"]" * 20}}}'.encode()),
    ),
}

CASES = DICOM_CASES | CLINICAL_CASES


# --- the preprocess model, on a fake pb_utils ---------------------------------------


class FakeMetric:
    def observe(self, value: float) -> None:
        pass

    def increment(self, value: float) -> None:
        pass


class FakeMetricFamily:
    HISTOGRAM = "histogram"
    COUNTER = "counter"
    labels: ClassVar[list[dict[str, str]]] = []  # every metric's labels, as created

    def __init__(self, *, name: str, description: str, kind: str) -> None:
        self.name = name

    def Metric(  # pb_utils names it so
        self, *, labels: dict[str, str], buckets: list[float] | None = None
    ) -> FakeMetric:
        self.labels.append(dict(labels))
        return FakeMetric()


class PbUtilsWithMetrics(FakePbUtils):
    MetricFamily = FakeMetricFamily


PB = PbUtilsWithMetrics()


def load_preprocess_module() -> ModuleType:
    """_python_models/preprocess.py, importing the fake pb_utils as Triton's stub would."""
    spec = importlib.util.spec_from_file_location("abdoserve_test_preprocess", PREPROCESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "triton_python_backend_utils", PB)
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One initialised preprocess model per task (no warm-up study: none is written)."""
    module = load_preprocess_module()
    repository = tmp_path_factory.mktemp("repository")
    root = logging.getLogger("abdoserve")
    level = root.level
    loaded: dict[str, Any] = {}
    for task in TASK_NAMES:
        model = module.TritonPythonModel()
        config = {"parameters": {"task": {"string_value": task}}}
        model.initialize(
            {
                "model_config": json.dumps(config),
                "model_repository": str(repository),
                "model_version": "1",
                "model_name": f"{task}_preprocess",  # as Triton passes it
            }
        )
        loaded[task] = model
    yield loaded
    # route_logging attached a handler for the fake Triton log: detach it again.
    for handler in [item for item in root.handlers if isinstance(item, TritonLogHandler)]:
        root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="module")
def studies() -> Studies:
    plain = {task: build_study(task, seed=5) for task in TASK_NAMES}
    compressed = {
        syntax: edit(
            build_study("bone_density_ct", seed=5, slices=1, transfer_syntax=syntax).instances[0],
            poison,
        )
        for syntax in ("RLELossless", "JPEG2000Lossless", "JPEGLSLossless")
    }
    return Studies(plain, compressed)


def request_tensors(hostile: Hostile) -> dict[str, FakeTensor]:
    dicom = np.empty((1, len(hostile.instances)), dtype=np.object_)
    dicom[0, :] = list(hostile.instances)
    clinical = np.array([[hostile.clinical]], dtype=np.object_)
    return {"DICOM": FakeTensor("DICOM", dicom), "CLINICAL": FakeTensor("CLINICAL", clinical)}


def intake(hostile: Hostile) -> IntakeError:
    """What the preprocess model does with a request (CLINICAL parsed, study prepared)."""
    spec = TASKS[hostile.task]
    with pytest.raises(IntakeError) as caught:
        StudyPreparer(spec)(
            list(hostile.instances), load_clinical_json(hostile.clinical, spec.limits)
        )
    return caught.value


def texts_of(error: IntakeError) -> Sequence[str]:
    return (str(error), error.detail, error.reason, repr(error.args))


# --- tests ---------------------------------------------------------------------------


def test_the_poisoned_studies_are_answered_and_carry_the_marker(
    studies: Studies, models: dict[str, Any]
) -> None:
    """Control: the poison alone refuses nothing, and the marker really is in the bytes."""
    for task in TASK_NAMES:
        hostile = Hostile(task, studies.instances(task), studies.clinical(task))
        assert all(PATIENT_NAME.encode() in data for data in hostile.instances)
        reply = models[task].handle(request_tensors(hostile))
        assert reply.error is None, f"{task}: {reply.error}"


def test_marker_forms_are_found() -> None:
    assert carries_marker(f"b'{MARKER}'") and carries_marker(f"segments ({1163090522})")


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_an_intake_error_never_carries_what_the_sender_wrote(
    case: str,
    studies: Studies,
    models: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    hostile = CASES[case].build(studies)
    # Python warnings reach the stub's stderr, and so Triton's log.
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        error = intake(hostile)
    assert not any(carries_marker(str(item.message)) for item in warned), warned
    assert error.reason in CASES[case].reasons, f"{case} reached {error.reason}: {error}"
    for text in texts_of(error):
        assert not carries_marker(text), f"{type(error).__name__}: {text}"

    adapted = error_response(PB, error).error
    assert adapted is not None and adapted.code == FakeTritonError.INVALID_ARG
    assert not carries_marker(adapted.message), adapted.message

    PB.Logger.lines.clear()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="abdoserve"):
        reply = models[hostile.task].handle(request_tensors(hostile))
        assert models[hostile.task].metrics_writer.flush()  # metrics update off its path
    assert reply.error is not None and reply.error.code == FakeTritonError.INVALID_ARG
    assert reply.error.message == adapted.message
    # Our loggers and Triton's log; pydicom's own logger is not routed anywhere.
    ours = [record for record in caplog.records if record.name.startswith("abdoserve")]
    logged = [record.getMessage() for record in ours] + [line for _, line in PB.Logger.lines]
    assert not any(carries_marker(line) for line in logged), logged
    assert not any(carries_marker(repr(labels)) for labels in FakeMetricFamily.labels)
