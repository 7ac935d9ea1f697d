"""What a served answer must equal: the same preprocessing in-process, then PyTorch eager."""

from __future__ import annotations

import numpy as np

from abdoserve.export.reference import TorchReference
from abdoserve.preprocessing.study import StudyPreparer
from abdoserve.preprocessing.tasks import TASKS

RELATIVE_TOLERANCE = 1e-4  # FP32 (docs/architecture.md)


def relative_error(served: np.ndarray, reference: np.ndarray) -> float:
    scale = max(float(np.max(np.abs(reference))), 1e-6)
    return float(np.max(np.abs(served - reference))) / scale


def in_process_reference(
    task: str, instances: tuple[bytes, ...], clinical: dict[str, object]
) -> np.ndarray:
    """The same preprocessing, then PyTorch eager: what the served answer must equal."""
    spec = TASKS[task]
    prepared = StudyPreparer(spec)(instances, clinical)
    features = None
    if spec.feature_width:
        features = np.repeat(prepared.features[None, :], prepared.samples.shape[0], axis=0)
    return TorchReference(spec)(prepared.samples, features)
