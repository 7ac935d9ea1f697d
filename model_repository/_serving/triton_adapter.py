"""The one place that knows Triton's Python-backend types.

Triton injects `triton_python_backend_utils` (pb_utils) only inside its stub, so
this module receives it as an argument instead of importing it; unit tests pass a
fake. Domain errors become per-request `TritonError`s: raising inside `execute`
would fail every request of the batch.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from abdoserve.preprocessing.errors import IntakeError, MissingInputError, StatusCode
from abdoserve.preprocessing.specs import TaskSpec
from abdoserve.preprocessing.tasks import get_task

_LOG = logging.getLogger(__name__)


class Tensor(Protocol):
    def as_numpy(self) -> np.ndarray: ...


def model_parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    """`parameters { key: ... value: { string_value: ... } }` as a plain dict."""
    raw = model_config.get("parameters", {}) or {}
    return {key: str(value.get("string_value", "")) for key, value in raw.items()}


def model_spec(pb_utils: Any, args: Mapping[str, Any]) -> tuple[dict[str, str], TaskSpec]:
    """What every Python model starts with: its logging routed to Triton's log, its config
    parameters, and its task's spec with the build's overrides (an invalid spec or override
    fails the model load, not the first patient)."""
    route_logging(pb_utils)
    parameters = model_parameters(json.loads(args["model_config"]))
    overrides = json.loads(parameters.get("spec_overrides") or "{}")
    return parameters, get_task(parameters["task"], overrides)


def require_input(pb_utils: Any, request: Any, name: str) -> np.ndarray:
    """The named input as numpy; a missing input is the caller's error, not None."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise MissingInputError(f"input tensor {name!r} is missing")
    array: np.ndarray = tensor.as_numpy()
    return array


def single_study(array: np.ndarray, name: str) -> np.ndarray:
    """Drop the batch axis of a one-study request: (1, ...) -> (...)."""
    study: np.ndarray
    if array.ndim == 0 or array.shape[0] != 1:
        raise IntakeError(
            f"input {name!r} must hold one study per request (batch dimension 1), "
            f"got shape {list(array.shape)}"
        )
    study = array[0]
    return study


def bytes_elements(array: np.ndarray) -> list[bytes]:
    """A BYTES tensor's elements as Python bytes."""
    return [item if isinstance(item, bytes) else bytes(item) for item in array.reshape(-1)]


def json_object(array: np.ndarray, name: str) -> dict[str, Any]:
    """A one-element BYTES tensor holding a JSON object (empty bytes mean {})."""
    elements = bytes_elements(array)
    if len(elements) != 1:
        raise IntakeError(f"input {name!r} must hold exactly one JSON object")
    if not elements[0].strip():
        return {}
    try:
        value = json.loads(elements[0])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IntakeError(
            f"input {name!r} is not valid JSON ({error.__class__.__name__})"
        ) from error
    if not isinstance(value, dict):
        raise IntakeError(f"input {name!r} must be a JSON object")
    return value


def json_tensor(value: Mapping[str, Any]) -> np.ndarray:
    """A JSON object as a (1, 1) BYTES array."""
    return np.array([[json.dumps(value, separators=(",", ":")).encode()]], dtype=np.object_)


def answer_outputs(
    output: np.ndarray, study: np.ndarray, answer: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """A study's public outputs, batch axis first: per-sample SCORES, STUDY, ANSWER (JSON)."""
    return {
        "SCORES": output[None, ...].astype(np.float32),
        "STUDY": study[None, ...],
        "ANSWER": json_tensor(answer),
    }


def error_response(pb_utils: Any, error: Exception) -> Any:
    """A per-request error response carrying the error's gRPC code."""
    if isinstance(error, IntakeError):
        code = _triton_code(pb_utils, error.code)
        message = str(error)
    else:
        # Unexpected failures: type and stack only; messages could echo request content.
        # Triton's own exceptions describe server state, never the request: keep theirs.
        stack = "".join(traceback.format_tb(error.__traceback__))
        detail = f": {error}" if type(error).__name__.startswith("Triton") else ""
        _LOG.error(
            "internal error %s%s while serving a request:\n%s", type(error).__name__, detail, stack
        )
        code = pb_utils.TritonError.INTERNAL
        message = f"internal error ({error.__class__.__name__}); see the server log"
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def cancelled_response(pb_utils: Any) -> Any:
    """The answer to a request whose client cancelled it or went away."""
    error = pb_utils.TritonError("the client cancelled the request", pb_utils.TritonError.CANCELLED)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def _triton_code(pb_utils: Any, code: StatusCode) -> Any:
    names = {
        StatusCode.INVALID_ARGUMENT: "INVALID_ARG",
        StatusCode.UNIMPLEMENTED: "UNSUPPORTED",
        StatusCode.INTERNAL: "INTERNAL",
    }
    return getattr(pb_utils.TritonError, names[code])


def response(pb_utils: Any, outputs: Mapping[str, np.ndarray]) -> Any:
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor(name, value) for name, value in outputs.items()]
    )


class TritonLogHandler(logging.Handler):
    """Forwards Python logging into Triton's own log through pb_utils.Logger."""

    def __init__(self, pb_utils: Any) -> None:
        super().__init__()
        self.logger = pb_utils.Logger

    def emit(self, record: logging.LogRecord) -> None:
        message = self.format(record)
        if record.levelno >= logging.ERROR:
            self.logger.log_error(message)
        elif record.levelno >= logging.WARNING:
            self.logger.log_warn(message)
        else:
            self.logger.log_info(message)


def route_logging(pb_utils: Any) -> None:
    """Send the project's loggers to Triton's log (once per stub process)."""
    root = logging.getLogger("abdoserve")
    if not any(isinstance(handler, TritonLogHandler) for handler in root.handlers):
        root.addHandler(TritonLogHandler(pb_utils))
        root.setLevel(logging.INFO)
