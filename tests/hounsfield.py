"""The modality LUT on its own, for tests: stored values -> Hounsfield units.

The served path never computes Hounsfield units by themselves: `window_ct` fuses the
LUT and the window into one multiply-add (preprocessing/intensity.py). Tests use this
to state in HU what a decoded slice holds.
"""

from __future__ import annotations

import numpy as np


def hounsfield(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored values -> Hounsfield units through the modality LUT."""
    return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
