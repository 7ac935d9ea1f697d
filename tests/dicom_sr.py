"""A minimal Basic Text SR, for the tests that send a PACS an SR of their own.

The gateway writes its real SRs with highdicom (deploy/gateway/report.py); this one
only needs to be a valid SR in a given patient and study, so tests can check what
Orthanc stores and answers.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pydicom
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset


def write_basic_text_sr(path: Path, *, like: Path, text: str) -> Dataset:
    """Write a minimal Basic Text SR in the patient and study of the file `like`, in a
    series of its own (a PACS indexes it as Modality SR); return the dataset."""
    reference = pydicom.dcmread(like, stop_before_pixels=True)
    sr = Dataset()
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        if keyword in reference:
            sr[keyword] = reference[keyword]
    now = datetime.datetime.now()
    sr.SOPClassUID = uid.BasicTextSRStorage
    sr.SOPInstanceUID = uid.generate_uid()
    sr.Modality = "SR"
    sr.SeriesInstanceUID = uid.generate_uid()
    sr.SeriesNumber = 900
    sr.InstanceNumber = 1
    sr.Manufacturer = "AbdoServe tests"
    sr.ContentDate = now.strftime("%Y%m%d")
    sr.ContentTime = now.strftime("%H%M%S")
    sr.ValueType = "CONTAINER"
    sr.ContinuityOfContent = "SEPARATE"
    sr.CompletionFlag = "COMPLETE"
    sr.VerificationFlag = "UNVERIFIED"
    sr.ConceptNameCodeSequence = [coded("18748-4", "LN", "Diagnostic imaging report")]
    finding = Dataset()
    finding.RelationshipType = "CONTAINS"
    finding.ValueType = "TEXT"
    finding.ConceptNameCodeSequence = [coded("121071", "DCM", "Finding")]
    finding.TextValue = text
    sr.ContentSequence = [finding]
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    sr.save_as(path, enforce_file_format=True)
    return sr


def coded(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue = value
    code.CodingSchemeDesignator = scheme
    code.CodeMeaning = meaning
    return code
