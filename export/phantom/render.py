"""From a label map to pixel values: tissue values, texture, partial volume, noise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from abdoserve.export.phantom.anatomy import FloatArray, LabelMap, PhantomGrid
from abdoserve.export.phantom.tissues import Label

StoredArray = npt.NDArray[np.int16] | npt.NDArray[np.uint16]


@dataclass(frozen=True)
class LiverTexture:
    """Fibrosis-like change of the liver: a nodular surface and a reticular texture.

    `surface` offsets the liver's boundary level; `pattern` is dimensionless
    (regenerative nodules positive, fibrous septa about -1) and is scaled per
    modality by the caller.
    """

    surface: FloatArray
    pattern: FloatArray


def smooth_field(rng: np.random.Generator, grid: PhantomGrid, cell_mm: float) -> FloatArray:
    """Zero-mean random field, about unit SD, varying over `cell_mm`: bilinear
    interpolation of white noise on a coarse lattice."""
    step = cell_mm / grid.spacing_mm
    coarse = rng.standard_normal(
        (int(grid.rows / step) + 2, int(grid.cols / step) + 2), dtype=np.float32
    )
    rows = _interpolate(coarse, np.arange(grid.rows) / step, axis=0)
    field = _interpolate(rows, np.arange(grid.cols) / step, axis=1)
    normalised: FloatArray = (field / field.std()).astype(np.float32)
    return normalised


def _interpolate(values: FloatArray, positions: npt.NDArray[np.float64], axis: int) -> FloatArray:
    low = np.floor(positions).astype(np.intp)
    frac = (positions - low).astype(np.float32)
    a = np.take(values, low, axis=axis)
    b = np.take(values, low + 1, axis=axis)
    weight = frac[:, None] if axis == 0 else frac[None, :]
    result: FloatArray = a + (b - a) * weight
    return result


def liver_texture(
    rng: np.random.Generator, grid: PhantomGrid, fibrosis: float
) -> LiverTexture | None:
    """The texture of a liver with fibrosis severity 0..1 (None when 0)."""
    if fibrosis <= 0:
        return None
    surface = 0.12 * fibrosis * smooth_field(rng, grid, cell_mm=12.0)
    nodules = smooth_field(rng, grid, cell_mm=6.0)
    septa = np.abs(smooth_field(rng, grid, cell_mm=10.0)) < 0.2  # a reticular network
    pattern = fibrosis * (0.4 * nodules - septa.astype(np.float32))
    return LiverTexture(surface.astype(np.float32), pattern.astype(np.float32))


def render(
    labels: LabelMap,
    values: FloatArray,
    noise_sd: float,
    rng: np.random.Generator,
    liver_change: FloatArray | None = None,
) -> FloatArray:
    """Tissue values, plus the liver's texture change, blurred by the partial
    volume of a 3x3 kernel, plus Gaussian noise of `noise_sd`."""
    image = values[labels]
    if liver_change is not None:
        liver = labels == Label.LIVER
        image[liver] += liver_change[liver]
    image = _blur(image)
    if noise_sd > 0:
        image += noise_sd * rng.standard_normal(image.shape, dtype=np.float32)
    return image


def _blur(image: FloatArray) -> FloatArray:
    """Separable [1, 2, 1] / 4 smoothing: edges get partial-volume values,
    uniform regions keep theirs."""
    padded = np.pad(image, 1, mode="edge")
    rows = (padded[:-2, :] + 2 * padded[1:-1, :] + padded[2:, :]) * 0.25
    result: FloatArray = (rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]) * 0.25
    return result


def stored_range(signed: bool, bits_stored: int) -> tuple[int, int]:
    if signed:
        return -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    return 0, (1 << bits_stored) - 1


def to_stored(image: FloatArray, intercept: float, signed: bool, bits_stored: int) -> StoredArray:
    """Round to stored values (value = stored + intercept), clipped to what the
    bits hold. Rounding precedes the shift so every format stores the same values."""
    low, high = stored_range(signed, bits_stored)
    stored = np.clip(np.rint(image) - intercept, low, high)
    if signed:
        return stored.astype(np.int16)
    return stored.astype(np.uint16)


Region = dict[str, object]


def regions(
    grid: PhantomGrid,
    labels: LabelMap,
    values: FloatArray,
    points: dict[str, tuple[float, float, Label]],
) -> dict[str, Region]:
    """Ground truth for named regions: the pixel nearest each point, its value,
    and the largest patch radius (3 or 1 pixels) over which the noiseless image
    equals that value. Points that miss their tissue at this slice are left out."""
    found: dict[str, Region] = {}
    for name, (x_mm, y_mm, label) in points.items():
        row, col = grid.pixel(x_mm, y_mm)
        for radius in (3, 1):
            reach = radius + 1  # the blur spreads neighbours' values one pixel
            if min(row, col) < reach or max(row - grid.rows, col - grid.cols) >= -reach:
                continue
            patch = labels[row - reach : row + reach + 1, col - reach : col + reach + 1]
            if patch.size and bool(np.all(patch == label)):
                value = float(values[label])
                found[name] = {"row": row, "col": col, "value": value, "patch_radius": radius}
                break
    return found
