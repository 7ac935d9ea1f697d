"""Real DICOM files nobody here wrote: each file pydicom ships decodes or is an IntakeError."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from abdoserve.preprocessing.decode import DecodedInstance, decode_instance
from abdoserve.preprocessing.errors import (
    IntakeError,
    NotDicomError,
    TruncatedDicomError,
    UnsupportedObjectError,
)
from abdoserve.preprocessing.specs import IntakeLimits

FOLDER = Path(os.path.dirname(get_testdata_file("CT_small.dcm")))
FILES = sorted(path for path in FOLDER.rglob("*") if path.is_file())
NAMES = [str(path.relative_to(FOLDER)) for path in FILES]
MR_VARIANTS = [
    "MR_small_RLE.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_implicit.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_padded.dcm",
]


def decode_file(name: str) -> DecodedInstance:
    return decode_instance((FOLDER / name).read_bytes(), 0, IntakeLimits())


def pydicom_pixels(name: str) -> np.ndarray | None:
    """What pydicom itself decodes, or None where it cannot."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array: np.ndarray = pydicom.dcmread(FOLDER / name, force=True).pixel_array
    except Exception:  # pydicom failing only means "no reference"
        return None
    return array


def test_the_corpus_is_the_one_we_expect() -> None:
    assert len(FILES) >= 150
    assert {"MR_small.dcm", "rtdose.dcm", "README.txt", "crayons.icc"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_shipped_file_decodes_or_is_an_intake_error(name: str) -> None:
    try:
        decoded = decode_file(name)
    except IntakeError as error:
        assert str(error).startswith("instance 0: ") or error.instance is None
        return
    frames = np.stack([frame.pixels for frame in decoded.frames])
    assert frames.ndim == 3 and frames.shape[0] == len(decoded.frames) >= 1
    reference = pydicom_pixels(name)
    assert reference is not None, f"we decode {name} but pydicom cannot"
    np.testing.assert_array_equal(frames, reference.reshape(frames.shape))
    assert all(min(frame.spacing) > 0 for frame in decoded.frames)


@pytest.mark.parametrize(
    "name",
    [
        "README.txt",
        "crayons.icc",
        "test1.json",
        "rtplan.dump",
        "zipMR.gz",
        "dicomdirtests/README.txt",
    ],
)
def test_helper_files_are_not_dicom(name: str) -> None:
    with pytest.raises(NotDicomError, match=r"^instance 0: not a DICOM dataset"):
        decode_file(name)


def test_the_corpus_splits_into_decoded_and_refused() -> None:
    decoded, refused = 0, {}
    for name in NAMES:
        try:
            decode_file(name)
            decoded += 1
        except IntakeError as error:
            refused[type(error).__name__] = refused.get(type(error).__name__, 0) + 1
    assert decoded >= 40
    assert refused["NotDicomError"] >= 8
    assert refused["UnsupportedObjectError"] >= 20  # SR, RT plans, DICOMDIRs, waveforms
    assert refused["NoPixelDataError"] >= 20  # image-class records without pixel data
    assert refused["AttributeProblem"] >= 30  # colour images, images without spacing


def test_mr_small_variants_equal_the_uncompressed_file() -> None:
    reference = decode_file("MR_small.dcm")
    expected = reference.frames[0].pixels
    assert expected.shape == (64, 64)
    np.testing.assert_array_equal(expected, pydicom_pixels("MR_small.dcm"))
    for name in MR_VARIANTS:
        decoded = decode_file(name)
        assert len(decoded.frames) == 1, name
        np.testing.assert_array_equal(decoded.frames[0].pixels, expected, err_msg=name)
        assert decoded.frames[0].spacing == reference.frames[0].spacing, name
        assert decoded.modality == "MR"


def test_ct_small_gives_hounsfield_units() -> None:
    decoded = decode_file("CT_small.dcm")
    ds = pydicom.dcmread(FOLDER / "CT_small.dcm")
    assert (decoded.frames[0].slope, decoded.frames[0].intercept) == (
        float(ds.RescaleSlope),
        float(ds.RescaleIntercept),
    )
    assert decoded.frames[0].spacing == tuple(float(value) for value in ds.PixelSpacing)
    assert decoded.frames[0].position == tuple(float(v) for v in ds.ImagePositionPatient)


@pytest.mark.parametrize("name", ["rtdose.dcm", "rtdose_expb.dcm", "rtdose_rle.dcm"])
def test_multi_frame_dose_has_15_frames_with_positions(name: str) -> None:
    decoded = decode_file(name)
    assert len(decoded.frames) == 15
    frames = np.stack([frame.pixels for frame in decoded.frames])
    assert frames.shape == (15, 10, 10)
    np.testing.assert_array_equal(frames, pydicom_pixels("rtdose.dcm"))


def test_truncated_and_non_image_real_files() -> None:
    with pytest.raises(TruncatedDicomError, match=r"Pixel Data holds 8130 bytes, expected 8192"):
        decode_file("MR_truncated.dcm")
    with pytest.raises(UnsupportedObjectError, match="RT Plan Storage is not an image object"):
        decode_file("rtplan_truncated.dcm")
    with pytest.raises(UnsupportedObjectError, match="Comprehensive SR Storage"):
        decode_file("test-SR.dcm")
