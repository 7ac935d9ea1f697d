"""The in-process PyTorch reference: what served outputs are compared against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from abdoserve.export.architectures import run_network
from abdoserve.export.errors import ReferenceInputError
from abdoserve.export.inputs import FloatArray
from abdoserve.export.weights import load_network
from abdoserve.preprocessing.specs import TaskSpec


class TorchReference:
    """A task's network, loaded once, answering numpy batches in eval mode."""

    def __init__(self, spec: TaskSpec, checkpoint: Path | None = None) -> None:
        loaded = load_network(spec, checkpoint)
        self.spec = spec
        self.module = loaded.module.eval()
        self.provenance = loaded.provenance

    def __call__(self, samples: NDArray[Any], features: NDArray[Any] | None = None) -> FloatArray:
        """Final outputs float32 [N, K] for samples [N, C, H, W] and features [N, F]."""
        samples = self._checked("samples", samples, self.spec.sample_shape)
        features = self._features(features, len(samples))
        with torch.no_grad():
            output = run_network(
                self.module,
                torch.from_numpy(samples),
                None if features is None else torch.from_numpy(features),
            )
        return np.asarray(output.numpy(), dtype=np.float32)

    def _features(self, features: NDArray[Any] | None, count: int) -> FloatArray | None:
        width = self.spec.feature_width
        if width == 0:
            # callers may pass an empty [N, 0] array for tasks without clinical inputs
            if features is not None and np.size(features) > 0:
                raise ReferenceInputError(f"{self.spec.name} takes no features")
            return None
        if features is None:
            raise ReferenceInputError(f"{self.spec.name} needs features [N, {width}]")
        checked = self._checked("features", features, (width,))
        if len(checked) != count:
            raise ReferenceInputError(f"{len(checked)} feature rows for {count} samples")
        return checked

    def _checked(self, name: str, array: NDArray[Any], shape: tuple[int, ...]) -> FloatArray:
        if array.ndim != len(shape) + 1 or tuple(array.shape[1:]) != shape:
            raise ReferenceInputError(
                f"{self.spec.name}: {name} must be [N, {', '.join(map(str, shape))}], "
                f"got {list(array.shape)}"
            )
        return np.ascontiguousarray(array, dtype=np.float32)
