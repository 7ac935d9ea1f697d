"""Intensity: stored values -> network range [0, 1].

CT: the modality LUT (Rescale Slope/Intercept -> Hounsfield units) and the window
are both affine up to the final clip, so they fuse into one multiply-add and a clip
on the resampled pixels. MR: the modality LUT, then per-image percentile scaling.
"""

from __future__ import annotations

import numpy as np

from abdoserve.preprocessing.errors import FlatImageError
from abdoserve.preprocessing.specs import CTWindow, MRPercentileScaling


def window_ct(resampled: np.ndarray, slope: float, intercept: float, window: CTWindow) -> None:
    """Stored values (resampled, float32) -> windowed [0, 1], in place.

    HU = stored * slope + intercept; out = (HU - low) / width, clipped to [0, 1].
    """
    low = window.center_hu - window.width_hu / 2.0
    resampled *= np.float32(slope / window.width_hu)
    resampled += np.float32((intercept - low) / window.width_hu)
    np.clip(resampled, 0.0, 1.0, out=resampled)


def scale_mr(
    resampled: np.ndarray,
    inside: np.ndarray | None,
    scaling: MRPercentileScaling,
    *,
    inverted: bool,
    instance: int,
) -> None:
    """Stored MR values (resampled) -> [0, 1] by the image's own percentiles, in place.

    Percentiles come from pixels inside the source image only, so padding does not
    drag the lower percentile down. MONOCHROME1 images are flipped first.
    """
    if inverted:
        np.negative(resampled, out=resampled)
    values = resampled[inside] if inside is not None else resampled
    low, high = np.percentile(values, [scaling.lower_percentile, scaling.upper_percentile])
    if not high > low:
        raise FlatImageError(
            "(7FE0,0010) Pixel Data holds a single value; no usable MR signal", instance=instance
        )
    resampled -= np.float32(low)
    resampled *= np.float32(1.0 / (high - low))
    np.clip(resampled, 0.0, 1.0, out=resampled)
