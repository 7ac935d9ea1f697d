"""A key image's picture as a colour Secondary Capture that files into the source study.

highdicom's `SCImage.from_ref_dataset` copies the patient and study attributes from the
source instance (so a PACS files the capture beside it), RGB 8 bit. The legend is part of
the pixels, so Burned In Annotation is YES. UIDs are derived from the study key, the task,
the version and the key image's number: the same study explained again gives the same
objects, which a PACS treats as one. Nothing here logs a header value.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pydicom
from highdicom.sc import SCImage
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MANUFACTURER = "AbdoServe"
SERIES_NUMBER = 9902  # beside the gateway's SR series (9901), out of the modality's way
_MAX_LO = 64


@dataclass(frozen=True)
class CaptureIds:
    """Where one capture goes: its series (one per study, task and version) and itself."""

    series_uid: str
    sop_uid: str
    number: int  # 1-based Instance Number

    @classmethod
    def derive(cls, study_key: str, task: str, version: int, index: int) -> CaptureIds:
        series = _derived_uid("series", study_key, task, str(version))
        return cls(
            series, _derived_uid("capture", study_key, task, str(version), str(index)), index + 1
        )


def _derived_uid(kind: str, *parts: str) -> str:
    # joined with newlines: generate_uid concatenates its sources without a separator
    return str(generate_uid(entropy_srcs=["\n".join(("abdoserve-explain", kind, *parts))]))


def source_header(data: bytes) -> Dataset:
    """The source instance's header (pixel data left unread)."""
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)


def secondary_capture(source: Dataset, rgb: np.ndarray, ids: CaptureIds, description: str) -> bytes:
    """The capture as a DICOM file (preamble and file meta), as it is sent."""
    capture = SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=ids.series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=ids.sop_uid,
        instance_number=ids.number,
        manufacturer=MANUFACTURER,
        patient_orientation=patient_orientation(source),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    capture.BurnedInAnnotation = "YES"
    if "Laterality" not in capture:
        # General Series 2C: the abdomen is no paired part, yet dciodvfy wants it present
        capture.Laterality = ""
    capture.SeriesDescription = description[:_MAX_LO]
    capture.ImageType = ["DERIVED", "SECONDARY"]
    capture.DerivationDescription = description
    capture.SourceImageSequence = DicomSequence([_reference(source)])
    buffer = io.BytesIO()
    capture.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def patient_orientation(source: Dataset) -> tuple[str, str]:
    """The row and column directions as patient letters, from Image Orientation
    (Patient); axial ("L", "P") where the header has none."""
    cosines = source.get("ImageOrientationPatient")
    if cosines is None or len(cosines) != 6:
        return ("L", "P")
    values = [float(value) for value in cosines]
    return (_letter(values[:3]), _letter(values[3:]))


def _letter(direction: list[float]) -> str:
    # DICOM's patient axes: +x left, +y posterior, +z head
    axis = int(np.argmax(np.abs(direction)))
    towards, away = (("L", "R"), ("P", "A"), ("H", "F"))[axis]
    return towards if direction[axis] > 0 else away
