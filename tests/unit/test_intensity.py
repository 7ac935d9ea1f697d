"""Intensity: CT window into [0, 1], MR percentile scaling, the modality LUT."""

from __future__ import annotations

import numpy as np
import pytest

from abdoserve.preprocessing.errors import FlatImageError
from abdoserve.preprocessing.intensity import scale_mr, window_ct
from abdoserve.preprocessing.specs import CTWindow, MRPercentileScaling
from tests.hounsfield import hounsfield

WINDOW = CTWindow(center_hu=40.0, width_hu=400.0)  # -160..240 HU


def windowed(stored: list[float], slope: float, intercept: float) -> np.ndarray:
    values = np.asarray(stored, dtype=np.float32)
    window_ct(values, slope, intercept, WINDOW)
    return values


def test_window_centre_maps_to_one_half() -> None:
    assert windowed([40.0], 1.0, 0.0)[0] == pytest.approx(0.5, abs=1e-6)
    assert windowed([1064.0], 1.0, -1024.0)[0] == pytest.approx(0.5, abs=1e-6)
    assert windowed([20.0], 2.0, 0.0)[0] == pytest.approx(0.5, abs=1e-6)


def test_window_is_linear_between_its_ends_and_clips_outside() -> None:
    out = windowed([-1000.0, -161.0, -160.0, -60.0, 140.0, 240.0, 241.0, 3000.0], 1.0, 0.0)
    np.testing.assert_allclose(out, [0.0, 0.0, 0.0, 0.25, 0.75, 1.0, 1.0, 1.0], atol=1e-6)


def test_windowed_values_stay_in_the_unit_interval() -> None:
    rng = np.random.default_rng(0)
    stored = rng.integers(-2048, 4096, size=10_000).astype(np.float32)
    window_ct(stored, 1.0, -1024.0, WINDOW)
    assert stored.min() == 0.0 and stored.max() == 1.0
    assert 0 < np.count_nonzero((stored > 0) & (stored < 1)) < stored.size


def test_hounsfield_applies_slope_and_intercept() -> None:
    stored = np.array([[0, 1024], [2048, 24]], dtype=np.uint16)
    np.testing.assert_array_equal(
        hounsfield(stored, 1.0, -1024.0), np.array([[-1024, 0], [1024, -1000]], np.float32)
    )
    assert hounsfield(stored, 0.5, 0.0)[0, 1] == 512.0
    assert hounsfield(stored, 1.0, 0.0).dtype == np.float32


def test_mr_percentiles_map_to_zero_and_one() -> None:
    values = np.arange(101, dtype=np.float32) * 10.0  # 0..1000, 1st pct 10, 99th 990
    scale_mr(values, None, MRPercentileScaling(1.0, 99.0), inverted=False, instance=0)
    assert values[1] == pytest.approx(0.0, abs=1e-6) and values[99] == pytest.approx(1.0)
    assert values[50] == pytest.approx(0.5, abs=1e-6)
    assert values[0] == 0.0 and values[100] == 1.0


def test_mr_percentiles_ignore_padding_outside_the_image() -> None:
    values = np.full((10, 10), 500.0, dtype=np.float32)
    values[:, 5:] = np.linspace(100, 900, 50, dtype=np.float32).reshape(10, 5)
    values[:, :5] = 0.0  # padding
    inside = np.zeros((10, 10), dtype=bool)
    inside[:, 5:] = True
    scale_mr(values, inside, MRPercentileScaling(0.0, 100.0), inverted=False, instance=0)
    assert values[:, 5:].min() == 0.0 and values[:, 5:].max() == pytest.approx(1.0)


def test_inverted_mr_flips_the_picture() -> None:
    plain = np.array([100.0, 200.0, 300.0], dtype=np.float32)
    flipped = np.array([300.0, 200.0, 100.0], dtype=np.float32)
    scaling = MRPercentileScaling(0.0, 100.0)
    scale_mr(plain, None, scaling, inverted=False, instance=0)
    scale_mr(flipped, None, scaling, inverted=True, instance=0)
    np.testing.assert_allclose(plain, [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(flipped, plain, atol=1e-6)


def test_a_flat_mr_image_is_refused_naming_the_instance() -> None:
    with pytest.raises(
        FlatImageError, match=r"^instance 2: \(7FE0,0010\) Pixel Data holds a single"
    ):
        scale_mr(
            np.full(16, 7.0, np.float32), None, MRPercentileScaling(), inverted=False, instance=2
        )
