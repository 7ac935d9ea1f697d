"""Every intake error, raised by a real malformed request, with the message a hospital reads."""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames

from abdoserve.export.phantom import PhantomStudy, build_study
from abdoserve.preprocessing.decode import decode_instance
from abdoserve.preprocessing.errors import (
    AttributeProblem,
    ClinicalInputError,
    FlatImageError,
    InconsistentGeometryError,
    InputTooLargeError,
    InstanceCountError,
    IntakeError,
    NoPixelDataError,
    NotDicomError,
    PixelDecodeError,
    RoiError,
    StatusCode,
    TruncatedDicomError,
    UnsupportedObjectError,
    WrongModalityError,
    describe_tag,
)
from abdoserve.preprocessing.specs import IntakeLimits
from abdoserve.preprocessing.study import StudyPreparer
from abdoserve.preprocessing.tasks import TASKS, get_task

Edit = Callable[[Dataset], None]
PATIENT_NAME = "PHANTOM^ABDOMEN"
SEED = 3
IDENTIFIERS = (PATIENT_NAME, f"PHANTOM-{SEED:04d}", f"PH{SEED}")  # name, ID, accession


@pytest.fixture(scope="module")
def bone() -> PhantomStudy:
    return build_study("bone_density_ct", seed=SEED, slices=3)


@pytest.fixture(scope="module")
def mass() -> PhantomStudy:
    return build_study("liver_mass_ct", seed=SEED)


@pytest.fixture(scope="module")
def mri() -> PhantomStudy:
    return build_study("liver_fibrosis_mri", seed=SEED)


@pytest.fixture(scope="module")
def fibrosis() -> PhantomStudy:
    return build_study("liver_fibrosis_ct", seed=SEED, slices=2)


def edit(data: bytes, change: Edit) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    change(ds)
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def refused(
    kind: type[IntakeError],
    task: str,
    instances: Sequence[bytes],
    clinical: dict[str, object] | None = None,
    spec: Any = None,
) -> IntakeError:
    """Prepare the request, expect `kind`; its message carries no patient identifier."""
    preparer = StudyPreparer(spec or TASKS[task])
    with pytest.raises(kind) as caught:
        preparer(instances, clinical or {})
    assert caught.value.code is StatusCode.INVALID_ARGUMENT
    for identifier in IDENTIFIERS:
        assert identifier not in str(caught.value)
    return caught.value


def test_bytes_that_are_not_dicom(bone: PhantomStudy) -> None:
    error = refused(NotDicomError, "bone_density_ct", [bone.instances[0], b"%PDF-1.4 hello" * 40])
    assert str(error) == (
        "instance 1: not a DICOM dataset: no 'DICM' prefix and no recognisable attributes"
    )
    assert error.instance == 1


@pytest.mark.parametrize("data", [b"", b"\x00" * 3, bytes(range(256)) * 4])
def test_empty_and_random_bytes_are_not_dicom(data: bytes) -> None:
    with pytest.raises((NotDicomError, TruncatedDicomError)) as caught:
        decode_instance(data, 4, IntakeLimits())
    assert str(caught.value).startswith("instance 4: ")


def test_file_cut_in_the_header(bone: PhantomStudy) -> None:
    error = refused(TruncatedDicomError, "bone_density_ct", [bone.instances[0][:300]])
    assert str(error).startswith("instance 0: ")


