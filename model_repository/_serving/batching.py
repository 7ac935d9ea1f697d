"""Ragged batching: many studies' samples -> one network run -> back per study.

Triton's dynamic batcher hands `execute` several requests whose studies hold
different numbers of samples; running them as one batch is what makes batching
pay. Clinical features are per study and are repeated for each of its samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Batch:
    samples: np.ndarray  # (total, C, H, W)
    features: np.ndarray | None  # (total, F)
    counts: tuple[int, ...]  # samples per study, in request order


def join(samples: Sequence[np.ndarray], features: Sequence[np.ndarray] | None) -> Batch:
    """Concatenate per-study samples (n_i, C, H, W) and repeat features (F,) per sample."""
    counts = tuple(int(item.shape[0]) for item in samples)
    joined = np.concatenate(samples, axis=0) if len(samples) > 1 else samples[0]
    repeated = None
    if features is not None:
        repeated = np.repeat(np.stack(features), counts, axis=0).astype(np.float32, copy=False)
    return Batch(np.ascontiguousarray(joined, dtype=np.float32), repeated, counts)


def split(outputs: np.ndarray, counts: Sequence[int]) -> list[np.ndarray]:
    """Per-study slices of a joined output, in the order `join` received them."""
    bounds = np.cumsum(counts)[:-1]
    return list(np.split(outputs, bounds, axis=0))


def chunks(total: int, size: int) -> list[slice]:
    """Row ranges of at most `size` rows: caps memory for very large batches."""
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]
