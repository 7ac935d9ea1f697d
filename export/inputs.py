"""Deterministic example inputs shaped like real samples, for export and parity checks.

Samples are uniform in [0, 1], the range preprocessing maps intensities into.
Clinical features are drawn inside each input's plausible range and encoded the
way the spec says: numbers as (value - offset) / scale, categories one-hot.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from abdoserve.preprocessing.specs import ClinicalInput, TaskSpec

FloatArray = NDArray[np.float32]
Inputs = tuple[FloatArray, FloatArray | None]


def example_inputs(spec: TaskSpec, batch: int, seed: int = 0) -> Inputs:
    """`batch` samples [N, C, H, W] and, when the spec has clinical inputs, features [N, F]."""
    rng = np.random.default_rng(seed)
    samples = rng.random((batch, *spec.sample_shape), dtype=np.float32)
    if spec.feature_width == 0:
        return samples, None
    columns = [_encoded(item, batch, rng) for item in spec.clinical_inputs]
    return samples, np.concatenate(columns, axis=1).astype(np.float32)


def _encoded(item: ClinicalInput, batch: int, rng: np.random.Generator) -> FloatArray:
    if item.kind == "category":
        picked = rng.integers(len(item.choices), size=batch)
        one_hot: FloatArray = np.eye(len(item.choices), dtype=np.float32)[picked]
        return one_hot
    # an open-ended range stays within three scales of the offset
    low = item.minimum if math.isfinite(item.minimum) else item.offset - 3 * item.scale
    high = item.maximum if math.isfinite(item.maximum) else item.offset + 3 * item.scale
    values = rng.uniform(low, high, size=(batch, 1))
    return ((values - item.offset) / item.scale).astype(np.float32)
