"""Per-sample network outputs -> the study-level answer a hospital system reads.

The answer names the model, its version and the provenance of its weights, and
answers from untrained reference weights carry a notice saying so: they must
never look like a diagnosis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from abdoserve.preprocessing.specs import Output, TaskSpec

UNTRAINED_NOTICE = (
    "UNTRAINED REFERENCE WEIGHTS: this output exercises the serving path and is not a "
    "diagnosis or a measurement"
)


@dataclass(frozen=True)
class ModelIdentity:
    """Which model answered, and where its weights came from (Triton config parameters)."""

    name: str
    version: str
    weights_source: str
    weights_sha256: str
    untrained: bool

    @classmethod
    def from_parameters(
        cls, name: str, version: str, parameters: Mapping[str, str]
    ) -> ModelIdentity:
        return cls(
            name=name,
            version=version,
            weights_source=parameters.get("weights_source", "unknown"),
            weights_sha256=parameters.get("weights_sha256", ""),
            # Anything not explicitly marked trained is treated as untrained.
            untrained=parameters.get("weights_untrained", "true").lower() != "false",
        )


def aggregate(output: Output, per_sample: np.ndarray) -> np.ndarray:
    """Study values from per-sample values (n, K) -> (K,)."""
    study: np.ndarray
    if output.aggregation == "max":
        study = per_sample.max(axis=0)
    elif output.aggregation == "mean" or per_sample.shape[0] > 1:
        study = per_sample.mean(axis=0)
    else:
        study = per_sample[0]
    return study


def study_answer(
    spec: TaskSpec,
    per_sample: np.ndarray,
    sources: Sequence[int],
    identity: ModelIdentity,
    roles: Mapping[str, int] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(study values (K,), answer as a JSON-ready dict)."""
    study = aggregate(spec.output, per_sample).astype(np.float32)
    answer: dict[str, Any] = {
        "task": spec.name,
        "title": spec.title,
        "model": {
            "name": identity.name,
            "version": identity.version,
            "weights_source": identity.weights_source,
            "weights_sha256": identity.weights_sha256,
            "untrained": identity.untrained,
        },
        "result": interpret(spec.output, study),
        "images": [
            {"instance": int(source), "values": _rounded(values)}
            for source, values in zip(sources, per_sample, strict=True)
        ],
    }
    if roles:
        answer["roles"] = dict(roles)
    if identity.untrained:
        answer["notice"] = UNTRAINED_NOTICE
    return study, answer


def interpret(output: Output, study: np.ndarray) -> dict[str, Any]:
    """The study values in the output's own terms: class, stage, flag."""
    if output.kind == "classification":
        best = int(np.argmax(study))
        return {
            "label": output.labels[best],
            "description": output.descriptions[best],
            "probabilities": dict(zip(output.labels, _rounded(study), strict=True)),
        }
    value = float(study[0])
    result: dict[str, Any] = {output.labels[0]: _round(value), "unit": output.unit}
    if output.stage_cutoffs:
        stage = int(np.searchsorted(np.asarray(output.stage_cutoffs), value, side="right"))
        result["stage"] = output.labels[1 + stage]
    if output.flag_below is not None:
        result[output.flag_name] = value <= output.flag_below
    if output.flag_above is not None:
        result[output.flag_name] = value >= output.flag_above
    return result


def _round(value: float) -> float:
    return round(value, 6) if math.isfinite(value) else value


def _rounded(values: np.ndarray) -> list[float]:
    return [_round(float(value)) for value in values]
