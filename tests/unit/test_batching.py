"""Ragged batching: join studies into one run and split the outputs back."""

from __future__ import annotations

import numpy as np
import pytest

from abdoserve.serving.batching import chunks, join, split


@pytest.mark.parametrize("counts", [(1,), (3, 1, 5), (2, 2), (1, 7, 1, 4)])
def test_join_then_split_round_trips_ragged_studies(counts: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(counts))
    samples = [rng.random((n, 2, 4, 4)).astype(np.float32) for n in counts]
    features = [np.full(3, float(i), dtype=np.float32) for i in range(len(counts))]
    batch = join(samples, features)
    assert batch.counts == counts
    assert batch.samples.shape == (sum(counts), 2, 4, 4)
    assert batch.features is not None and batch.features.shape == (sum(counts), 3)
    expected_owner = np.repeat(np.arange(len(counts)), counts)
    np.testing.assert_array_equal(batch.features[:, 0], expected_owner)
    outputs = batch.samples.reshape(sum(counts), -1).sum(axis=1, keepdims=True)
    for study, part in zip(samples, split(outputs, batch.counts), strict=True):
        np.testing.assert_allclose(part[:, 0], study.reshape(len(study), -1).sum(axis=1), rtol=1e-6)
    for study, part in zip(samples, split(batch.samples, batch.counts), strict=True):
        np.testing.assert_array_equal(part, study)


def test_join_without_features_and_dtype() -> None:
    batch = join([np.ones((2, 1, 3, 3), dtype=np.float64)], None)
    assert batch.features is None and batch.samples.dtype == np.float32
    assert batch.samples.flags["C_CONTIGUOUS"] and batch.counts == (2,)


def test_chunks_cover_every_row_once() -> None:
    assert chunks(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert chunks(3, 8) == [slice(0, 3)]
    assert chunks(0, 8) == []
    rows = [row for part in chunks(37, 5) for row in range(37)[part]]
    assert rows == list(range(37))
