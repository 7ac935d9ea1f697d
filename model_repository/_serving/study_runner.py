"""What every `_net` runner shares: studies joined into one run, chunked, split back.

A runtime (ONNX Runtime, OpenVINO) only says how it runs one chunk of rows; the
ragged batching around it (`batching.py`) lives here once, so every runtime, served
or benchmarked, batches studies exactly alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from abdoserve.serving import batching


class StudyRunner(ABC):
    """A CPU network runner over the `_net` contract: `samples`[, `features`] -> `output`."""

    with_features: bool  # whether the graph takes `features`
    max_samples: int  # rows per run at most: caps the activations' memory

    @abstractmethod
    def run_rows(self, samples: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        """Outputs [n, K] for samples [n, C, M, M] and, where the graph takes them, [n, F]."""

    def run_studies(
        self, samples: Sequence[np.ndarray], features: Sequence[np.ndarray] | None
    ) -> list[np.ndarray]:
        """One output array per study, in order; `features` only where the graph takes them."""
        study_features = list(features) if self.with_features and features is not None else None
        batch = batching.join(list(samples), study_features)
        results = []
        for rows in batching.chunks(batch.samples.shape[0], self.max_samples):
            chunk_features = None if batch.features is None else batch.features[rows]
            results.append(self.run_rows(batch.samples[rows], chunk_features))
        return batching.split(np.concatenate(results, axis=0), batch.counts)
