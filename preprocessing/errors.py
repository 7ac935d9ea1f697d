"""Intake errors: a small hierarchy, each carrying the gRPC status it maps to.

Messages name the instance (its index in the request) and the DICOM attribute at
fault, the way pydicom does ("instance 2: (0028,0030) Pixel Spacing is missing").
They never carry patient identifiers: only tags, keywords, counts and geometry.
"""

from __future__ import annotations

import enum

from pydicom.datadict import dictionary_description
from pydicom.tag import Tag


class StatusCode(enum.Enum):
    """The gRPC status codes an intake error can map to."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"


class IntakeError(Exception):
    """Base class: the request cannot be turned into model tensors."""

    code: StatusCode = StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, *, instance: int | None = None) -> None:
        self.instance = instance
        self.detail = message
        prefix = f"instance {instance}: " if instance is not None else ""
        super().__init__(prefix + message)


class NotDicomError(IntakeError):
    """The bytes are not a DICOM dataset at all."""


class TruncatedDicomError(IntakeError):
    """The bytes start as DICOM but end before the dataset or its pixel data does."""


class UnsupportedObjectError(IntakeError):
    """A valid DICOM object that is not an image (SR, RT plan, presentation state, ...)."""


class NoPixelDataError(IntakeError):
    """An image object without (7FE0,0010) Pixel Data."""


class PixelDecodeError(IntakeError):
    """The pixel data could not be decoded (corrupt stream, unsupported syntax)."""


class AttributeProblem(IntakeError):
    """A required attribute is missing or holds an unusable value."""

    def __init__(self, tag: int, problem: str, *, instance: int | None = None) -> None:
        self.tag = Tag(tag)
        super().__init__(f"{describe_tag(tag)} {problem}", instance=instance)


class WrongModalityError(IntakeError):
    """The image's modality is not the one the task reads."""


class InstanceCountError(IntakeError):
    """The request carries the wrong number of images, phases or levels."""


class InconsistentGeometryError(IntakeError):
    """Images that must line up (orientation, spacing, location) do not."""


class RoiError(IntakeError):
    """The region of interest is missing, malformed or outside the image."""


class ClinicalInputError(IntakeError):
    """A clinical input (age, sex, field strength, ...) is missing or out of range."""


class InputTooLargeError(IntakeError):
    """The request exceeds a configured size limit; refused before decoding pixels."""


def describe_tag(tag: int) -> str:
    """'(0028,0030) Pixel Spacing', named as the DICOM dictionary (and pydicom) names it."""
    value = Tag(tag)
    try:
        name = dictionary_description(value)
    except KeyError:
        name = "Unknown Attribute"
    return f"({value.group:04X},{value.element:04X}) {name}"
