"""Two versions' answers to one study, compared as a radiologist would read them.

Agreement is on what the answer says: the class (liver mass), the stage (fibrosis),
the flag (osteoporosis, cancer), or for an output with none of these, the value
itself. The delta is the score's absolute difference: the largest over the classes
of a classification, the value's otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from abdoserve.preprocessing.specs import Output
from abdoserve.serving.answer import aggregate, interpret


@dataclass(frozen=True)
class Comparison:
    agree: bool
    delta: float


def compare(output: Output, answered: np.ndarray, other: np.ndarray) -> Comparison:
    """`answered` and `other` are study values (K,), as `aggregate` gives them."""
    delta = float(np.max(np.abs(answered.astype(np.float64) - other.astype(np.float64))))
    if not np.isfinite(delta):
        return Comparison(agree=False, delta=float("inf"))
    return Comparison(agree=_verdict(output, answered) == _verdict(output, other), delta=delta)


def study_values(output: Output, per_sample: np.ndarray) -> np.ndarray:
    return aggregate(output, per_sample).astype(np.float32)


def _verdict(output: Output, study: np.ndarray) -> object:
    """What the answer says, without its decimals."""
    result = interpret(output, study)
    if output.kind == "classification":
        return result["label"]
    said = tuple(result[key] for key in ("stage", output.flag_name) if key and key in result)
    return said if said else float(study[0])
