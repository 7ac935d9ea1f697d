"""Per-sample network outputs -> the study-level answer a hospital system reads.

The answer names the model, its version, the provenance of its weights and the
runtime and precision that ran the network (with, where the build measured it, the
deviation from the FP32 PyTorch network: an INT8 answer always carries it). Answers
from untrained reference weights carry a notice saying so: they must never look
like a diagnosis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from abdoserve.preprocessing.specs import Output, TaskSpec
from abdoserve_client import model_identity
from abdoserve_client.results import answer_number

# The identity and the notice have their one home in the client distribution, whose
# parser reads them back; named here too for the code that builds answers.
ModelIdentity = model_identity.ModelIdentity
UNTRAINED_NOTICE = model_identity.UNTRAINED_NOTICE


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
        "model": identity.to_answer(),
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
    result: dict[str, Any] = {output.labels[0]: answer_number(value), "unit": output.unit}
    if output.stage_cutoffs:
        stage = int(np.searchsorted(np.asarray(output.stage_cutoffs), value, side="right"))
        result["stage"] = output.labels[1 + stage]
    if output.flag_below is not None:
        result[output.flag_name] = value <= output.flag_below
    if output.flag_above is not None:
        result[output.flag_name] = value >= output.flag_above
    return result


def _rounded(values: np.ndarray) -> list[float]:
    return [answer_number(float(value)) for value in values]