def test_file_cut_in_the_pixel_data(bone: PhantomStudy) -> None:
    data = bone.instances[1][:-1000]
    error = refused(TruncatedDicomError, "bone_density_ct", [bone.instances[0], data])
    assert str(error) == ("instance 1: (7FE0,0010) Pixel Data holds 523288 bytes, expected 524288")


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize(
    "syntax", ["DeflatedExplicitVRLittleEndian", "JPEG2000Lossless", "ExplicitVRBigEndian"]
)
def test_every_cut_of_a_file_is_an_intake_error(syntax: str) -> None:
    """Regression: cut deflate streams raised zlib.error, short reads struct.error,
    values of the wrong length BytesLengthException."""
    data = build_study("bone_density_ct", seed=1, slices=1, transfer_syntax=syntax).instances[0]
    cuts = [*range(0, 1600, 3), *range(1600, len(data), max(len(data) // 40, 1))]
    kinds: set[str] = set()
    for cut in cuts:
        with pytest.raises(IntakeError) as caught:
            decode_instance(data[:cut], 0, IntakeLimits())
        kinds.add(type(caught.value).__name__)
        assert not any(item in str(caught.value) for item in IDENTIFIERS[:1])
    assert "TruncatedDicomError" in kinds


def test_garbled_value_representations_are_attribute_problems(bone: PhantomStudy) -> None:
    """Regression: an unknown VR on Bits Allocated raised NotImplementedError."""
    data = bytearray(bone.instances[0])
    tag = struct.pack("<HH", 0x0028, 0x0100) + b"US"
    at = data.index(tag)
    data[at + 4 : at + 6] = b"U\xb5"
    with pytest.raises(IntakeError) as caught:
        decode_instance(bytes(data), 2, IntakeLimits())
    assert str(caught.value).startswith("instance 2: ")


def test_a_panicking_rle_decoder_is_a_pixel_decode_error() -> None:
    """Regression: pylibjpeg-rle panics (a BaseException) on this stream."""
    ds = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    offsets = list(struct.unpack("<15I", frame[4:64]))
    segment = bytes([0x7F]) + bytes(128) + bytes([0x81, 1]) * 40
    second = frame[offsets[1] :]
    offsets[1] = 64 + len(segment)
    ds.PixelData = encapsulate([frame[:4] + struct.pack("<15I", *offsets) + segment + second])
    out = io.BytesIO()
    ds.save_as(out)
    with pytest.raises(PixelDecodeError) as caught:
        decode_instance(out.getvalue(), 0, IntakeLimits())
    # The decoder's own message may quote the stream: only its type is named.
    assert str(caught.value) == (
        "instance 0: (7FE0,0010) Pixel Data could not be decoded (RLE Lossless): "
        "the decoder raised PanicException"
    )


def test_image_without_pixel_data(bone: PhantomStudy) -> None:
    def drop(ds: Dataset) -> None:
        del ds.PixelData

    error = refused(NoPixelDataError, "bone_density_ct", [edit(bone.instances[0], drop)])
    assert str(error) == "instance 0: (7FE0,0010) Pixel Data is missing"


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("rtplan.dcm", "RT Plan Storage"),
        ("test-SR.dcm", "Comprehensive SR Storage"),
        ("rtstruct.dcm", "RT Structure Set Storage"),
    ],
)
def test_non_image_objects(bone: PhantomStudy, name: str, what: str) -> None:
    data = open(get_testdata_file(name), "rb").read()  # noqa: SIM115 - tiny test file
    error = refused(UnsupportedObjectError, "bone_density_ct", [bone.instances[0], data])
    assert str(error) == f"instance 1: {what} is not an image object"


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_sop_class_outside_the_dictionary_is_named_by_its_attribute(bone: PhantomStudy) -> None:
    def private_class(ds: Dataset) -> None:
        ds.SOPClassUID = "1.2.826.0.1.3680043.99.1"
        del ds.PixelData

    error = refused(
        UnsupportedObjectError, "bone_density_ct", [edit(bone.instances[0], private_class)]
    )
    assert str(error) == (
        "instance 0: (0008,0016) SOP Class UID is not a standard SOP class; not an image object"
    )


def test_wrong_modality(bone: PhantomStudy, mri: PhantomStudy) -> None:
    error = refused(WrongModalityError, "bone_density_ct", [bone.instances[0], mri.instances[0]])
    assert str(error) == "instance 1: (0008,0060) Modality is not CT; bone_density_ct reads CT"
    error = refused(WrongModalityError, "liver_fibrosis_mri", list(bone.instances), {})
    assert str(error) == "instance 0: (0008,0060) Modality is not MR; liver_fibrosis_mri reads MR"

    def blank(ds: Dataset) -> None:
        ds.Modality = ""

    error = refused(WrongModalityError, "bone_density_ct", [edit(bone.instances[0], blank)])
    assert str(error) == (
        "instance 0: (0008,0060) Modality is missing or empty; bone_density_ct reads CT"
    )


def test_wrong_number_of_phases_levels_and_slices(
    mass: PhantomStudy, mri: PhantomStudy, bone: PhantomStudy
) -> None:
    error = refused(InstanceCountError, "liver_mass_ct", mass.instances[:2], mass.clinical)
    assert str(error) == (
        "liver_mass_ct needs exactly 3 images (non_contrast, arterial, delayed), got 2"
    )
    error = refused(
        InstanceCountError, "liver_fibrosis_mri", [*mri.instances, mri.instances[0]], mri.clinical
    )
    assert (
        str(error) == "liver_fibrosis_mri needs exactly 3 images (cranial, middle, caudal), got 4"
    )
    error = refused(InstanceCountError, "bone_density_ct", [])
    assert str(error) == "bone_density_ct needs at least one DICOM instance, got none"
    spec = get_task("bone_density_ct", {"images.max_images": 2})
    error = refused(InstanceCountError, "bone_density_ct", bone.instances, spec=spec)
    assert str(error) == "bone_density_ct needs 1 to 2 images, got 3"


def test_slices_of_another_orientation(bone: PhantomStudy) -> None:
    def coronal(ds: Dataset) -> None:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]

    slices = [bone.instances[0], edit(bone.instances[1], coronal), bone.instances[2]]
    error = refused(InconsistentGeometryError, "bone_density_ct", slices)
    assert str(error) == (
        "instance 1: (0020,0037) Image Orientation (Patient) differs from instance 0"
    )


