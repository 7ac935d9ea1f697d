"""One timed inference call, run in a real OS thread (see `loadtests.grpc_user`).

Locust-free, so it can be tested without gevent's monkey-patching.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from tritonclient.utils import InferenceServerException

from clients.errors import AbdoServeError, ResponseError, from_triton
from clients.protocol import requested_outputs
from loadtests.payloads import Payload


class InferClient(Protocol):
    """What we use of `tritonclient.grpc.InferenceServerClient`."""

    def infer(self, model_name: str, inputs: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Outcome:
    """What locust's `events.request` needs to know about one call."""

    response_time_ms: float
    response_length: int
    error: AbdoServeError | None = None


def reported(error: AbdoServeError) -> AbdoServeError:
    """The same error with its gRPC code leading the message: locust names failures by
    `repr(error)`, which shows only the message."""
    failure = type(error)(f"{error.code}: {error.message}", error.code)
    failure.__cause__ = error.__cause__
    return failure


def timed_infer(client: InferClient, payload: Payload, deadline_s: float) -> Outcome:
    """Send `payload` once; gRPC errors come back as a failed `Outcome`, never raised."""
    started = time.perf_counter()
    try:
        result = client.infer(
            payload.model,
            list(payload.inputs),
            outputs=requested_outputs(),
            client_timeout=deadline_s,
        )
    except InferenceServerException as error:
        elapsed_ms = 1e3 * (time.perf_counter() - started)
        failure = from_triton(error)
        failure.__cause__ = error
        return Outcome(elapsed_ms, 0, reported(failure))
    elapsed_ms = 1e3 * (time.perf_counter() - started)
    if result.as_numpy("ANSWER") is None:
        missing = ResponseError(f"{payload.model} answered without ANSWER")
        return Outcome(elapsed_ms, 0, reported(missing))
    return Outcome(elapsed_ms, int(result.get_response().ByteSize()))
