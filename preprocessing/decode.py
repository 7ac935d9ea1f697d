"""DICOM bytes -> stored pixel frames plus the geometry and rescale needed downstream.

Tolerant on decode: explicit/implicit VR, big endian, deflated, files without
preamble or file meta, multi-frame, MONOCHROME1, and the compressed transfer
syntaxes through pydicom's decoder plugins (pylibjpeg with openjpeg, libjpeg and
rle; pyjpegls); openjpeg 2 also decodes HTJ2K (JPEG 2000 Part 15: .201, .202, .203).
python-gdcm is deliberately not installed: pydicom tries it first, and a byte-flipped
JPEG-LS header made it abort the whole process from C++, which in Triton would kill
the stub and every request batched with the bad one.
Strict where the answer would be wrong: no pixel data, colour, missing rescale or
spacing, truncated pixel data.

Pixels stay as stored integers here; the modality LUT (slope/intercept) is affine
and is applied after resampling, on four to ten times fewer pixels.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from abdoserve.preprocessing import header
from abdoserve.preprocessing.budget import RequestBudget
from abdoserve.preprocessing.codestream import FrameHeader, check_codestreams
from abdoserve.preprocessing.deflate import inflate_to_explicit, is_deflated
from abdoserve.preprocessing.errors import (
    AttributeProblem,
    InputTooLargeError,
    NoPixelDataError,
    NotDicomError,
    TruncatedDicomError,
    UnsupportedObjectError,
    uid_name,
)
from abdoserve.preprocessing.frames import Frame, frames_of
from abdoserve.preprocessing.nesting import check_sequence_depth, nested_too_deep
from abdoserve.preprocessing.pixel_data import (
    PixelSpan,
    decoded_pixels,
    frame_shape,
    native_pixels,
    native_span,
)
from abdoserve.preprocessing.specs import IntakeLimits
from abdoserve.preprocessing.study_profile import InstanceHeader, instance_header
from abdoserve.preprocessing.tags import (
    ACQUISITION_TIME,
    BITS_ALLOCATED,
    COLUMNS,
    CONTENT_TIME,
    DOUBLE_FLOAT_PIXEL_DATA,
    FLOAT_PIXEL_DATA,
    MODALITY,
    PHOTOMETRIC_INTERPRETATION,
    PIXEL_DATA,
    ROWS,
    SAMPLES_PER_PIXEL,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
)

# Attributes any image must have; a dataset without one of these is not an image.
_IMAGE_PIXEL_MODULE = (ROWS, COLUMNS, BITS_ALLOCATED)
_RECOGNISABLE = ("SOPClassUID", "Modality", "Rows", "PixelData", "StudyInstanceUID")
# What pydicom raises on bytes that end early or hold garbage: a short read (struct),
# a value of the wrong length (BytesLengthException), a cut deflate stream (zlib), ...
_PARSE_ERRORS = (
    EOFError,
    OSError,
    ValueError,
    KeyError,
    TypeError,
    NotImplementedError,
    struct.error,
    zlib.error,
    BytesLengthException,
)


@dataclass(frozen=True)
class DecodedInstance:
    """One request instance: its frames, each with its geometry and modality LUT."""

    index: int
    modality: str
    frames: tuple[Frame, ...]
    inverted: bool  # MONOCHROME1: higher stored values are darker
    acquisition_time: str
    extras: dict[int, object]  # values of the extra tags the caller asked for
    uid: str = ""  # SOP Instance UID, where the header has one
    header: InstanceHeader = field(default_factory=InstanceHeader)  # for drift, never refused


def decode_instance(
    data: bytes,
    index: int,
    limits: IntakeLimits,
    extra_tags: tuple[int, ...] = (),
    budget: RequestBudget | None = None,
) -> DecodedInstance:
    """Parse one DICOM instance from bytes; raise an IntakeError naming what is wrong.
    `budget` is the request's running total (a study passes one for all its instances)."""
    if len(data) > limits.max_bytes_per_instance:
        raise InputTooLargeError(
            f"{len(data)} bytes exceed the limit of {limits.max_bytes_per_instance} per instance",
            instance=index,
        )
    budget = RequestBudget(limits) if budget is None else budget
    inflated = is_deflated(data)
    if inflated:
        data = inflate_to_explicit(data, index, budget.inflate_bound())
    budget.spend_bytes(len(data), index)
    try:
        parsed = parse_dataset(data, index)
    except RecursionError as error:  # pydicom reads nested sequences recursively
        raise nested_too_deep(limits, index) from error
    dataset = parsed.dataset
    check_sequence_depth(dataset, limits.max_sequence_depth, index)
    check_is_image(parsed, index)
    budget.spend_pixels(check_pixel_budget(dataset, index, limits), index)
    modality = (header.text(dataset, MODALITY) or "").upper()
    check_compressed_frames(parsed, index)
    pixels = decode_pixels(data, parsed, index)
    if inflated and not pixels.flags.owndata:
        # A view into the inflated dataset would keep all of it (a private element of
        # 60 MiB, say) alive until the study is prepared: keep the pixels alone.
        pixels = pixels.copy()
    return DecodedInstance(
        index=index,
        modality=modality,
        frames=frames_of(dataset, pixels, index, modality),
        inverted=header.text(dataset, PHOTOMETRIC_INTERPRETATION) == "MONOCHROME1",
        acquisition_time=(
            header.text(dataset, ACQUISITION_TIME) or header.text(dataset, CONTENT_TIME) or ""
        ),
        extras={tag: _value(dataset, tag, index) for tag in extra_tags},
        uid=header.text(dataset, SOP_INSTANCE_UID) or "",
        header=instance_header(dataset),
    )


