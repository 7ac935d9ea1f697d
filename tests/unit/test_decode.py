"""DICOM bytes -> frames: Hounsfield units at known phantom regions, every encoding alike."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from abdoserve.export.phantom import PhantomStudy, build_study
from abdoserve.preprocessing.decode import decode_instance
from abdoserve.preprocessing.specs import IntakeLimits
from abdoserve.preprocessing.study import StudyPreparer
from abdoserve.preprocessing.tasks import TASKS
from tests.hounsfield import hounsfield

SYNTAXES = (
    "ImplicitVRLittleEndian",
    "ExplicitVRBigEndian",
    "DeflatedExplicitVRLittleEndian",
    "RLELossless",
    "JPEG2000Lossless",
    "JPEGLSLossless",
)


def noiseless(task: str, **options: Any) -> PhantomStudy:
    noise = "noise_sd" if task == "liver_fibrosis_mri" else "noise_hu"
    return build_study(task, seed=5, **{noise: 0.0}, **options)


@pytest.fixture(scope="module")
def signed() -> PhantomStudy:
    return noiseless("bone_density_ct", slices=3, signed=True)


@pytest.fixture(scope="module")
def unsigned() -> PhantomStudy:
    return noiseless("bone_density_ct", slices=3, signed=False)


def regions(study: PhantomStudy, index: int) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = study.truth["instances"][index]["regions"]
    return found


@pytest.mark.parametrize("form", ["signed", "unsigned"])
def test_decoded_frames_give_the_truth_hu_at_every_region(
    form: str, signed: PhantomStudy, unsigned: PhantomStudy
) -> None:
    study = signed if form == "signed" else unsigned
    checked = 0
    for index, data in enumerate(study.instances):
        decoded = decode_instance(data, index, IntakeLimits())
        assert decoded.frames[0].intercept == (0.0 if form == "signed" else -1024.0)
        hu = hounsfield(
            decoded.frames[0].pixels, decoded.frames[0].slope, decoded.frames[0].intercept
        )
        for name, region in regions(study, index).items():
            r, c, h = region["row"], region["col"], region["patch_radius"]
            patch = hu[r - h : r + h + 1, c - h : c + h + 1]
            np.testing.assert_array_equal(patch, np.float32(region["value"]), err_msg=name)
            checked += 1
    assert checked >= 15


def test_unsigned_storage_holds_hu_plus_1024(signed: PhantomStudy, unsigned: PhantomStudy) -> None:
    a = decode_instance(signed.instances[0], 0, IntakeLimits()).frames[0].pixels
    b = decode_instance(unsigned.instances[0], 0, IntakeLimits()).frames[0].pixels
    assert a.dtype.kind == "i" and b.dtype.kind == "u"
    np.testing.assert_array_equal(b.astype(np.int32), a.astype(np.int32) + 1024)


@pytest.mark.parametrize("form", ["signed", "unsigned"])
def test_windowed_output_at_a_region_is_the_window_of_its_truth(
    form: str, signed: PhantomStudy, unsigned: PhantomStudy
) -> None:
    """Map each truth region to the output pixel sampling it (1 mm grid, 192 px, centred)."""
    study = signed if form == "signed" else unsigned
    spec = TASKS["bone_density_ct"]
    prepared = StudyPreparer(spec)(study.instances, {})
    source = 0.75  # mm per phantom pixel
    checked = 0
    for sample, index in enumerate(prepared.sources):
        for name, region in regions(study, int(index)).items():
            if region["patch_radius"] < 3:
                continue
            out_row = round(95.5 + (region["row"] - 255.5) * source / 1.0)
            out_col = round(95.5 + (region["col"] - 255.5) * source / 1.0)
            if not (0 <= out_row < 192 and 0 <= out_col < 192):
                continue
            expected = np.clip((region["value"] - (300.0 - 750.0)) / 1500.0, 0.0, 1.0)
            value = prepared.samples[sample, 0, out_row, out_col]
            assert value == pytest.approx(expected, abs=1e-5), name
            checked += 1
    assert checked >= 9


def test_every_transfer_syntax_prepares_identical_tensors(signed: PhantomStudy) -> None:
    preparer = StudyPreparer(TASKS["bone_density_ct"])
    reference = preparer(signed.instances, {})
    for syntax in SYNTAXES:
        study = noiseless("bone_density_ct", slices=3, signed=True, transfer_syntax=syntax)
        assert study.truth["transfer_syntax"] != signed.truth["transfer_syntax"]
        prepared = preparer(study.instances, {})
        np.testing.assert_array_equal(prepared.samples, reference.samples, err_msg=syntax)
        np.testing.assert_array_equal(prepared.sources, reference.sources, err_msg=syntax)


def without_file_meta(data: bytes, *, implicit: bool) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.preamble = None
    del ds.file_meta
    out = io.BytesIO()
    ds.save_as(out, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    return out.getvalue()


@pytest.mark.parametrize("implicit", [False, True])
def test_files_without_preamble_or_file_meta(signed: PhantomStudy, implicit: bool) -> None:
    bare = [without_file_meta(data, implicit=implicit) for data in signed.instances]
    assert all(data[128:132] != b"DICM" and data[:4] == b"\x08\x00\x05\x00" for data in bare)
    preparer = StudyPreparer(TASKS["bone_density_ct"])
    reference = preparer(signed.instances, {})
    prepared = preparer(bare, {})
    np.testing.assert_array_equal(prepared.samples, reference.samples)
    np.testing.assert_array_equal(prepared.sources, reference.sources)


def invert(ds: Dataset) -> None:
    """MONOCHROME1 with the same picture: stored = top - value."""
    values = np.frombuffer(ds.PixelData, dtype="<u2")
    ds.PixelData = (4095 - values).astype("<u2").tobytes()
    ds.PhotometricInterpretation = "MONOCHROME1"


def edited(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    invert(ds)
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def test_monochrome1_mr_is_inverted_to_the_same_picture() -> None:
    study = build_study("liver_fibrosis_mri", seed=5)
    preparer = StudyPreparer(TASKS["liver_fibrosis_mri"])
    reference = preparer(study.instances, study.clinical)
    flipped = [edited(data) for data in study.instances]
    decoded = decode_instance(flipped[0], 0, IntakeLimits())
    assert decoded.inverted
    assert not decode_instance(study.instances[0], 0, IntakeLimits()).inverted
    prepared = preparer(flipped, study.clinical)
    np.testing.assert_allclose(prepared.samples, reference.samples, atol=1e-5)
    # without the inversion the picture would be a negative: far from the reference
    assert float(np.abs(reference.samples - (1.0 - reference.samples)).mean()) > 0.2


def test_extra_tags_are_read_from_the_header() -> None:
    study = build_study("liver_fibrosis_mri", seed=5, field_strength=1.5)
    decoded = decode_instance(study.instances[0], 7, IntakeLimits(), (0x00180087, 0x00181234))
    assert decoded.index == 7 and decoded.modality == "MR"
    assert float(decoded.extras[0x00180087]) == 1.5  # type: ignore[arg-type]
    assert decoded.extras[0x00181234] is None
    header = pydicom.dcmread(io.BytesIO(study.instances[0]))
    assert decoded.acquisition_time == str(header.AcquisitionTime).strip() == "095100.000000"
