"""Explanation maps: the key images of an answer with Grad-CAM saliency from the PyTorch
twin of the version that answered, as PNG and DICOM Secondary Capture (the
`<task>_explain` model; docs/architecture.md, "Explanation maps")."""

from __future__ import annotations

import numpy as np

from abdoserve.export.explain.errors import NoTwinError, TwinMismatchError, VersionError
from abdoserve.export.explain.explainer import Explainer, Explanation
from abdoserve.export.explain.key_images import KeyImage, choose_key_images
from abdoserve.export.explain.twin import TWIN_FILE, load_twin, save_twin

__all__ = [
    "TWIN_FILE",
    "Explainer",
    "Explanation",
    "KeyImage",
    "NoTwinError",
    "TwinMismatchError",
    "VersionError",
    "choose_key_images",
    "load_twin",
    "read_version",
    "save_twin",
]


def read_version(array: np.ndarray) -> int:
    """VERSION, INT32 [1, 1]: the `<task>_net` version the answer names."""
    if array.dtype != np.int32 or array.size != 1:
        raise VersionError("input 'VERSION' must be one INT32 per study")
    version = int(array.reshape(-1)[0])
    if version < 1:
        raise VersionError("input 'VERSION' must be a version number (1 or more)")
    return version