def test_slices_of_another_pixel_spacing(bone: PhantomStudy) -> None:
    def finer(ds: Dataset) -> None:
        ds.PixelSpacing = [0.8, 0.8]

    slices = [bone.instances[0], bone.instances[1], edit(bone.instances[2], finer)]
    error = refused(InconsistentGeometryError, "bone_density_ct", slices)
    assert str(error) == (
        "instance 2: (0028,0030) Pixel Spacing [0.8, 0.8] differs from instance 0 [0.75, 0.75]"
    )


def test_a_phase_30_mm_away(mass: PhantomStudy) -> None:
    def move(ds: Dataset) -> None:
        x, y, z = (float(value) for value in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 30.0]

    phases = [mass.instances[0], mass.instances[1], edit(mass.instances[2], move)]
    error = refused(InconsistentGeometryError, "liver_mass_ct", phases, mass.clinical)
    assert error.instance == 2
    assert "(0020,0032) Image Position (Patient) lies 30.0 mm from instance 0" in str(error)
    assert str(error).startswith("instance 2: ")


def test_phases_on_different_grids(mass: PhantomStudy) -> None:
    def smaller(ds: Dataset) -> None:
        ds.Rows, ds.Columns = 256, 256
        ds.PixelData = ds.PixelData[: 256 * 256 * 2]

    phases = [mass.instances[0], edit(mass.instances[1], smaller), mass.instances[2]]
    error = refused(InconsistentGeometryError, "liver_mass_ct", phases, mass.clinical)
    assert str(error).startswith("instance 1: (0028,0010) Rows/Columns (256, 256) differ")


def test_duplicate_mri_level(mri: PhantomStudy) -> None:
    position = pydicom.dcmread(io.BytesIO(mri.instances[0])).ImagePositionPatient

    def same(ds: Dataset) -> None:
        ds.ImagePositionPatient = position

    levels = [mri.instances[0], edit(mri.instances[1], same), mri.instances[2]]
    error = refused(InconsistentGeometryError, "liver_fibrosis_mri", levels, mri.clinical)
    assert "(0020,0032) Image Position (Patient) equals that of instance" in str(error)
    assert "the section levels must differ" in str(error)
    assert error.instance in (0, 1)


