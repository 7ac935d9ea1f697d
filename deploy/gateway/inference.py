"""Calls to the server that outlast its restarts: retry UNAVAILABLE and deadlines with backoff.

The client already retries a few times within one call's deadline; a server that is
being restarted (tens of seconds) or a network that is down needs more patience than
a call has. Here a study waits, backing off up to `max_backoff_s`, until the server
answers or `give_up_after_s` has passed: it is never dropped for a transient fault.
An INVALID_ARGUMENT is final at once: the study itself is at fault.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from abdoserve.deploy.gateway.metrics import GatewayMetrics
from abdoserve_client.errors import DeadlineExceededError, ServerUnavailableError
from abdoserve_client.results import StudyResult

log = logging.getLogger("abdoserve.gateway")

# The server could not answer in time (down, restarting, a network fault): waited out.
# Other errors are the study's own, or the client has already retried them.
UNREACHABLE_ERRORS = (ServerUnavailableError, DeadlineExceededError)


class Interrupted(Exception):
    """The gateway is stopping; the study stays in the spool and is resumed at the next start."""


class GaveUp(Exception):
    """The server stayed unreachable past the give-up time."""


@dataclass(frozen=True)
class RetryOptions:
    first_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    give_up_after_s: float = 24 * 3600.0


# (task, instances, clinical) -> the server's answer, raising the client's errors
Infer = Callable[[str, Sequence[bytes], Mapping[str, Any]], StudyResult]


class PersistentInference:
    """`infer(...)` that retries until the server answers (or `give_up_after_s` passes),
    and stops when the gateway does."""

    def __init__(
        self,
        infer: Infer,
        options: RetryOptions,
        metrics: GatewayMetrics,
        stopping: threading.Event,
    ) -> None:
        self._infer = infer
        self.options = options
        self.metrics = metrics
        self.stopping = stopping

    def __call__(
        self, task: str, instances: Sequence[bytes], clinical: Mapping[str, Any]
    ) -> StudyResult:
        started = time.monotonic()
        backoff = self.options.first_backoff_s
        while True:
            if self.stopping.is_set():
                raise Interrupted
            try:
                return self._infer(task, instances, clinical)
            except UNREACHABLE_ERRORS as error:
                waited = time.monotonic() - started
                if waited + backoff > self.options.give_up_after_s:
                    raise GaveUp(f"server unreachable for {waited:.0f} s ({error.code})") from error
                self.metrics.inference_retries.inc()
                log.warning("%s: %s; retrying in %.1f s", task, error.code, backoff)
                if self.stopping.wait(backoff):
                    raise Interrupted from error
                backoff = min(2 * backoff, self.options.max_backoff_s)
