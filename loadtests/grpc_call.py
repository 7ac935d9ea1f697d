"""One timed inference call, run in a real OS thread (see `abdoserve.loadtests.grpc_user`).

The call is `AbdoServeClient.infer`, exactly what a hospital's code runs: request
encoding, the gRPC call and parsing the typed result are all inside the timing.
Locust-free, so it can be tested without gevent's monkey-patching.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from abdoserve.loadtests.payloads import Payload
from abdoserve_client.errors import AbdoServeError
from abdoserve_client.results import StudyResult


class InferClient(Protocol):
    """What we use of `abdoserve_client.AbdoServeClient`."""

    def infer(
        self, task: str, instances: Sequence[bytes], clinical: Mapping[str, Any] | None = None
    ) -> StudyResult: ...


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


def response_size(result: StudyResult) -> int:
    """The answer's size as received: per-image and study tensors plus the ANSWER JSON."""
    answer = json.dumps(dict(result.answer), separators=(",", ":"))
    return int(result.image_values.nbytes + result.study_values.nbytes + len(answer))


def timed_infer(client: InferClient, payload: Payload) -> Outcome:
    """Send `payload` once; typed client errors come back as a failed `Outcome`."""
    started = time.perf_counter()
    try:
        result = client.infer(payload.model, payload.instances, payload.clinical)
    except AbdoServeError as error:
        elapsed_ms = 1e3 * (time.perf_counter() - started)
        return Outcome(elapsed_ms, 0, reported(error))
    elapsed_ms = 1e3 * (time.perf_counter() - started)
    return Outcome(elapsed_ms, response_size(result))
