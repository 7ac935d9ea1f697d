"""In-plane geometry: where each output pixel samples the source image, and resampling.

An output grid is square, `matrix` pixels of `spacing_mm`, centred on a point of
the source image. Resampling is separable bilinear interpolation evaluated only at
the output pixels, so the cost scales with the output (192x192), not the source
(512x512). Pixels outside the source image are marked and filled by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from abdoserve.preprocessing.errors import RoiError
from abdoserve.preprocessing.specs import FixedSpacing, RoiCrop


@dataclass(frozen=True, eq=False)
class AxisSamples:
    """Where the output samples one source axis: lower neighbour, weight, inside mask."""

    lower: np.ndarray  # intp, index of the lower neighbour
    upper: np.ndarray  # intp, index of the upper neighbour (lower + 1, or lower at an edge)
    weight: np.ndarray  # float32, weight of the upper neighbour
    inside: np.ndarray  # bool, the sample lies within the source image
    all_inside: bool
    # source coordinate of output sample 0 and the step between samples: the affine map
    # that `to_source` inverts (the explanation maps go back onto the source pixels)
    start: float = 0.0
    step: float = 1.0


@dataclass(frozen=True, eq=False)
class Grid:
    rows: AxisSamples
    columns: AxisSamples
    spacing_mm: float


@dataclass(frozen=True)
class Roi:
    """A box in source pixel indices: rows row_min..row_max, columns col_min..col_max."""

    row_min: float
    col_min: float
    row_max: float
    col_max: float


def centred_grid(
    shape: tuple[int, int], spacing: tuple[float, float], geometry: FixedSpacing
) -> Grid:
    """The output grid for a fixed spacing, centred on the image centre."""
    centre = ((shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0)
    return _grid(shape, spacing, centre, geometry.spacing_mm, geometry.matrix)


def roi_grid(
    shape: tuple[int, int], spacing: tuple[float, float], roi: Roi, geometry: RoiCrop
) -> Grid:
    """The output grid around a ROI: its longer side times the margin, at least min_fov_mm."""
    height_mm = (roi.row_max - roi.row_min) * spacing[0]
    width_mm = (roi.col_max - roi.col_min) * spacing[1]
    fov_mm = max(max(height_mm, width_mm) * geometry.margin, geometry.min_fov_mm)
    centre = ((roi.row_min + roi.row_max) / 2.0, (roi.col_min + roi.col_max) / 2.0)
    return _grid(shape, spacing, centre, fov_mm / geometry.matrix, geometry.matrix)


def _grid(
    shape: tuple[int, int],
    spacing: tuple[float, float],
    centre: tuple[float, float],
    out_spacing: float,
    matrix: int,
) -> Grid:
    offsets = (np.arange(matrix, dtype=np.float64) - (matrix - 1) / 2.0) * out_spacing
    return Grid(
        rows=_axis(centre[0] + offsets / spacing[0], shape[0]),
        columns=_axis(centre[1] + offsets / spacing[1], shape[1]),
        spacing_mm=out_spacing,
    )


def to_source(values: np.ndarray, grid: Grid, shape: tuple[int, int]) -> np.ndarray:
    """A (matrix, matrix) map on `grid` back onto the source image's (rows, columns)
    pixels, bilinear; source pixels the grid does not cover are 0."""
    matrix = values.shape[0]
    axes = []
    for axis, size in ((grid.rows, shape[0]), (grid.columns, shape[1])):
        coordinates = (np.arange(size, dtype=np.float64) - axis.start) / axis.step
        axes.append(_axis(coordinates, matrix))
    back = Grid(rows=axes[0], columns=axes[1], spacing_mm=0.0)
    projected = resample(values, back)
    fill_outside(projected, back, 0.0)
    return projected


def _axis(coordinates: np.ndarray, size: int) -> AxisSamples:
    # A pixel covers +-0.5 around its centre: samples within that extent are inside.
    inside = (coordinates >= -0.5) & (coordinates <= size - 0.5)
    clipped = np.clip(coordinates, 0.0, size - 1.0)
    lower = np.minimum(np.floor(clipped), max(size - 2, 0)).astype(np.intp)
    weight = (clipped - lower).astype(np.float32)
    if size == 1:
        weight[:] = 0.0
    upper = np.minimum(lower + 1, size - 1)
    step = float(coordinates[1] - coordinates[0]) if coordinates.size > 1 else 1.0
    start = float(coordinates[0]) if coordinates.size else 0.0
    return AxisSamples(lower, upper, weight, inside, bool(inside.all()), start, step)


def resample(pixels: np.ndarray, grid: Grid, out: np.ndarray | None = None) -> np.ndarray:
    """Bilinear samples of `pixels` at the grid, as float32 (matrix, matrix), into `out`."""
    rows, columns = grid.rows, grid.columns
    # np.take is markedly faster than fancy indexing for these gathers.
    top = np.take(pixels, rows.lower, axis=0).astype(np.float32)
    bottom = np.take(pixels, rows.upper, axis=0).astype(np.float32)
    bottom -= top
    bottom *= rows.weight[:, None]
    top += bottom  # rows interpolated: (matrix, source columns)
    left: np.ndarray = np.take(top, columns.lower, axis=1)
    right = np.take(top, columns.upper, axis=1)
    right -= left
    right *= columns.weight[None, :]
    if out is None:
        left += right
        return left
    np.add(left, right, out=out)
    return out


def fill_outside(image: np.ndarray, grid: Grid, value: float) -> None:
    """Set output pixels that fall outside the source image to `value`, in place."""
    if not grid.rows.all_inside:
        image[~grid.rows.inside, :] = value
    if not grid.columns.all_inside:
        image[:, ~grid.columns.inside] = value


def parse_roi(value: object, shape: tuple[int, int]) -> Roi:
    """A request's ROI [row_min, col_min, row_max, col_max], checked against the image."""
    try:
        numbers = [float(item) for item in value]  # type: ignore[attr-defined]
    except (TypeError, ValueError) as error:
        raise RoiError("roi must be four numbers [row_min, col_min, row_max, col_max]") from error
    if len(numbers) != 4 or not np.all(np.isfinite(numbers)):
        raise RoiError("roi must be four finite numbers [row_min, col_min, row_max, col_max]")
    roi = Roi(*numbers)
    if roi.row_min >= roi.row_max or roi.col_min >= roi.col_max:
        raise RoiError("roi is empty: row_min < row_max and col_min < col_max needed")
    if roi.row_min < 0 or roi.col_min < 0 or roi.row_max > shape[0] or roi.col_max > shape[1]:
        # The image's size, not the request's numbers: CLINICAL values are never echoed.
        raise RoiError(f"roi lies outside the {shape[0]}x{shape[1]} image")
    return roi
