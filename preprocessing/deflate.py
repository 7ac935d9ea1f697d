"""Deflated Explicit VR Little Endian, inflated with a bound before pydicom sees it.

pydicom inflates a deflated dataset in one `zlib.decompress` call: a 1.3 MB file
that inflates to 1 GiB took 14.6 s and 4.4 GB. Here the body is inflated in steps
that stop one byte past the instance limit, and the result is handed on as the
equivalent explicit VR little endian file, so every later step reads it as usual.
The bound is the instance's limit or what its request has left of its own, whichever is
less (`abdoserve.preprocessing.budget`).
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

from pydicom.dataset import FileMetaDataset
from pydicom.errors import BytesLengthException
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from abdoserve.preprocessing.errors import InputTooLargeError, TruncatedDicomError

DEFLATED_UID = DeflatedExplicitVRLittleEndian.encode()
META_SCAN_BYTES = 4096  # the file meta group lies well within this
CHUNK_BYTES = 1024 * 1024
# What pydicom raises on a corrupt file meta group, reading or writing it again.
META_ERRORS = (
    EOFError,
    OSError,
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    BytesLengthException,
)


@dataclass(frozen=True)
class InflateBound:
    """At most `limit` inflated bytes; past them, the refusal says `message`."""

    limit: int
    message: str


def is_deflated(data: bytes) -> bool:
    """Cheap test: the deflated syntax's UID appears in the file meta group."""
    return DEFLATED_UID in data[:META_SCAN_BYTES]


def inflate_to_explicit(data: bytes, index: int, bound: InflateBound) -> bytes:
    """The same instance, inflated and re-labelled explicit VR little endian; a body that
    inflates past `bound.limit` bytes is refused while inflating."""
    stream = io.BytesIO(data)
    try:
        read_preamble(stream, force=True)
        meta = _read_file_meta_info(stream)
        deflated = meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    except META_ERRORS as error:
        raise TruncatedDicomError("the file meta group cannot be read", instance=index) from error
    if not deflated:
        return data
    # The header goes in front while joining: no second copy of a large body.
    return bounded_inflate(data[stream.tell() :], bound, index, explicit_header(meta, index))


def explicit_header(meta: FileMetaDataset, index: int) -> bytes:
    """Preamble, prefix and a new file meta group: the instance's UIDs, explicit VR LE."""
    fresh = FileMetaDataset()
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    try:
        for keyword in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID"):
            if keyword in meta:
                setattr(fresh, keyword, str(meta[keyword].value))
        fresh.TransferSyntaxUID = ExplicitVRLittleEndian
        write_file_meta_info(out, fresh, enforce_standard=True)  # type: ignore[arg-type]
    except META_ERRORS as error:
        raise TruncatedDicomError("the file meta group cannot be read", instance=index) from error
    return out.getvalue()


def bounded_inflate(
    compressed: bytes, bound: InflateBound, index: int, prefix: bytes = b""
) -> bytes:
    """Raw deflate (no zlib header) -> `prefix` and at most `bound.limit` bytes, else
    InputTooLargeError."""
    limit = bound.limit
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    parts: list[bytes] = [prefix]
    size = 0
    pending = compressed
    try:
        while pending and not inflater.eof:
            part = inflater.decompress(pending, CHUNK_BYTES)
            pending = inflater.unconsumed_tail
            size += len(part)
            if size > limit:
                raise InputTooLargeError(bound.message, instance=index)
            parts.append(part)
        parts.append(inflater.flush())  # what the window still holds (at most 32 KiB)
    except zlib.error as error:
        raise TruncatedDicomError("the deflated dataset is corrupt", instance=index) from error
    if size + len(parts[-1]) > limit:
        raise InputTooLargeError(bound.message, instance=index)
    return b"".join(parts)