def _value(dataset: Dataset, tag: int, index: int) -> object:
    try:
        element = dataset.get(tag)
    except _PARSE_ERRORS as error:  # a raw value pydicom cannot convert
        raise AttributeProblem(tag, "cannot be read", instance=index) from error
    return None if element is None else element.value


@dataclass(frozen=True, eq=False)
class Parsed:
    """The header, and where native pixel data lies in the bytes (fast path) if it does."""

    dataset: Dataset
    syntax: UID | None
    span: PixelSpan | None


def parse_dataset(data: bytes, index: int) -> Parsed:
    """Read the header; find native pixel data in place, or read everything."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        force = False
        try:
            dataset, position = _read(data, index, force=False, header_only=True)
        except InvalidDicomError:
            force = True
            dataset, position = _read(data, index, force=True, header_only=True)
        syntax = _transfer_syntax(dataset)
        span = native_span(data, position, syntax)
        if span is None:  # compressed, deflated, no pixels, ...: pydicom reads it all
            dataset, _ = _read(data, index, force=force, header_only=False)
    if force and not any(keyword in dataset for keyword in _RECOGNISABLE):
        raise NotDicomError(
            "not a DICOM dataset: no 'DICM' prefix and no recognisable attributes", instance=index
        )
    return Parsed(dataset, syntax, span)


def _read(data: bytes, index: int, *, force: bool, header_only: bool) -> tuple[Dataset, int]:
    stream = io.BytesIO(data)
    try:
        dataset = pydicom.dcmread(stream, force=force, stop_before_pixels=header_only)
    except InvalidDicomError:
        raise
    except _PARSE_ERRORS as error:
        # pydicom's message may quote the element's bytes: it stays in __cause__ only.
        raise TruncatedDicomError(
            "the dataset cannot be parsed: it ends early or holds a malformed element",
            instance=index,
        ) from error
    if len(dataset) == 0:
        raise TruncatedDicomError(
            # A whole read follows a header that parsed: pydicom 3.0 returns nothing at all
            # when the file ends inside encapsulated Pixel Data (seen with cut HTJ2K files).
            "the dataset ends before its first attribute"
            if header_only
            else "the dataset ends inside (7FE0,0010) Pixel Data",
            instance=index,
        )
    return dataset, stream.tell()


def check_is_image(parsed: Parsed, index: int) -> None:
    """Refuse non-image objects, pixel-less images and colour images, naming why."""
    dataset = parsed.dataset
    has_pixels = parsed.span is not None or any(
        tag in dataset for tag in (PIXEL_DATA, *(FLOAT_PIXEL_DATA, DOUBLE_FLOAT_PIXEL_DATA))
    )
    if not has_pixels:
        # The dictionary's name decides, never the sent text ("1.2.3.Image" is no image class).
        sop_class = header.text(dataset, SOP_CLASS_UID)
        is_image_class = "Image" in (uid_name(sop_class, "SOP Class") or "")
        if sop_class and not is_image_class:
            raise UnsupportedObjectError(not_an_image(sop_class), instance=index)
        if not is_image_class and not any(tag in dataset for tag in _IMAGE_PIXEL_MODULE):
            raise UnsupportedObjectError(
                "the dataset holds no image (no Rows, Columns or Pixel Data)", instance=index
            )
        raise NoPixelDataError("(7FE0,0010) Pixel Data is missing", instance=index)
    for tag in _IMAGE_PIXEL_MODULE:
        if not header.present(dataset, tag):
            raise AttributeProblem(tag, "is missing", instance=index)
    samples = header.unsigned(dataset, SAMPLES_PER_PIXEL, 1, index)
    if samples != 1:
        raise AttributeProblem(
            SAMPLES_PER_PIXEL, f"is {samples}; a greyscale image is required", instance=index
        )


def not_an_image(sop_class: str) -> str:
    """A standard SOP class by its dictionary name; any other only by the attribute's name."""
    name = uid_name(sop_class, "SOP Class")
    if name is None:
        return "(0008,0016) SOP Class UID is not a standard SOP class; not an image object"
    return f"{name} is not an image object"


