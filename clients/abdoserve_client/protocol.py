"""What the sync and async clients share: the tensor contract, retry policy, task inputs.

Tensor contract of each task's ensemble (see export/configs.py on the server side):
DICOM = BYTES [1, n] (one element per instance) or DICOM_PACKED = UINT8 [1, bytes] with
DICOM_OFFSETS = INT64 [1, n], CLINICAL = BYTES [1, 1] (a JSON object)
-> SCORES FP32 [1, samples, K], STUDY FP32 [1, K], ANSWER BYTES [1, 1] (JSON).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import numpy as np
from tritonclient.utils import InferenceServerException

from abdoserve_client.errors import (
    AbdoServeError,
    DeadlineExceededError,
    InvalidRequestError,
    ResponseError,
    ServerUnavailableError,
    from_triton,
)
from abdoserve_client.results import StudyResult, TaskInfo, parse_result
from abdoserve_client.wire import WireTensor, bytes_tensor

log = logging.getLogger("abdoserve_client")

DEFAULT_URL = "127.0.0.1:8001"
OUTPUT_NAMES = ("SCORES", "STUDY", "ANSWER")
R = TypeVar("R", bound=StudyResult)


class _Response(Protocol):
    def as_numpy(self, name: str) -> np.ndarray | None: ...


# Errors that mean "not now", not "this request is bad"; inference is idempotent, so
# they are retried: INTERNAL from a Python-backend stub that died or stalled under the
# request (the server's supervisor reloads the model within seconds), and the guard's
# RESOURCE_EXHAUSTED for a full in-flight budget (a request over the size limit is
# RESOURCE_EXHAUSTED too, and is not retried).
RETRIED_MESSAGES = {
    "INTERNAL": ("is not healthy", "Failed to obtain the health mutex"),
    "RESOURCE_EXHAUSTED": ("server busy",),
}


def is_retried(failure: AbdoServeError) -> bool:
    """UNAVAILABLE, or one of the `RETRIED_MESSAGES` of its code."""
    if failure.code == ServerUnavailableError.code:
        return True
    markers = RETRIED_MESSAGES.get(failure.code, ())
    return any(marker in failure.message for marker in markers)


class Deadline:
    """The caller's time budget for one call: every attempt and backoff wait fits in it."""

    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self.seconds = seconds
        self._clock = clock
        self._expires = clock() + seconds

    def remaining(self) -> float:
        return max(0.0, self._expires - self._clock())

    def attempt_timeout(self, target: str) -> float:
        """The time the next attempt may take: what is left, or DeadlineExceededError."""
        remaining = self.remaining()
        if remaining <= 0.0:
            raise DeadlineExceededError(f"{target}: the {self.seconds:g} s deadline is spent")
        return remaining


@dataclass(frozen=True)
class RetryPolicy:
    """Retry transient failures (`is_retried`), `retries` times, doubling the wait
    (inference is idempotent), while the caller's deadline leaves time for the wait and
    another attempt; every other error is raised at once."""

    retries: int = 3
    backoff_s: float = 0.2

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0:
            raise ValueError("retries and backoff_s must not be negative")

    def delay_or_raise(
        self,
        error: InferenceServerException,
        attempt: int,
        target: str,
        deadline: Deadline | None = None,
    ) -> float:
        """Seconds to wait before retrying after failed attempt `attempt` (from 0), or raise
        the typed error with `error` as its cause."""
        failure = from_triton(error)
        if not is_retried(failure):
            raise failure from error
        delay = self.backoff_s * 2.0**attempt
        if attempt >= self.retries:
            raise _exhausted(failure, target, attempt, "") from error
        if deadline is not None and delay >= deadline.remaining():
            # No retry could finish in time: the caller hears now, not at the deadline.
            why = f" (the {deadline.seconds:g} s deadline leaves no time for another)"
            raise _exhausted(failure, target, attempt, why) from error
        log.debug(
            "%s: %s (attempt %d); retrying in %.2f s", target, failure.code, attempt + 1, delay
        )
        return delay


def _exhausted(failure: AbdoServeError, target: str, attempt: int, why: str) -> AbdoServeError:
    """The transient failure that was not retried again, with the attempts it took."""
    if failure.code == ServerUnavailableError.code:
        return ServerUnavailableError(
            f"{target} unavailable after {attempt + 1} attempts{why}: {failure.message}"
        )
    return type(failure)(
        f"{target} failed after {attempt + 1} attempts{why}: {failure.message}", failure.code
    )


