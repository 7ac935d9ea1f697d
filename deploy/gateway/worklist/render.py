"""A spooled instance as a PNG, windowed as its task's network sees it.

Decoded by the intake itself (every transfer syntax the server takes), at the image's
own matrix so that a pixel on the page is a pixel of the ROI. CT: the task's window
(liver mass 100/400 HU); MR: the task's percentile scaling. The PNG is written to
memory and sent with no-store: it is patient data and never cached or logged.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from abdoserve.preprocessing.decode import decode_instance
from abdoserve.preprocessing.intensity import scale_mr, window_ct
from abdoserve.preprocessing.specs import CTWindow, TaskSpec


@dataclass(frozen=True)
class RenderedSlice:
    png: bytes
    rows: int
    columns: int


def slice_shape(file: Path, spec: TaskSpec) -> tuple[int, int]:
    """(rows, columns) of the instance's first frame, as the server will see it."""
    frame = decode_instance(file.read_bytes(), 0, spec.limits).frames[0]
    return int(frame.pixels.shape[0]), int(frame.pixels.shape[1])


def render_slice(file: Path, spec: TaskSpec) -> RenderedSlice:
    """The instance's first frame in 8-bit grey, windowed for the task."""
    instance = decode_instance(file.read_bytes(), 0, spec.limits)
    frame = instance.frames[0]
    values = frame.pixels.astype(np.float32)
    if isinstance(spec.intensity, CTWindow):
        window_ct(values, frame.slope, frame.intercept, spec.intensity)
    else:
        inverted = instance.inverted != (frame.slope < 0)
        scale_mr(values, None, spec.intensity, inverted=inverted, instance=0)
    grey = np.rint(values * 255.0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    return RenderedSlice(buffer.getvalue(), int(grey.shape[0]), int(grey.shape[1]))
