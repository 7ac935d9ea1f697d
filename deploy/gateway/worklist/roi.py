"""The box a person draws on a rendered slice -> the liver mass ROI the server takes.

The server's ROI is `[row_min, col_min, row_max, col_max]` in the image's pixel
indices (`preprocessing.geometry.parse_roi`; `abdoserve infer --roi R0 C0 R1 C1`), as
the phantom writes it: the first and last row and column the box covers, inclusive.
The browser sends the box in the displayed image's CSS pixels and the displayed size;
the slice is rendered at its own matrix and scaled, so a displayed point (x, y) is
image point (x * columns / width, y * rows / height), pixel edges at whole numbers.
The ROI is every pixel the box touches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from abdoserve.preprocessing.errors import RoiError
from abdoserve.preprocessing.geometry import parse_roi


@dataclass(frozen=True)
class DrawnBox:
    """Two corners in displayed pixels, and the displayed image's size."""

    x0: float
    y0: float
    x1: float
    y1: float
    view_width: float
    view_height: float


def parse_box(corners: str, view: str) -> DrawnBox:
    """The form's `x0,y0,x1,y1` and `width,height`; RoiError when they are not numbers."""
    numbers = _numbers(corners, 4) + _numbers(view, 2)
    if numbers[4] <= 0 or numbers[5] <= 0:
        raise RoiError("the displayed image has no size")
    return DrawnBox(*numbers)


def _numbers(text: str, count: int) -> tuple[float, ...]:
    try:
        numbers = tuple(float(part) for part in text.split(","))
    except ValueError as error:
        raise RoiError("draw a box on the image") from error
    if len(numbers) != count or not all(math.isfinite(number) for number in numbers):
        raise RoiError("draw a box on the image")
    return numbers


def roi_from_box(box: DrawnBox, shape: tuple[int, int]) -> list[int]:
    """The inclusive pixel box under the drawn one, checked as the server checks it."""
    rows, columns = shape
    top, bottom = _span(box.y0, box.y1, rows / box.view_height, rows)
    left, right = _span(box.x0, box.x1, columns / box.view_width, columns)
    roi = [top, left, bottom, right]
    parse_roi(roi, shape)  # an empty box (a click, a one-pixel line) is refused here
    return roi


def _span(start: float, end: float, scale: float, size: int) -> tuple[int, int]:
    """First and last pixel index covered by [start, end] (display units), inside 0..size-1."""
    low, high = sorted((start * scale, end * scale))
    low, high = min(max(low, 0.0), float(size)), min(max(high, 0.0), float(size))
    first = min(math.floor(low), size - 1)
    last = max(math.ceil(high) - 1, first)
    return first, last
