"""A key image as a viewer sees it: the source slice in the task's window, the saliency
map over it in colour, and a legend burned into a band below the image.

The legend says what the picture is and is not: the task, the value, the model version,
"NOT FOR CLINICAL USE" (in red) where the weights are untrained, the method, and that a
saliency map is not a localisation (Saporta et al., Nat Mach Intell 2022).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from abdoserve.preprocessing.frames import Frame
from abdoserve.preprocessing.intensity import scale_mr, window_ct
from abdoserve.preprocessing.specs import CTWindow, TaskSpec

NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"
CAVEAT = "a saliency map is not a localisation (Saporta et al. 2022)"
BAND_COLOUR = (24, 24, 24)
TEXT_COLOUR = (255, 255, 255)
WARNING_COLOUR = (255, 64, 64)
# Below this relevance the slice shows through untinted: the map marks, it does not paint.
SHOWN_FROM = 0.2
MAX_ALPHA = 0.55
# A blue-cyan-yellow-red ramp (relevance 0 -> 1), as radiology viewers colour overlays.
_RAMP_AT = np.array([0.0, 0.35, 0.65, 1.0])
_RAMP = np.array([[0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]], dtype=np.float64)


@dataclass(frozen=True)
class LegendLine:
    text: str
    warning: bool = False  # drawn in red


def display_slice(frame: Frame, spec: TaskSpec, inverted: bool, instance: int) -> np.ndarray:
    """The whole source frame as grey values in [0, 1]: CT in the task's window, MR by
    its own percentiles (the intake's own intensity steps, on the source grid)."""
    grey = frame.pixels.astype(np.float32)
    if isinstance(spec.intensity, CTWindow):
        window_ct(grey, frame.slope, frame.intercept, spec.intensity)
    else:
        flipped = inverted != (frame.slope < 0)
        scale_mr(grey, None, spec.intensity, inverted=flipped, instance=instance)
    return grey


def overlay(grey: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    """RGB uint8 (rows, columns, 3): the slice with the map blended over it."""
    base = np.repeat((grey * 255.0)[..., None], 3, axis=2)
    colour = np.stack([np.interp(relevance, _RAMP_AT, _RAMP[:, c]) for c in range(3)], axis=2)
    alpha = np.where(relevance >= SHOWN_FROM, MAX_ALPHA * relevance, 0.0)[..., None]
    blended = base * (1.0 - alpha) + colour * alpha
    rgb: np.ndarray = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return rgb


def with_legend(rgb: np.ndarray, lines: Sequence[LegendLine]) -> tuple[np.ndarray, int]:
    """The image with the legend band below it, and the band's height in rows."""
    width = rgb.shape[1]
    size = max(10, min(16, width // 40))
    font = ImageFont.load_default(size=size)
    wrapped = [(text, line.warning) for line in lines for text in _wrap(line.text, font, width - 8)]
    step = size + 4
    band = step * len(wrapped) + 8
    canvas = Image.new("RGB", (width, rgb.shape[0] + band), BAND_COLOUR)
    canvas.paste(Image.fromarray(rgb, "RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (text, warning) in enumerate(wrapped):
        colour = WARNING_COLOUR if warning else TEXT_COLOUR
        draw.text((4, rgb.shape[0] + 4 + row * step), text, fill=colour, font=font)
    return np.asarray(canvas), band


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to the image's width in pixels."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if current and font.getlength(trial) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    return [*lines, current] if current else lines


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()
