"""Stored pixel values from a parsed instance.

Uncompressed pixel data is viewed in place in the request's bytes: the header is
parsed up to (7FE0,0010), the element's own header gives offset and length, and
numpy reads the values without a copy. This is what keeps our whole per-slice
preprocessing within 1.25x of a bare `pydicom.dcmread(...).pixel_array`.
Compressed and unusual pixel data go through pydicom's decoder plugins.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from abdoserve.preprocessing import header
from abdoserve.preprocessing.errors import PixelDecodeError, TruncatedDicomError, uid_name
from abdoserve.preprocessing.tags import (
    BITS_ALLOCATED,
    BITS_STORED,
    COLUMNS,
    NUMBER_OF_FRAMES,
    PIXEL_DATA,
    PIXEL_REPRESENTATION,
    ROWS,
)

_UNDEFINED_LENGTH = 0xFFFFFFFF
_NATIVE_SYNTAXES: dict[str, tuple[bool, bool]] = {  # (implicit VR, little endian)
    ImplicitVRLittleEndian: (True, True),
    ExplicitVRLittleEndian: (False, True),
    ExplicitVRBigEndian: (False, False),
}


@dataclass(frozen=True)
class PixelSpan:
    """Where native Pixel Data lies inside the instance's bytes."""

    offset: int
    length: int
    little_endian: bool


def native_span(data: bytes, position: int, syntax: UID | None) -> PixelSpan | None:
    """The Pixel Data element starting at `position`, if native with a defined length."""
    encoding = _NATIVE_SYNTAXES.get(str(syntax)) if syntax is not None else None
    if encoding is None or position + 8 > len(data):
        return None
    implicit, little = encoding
    order = "<" if little else ">"
    group, element = struct.unpack_from(f"{order}HH", data, position)
    if (group << 16) | element != PIXEL_DATA:
        return None
    if implicit:
        (length,), header_size = struct.unpack_from(f"{order}I", data, position + 4), 8
    else:
        if position + 12 > len(data):
            return None
        (length,), header_size = struct.unpack_from(f"{order}I", data, position + 8), 12
    if length == _UNDEFINED_LENGTH:
        return None
    return PixelSpan(position + header_size, length, little)


def frame_shape(dataset: Dataset, index: int) -> tuple[int, int, int]:
    frames = header.number(dataset, NUMBER_OF_FRAMES, index)
    count = int(frames) if frames is not None and frames >= 1 else 1
    rows = header.unsigned(dataset, ROWS, 0, index)
    return (count, rows, header.unsigned(dataset, COLUMNS, 0, index))


def native_pixels(data: bytes, span: PixelSpan, dataset: Dataset, index: int) -> np.ndarray | None:
    """(frames, rows, columns) viewed in `data`; None for layouts numpy cannot view."""
    bits = header.unsigned(dataset, BITS_ALLOCATED, 0, index)
    if bits not in (8, 16, 32):
        return None  # 1-bit and other packed layouts: pydicom unpacks them
    signed = header.unsigned(dataset, PIXEL_REPRESENTATION, 0, index) == 1
    dtype = np.dtype(f"{'<' if span.little_endian else '>'}{'i' if signed else 'u'}{bits // 8}")
    shape = frame_shape(dataset, index)
    count = shape[0] * shape[1] * shape[2]
    available = min(span.length, len(data) - span.offset)
    if available < count * dtype.itemsize:
        raise TruncatedDicomError(
            f"(7FE0,0010) Pixel Data holds {max(available, 0)} bytes, "
            f"expected {count * dtype.itemsize}",
            instance=index,
        )
    pixels: np.ndarray = np.frombuffer(data, dtype=dtype, count=count, offset=span.offset)
    pixels = pixels.reshape(shape)
    stored = header.unsigned(dataset, BITS_STORED, bits, index)
    # One pass of max() finds values using bits above Bits Stored; only then fix them.
    if stored < bits and int(pixels.max()) >= (1 << (stored - 1 if signed else stored)):
        pixels = _mask_stored_bits(pixels, stored, signed)
    return pixels


def decoded_pixels(dataset: Dataset, syntax: UID | None, index: int) -> np.ndarray:
    """(frames, rows, columns) through pydicom's decoders (compressed, packed, deflated)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array = dataset.pixel_array
    except Exception as error:  # decoder plugins raise many unrelated types
        raise _decode_error(syntax, index, error) from error
    except BaseException as error:
        # Rust plugins (pylibjpeg-rle) panic on corrupt streams with pyo3's
        # PanicException, a BaseException: one bad instance must not fail the batch.
        if type(error).__name__ != "PanicException":
            raise
        raise _decode_error(syntax, index, error) from error
    return array.reshape(frame_shape(dataset, index))


def _decode_error(syntax: UID | None, index: int, error: BaseException) -> PixelDecodeError:
    """Names the syntax (if standard) and the exception's type; the decoder's message may
    quote the stream or the header's values, so it stays in __cause__ only."""
    name = uid_name(syntax, "Transfer Syntax")
    if name is None:
        return PixelDecodeError(
            "(7FE0,0010) Pixel Data could not be decoded: (0002,0010) Transfer Syntax UID "
            "is missing or not a standard transfer syntax",
            instance=index,
        )
    return PixelDecodeError(
        f"(7FE0,0010) Pixel Data could not be decoded ({name}): the decoder raised "
        f"{type(error).__name__}",
        instance=index,
    )


def _mask_stored_bits(pixels: np.ndarray, stored: int, signed: bool) -> np.ndarray:
    """Drop bits above Bits Stored (overlays, junk); sign-extend signed values."""
    size = pixels.dtype.itemsize
    native = pixels.astype(pixels.dtype.newbyteorder("="))
    masked: np.ndarray = native.view(f"u{size}") & np.array((1 << stored) - 1, f"u{size}")
    if not signed:
        return masked
    shift = size * 8 - stored
    extended: np.ndarray = (masked.view(f"i{size}") << shift) >> shift
    return extended
