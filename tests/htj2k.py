"""Phantom studies rewritten in the three HTJ2K transfer syntaxes (1.2.840.10008.1.2.4.201,
.202, .203).

No package ships an HTJ2K DICOM sample, so the tests make their own: each frame is
encoded by OpenJPH through imagecodecs (a test dependency only; the intake decodes with
pylibjpeg-openjpeg) and encapsulated with a basic offset table. imagecodecs writes the
codestream's precision as the array's width (16 bits for the phantom's 12 stored), which
real encoders do too, and which the intake accepts: it refuses only more bits than
(0028,0100) Bits Allocated.
"""

from __future__ import annotations

import io
from dataclasses import replace
from decimal import Decimal

import imagecodecs
import numpy as np
import pydicom
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate

from abdoserve.export.phantom import PhantomStudy

SYNTAXES = (uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K)
# OpenJPH's quantisation step for the lossy (irreversible 9/7) codestreams, relative to the
# codestream's 16-bit range: 6.6 stored units, 6.1-6.4:1 on the phantom's noisy CT slices.
LOSSY_STEP = 1e-4
LOSSY_METHOD = "ISO_15444_15"  # the defined term for HTJ2K (PS3.3 C.7.6.1.1.5.1)


def htj2k_study(study: PhantomStudy, syntax: uid.UID, *, lossy: bool = False) -> PhantomStudy:
    """`study` with every instance's pixel data encoded in `syntax`; `lossy` only for
    HTJ2K (.203), which takes a reversible or an irreversible codestream."""
    if lossy and syntax != uid.HTJ2K:
        raise ValueError(f"{syntax.name} is lossless only")
    instances = tuple(transcode(data, syntax, lossy=lossy) for data in study.instances)
    truth = {**study.truth, "transfer_syntax": str(syntax)}
    return replace(study, instances=instances, truth=truth)


def transcode(data: bytes, syntax: uid.UID, *, lossy: bool = False) -> bytes:
    """One instance's bytes with its frames encoded as HTJ2K in `syntax`."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    frames = stored_frames(dataset)
    encoded = [encode_frame(frame, syntax, lossy=lossy) for frame in frames]
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.PixelData = encapsulate(encoded, has_bot=True)
    dataset["PixelData"].VR = "OB"
    if lossy:
        mark_lossy(dataset, sum(frame.nbytes for frame in frames), sum(map(len, encoded)))
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


def stored_frames(dataset: Dataset) -> list[np.ndarray]:
    """Stored values as (rows, columns) arrays, one per frame, in native byte order."""
    pixels = dataset.pixel_array
    shape = (-1, int(dataset.Rows), int(dataset.Columns))
    return [
        np.ascontiguousarray(frame, frame.dtype.newbyteorder("="))
        for frame in pixels.reshape(shape)
    ]


def encode_frame(frame: np.ndarray, syntax: uid.UID, *, lossy: bool = False) -> bytes:
    """An HTJ2K codestream (J2C, no JP2 box) of one greyscale frame."""
    if lossy:
        return bytes(imagecodecs.htj2k_encode(frame, LOSSY_STEP, reversible=False))
    if syntax == uid.HTJ2KLosslessRPCL:
        # PS3.5 10.18: RPCL progression (OpenJPH's default), a base resolution of at most
        # 64 (its 5 decompositions leave 16 of 512), and Tile Length Markers, with a tile
        # part per resolution so a reader can stop after any of them.
        codestream = imagecodecs.htj2k_encode(frame, reversible=True, tlm=True, tilepart=1)
        return bytes(codestream)
    return bytes(imagecodecs.htj2k_encode(frame, reversible=True))


def mark_lossy(dataset: Dataset, original_bytes: int, encoded_bytes: int) -> None:
    """General Image module after lossy compression (PS3.3 C.7.6.1.1.5): flagged, with
    ratio and method, under a new SOP Instance UID, since the pixels are not the original's."""
    ratio = Decimal(original_bytes) / Decimal(encoded_bytes)
    dataset.LossyImageCompression = "01"
    dataset.LossyImageCompressionRatio = f"{ratio:.4f}"[:16]
    dataset.LossyImageCompressionMethod = LOSSY_METHOD
    new_uid = uid.generate_uid(entropy_srcs=[str(dataset.SOPInstanceUID), LOSSY_METHOD])
    dataset.SOPInstanceUID = new_uid
    dataset.file_meta.MediaStorageSOPInstanceUID = new_uid


def compression_ratio(study: PhantomStudy) -> float:
    """The first lossy instance's recorded ratio (uncompressed to compressed bytes)."""
    dataset = pydicom.dcmread(io.BytesIO(study.instances[0]), stop_before_pixels=True)
    return float(dataset.LossyImageCompressionRatio)
