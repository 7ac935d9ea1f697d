"""The versions of a task's `<task>_net`, as the postprocess model calls and names them.

`NetClient` calls one version through Triton's BLS (`model_version`), awaited inside
`execute` for the answer or blocking from the comparison thread. `VersionIdentities`
names each version in the answer: its weights' provenance and card come from its
own folder (`provenance.json`, `card.json`, written by the build or `abdoserve model
import`), the runtime from the postprocess config (every version runs on the same one).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from abdoserve.preprocessing.errors import IntakeError
from abdoserve.preprocessing.specs import TaskSpec
from abdoserve.serving import validation
from abdoserve.serving.answer import ModelIdentity
from abdoserve_client.model_identity import CARD_PARAMETER, DEVIATION_PARAMETER

_LOG = logging.getLogger("abdoserve.serving.net_versions")
PROVENANCE_FILE = "provenance.json"
CARD_FILE = "card.json"
_WEIGHTS_KEYS = ("weights_source", "weights_sha256", "weights_untrained")


class NetFailed(Exception):
    """A version of the net answered with an error: `triton_error` is Triton's own, which
    names server state or our own validation, never request content."""

    def __init__(self, version: int, triton_error: Any) -> None:
        super().__init__(f"version {version} of the network failed")
        self.version = version
        self.triton_error = triton_error


class NetClient:
    """BLS calls of `<task>_net` at a given version: one study's SAMPLES (and FEATURES)
    in, its per-sample OUTPUT out, checked against the task's output contract (a
    version that answers outside it has failed, like one that answers an error)."""

    def __init__(self, pb_utils: Any, spec: TaskSpec) -> None:
        self.pb_utils = pb_utils
        self.spec = spec
        self.net_model = f"{spec.name}_net"
        self.takes_features = bool(spec.feature_width)

    def request(self, version: int, samples: np.ndarray, features: np.ndarray) -> Any:
        tensors = [self.pb_utils.Tensor("SAMPLES", samples[None, ...])]
        if self.takes_features:
            tensors.append(self.pb_utils.Tensor("FEATURES", features[None, ...]))
        return self.pb_utils.InferenceRequest(
            model_name=self.net_model,
            model_version=version,
            requested_output_names=["OUTPUT"],
            inputs=tensors,
        )

    async def call(self, version: int, samples: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Awaited inside `execute`: the studies of one batch go to the net together."""
        reply = await self.request(version, samples, features).async_exec()
        return self.output(version, reply)

    def call_blocking(self, version: int, samples: np.ndarray, features: np.ndarray) -> np.ndarray:
        """From a thread of our own (the comparison runs after the answer has left)."""
        return self.output(version, self.request(version, samples, features).exec())

    def output(self, version: int, reply: Any) -> np.ndarray:
        if reply.has_error():
            raise NetFailed(version, reply.error())
        output = self.pb_utils.get_output_tensor_by_name(reply, "OUTPUT").as_numpy()[0]
        try:
            validation.check_output(self.spec, output)
        except IntakeError as error:
            message = f"{self.net_model} version {version} answered outside its contract: {error}"
            raise NetFailed(
                version, self.pb_utils.TritonError(message, self.pb_utils.TritonError.INTERNAL)
            ) from None
        return np.asarray(output)


class VersionIdentities:
    """Each version's ModelIdentity, read once from its folder."""

    def __init__(self, name: str, parameters: Mapping[str, str], net_folder: Path) -> None:
        self.name = name
        self.parameters = dict(parameters)
        self.net_folder = net_folder
        # The build measured the deviation of the version it built; another version's
        # comes with it or is not known.
        self.built_version = parameters.get("model_version", "1")
        self._known: dict[int, ModelIdentity] = {}

    def __getitem__(self, version: int) -> ModelIdentity:
        if version not in self._known:
            self._known[version] = self._read(version)
        return self._known[version]

    def _read(self, version: int) -> ModelIdentity:
        folder = self.net_folder / str(version)
        values = dict(self.parameters)
        if str(version) != self.built_version:
            values.pop(DEVIATION_PARAMETER, None)
            values.pop(CARD_PARAMETER, None)
        provenance = _json_file(folder / PROVENANCE_FILE)
        values.update({key: str(provenance[key]) for key in _WEIGHTS_KEYS if key in provenance})
        if DEVIATION_PARAMETER in provenance:
            values[DEVIATION_PARAMETER] = json.dumps(provenance[DEVIATION_PARAMETER])
        card = _json_file(folder / CARD_FILE)
        if card.get("card_id"):
            values[CARD_PARAMETER] = str(card["card_id"])
        return ModelIdentity.from_parameters(self.name, str(version), values)


def _json_file(path: Path) -> dict[str, Any]:
    """A version's JSON record, or {} where it has none (a GPU plan folder, say)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        _LOG.warning("%s cannot be read (%s): the version is named without it", path, error)
        return {}
    return value if isinstance(value, dict) else {}
