"""Which images carried the answer: the key images a viewer is shown.

- a free series whose study value is the maximum over images (oesophageal cancer): the
  top k slices by per-image value, highest first;
- a free series whose study value is the mean (bone density, fibrosis CT): every slice
  used, in the network's order;
- images stacked as the channels of one sample (liver mass phases, fibrosis MRI levels):
  each phase or level, in the spec's role order, all sharing that sample's map.

Pure numpy on the per-sample output, so a test can choose from a hand-made answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from abdoserve.preprocessing.specs import TaskSpec

TOP_K = 3


@dataclass(frozen=True)
class KeyImage:
    """One key image: the sample whose saliency it shows and the request instance it is."""

    sample: int  # row of the network's output (and of its samples)
    instance: int  # request instance index
    why: str  # "top 1 of 3 by per-image probability", "slice used", the role name


def explained_output(spec: TaskSpec, study: np.ndarray) -> int:
    """The output column the map explains: the answered class, else the one value."""
    if spec.output.kind == "classification":
        return int(np.argmax(study))
    return 0


def choose_key_images(
    spec: TaskSpec,
    per_sample: np.ndarray,
    sources: Sequence[int],
    roles: Mapping[str, int],
    top_k: int = TOP_K,
) -> list[KeyImage]:
    """The key images of one answered study (see the module doc)."""
    if per_sample.ndim != 2 or per_sample.shape[0] != len(sources):
        raise ValueError(f"{per_sample.shape[0]} sample values for {len(sources)} sources")
    if spec.images.stacking == "channels":
        return [KeyImage(0, int(roles[role]), role) for role in spec.images.roles]
    if spec.output.aggregation == "max":
        return _top_k(spec, per_sample, sources, top_k)
    return [KeyImage(index, int(source), "slice used") for index, source in enumerate(sources)]


def _top_k(
    spec: TaskSpec, per_sample: np.ndarray, sources: Sequence[int], top_k: int
) -> list[KeyImage]:
    column = per_sample[:, 0]
    # stable: equal values keep the network's order, so a re-run picks the same slices
    order = np.argsort(-column, kind="stable")[: max(1, top_k)]
    shown = len(order)
    what = "probability" if spec.output.kind == "probability" else spec.output.labels[0]
    return [
        KeyImage(int(index), int(sources[index]), f"top {rank + 1} of {shown} by per-image {what}")
        for rank, index in enumerate(order)
    ]
