"""The second version a study runs on, after its answer has left: shadow and canary.

One thread per postprocess instance takes jobs from a bounded queue, calls the
companion version through BLS, and records the comparison. A full queue drops the
job (counted): comparison is a sample, and must never slow or hold an answer.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from abdoserve.preprocessing.specs import Output
from abdoserve.serving.comparison import compare, study_values
from abdoserve.serving.routing_metrics import RoutingMetrics

_LOG = logging.getLogger("abdoserve.serving.companion")
QUEUE_SIZE = 16
BlockingCall = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True, eq=False)
class Job:
    answering: int
    companion: int
    samples: np.ndarray
    features: np.ndarray
    answered: np.ndarray  # the answer's study values (K,)


class CompanionRunner:
    def __init__(self, output: Output, call: BlockingCall, metrics: RoutingMetrics) -> None:
        self.output = output
        self.call = call
        self.metrics = metrics
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=QUEUE_SIZE)
        self.thread = threading.Thread(target=self._run, name="companion", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            self.metrics.compared(job.answering, job.companion, "dropped", None)

    def stop(self) -> None:
        """At unload: the jobs still queued are dropped, the one running finishes."""
        while True:
            try:
                self.jobs.get_nowait()
            except queue.Empty:
                break
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                self.run(job)
            except Exception:  # the thread must outlive any one comparison
                _LOG.exception("a comparison of versions failed")
            finally:
                self.jobs.task_done()

    def run(self, job: Job) -> None:
        try:
            per_sample = self.call(job.companion, job.samples, job.features)
        except Exception as error:
            _LOG.warning(
                "version %d failed beside version %d: %s",
                job.companion,
                job.answering,
                type(error).__name__,
            )
            self.metrics.failed(job.companion)
            self.metrics.compared(job.answering, job.companion, "failed", None)
            return
        result = compare(self.output, job.answered, study_values(self.output, per_sample))
        verdict = "agree" if result.agree else "disagree"
        self.metrics.compared(job.answering, job.companion, verdict, result.delta)
