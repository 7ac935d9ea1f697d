"""Enhanced CT / MR multi-frame objects built from a phantom's single-frame slices.

Scanners write one Enhanced CT (or MR) Image Storage object per series, with the
geometry and the modality LUT in functional groups instead of the top level: the
shared group when every frame agrees, the per-frame groups when they differ. These
objects hold the same stored pixels as the single-frame study they come from, so
an intake that reads the functional groups right answers both alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO

import numpy as np
from pydicom import dcmread, uid
from pydicom.dataset import Dataset, FileMetaDataset

ENHANCED_CLASSES = {"CT": uid.EnhancedCTImageStorage, "MR": uid.EnhancedMRImageStorage}
# Copied unchanged from the first slice: patient, study, series and pixel format.
COMMON_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "SeriesInstanceUID",
    "SeriesNumber",
    "Modality",
    "SeriesDescription",
    "BodyPartExamined",
    "ContrastBolusAgent",
    "ContrastBolusRoute",
    "MagneticFieldStrength",
    "FrameOfReferenceUID",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)
# Per-frame LUT variant: frame k stores its values shifted by k * this much (the
# intercept compensates), so only a frame-by-frame LUT gives the right values.
PER_FRAME_SHIFT = 7


def enhanced_multiframe(instances: Sequence[bytes], *, per_frame_lut: bool = False) -> bytes:
    """One Enhanced CT/MR object (explicit VR little endian) holding every slice as a frame.

    `per_frame_lut`: each frame gets its own Rescale Intercept in its per-frame
    Pixel Value Transformation; otherwise one shared LUT for all frames.
    """
    slices = [dcmread(BytesIO(data)) for data in instances]
    first = slices[0]
    dataset = _header(first, len(slices))
    shifts = [PER_FRAME_SHIFT * number if per_frame_lut else 0 for number in range(len(slices))]
    shared = Dataset()
    measures = _item(PixelSpacing=first.PixelSpacing)
    if "SliceThickness" in first:  # required there by the Enhanced CT/MR IODs
        measures.SliceThickness = first.SliceThickness
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [_item(ImageOrientationPatient=first.ImageOrientationPatient)]
    if not per_frame_lut:
        shared.PixelValueTransformationSequence = [_lut(first, 0)]
    dataset.SharedFunctionalGroupsSequence = [shared]
    dataset.PerFrameFunctionalGroupsSequence = [
        _frame_groups(item, shift, per_frame_lut)
        for item, shift in zip(slices, shifts, strict=True)
    ]
    frames = [_shifted_pixels(item, shift) for item, shift in zip(slices, shifts, strict=True)]
    dataset.PixelData = b"".join(frames)
    out = BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _header(first: Dataset, frames: int) -> Dataset:
    dataset = Dataset()
    for keyword in COMMON_KEYWORDS:
        if keyword in first:
            setattr(dataset, keyword, first.data_element(keyword).value)  # type: ignore[union-attr]
    dataset.SOPClassUID = ENHANCED_CLASSES[str(first.Modality)]
    dataset.SOPInstanceUID = uid.generate_uid()
    dataset.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    dataset.NumberOfFrames = frames
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    dataset.file_meta = meta
    return dataset


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _lut(source: Dataset, shift: int) -> Dataset:
    """The slice's Rescale Slope/Intercept, the intercept moved to undo `shift`."""
    slope = float(source.get("RescaleSlope", 1.0))
    intercept = float(source.get("RescaleIntercept", 0.0)) - shift * slope
    kind = "HU" if source.Modality == "CT" else "US"
    return _item(RescaleSlope=f"{slope:g}", RescaleIntercept=f"{intercept:g}", RescaleType=kind)


def _frame_groups(source: Dataset, shift: int, per_frame_lut: bool) -> Dataset:
    groups = Dataset()
    groups.PlanePositionSequence = [_item(ImagePositionPatient=source.ImagePositionPatient)]
    if per_frame_lut:
        groups.PixelValueTransformationSequence = [_lut(source, shift)]
    return groups


def _shifted_pixels(source: Dataset, shift: int) -> bytes:
    stored = source.pixel_array
    if shift:
        bits = int(source.BitsStored)
        low, high = (
            (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            if source.PixelRepresentation
            else (
                0,
                2**bits - 1,
            )
        )
        if stored.max() + shift > high or stored.min() + shift < low:
            raise ValueError("the per-frame shift would overflow the stored bits")
        stored = stored + np.asarray(shift, dtype=stored.dtype)
    return bytes(stored.astype(stored.dtype.newbyteorder("<")).tobytes())
