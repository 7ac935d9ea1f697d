"""Intake errors: a small hierarchy, each carrying the gRPC status it maps to.

Messages name the instance (its index in the request) and the DICOM attribute at
fault, the way pydicom does ("instance 2: (0028,0030) Pixel Spacing is missing").
They never carry text the sender wrote: no attribute value read as a string (Modality,
UIDs, names, dates), no CLINICAL key or value, no third-party exception text (a
decoder's or parser's message may quote the file). Only tags, keywords, counts,
geometry and numbers parsed as numbers, and the server's own expected values.

Every class names a stable `reason`: the `reason` label of
`abdoserve_rejected_requests_total`. Dashboards and alerts read these strings, so a
class may be renamed freely but a reason never changes; a test pins them all.
"""

from __future__ import annotations

import enum
from typing import ClassVar

from pydicom._uid_dict import UID_dictionary  # pydicom.uid imports it from here
from pydicom.datadict import dictionary_description
from pydicom.tag import Tag


class StatusCode(enum.Enum):
    """The gRPC status codes an intake error can map to."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"


class IntakeError(Exception):
    """Base class: the request cannot be turned into model tensors."""

    code: ClassVar[StatusCode] = StatusCode.INVALID_ARGUMENT
    reason: ClassVar[str] = "intake"

    def __init__(self, message: str, *, instance: int | None = None) -> None:
        self.instance = instance
        self.detail = message
        prefix = f"instance {instance}: " if instance is not None else ""
        super().__init__(prefix + message)


class NotDicomError(IntakeError):
    """The bytes are not a DICOM dataset at all."""

    reason = "not_dicom"


class TruncatedDicomError(IntakeError):
    """The bytes start as DICOM but end before the dataset or its pixel data does."""

    reason = "truncated_dicom"


class UnsupportedObjectError(IntakeError):
    """A valid DICOM object that is not an image (SR, RT plan, presentation state, ...)."""

    reason = "unsupported_object"


class NoPixelDataError(IntakeError):
    """An image object without (7FE0,0010) Pixel Data."""

    reason = "no_pixel_data"


class PixelDecodeError(IntakeError):
    """The pixel data could not be decoded (corrupt stream, unsupported syntax)."""

    reason = "pixel_decode"


class AttributeProblem(IntakeError):
    """A required attribute is missing or holds an unusable value."""

    reason = "attribute_problem"

    def __init__(self, tag: int, problem: str, *, instance: int | None = None) -> None:
        self.tag = Tag(tag)
        super().__init__(f"{describe_tag(tag)} {problem}", instance=instance)


class WrongModalityError(IntakeError):
    """The image's modality is not the one the task reads."""

    reason = "wrong_modality"


class InstanceCountError(IntakeError):
    """The request carries the wrong number of images, phases or levels."""

    reason = "instance_count"


class InconsistentGeometryError(IntakeError):
    """Images that must line up (orientation, spacing, location) do not."""

    reason = "inconsistent_geometry"


class RoiError(IntakeError):
    """The region of interest is missing, malformed or outside the image."""

    reason = "roi"


class ClinicalInputError(IntakeError):
    """A clinical input (age, sex, field strength, ...) is missing or out of range."""

    reason = "clinical_input"


class InputTooLargeError(IntakeError):
    """The request exceeds a configured size limit; refused before decoding pixels."""

    reason = "input_too_large"


class NestingTooDeepError(IntakeError):
    """Sequences (or CLINICAL's JSON) nested deeper than the spec's limit."""

    reason = "nesting_too_deep"


class CodestreamMismatchError(IntakeError):
    """A compressed frame's own header disagrees with Rows, Columns or Bits Allocated."""

    reason = "codestream_mismatch"


class ModalityLutError(IntakeError):
    """A Modality LUT Sequence: a lookup table in place of Rescale Slope and Intercept."""

    reason = "modality_lut"


class FlatImageError(IntakeError):
    """An image whose pixels carry no usable signal (all one value)."""

    reason = "flat_image"


class MissingInputError(IntakeError):
    """A required input tensor is absent from the request."""

    reason = "missing_input"


# The explanation model's refusals (abdoserve.export.explain): a request for the maps of an
# answer that cannot have any, answered per request with its own code.


class NoTwinError(IntakeError):
    """The version that answered has no PyTorch twin to compute saliency with (an ONNX or
    TorchScript import of an architecture this project does not build)."""

    code = StatusCode.UNIMPLEMENTED
    reason = "explain_no_twin"


class TwinMismatchError(IntakeError):
    """The twin does not give the served version's output: its map would explain another
    network."""

    code = StatusCode.INTERNAL
    reason = "explain_twin_mismatch"


class VersionError(IntakeError):
    """VERSION does not name a version of the task's network."""

    reason = "explain_version"


def describe_tag(tag: int) -> str:
    """'(0028,0030) Pixel Spacing', named as the DICOM dictionary (and pydicom) names it."""
    value = Tag(tag)
    try:
        name = dictionary_description(value)
    except KeyError:
        name = "Unknown Attribute"
    return f"({value.group:04X},{value.element:04X}) {name}"


def uid_name(value: str | None, kind: str) -> str | None:
    """The DICOM dictionary's name for a standard UID of `kind` ("SOP Class", "Transfer
    Syntax"); None for any other value.

    pydicom's `UID.name` returns the value itself when it is not in the dictionary,
    and a UID the sender crafted can carry any text. A plain lookup, not `UID(value)`:
    that warns with the value itself.
    """
    entry = UID_dictionary.get(str(value)) if value else None
    return entry[0] if entry is not None and entry[1] == kind else None
