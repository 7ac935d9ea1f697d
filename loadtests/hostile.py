"""Hostile requests, built from real phantom files: bombs, lies and nesting.

Each builder returns the bytes an attacker (or a broken sender) would send; the
unit, fuzz and integration tests, `abdoserve bench hostile` and the load tests all use
the same ones.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from functools import cache

from pydicom import dcmread, uid
from pydicom.filewriter import write_file_meta_info
from tritonclient.utils import InferenceServerException

from abdoserve.export.phantom import build_study
from abdoserve_client.errors import AbdoServeError, from_triton
from abdoserve_client.protocol import OUTPUT_NAMES
from abdoserve_client.wire import RawInfer, bytes_tensor, open_channel

PIXEL_DATA_LE = b"\xe0\x7f\x10\x00"  # (7FE0,0010) in little endian
SOC_SIZ = b"\xff\x4f\xff\x51"
JPEG_LS_SOF = b"\xff\xf7"
UNDEFINED = b"\xff\xff\xff\xff"
NESTED_TAG = b"\x40\x00\x30\xa7"  # (0040,A730) Content Sequence


def phantom_instance(
    task: str = "bone_density_ct", syntax: str = "ExplicitVRLittleEndian"
) -> bytes:
    return build_study(task, seed=1, transfer_syntax=syntax).instances[0]


def deep_sequence(levels: int) -> bytes:
    """A real CT slice with `levels` undefined-length sequences nested before Pixel Data."""
    data = phantom_instance()
    opening = (NESTED_TAG + b"SQ\x00\x00" + UNDEFINED + b"\xfe\xff\x00\xe0" + UNDEFINED) * levels
    closing = (b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00") * levels
    at = data.rindex(PIXEL_DATA_LE + b"OW")
    return data[:at] + opening + closing + data[at:]


@cache
def deflate_bomb(inflated_bytes: int = 1024**3) -> bytes:
    """Deflated Explicit VR Little Endian whose body inflates to `inflated_bytes`: a real
    header, then a private OB element of zeros (about 1 MB compressed per GiB)."""
    source = dcmread(io.BytesIO(phantom_instance()))
    del source.PixelData
    body = io.BytesIO()
    source.save_as(body, enforce_file_format=False, implicit_vr=False, little_endian=True)
    header = body.getvalue()
    zeros = inflated_bytes - len(header) - 12
    element = b"\x09\x00\x10\x10" + b"OB\x00\x00" + struct.pack("<I", zeros)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = b"\0" * (16 * 1024 * 1024)
    parts = [compressor.compress(header + element)]
    for start in range(0, zeros, len(chunk)):
        parts.append(compressor.compress(chunk[: min(len(chunk), zeros - start)]))
    parts.append(compressor.flush())
    meta = io.BytesIO()
    source.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    write_file_meta_info(meta, source.file_meta, enforce_standard=True)  # type: ignore[arg-type]
    return b"\0" * 128 + b"DICM" + meta.getvalue() + b"".join(parts)


PRIVATE_CREATOR = b"\xdf\x7f\x10\x00LO\x0a\x00ABDOSERVE "  # (7FDF,0010), before Pixel Data
PRIVATE_OB = b"\xdf\x7f\x10\x10OB\x00\x00"  # (7FDF,1010) OB, its length follows


@cache
def inflation_flood(
    count: int, private_bytes: int, task: str = "esophageal_cancer_ct"
) -> tuple[bytes, ...]:
    """`count` real slices of `task` (64 distinct at most, then repeated), each deflated
    with a private OB element of `private_bytes` zeros before its Pixel Data: every instance
    is under the per-instance bound, but together they inflate to about `count` x
    `private_bytes` (issue 19's probe: 96 x 60 MiB from 30 MB sent)."""
    slices = build_study(task, seed=1, slices=min(count, 64), interval_mm=5.0).instances
    flooded = [_with_private_zeros(item, private_bytes) for item in slices]
    return tuple(flooded[number % len(flooded)] for number in range(count))


def _with_private_zeros(explicit: bytes, private_bytes: int) -> bytes:
    """An explicit VR little endian instance, deflated, with `private_bytes` zeros in a
    private element: its header and pixels are deflated around one cached run of zeros."""
    source = dcmread(io.BytesIO(explicit))
    meta = io.BytesIO()
    source.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    write_file_meta_info(meta, source.file_meta, enforce_standard=True)  # type: ignore[arg-type]
    body = explicit[explicit.index(b"DICM") + 4 :]
    body = body[_meta_group_length(body) :]
    at = body.rindex(PIXEL_DATA_LE + b"OW")
    element = PRIVATE_CREATOR + PRIVATE_OB + struct.pack("<I", private_bytes)
    before = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    after = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return b"".join(
        (
            b"\0" * 128 + b"DICM" + meta.getvalue(),
            # A full flush ends byte-aligned with no back references: raw deflate blocks
            # made apart then join into one stream (only the last block is final).
            before.compress(body[:at] + element) + before.flush(zlib.Z_FULL_FLUSH),
            _deflated_zeros(private_bytes),
            after.compress(body[at:]) + after.flush(),
        )
    )


def _meta_group_length(body: bytes) -> int:
    """Bytes of the file meta group (0002,xxxx) at the start of `body`: its first element,
    (0002,0000) UL, holds the length of the rest."""
    (rest,) = struct.unpack_from("<I", body, 8)
    return 12 + int(rest)


@cache
def _deflated_zeros(count: int) -> bytes:
    """`count` zeros as non-final raw deflate blocks, ending on a full flush."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = b"\0" * (16 * 1024 * 1024)
    parts = [
        compressor.compress(chunk[: min(len(chunk), count - start)])
        for start in range(0, count, len(chunk))
    ]
    return b"".join(parts) + compressor.flush(zlib.Z_FULL_FLUSH)


def j2k_size_lie(rows: int = 65535, columns: int = 65535) -> bytes:
    """A JPEG 2000 slice whose header says 512 x 512 but whose SIZ marker says otherwise."""
    data = bytearray(phantom_instance(syntax="JPEG2000Lossless"))
    at = data.index(SOC_SIZ)
    xosiz, yosiz = struct.unpack(">II", data[at + 16 : at + 24])
    data[at + 8 : at + 16] = struct.pack(">II", columns + xosiz, rows + yosiz)
    return bytes(data)


def jpeg_ls_size_lie(rows: int = 65535, columns: int = 65535) -> bytes:
    """A JPEG-LS slice whose SOF55 frame header claims another size than Rows x Columns."""
    data = bytearray(phantom_instance(syntax="JPEGLSLossless"))
    at = data.index(JPEG_LS_SOF)
    data[at + 5 : at + 9] = struct.pack(">HH", rows, columns)
    return bytes(data)


def deep_json(levels: int) -> bytes:
    return b'{"age": ' + b"[" * levels + b"1" + b"]" * levels + b"}"


def long_number(digits: int) -> bytes:
    return b'{"age": ' + b"1" * digits + b', "sex": "F"}'


@dataclass(frozen=True)
class HostileRequest:
    """One hostile request and the words its refusal must contain (the limit it hit)."""

    name: str
    task: str
    instances: tuple[bytes, ...]
    clinical: bytes  # raw CLINICAL: JSON the client library would refuse to write
    refusal: str


FLOOD_INSTANCES = 96  # issue 19's probe: 30 MB sent, answered after 34.6 s at 5.96 GB
FLOOD_PRIVATE_BYTES = 60 * 1024 * 1024


def flood_request() -> HostileRequest:
    """Issue 19's probe: each instance under its own bound, the request far over its own."""
    return HostileRequest(
        f"{FLOOD_INSTANCES} deflated instances, each inflating a 60 MiB private element",
        "esophageal_cancer_ct",
        inflation_flood(FLOOD_INSTANCES, FLOOD_PRIVATE_BYTES),
        b"",
        "the request's instances inflate past the limit of 268435456 bytes per request",
    )


def catalogue() -> list[HostileRequest]:
    """The hostile cases of the reliability table, as sent over the wire."""
    study = build_study("bone_density_ct", seed=1).instances
    fibrosis = build_study("liver_fibrosis_ct", seed=1).instances
    return [
        HostileRequest(
            "deflate bomb (1 GiB inflated)",
            "bone_density_ct",
            (deflate_bomb(), *study[1:]),
            b"",
            "inflates past the limit",
        ),
        HostileRequest(
            "JPEG 2000 SIZ 65535 x 65535 in a 512 x 512 header",
            "bone_density_ct",
            (j2k_size_lie(), *study[1:]),
            b"",
            "the codestream header says 65535 x 65535",
        ),
        HostileRequest(
            "JPEG-LS SOF55 65535 x 65535 in a 512 x 512 header",
            "bone_density_ct",
            (jpeg_ls_size_lie(), *study[1:]),
            b"",
            "the codestream header says 65535 x 65535",
        ),
        HostileRequest(
            "10,000-level nested sequence",
            "bone_density_ct",
            (deep_sequence(10_000), *study[1:]),
            b"",
            "nested deeper than the limit of 16",
        ),
        HostileRequest(
            "30,000-level nested CLINICAL JSON",
            "liver_fibrosis_ct",
            fibrosis,
            deep_json(30_000),
            "deeper than the limit of 8",
        ),
        HostileRequest(
            "5,000-digit integer in CLINICAL",
            "liver_fibrosis_ct",
            fibrosis,
            long_number(5_000),
            "a number of 5000 characters",
        ),
        flood_request(),
    ]


def send(url: str, request: HostileRequest, timeout_s: float = 300.0) -> AbdoServeError | None:
    """The request as the client's own encoder writes it; the server's refusal, if any."""
    channel = open_channel(
        url, ssl=False, root_certificates=None, private_key=None, certificate_chain=None
    )
    raw = RawInfer(channel)
    tensors = [
        bytes_tensor("DICOM", request.instances),
        bytes_tensor("CLINICAL", [request.clinical]),
    ]
    try:
        raw.infer(request.task, tensors, OUTPUT_NAMES, timeout_s)
    except InferenceServerException as error:
        return from_triton(error)
    finally:
        raw.close()
    return None