def test_mri_level_without_position(mri: PhantomStudy) -> None:
    def drop(ds: Dataset) -> None:
        del ds.ImagePositionPatient

    levels = [mri.instances[0], mri.instances[1], edit(mri.instances[2], drop)]
    error = refused(AttributeProblem, "liver_fibrosis_mri", levels, mri.clinical)
    assert str(error) == (
        "instance 2: (0020,0032) Image Position (Patient) is missing; "
        "needed to order the section levels"
    )


@pytest.mark.parametrize(
    ("roi", "message"),
    [
        (None, "liver_mass_ct needs 'roi' [row_min, col_min, row_max, col_max]"),
        ("abc", "roi must be four numbers [row_min, col_min, row_max, col_max]"),
        ([1, 2, 3], "roi must be four finite numbers [row_min, col_min, row_max, col_max]"),
        ([1, 2, 3, float("nan")], "roi must be four finite numbers"),
        ([10, 10, 10, 20], "roi is empty: row_min < row_max and col_min < col_max needed"),
        ([500, 500, 600, 600], "roi lies outside the 512x512 image"),
        ([-1, 0, 20, 20], "roi lies outside the 512x512 image"),
    ],
)
def test_missing_malformed_and_outside_roi(mass: PhantomStudy, roi: object, message: str) -> None:
    clinical = {} if roi is None else {"roi": roi}
    error = refused(RoiError, "liver_mass_ct", mass.instances, clinical)
    assert str(error).startswith(message)


@pytest.mark.parametrize(
    ("clinical", "message"),
    [
        ({"sex": "M"}, "clinical input 'age' is missing"),
        ({"age": 50}, "clinical input 'sex' is missing"),
        ({"sex": "M", "age": 150}, "clinical input 'age' must lie within 0..120 years"),
        ({"sex": "M", "age": -1}, "clinical input 'age' must lie within 0..120 years"),
        ({"sex": "M", "age": "old"}, "clinical input 'age' must be a number"),
        ({"sex": "M", "age": True}, "clinical input 'age' must be a number"),
        ({"sex": "M", "age": float("inf")}, "clinical input 'age' must lie within 0..120 years"),
        ({"sex": "X", "age": 50}, "clinical input 'sex' must be one of M, F"),
        ({"sex": ["M"], "age": 50}, "clinical input 'sex' must be one of M, F"),
        (
            {"sex": "M", "age": 50, "weight": 70},
            "CLINICAL has 1 unknown key for liver_fibrosis_ct; expected: age, sex",
        ),
        (
            {"sex": "M", "age": 50, "weight": 70, "Age": 50},
            "CLINICAL has 2 unknown keys for liver_fibrosis_ct; expected: age, sex",
        ),
    ],
)
def test_clinical_inputs(fibrosis: PhantomStudy, clinical: dict[str, object], message: str) -> None:
    error = refused(ClinicalInputError, "liver_fibrosis_ct", fibrosis.instances, clinical)
    assert str(error) == message


def test_field_strength_falls_back_to_the_header(mri: PhantomStudy) -> None:
    preparer = StudyPreparer(TASKS["liver_fibrosis_mri"])
    given = preparer(mri.instances, mri.clinical).features
    clinical = {key: value for key, value in mri.clinical.items() if key != "field_strength"}
    fallback = preparer(mri.instances, clinical).features
    strength = float(mri.clinical["field_strength"])  # type: ignore[arg-type]
    assert fallback[0] == pytest.approx((strength - 1.5) / 1.5)
    np.testing.assert_array_equal(given, fallback)

    def tesla_1_5(ds: Dataset) -> None:
        ds.MagneticFieldStrength = 1.5

    lower = preparer([edit(data, tesla_1_5) for data in mri.instances], clinical).features
    assert lower[0] == 0.0