def clinical_json(clinical: Mapping[str, Any] | None) -> bytes:
    """The CLINICAL element; None values are left out (the server then uses its fallback)."""
    values = {key: value for key, value in (clinical or {}).items() if value is not None}
    try:
        return json.dumps(values, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as error:
        raise InvalidRequestError(f"clinical inputs are not JSON-serialisable: {error}") from error


def request_tensors(
    instances: Sequence[bytes], clinical: Mapping[str, Any] | None, *, packed: bool = False
) -> list[WireTensor]:
    """The ensemble's inputs: the study (`dicom_tensors`) and CLINICAL [1, 1] (JSON)."""
    return [
        *dicom_tensors(instances, packed=packed),
        bytes_tensor("CLINICAL", [clinical_json(clinical)]),
    ]


def dicom_tensors(instances: Sequence[bytes], *, packed: bool) -> list[WireTensor]:
    """The study as BYTES DICOM [1, n], or `packed`: every instance back to back in
    DICOM_PACKED (UINT8 [1, bytes]) with their start offsets in DICOM_OFFSETS (INT64 [1, n]),
    which the server moves as one block instead of n elements."""
    if not instances:
        raise InvalidRequestError("no DICOM instances given")
    if not packed:
        return [bytes_tensor("DICOM", instances)]
    total = sum(len(instance) for instance in instances)
    return [
        WireTensor("DICOM_PACKED", "UINT8", (1, total), list(instances)),
        offsets_tensor(instances),
    ]


def offsets_tensor(instances: Sequence[bytes]) -> WireTensor:
    """DICOM_OFFSETS: where each instance starts in DICOM_PACKED."""
    if any(not instance for instance in instances):
        raise InvalidRequestError("an empty DICOM instance was given")
    starts = np.cumsum([0, *(len(instance) for instance in instances[:-1])], dtype="<i8")
    return WireTensor("DICOM_OFFSETS", "INT64", (1, len(instances)), [starts.tobytes()])


def task_info(config: Any, metadata: Any) -> TaskInfo:
    """TaskInfo from `get_model_config` and `get_model_metadata` protobuf responses."""
    parameters = {key: value.string_value for key, value in config.config.parameters.items()}
    versions = sorted(metadata.versions, key=lambda version: (len(version), version))
    info = TaskInfo.from_parameters(parameters, version=versions[-1] if versions else "")
    inputs = {item.name for item in config.config.input}
    return replace(info, accepts_packed={"DICOM_PACKED", "DICOM_OFFSETS"} <= inputs)


def parse_response(info: TaskInfo, response: _Response) -> StudyResult:
    arrays = {name: response.as_numpy(name) for name in OUTPUT_NAMES}
    missing = [name for name, array in arrays.items() if array is None]
    if missing:
        raise ResponseError(f"the response lacks {', '.join(missing)}")
    answer = np.asarray(arrays["ANSWER"]).reshape(-1)
    if answer.size != 1:
        raise ResponseError(f"ANSWER holds {answer.size} elements; expected 1")
    element = answer[0]
    text = element if isinstance(element, bytes | str) else bytes(element)
    return parse_result(info, text, np.asarray(arrays["SCORES"]), np.asarray(arrays["STUDY"]))


def expect(result: StudyResult, kind: type[R]) -> R:
    if not isinstance(result, kind):
        raise ResponseError(
            f"{result.task} answered a {type(result).__name__}, not {kind.__name__}"
        )
    return result


def request_summary(task: str, instances: Sequence[bytes], clinical: Mapping[str, Any]) -> str:
    """What a DEBUG log may say about a request: sizes and input names, never values."""
    size = sum(len(item) for item in instances)
    keys = sorted(key for key, value in clinical.items() if value is not None)
    return f"{task}: {len(instances)} instances, {size} bytes, clinical keys {keys}"


# Per-task clinical inputs. Keys are the server's input names (`clinical_inputs`).
def liver_mass_clinical(roi: Sequence[float]) -> dict[str, Any]:
    if len(roi) != 4:
        raise InvalidRequestError("roi must be [row_min, col_min, row_max, col_max]")
    return {"roi": [_number(value) for value in roi]}


def fibrosis_ct_clinical(age: float, sex: str) -> dict[str, Any]:
    return {"age": age, "sex": sex}


def fibrosis_mri_clinical(field_strength: float | None, hbv: str, hcv: str) -> dict[str, Any]:
    return {"field_strength": field_strength, "hbv": hbv, "hcv": hcv}


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)
