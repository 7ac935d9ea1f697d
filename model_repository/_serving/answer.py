"""Per-sample network outputs -> the study-level answer a hospital system reads.

The answer names the model, its version, the provenance of its weights and the
runtime and precision that ran the network (with, where the build measured it, the
deviation from the FP32 PyTorch network: an INT8 answer always carries it). Answers
from untrained reference weights carry a notice saying so: they must never look
like a diagnosis.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from abdoserve.preprocessing.specs import Output, TaskSpec
from abdoserve.serving.cpu_runtimes import (
    DEVIATION_PARAMETER,
    PRECISION_PARAMETER,
    RUNTIME_PARAMETER,
)

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
    runtime: str = "unknown"
    precision: str = "unknown"
    # vs FP32 PyTorch on held-out phantom studies, as the build measured it (None: not
    # measured, i.e. the default ONNX Runtime FP32, held to PyTorch by the export's check)
    deviation: Mapping[str, Any] | None = field(default=None, hash=False)

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
            runtime=parameters.get(RUNTIME_PARAMETER, "unknown"),
            precision=parameters.get(PRECISION_PARAMETER, "unknown"),
            deviation=_deviation(parameters.get(DEVIATION_PARAMETER, "")),
        )

    def runtime_provenance(self) -> dict[str, Any]:
        """What ran the network, as the answer names it."""
        provenance: dict[str, Any] = {"name": self.runtime, "precision": self.precision}
        if self.deviation is not None:
            provenance["deviation"] = dict(self.deviation)
        return provenance


def _deviation(text: str) -> Mapping[str, Any] | None:
    if not text:
        return None
    value = json.loads(text)  # written by the build; a broken one fails the model's load
    if not isinstance(value, dict):
        raise ValueError(f"{DEVIATION_PARAMETER} must be a JSON object")
    return value


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
            "runtime": identity.runtime_provenance(),
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