def test_field_strength_missing_everywhere(mri: PhantomStudy) -> None:
    def drop(ds: Dataset) -> None:
        del ds.MagneticFieldStrength

    clinical = {key: value for key, value in mri.clinical.items() if key != "field_strength"}
    levels = [edit(data, drop) for data in mri.instances]
    error = refused(ClinicalInputError, "liver_fibrosis_mri", levels, clinical)
    assert str(error) == (
        "clinical input 'field_strength' is missing and the images lack "
        "(0018,0087) Magnetic Field Strength"
    )

    def too_strong(ds: Dataset) -> None:
        ds.MagneticFieldStrength = 9.4

    levels = [edit(data, too_strong) for data in mri.instances]
    error = refused(ClinicalInputError, "liver_fibrosis_mri", levels, clinical)
    assert str(error) == "clinical input 'field_strength' must lie within 0.2..7 T"


def test_header_claiming_a_huge_image_is_refused_before_decoding(bone: PhantomStudy) -> None:
    def huge(ds: Dataset) -> None:
        ds.Rows, ds.Columns = 60000, 60000

    error = refused(InputTooLargeError, "bone_density_ct", [edit(bone.instances[0], huge)])
    assert str(error) == (
        "instance 0: (0028,0010) Rows x (0028,0011) Columns x frames = 3600000000 pixels "
        "exceeds the limit of 16777216"
    )

    def many_frames(ds: Dataset) -> None:
        ds.NumberOfFrames = 100

    error = refused(InputTooLargeError, "bone_density_ct", [edit(bone.instances[0], many_frames)])
    assert "= 26214400 pixels exceeds" in str(error)


def test_huge_compressed_header_is_refused_before_decoding() -> None:
    data = build_study(
        "bone_density_ct", seed=2, slices=1, transfer_syntax="JPEG2000Lossless"
    ).instances[0]

    def huge(ds: Dataset) -> None:
        ds.Rows, ds.Columns = 60000, 60000

    with pytest.raises(InputTooLargeError, match="3600000000 pixels"):
        decode_instance(edit(data, huge), 0, IntakeLimits())


def test_bytes_per_instance_and_instances_per_request(bone: PhantomStudy) -> None:
    spec = get_task("bone_density_ct", {"limits.max_bytes_per_instance": 100_000})
    error = refused(InputTooLargeError, "bone_density_ct", [bone.instances[0]], spec=spec)
    assert str(error) == (
        f"instance 0: {len(bone.instances[0])} bytes exceed the limit of 100000 per instance"
    )
    # 300 copies of one header: refused by count, before any is parsed
    error = refused(InputTooLargeError, "esophageal_cancer_ct", [b"not even dicom"] * 300)
    assert str(error) == "300 instances exceed the limit of 256 per request"


def test_ct_without_rescale_intercept(bone: PhantomStudy) -> None:
    def drop(ds: Dataset) -> None:
        del ds.RescaleIntercept

    error = refused(AttributeProblem, "bone_density_ct", [edit(bone.instances[0], drop)])
    assert str(error) == (
        "instance 0: (0028,1052) Rescale Intercept is missing; CT needs it to give Hounsfield units"
    )
    assert isinstance(error, AttributeProblem) and error.tag == 0x00281052


def test_ct_with_zero_slope_and_missing_spacing(bone: PhantomStudy) -> None:
    def flat_slope(ds: Dataset) -> None:
        ds.RescaleSlope = 0

    def no_spacing(ds: Dataset) -> None:
        del ds.PixelSpacing

    error = refused(AttributeProblem, "bone_density_ct", [edit(bone.instances[0], flat_slope)])
    assert str(error) == "instance 0: (0028,1053) Rescale Slope is zero"
    error = refused(AttributeProblem, "bone_density_ct", [edit(bone.instances[0], no_spacing)])
    assert str(error) == "instance 0: (0028,0030) Pixel Spacing is missing"


