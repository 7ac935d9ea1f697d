"""Compressed frames' own headers, checked against the DICOM header before any decoder runs.

A decoder allocates what the codestream's header says, not what Rows and Columns
say: a 3.5 KB JPEG 2000 file whose SIZ marker claims 65535 x 65535 made the decoder
allocate gigabytes. Each frame's header (JPEG 2000 SIZ, JPEG SOFn, JPEG-LS SOF55) is
read here in a few bytes and must agree with (0028,0010) Rows, (0028,0011) Columns
and (0028,0100) Bits Allocated, and hold one component. HTJ2K (Part 15) codestreams
start the same way (SOC, SIZ, then its CAP marker), so the same SIZ check covers them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from pydicom.encaps import generate_frames
from pydicom.uid import UID

from abdoserve.preprocessing.errors import CodestreamMismatchError

SOC, SIZ = 0xFF4F, 0xFF51  # JPEG 2000: start of codestream, image and tile size
SOI = 0xFFD8  # JPEG / JPEG-LS: start of image
# JPEG start-of-frame markers: SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC);
# JPEG-LS: SOF55 (F7).
SOF_MARKERS = frozenset(range(0xFFC0, 0xFFD0)) - {0xFFC4, 0xFFC8, 0xFFCC} | {0xFFF7}
STANDALONE = frozenset(range(0xFFD0, 0xFFD9)) | {0xFF01}  # RSTn, SOI, EOI, TEM: no length
HEADER_SCAN_BYTES = 64 * 1024  # a frame header larger than this is refused


@dataclass(frozen=True)
class FrameHeader:
    rows: int
    columns: int
    precision: int
    components: int


def check_codestreams(pixel_data: bytes, frames: int, expected: FrameHeader, index: int) -> None:
    """Every encapsulated frame's header matches `expected` (from the DICOM header: rows,
    columns, Bits Allocated as the most precision, one component), or
    CodestreamMismatchError."""
    for number, frame in enumerate(_frames(pixel_data, frames, index)):
        header = frame_header(frame[:HEADER_SCAN_BYTES])
        if header is None:
            continue  # RLE and other syntaxes: the decoder sizes output from the DICOM header
        problem = _disagreement(header, expected)
        if problem:
            raise CodestreamMismatchError(
                f"frame {number}: the codestream header says {problem}; refused before decoding",
                instance=index,
            )


def _frames(pixel_data: bytes, frames: int, index: int) -> Iterator[bytes]:
    try:
        yield from generate_frames(pixel_data, number_of_frames=frames)
    except (ValueError, struct.error) as error:
        raise CodestreamMismatchError(
            f"the encapsulated pixel data cannot be split into {frames} frames", instance=index
        ) from error


def _disagreement(header: FrameHeader, expected: FrameHeader) -> str:
    if (header.rows, header.columns) != (expected.rows, expected.columns):
        return (
            f"{header.rows} x {header.columns} pixels, but (0028,0010) Rows x "
            f"(0028,0011) Columns is {expected.rows} x {expected.columns}"
        )
    if header.components != expected.components:
        return f"{header.components} components; a greyscale image has {expected.components}"
    if header.precision > expected.precision:
        return f"{header.precision} bits per sample, over (0028,0100) Bits Allocated"
    return ""


def frame_header(frame: bytes) -> FrameHeader | None:
    """The size of a JPEG 2000, JPEG or JPEG-LS frame from its first marker segments."""
    if len(frame) < 4:
        return None
    first = int.from_bytes(frame[:2], "big")
    if first == SOC:
        return _siz(frame)
    if first == SOI:
        return _sof(frame)
    if frame[:4] == b"\x00\x00\x00\x0c":  # JP2 file format box: find the codestream
        start = frame.find(b"\xff\x4f\xff\x51")
        return _siz(frame[start:]) if start >= 0 else None
    return None


def _siz(frame: bytes) -> FrameHeader | None:
    # SOC, SIZ, Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz, XTOsiz, YTOsiz, Csiz
    if len(frame) < 42 or int.from_bytes(frame[2:4], "big") != SIZ:
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", frame[8:24])
    components = int.from_bytes(frame[40:42], "big")
    precision = (frame[42] & 0x7F) + 1 if len(frame) > 42 else 0
    return FrameHeader(ysiz - yosiz, xsiz - xosiz, precision, components)


def _sof(frame: bytes) -> FrameHeader | None:
    position = 2
    while position + 4 <= len(frame):
        marker = int.from_bytes(frame[position : position + 2], "big")
        if marker in STANDALONE or marker == 0xFFFF:
            position += 1 if marker == 0xFFFF else 2  # fill byte or no-length marker
            continue
        length = int.from_bytes(frame[position + 2 : position + 4], "big")
        if marker in SOF_MARKERS:
            segment = frame[position + 4 : position + 2 + length]
            if len(segment) < 6:
                return None
            precision, height, width, components = struct.unpack(">BHHB", segment[:6])
            return FrameHeader(height, width, precision, components)
        if marker == 0xFFDA:  # start of scan before any frame header
            return None
        position += 2 + length
    return None


def is_encapsulated(syntax: UID | None) -> bool:
    return syntax is not None and syntax.is_encapsulated
