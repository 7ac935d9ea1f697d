"""In-plane geometry: physical size kept, bilinear exact on ramps, outside samples filled."""

from __future__ import annotations

import numpy as np
import pytest

from abdoserve.preprocessing.geometry import (
    Roi,
    centred_grid,
    fill_outside,
    parse_roi,
    resample,
    roi_grid,
)
from abdoserve.preprocessing.specs import FixedSpacing, RoiCrop


def bar_image(shape: tuple[int, int], spacing: float, width_mm: float) -> np.ndarray:
    """A vertical bar `width_mm` wide (whole source pixels) in the middle of the image."""
    image = np.zeros(shape, dtype=np.int16)
    pixels = round(width_mm / spacing)
    start = shape[1] // 2 - pixels // 2
    image[:, start : start + pixels] = 1000
    return image


def measured_width_mm(resampled: np.ndarray, spacing: float) -> float:
    row = resampled[resampled.shape[0] // 2]
    return float(np.count_nonzero(row > 500.0)) * spacing


@pytest.mark.parametrize(
    ("source", "target"), [(0.5, 0.8), (0.75, 1.0), (0.7, 1.5), (1.2, 0.5), (0.9, 0.9)]
)
def test_a_10_mm_object_stays_10_mm(source: float, target: float) -> None:
    image = bar_image((200, 200), source, 10.0)
    assert np.count_nonzero(image[0]) * source == pytest.approx(10.0, abs=source)
    grid = centred_grid(image.shape, (source, source), FixedSpacing(target, 64))
    out = resample(image, grid)
    assert out.dtype == np.float32 and out.shape == (64, 64)
    assert grid.spacing_mm == target
    assert abs(measured_width_mm(out, target) - 10.0) <= target


def test_anisotropic_source_spacing_keeps_both_sizes() -> None:
    image = np.zeros((120, 300), dtype=np.int16)
    image[50:70, 140:160] = 1000  # 20 rows x 2.0 mm = 40 mm tall, 20 cols x 0.5 mm = 10 mm wide
    grid = centred_grid(image.shape, (2.0, 0.5), FixedSpacing(1.0, 96))
    out = resample(image, grid)
    tall = float(np.count_nonzero(out[:, 48] > 500)) * 1.0
    wide = float(np.count_nonzero(out[48] > 500)) * 1.0
    assert abs(tall - 40.0) <= 1.0 and abs(wide - 10.0) <= 1.0


def test_roi_grid_field_of_view_is_the_roi_times_the_margin() -> None:
    image = bar_image((300, 300), 0.75, 12.0)
    roi = Roi(row_min=130, col_min=134, row_max=170, col_max=166)  # 40 x 32 pixels
    grid = roi_grid(image.shape, (0.75, 0.75), roi, RoiCrop(matrix=64, margin=1.5, min_fov_mm=10))
    assert grid.spacing_mm == pytest.approx(40 * 0.75 * 1.5 / 64)
    out = resample(image, grid)
    assert abs(measured_width_mm(out, grid.spacing_mm) - 12.0) <= grid.spacing_mm
    small = Roi(148, 148, 152, 152)
    grid = roi_grid(image.shape, (0.75, 0.75), small, RoiCrop(matrix=64, margin=1.5, min_fov_mm=30))
    assert grid.spacing_mm == pytest.approx(30.0 / 64)


def test_bilinear_is_exact_on_a_linear_ramp() -> None:
    rows, columns = np.mgrid[0:80, 0:100].astype(np.float64)
    ramp = (3.0 * rows - 2.0 * columns + 500.0).astype(np.int32)
    spacing = (0.8, 0.6)
    geometry = FixedSpacing(spacing_mm=0.55, matrix=90)
    grid = centred_grid(ramp.shape, spacing, geometry)
    out = resample(ramp, grid)
    offsets = (np.arange(90) - 44.5) * 0.55
    r = 39.5 + offsets / spacing[0]
    c = 49.5 + offsets / spacing[1]
    expected = 3.0 * r[:, None] - 2.0 * c[None, :] + 500.0
    inside = ((r >= 0) & (r <= 79))[:, None] & ((c >= 0) & (c <= 99))[None, :]
    assert inside.sum() > 3000
    np.testing.assert_allclose(out[inside], expected[inside], atol=2e-3)


def test_samples_on_source_pixels_return_them_unchanged() -> None:
    image = np.arange(64 * 64, dtype=np.int16).reshape(64, 64)
    grid = centred_grid(image.shape, (1.0, 1.0), FixedSpacing(1.0, 64))
    np.testing.assert_array_equal(resample(image, grid), image.astype(np.float32))
    out = np.empty((64, 64), dtype=np.float32)
    assert resample(image, grid, out) is out


def test_out_of_image_samples_are_filled() -> None:
    image = np.full((40, 40), 700, dtype=np.int16)  # 40 mm at 1 mm
    grid = centred_grid(image.shape, (1.0, 1.0), FixedSpacing(1.0, 64))  # 64 mm
    assert not grid.rows.all_inside and not grid.columns.all_inside
    out = resample(image, grid)
    fill_outside(out, grid, -5.0)
    inside = grid.rows.inside[:, None] & grid.columns.inside[None, :]
    assert int(inside.sum()) == 40 * 40
    assert np.all(out[inside] == 700.0) and np.all(out[~inside] == -5.0)
    assert np.all(out[:12] == -5.0) and np.all(out[:, -12:] == -5.0)


def test_a_grid_within_the_image_fills_nothing() -> None:
    image = np.full((100, 100), 3, dtype=np.int16)
    grid = centred_grid(image.shape, (1.0, 1.0), FixedSpacing(1.0, 32))
    assert grid.rows.all_inside and grid.columns.all_inside
    out = resample(image, grid)
    fill_outside(out, grid, -1.0)
    assert np.all(out == 3.0)


def test_parse_roi_accepts_four_numbers_inside_the_image() -> None:
    assert parse_roi([1, 2, "30", 40.5], (64, 64)) == Roi(1.0, 2.0, 30.0, 40.5)
    assert parse_roi((0, 0, 64, 64), (64, 64)) == Roi(0.0, 0.0, 64.0, 64.0)
