"""The explanation map goes back onto the source pixels where the intake sampled them."""

from __future__ import annotations

import numpy as np

from abdoserve.preprocessing.geometry import Roi, centred_grid, resample, roi_grid, to_source
from abdoserve.preprocessing.specs import FixedSpacing, RoiCrop


def test_a_map_resampled_and_projected_back_lands_on_the_same_pixels() -> None:
    shape, spacing = (256, 300), (0.8, 0.7)
    grid = centred_grid(shape, spacing, FixedSpacing(spacing_mm=1.0, matrix=96))
    rows = np.repeat(np.arange(shape[0], dtype=np.float32)[:, None], shape[1], axis=1)
    on_grid = resample(rows, grid)  # each output pixel holds the source row it sampled
    back = to_source(on_grid, grid, shape)
    covered = back > 0
    # the grid spans 96 mm: 120 rows of 0.8 mm, 137 columns of 0.7 mm around the centre
    assert abs(int(covered[:, 150].sum()) - 120) <= 2
    assert abs(int(covered[128].sum()) - 137) <= 2
    # away from the crop's edge (where the source is half covered), an affine round trip
    # gives each source pixel back its own row
    error = np.abs(back - rows)[covered & (rows > 75) & (rows < 180)]
    assert error.size > 10_000 and error.max() < 1e-3


def test_a_roi_map_covers_the_crop_and_nothing_else() -> None:
    shape = (512, 512)
    roi = Roi(200.0, 100.0, 260.0, 150.0)
    geometry = RoiCrop(matrix=64, margin=1.5, min_fov_mm=30.0)
    grid = roi_grid(shape, (0.7, 0.7), roi, geometry)
    back = to_source(np.ones((64, 64), np.float32), grid, shape)
    rows = np.flatnonzero(back.any(axis=1))
    columns = np.flatnonzero(back.any(axis=0))
    # 60 rows * 1.5 margin = 90 rows around the ROI's centre (230, 125)
    assert abs(rows[0] - 185) <= 1 and abs(rows[-1] - 275) <= 1
    assert abs(columns[0] - 80) <= 1 and abs(columns[-1] - 170) <= 1
    assert back.max() == 1.0 and back[0, 0] == 0.0
