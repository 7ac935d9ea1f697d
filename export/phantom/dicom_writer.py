"""CT and MR Image Storage objects: the modules a scanner writes, then encoding.

UIDs are derived from the phantom's seed (pydicom's root plus a hash of the
entropy sources), so the same seed writes the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from io import BytesIO
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset

from abdoserve.export.phantom.anatomy import PhantomGrid

PATIENT_NAME = "PHANTOM^ABDOMEN"

TRANSFER_SYNTAXES: dict[str, uid.UID] = {
    str(item.keyword): item
    for item in (
        uid.ExplicitVRLittleEndian,
        uid.ImplicitVRLittleEndian,
        uid.ExplicitVRBigEndian,
        uid.DeflatedExplicitVRLittleEndian,
        uid.RLELossless,
        uid.JPEG2000Lossless,
        uid.JPEGLSLossless,
    )
}


def resolve_transfer_syntax(value: str) -> uid.UID:
    """A supported transfer syntax, by keyword ("RLELossless") or UID."""
    if value in TRANSFER_SYNTAXES:
        return TRANSFER_SYNTAXES[value]
    for item in TRANSFER_SYNTAXES.values():
        if value == item:
            return item
    known = ", ".join(TRANSFER_SYNTAXES)
    raise ValueError(f"unsupported transfer syntax {value!r}; known: {known}")


def phantom_uid(*parts: object) -> str:
    """A UID that depends only on `parts` (task, seed, role, ...)."""
    return str(uid.generate_uid(entropy_srcs=[str(part) for part in parts]))


@dataclass(frozen=True)
class Patient:
    patient_id: str
    birth_date: date
    sex: Literal["M", "F"]
    age: int


@dataclass(frozen=True)
class StudyHeader:
    uid: str
    frame_of_reference_uid: str
    study_date: date
    study_time: str
    accession: str
    description: str
    patient: Patient


@dataclass(frozen=True)
class SeriesHeader:
    uid: str
    number: int
    description: str
    window: tuple[float, float]  # centre, width
    contrast_agent: str | None = None


@dataclass(frozen=True)
class PixelFormat:
    """Stored integers: signed or not, bits used, and for CT the rescale to HU."""

    signed: bool
    bits_stored: int
    rescale_intercept: float | None  # None: no Modality LUT (MR)

    def __post_init__(self) -> None:
        if self.bits_stored not in (12, 16):
            raise ValueError("bits_stored must be 12 or 16")


@dataclass(frozen=True)
class SliceHeader:
    sop_uid: str
    instance_number: int
    z_mm: float
    grid: PhantomGrid
    thickness_mm: float
    acquisition_time: str  # HHMMSS.FFFFFF


@dataclass(frozen=True)
class MRAcquisition:
    field_strength_t: float
    contrast_agent: str = "gadoxetic acid (Gd-EOB-DTPA)"

    def __post_init__(self) -> None:
        if not 0.2 <= self.field_strength_t <= 7.0:
            raise ValueError("field_strength must be in 0.2..7.0 T")


def ct_dataset(
    study: StudyHeader, series: SeriesHeader, image: SliceHeader, pixels: PixelFormat
) -> Dataset:
    """A CT Image Storage dataset, without Pixel Data."""
    ds = _common(study, series, image, pixels, modality="CT", sop_class=uid.CTImageStorage)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.KVP = 120
    ds.XRayTubeCurrent = 250
    ds.ConvolutionKernel = "STANDARD"
    ds.GantryDetectorTilt = 0
    ds.ReconstructionDiameter = round(image.grid.cols * image.grid.spacing_mm, 1)
    ds.RescaleIntercept = pixels.rescale_intercept or 0
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    return ds


def mr_dataset(
    study: StudyHeader,
    series: SeriesHeader,
    image: SliceHeader,
    pixels: PixelFormat,
    acquisition: MRAcquisition,
) -> Dataset:
    """A hepatobiliary-phase fat-suppressed 3D T1 gradient-echo MR slice, without Pixel Data."""
    ds = _common(study, series, image, pixels, modality="MR", sop_class=uid.MRImageStorage)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.ScanningSequence = "GR"
    ds.SequenceVariant = ["SP", "SS"]
    ds.ScanOptions = "FS"
    ds.MRAcquisitionType = "3D"
    ds.RepetitionTime = 4.0
    ds.EchoTime = 1.9
    ds.EchoTrainLength = 1
    ds.FlipAngle = 25
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = acquisition.field_strength_t
    ds.ImagingFrequency = round(42.577 * acquisition.field_strength_t, 3)
    ds.SpacingBetweenSlices = image.thickness_mm
    return ds


def _common(
    study: StudyHeader,
    series: SeriesHeader,
    image: SliceHeader,
    pixels: PixelFormat,
    *,
    modality: str,
    sop_class: uid.UID,
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = image.sop_uid
    _patient_and_study(ds, study)
    ds.Modality = modality
    ds.SeriesInstanceUID = series.uid
    ds.SeriesNumber = series.number
    ds.SeriesDescription = series.description
    ds.BodyPartExamined = "ABDOMEN"
    ds.PatientPosition = "FFS"
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "AbdoServe"
    ds.ManufacturerModelName = "Digital abdominal phantom"
    if series.contrast_agent:
        ds.ContrastBolusAgent = series.contrast_agent
        ds.ContrastBolusRoute = "IV"
    _image(ds, study, image)
    _image_pixel(ds, image.grid, pixels)
    ds.WindowCenter, ds.WindowWidth = series.window
    return ds


def _patient_and_study(ds: Dataset, study: StudyHeader) -> None:
    patient = study.patient
    ds.PatientName = PATIENT_NAME
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{patient.age:03d}Y"
    ds.StudyInstanceUID = study.uid
    ds.StudyDate = study.study_date.strftime("%Y%m%d")
    ds.StudyTime = study.study_time
    ds.StudyID = "1"
    ds.AccessionNumber = study.accession
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study.description


def _image(ds: Dataset, study: StudyHeader, image: SliceHeader) -> None:
    """General Image and Image Plane modules: axial, centred on the body axis."""
    ds.InstanceNumber = image.instance_number
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = ds.ContentDate = study.study_date.strftime("%Y%m%d")
    ds.AcquisitionTime = ds.ContentTime = image.acquisition_time
    x0, y0 = image.grid.origin_mm
    ds.ImagePositionPatient = [round(x0, 4), round(y0, 4), round(image.z_mm, 4)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [image.grid.spacing_mm, image.grid.spacing_mm]
    ds.SliceThickness = image.thickness_mm
    ds.SliceLocation = round(image.z_mm, 4)


def _image_pixel(ds: Dataset, grid: PhantomGrid, pixels: PixelFormat) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = grid.rows
    ds.Columns = grid.cols
    ds.BitsAllocated = 16
    ds.BitsStored = pixels.bits_stored
    ds.HighBit = pixels.bits_stored - 1
    ds.PixelRepresentation = int(pixels.signed)


def encode(
    ds: Dataset,
    stored: npt.NDArray[np.int16] | npt.NDArray[np.uint16],
    syntax: uid.UID,
) -> bytes:
    """The DICOM file (preamble, file meta, dataset) in `syntax`, with `stored` as
    its pixels. Big endian needs the pixel bytes swapped by hand: pydicom 3
    rewrites the element encoding but leaves OW values as given."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    order: Literal["<", ">"] = ">" if syntax == uid.ExplicitVRBigEndian else "<"
    ds.add_new("PixelData", "OW", stored.astype(stored.dtype.newbyteorder(order)).tobytes())
    if syntax.is_compressed:
        ds.compress(syntax, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = syntax  # deflate happens while writing
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