def test_colour_images_are_refused(bone: PhantomStudy) -> None:
    def rgb(ds: Dataset) -> None:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0

    error = refused(AttributeProblem, "bone_density_ct", [edit(bone.instances[0], rgb)])
    assert str(error) == (
        "instance 0: (0028,0002) Samples per Pixel is 3; a greyscale image is required"
    )


def test_flat_mr_image(mri: PhantomStudy) -> None:
    def blank(ds: Dataset) -> None:
        ds.PixelData = bytes(len(ds.PixelData))

    levels = [mri.instances[0], edit(mri.instances[1], blank), mri.instances[2]]
    error = refused(FlatImageError, "liver_fibrosis_mri", levels, mri.clinical)
    assert str(error).endswith("(7FE0,0010) Pixel Data holds a single value; no usable MR signal")


def test_describe_tag_names_attributes_as_pydicom_does() -> None:
    assert describe_tag(0x00280030) == "(0028,0030) Pixel Spacing"
    assert describe_tag(0x00181053) == "(0018,1053) Unknown Attribute"
    error = AttributeProblem(0x00281053, "is missing", instance=2)
    assert str(error) == "instance 2: (0028,1053) Rescale Slope is missing"
    assert error.detail == "(0028,1053) Rescale Slope is missing"


def test_the_phantom_carries_the_identifiers_checked_for(bone: PhantomStudy) -> None:
    """The identifiers `refused` looks for are really in the files."""
    ds = pydicom.dcmread(io.BytesIO(bone.instances[0]))
    assert (str(ds.PatientName), str(ds.PatientID), str(ds.AccessionNumber)) == IDENTIFIERS


# The `reason` label of abdoserve_rejected_requests_total: dashboards and alerts read
# these strings, so they are pinned here and never derived from class names.
PINNED_REASONS = {
    "IntakeError": "intake",
    "NotDicomError": "not_dicom",
    "TruncatedDicomError": "truncated_dicom",
    "UnsupportedObjectError": "unsupported_object",
    "NoPixelDataError": "no_pixel_data",
    "PixelDecodeError": "pixel_decode",
    "AttributeProblem": "attribute_problem",
    "WrongModalityError": "wrong_modality",
    "InstanceCountError": "instance_count",
    "InconsistentGeometryError": "inconsistent_geometry",
    "RoiError": "roi",
    "ClinicalInputError": "clinical_input",
    "InputTooLargeError": "input_too_large",
    "FlatImageError": "flat_image",
    "ModalityLutError": "modality_lut",
    "NestingTooDeepError": "nesting_too_deep",
    "CodestreamMismatchError": "codestream_mismatch",
    "MissingInputError": "missing_input",
    "NoTwinError": "explain_no_twin",
    "TwinMismatchError": "explain_twin_mismatch",
    "VersionError": "explain_version",
}


def _intake_error_classes() -> list[type[IntakeError]]:
    found: list[type[IntakeError]] = [IntakeError]
    for kind in found:
        found.extend(kind.__subclasses__())
    return found


def test_every_intake_error_lives_in_errors_py_with_its_own_pinned_reason() -> None:
    classes = _intake_error_classes()
    assert {kind.__module__ for kind in classes} == {"abdoserve.preprocessing.errors"}
    assert {kind.__name__: kind.reason for kind in classes} == PINNED_REASONS
    for kind in classes:
        assert "reason" in vars(kind), f"{kind.__name__} inherits its reason"


def test_the_metric_label_is_the_pinned_reason_and_unknown_failures_are_internal() -> None:
    from abdoserve.serving.metrics import rejection_reason

    assert rejection_reason(InstanceCountError("too many images")) == "instance_count"
    assert rejection_reason(AttributeProblem(0x00280030, "is missing")) == "attribute_problem"
    assert rejection_reason(ValueError("anything")) == "internal"
