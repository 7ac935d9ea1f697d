"""Which model answered: the one type the server writes into the ANSWER JSON's `model`,
the client reads back from it (and from a config's parameters), and the gateway's
Structured Report names (TID 4019).

The server's answer code imports this module inside Triton's Python stub, so it imports
the standard library alone: no grpc, no tritonclient, no numpy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# The model config parameters the repository build writes and every reader reads.
RUNTIME_PARAMETER = "runtime"
PRECISION_PARAMETER = "runtime_precision"
DEVIATION_PARAMETER = "runtime_deviation"  # JSON: measured vs FP32 PyTorch at build time
CARD_PARAMETER = "card_id"

# The statement every answer from untrained weights carries (the server sends it; a
# reader shows it where a server marked the weights untrained but sent none).
UNTRAINED_NOTICE = (
    "UNTRAINED REFERENCE WEIGHTS: this output exercises the serving path and is not a "
    "diagnosis or a measurement"
)


@dataclass(frozen=True)
class ModelIdentity:
    """Which model answered, where its weights came from, and what ran the network.

    `runtime` is the server's network runtime (`onnxruntime`, `onnxruntime-int8`,
    `openvino`, `openvino-int8`, or a GPU server's), `precision` its arithmetic
    (`fp32`, `int8`, `fp16`). `deviation` is what the server's build measured against
    the FP32 network on held-out studies (`max_abs`, `mean_abs`, per-output values,
    `study_agreement` of the class, stage or flag): every INT8 answer carries it; None
    where nothing was measured (the default ONNX Runtime FP32, held to PyTorch by the
    export's check).
    """

    name: str
    version: str
    weights_source: str
    weights_sha256: str
    untrained: bool
    runtime: str = "unknown"
    precision: str = "unknown"
    deviation: Mapping[str, Any] | None = field(default=None, hash=False)
    card_id: str = ""  # the version's model card (`abdoserve model import`); "" for a build's

    @classmethod
    def from_parameters(
        cls, name: str, version: str, parameters: Mapping[str, str]
    ) -> ModelIdentity:
        """From a model config's parameters, as the server loads them: a deviation that is
        not a JSON object raises ValueError (a broken build fails the model's load)."""
        return cls(
            name=name,
            version=version,
            weights_source=parameters.get("weights_source", "unknown"),
            weights_sha256=parameters.get("weights_sha256", ""),
            untrained=_untrained(parameters.get("weights_untrained")),
            runtime=parameters.get(RUNTIME_PARAMETER, "unknown"),
            precision=parameters.get(PRECISION_PARAMETER, "unknown"),
            deviation=_strict_deviation(parameters.get(DEVIATION_PARAMETER, "")),
            card_id=parameters.get(CARD_PARAMETER, ""),
        )

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], name: str = "", version: str = ""
    ) -> ModelIdentity:
        """From an ANSWER's `model` object or a config's `weights_*`/`runtime*` parameters,
        as a client reads them: what is missing or unreadable takes its default."""
        return cls(
            name=str(values.get("name", name)),
            version=str(values.get("version", version)),
            weights_source=str(values.get("weights_source", "unknown")),
            weights_sha256=str(values.get("weights_sha256", "")),
            untrained=_untrained(values.get("untrained", values.get("weights_untrained"))),
            **_runtime_fields(values),
            card_id=str(values.get("card_id", "")),
        )

    def to_answer(self) -> dict[str, Any]:
        """The ANSWER's `model` object (the order of its keys is the wire's)."""
        return {
            "name": self.name,
            "version": self.version,
            "weights_source": self.weights_source,
            "weights_sha256": self.weights_sha256,
            "untrained": self.untrained,
            "runtime": self.runtime_provenance(),
            "card_id": self.card_id,
        }

    def runtime_provenance(self) -> dict[str, Any]:
        """What ran the network, as the answer names it."""
        provenance: dict[str, Any] = {"name": self.runtime, "precision": self.precision}
        if self.deviation is not None:
            provenance["deviation"] = dict(self.deviation)
        return provenance

    @property
    def quantized(self) -> bool:
        """True when an INT8 network answered: read `deviation` before trusting decimals."""
        return self.precision == "int8"


def _untrained(flag: object) -> bool:
    """Anything not explicitly marked trained (False, or the text "false") is untrained."""
    if isinstance(flag, str):
        return flag.lower() != "false"
    return flag is not False


def _strict_deviation(text: str) -> Mapping[str, Any] | None:
    if not text:
        return None
    value = json.loads(text)  # written by the build; a broken one fails the model's load
    if not isinstance(value, dict):
        raise ValueError(f"{DEVIATION_PARAMETER} must be a JSON object")
    return value


def _runtime_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """An ANSWER's `runtime` object, or a config's runtime parameters (deviation as JSON)."""
    runtime = values.get(RUNTIME_PARAMETER, "unknown")
    if isinstance(runtime, Mapping):
        deviation = runtime.get("deviation")
        return {
            "runtime": str(runtime.get("name", "unknown")),
            "precision": str(runtime.get("precision", "unknown")),
            "deviation": deviation if isinstance(deviation, Mapping) else None,
        }
    try:
        deviation = json.loads(values.get(DEVIATION_PARAMETER) or "null")
    except ValueError:
        deviation = None
    return {
        "runtime": str(runtime),
        "precision": str(values.get(PRECISION_PARAMETER, "unknown")),
        "deviation": deviation if isinstance(deviation, Mapping) else None,
    }