def check_pixel_budget(dataset: Dataset, index: int, limits: IntakeLimits) -> int:
    """Refuse oversized images from the header alone, before decoding anything; the bytes
    the decoded pixels will take (1-bit data is unpacked to a byte a pixel)."""
    frames, rows, columns = frame_shape(dataset, index)
    pixels = frames * rows * columns
    if pixels > limits.max_pixels_per_instance:
        raise InputTooLargeError(
            f"(0028,0010) Rows x (0028,0011) Columns x frames = {pixels} pixels exceeds the "
            f"limit of {limits.max_pixels_per_instance}",
            instance=index,
        )
    bits = header.unsigned(dataset, BITS_ALLOCATED, 8, index)
    return pixels * max(1, -(-bits // 8))


def check_compressed_frames(parsed: Parsed, index: int) -> None:
    """Compressed frames' own headers must agree with the DICOM header (before decoding)."""
    syntax = parsed.syntax
    # A corrupt Transfer Syntax UID may name no transfer syntax at all (fuzzing found it).
    if parsed.span is not None or syntax is None or not syntax.is_transfer_syntax:
        return
    if not syntax.is_encapsulated:
        return
    pixel_data = header.raw_bytes(parsed.dataset, PIXEL_DATA)
    if pixel_data is None:
        return
    frames, rows, columns = frame_shape(parsed.dataset, index)
    bits = header.unsigned(parsed.dataset, BITS_ALLOCATED, 0, index)
    check_codestreams(pixel_data, frames, FrameHeader(rows, columns, bits, 1), index)


def decode_pixels(data: bytes, parsed: Parsed, index: int) -> np.ndarray:
    """Stored pixel values as (frames, rows, columns)."""
    if parsed.span is not None:
        pixels = native_pixels(data, parsed.span, parsed.dataset, index)
        if pixels is not None:
            return pixels
        # A layout numpy cannot view (e.g. 1-bit): let pydicom read and unpack it.
        dataset, _ = _read(data, index, force=True, header_only=False)
        return decoded_pixels(dataset, parsed.syntax, index)
    return decoded_pixels(parsed.dataset, parsed.syntax, index)


def _transfer_syntax(dataset: Dataset) -> UID | None:
    meta = getattr(dataset, "file_meta", None)
    value = meta.get("TransferSyntaxUID") if meta is not None else None
    if value is not None:
        return UID(str(value))
    # Files without file meta: pydicom records the encoding it found while reading.
    implicit, little = dataset.original_encoding
    if little is None:
        return None
    if little:
        return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ExplicitVRBigEndian
