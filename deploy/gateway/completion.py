"""Completing a waiting request with the inputs a person gave on the worklist.

The web app only records the inputs (`WaitingRequests.give`, once, on disk) and wakes
this thread; the thread sends the request down the same path as any routed request
(`StudyProcessor.answer`: infer, the SR, every destination's outbox) and records the
outcome with the inputs and who gave them. A gateway that stops halfway finds the
given inputs at its next start and finishes then; the SR's UID comes from the study,
task and instances, so a report queued twice is one report.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from abdoserve.deploy.gateway.inference import Interrupted
from abdoserve.deploy.gateway.processing import Job, StudyProcessor
from abdoserve.deploy.gateway.waiting import Given, WaitingRequest
from abdoserve.deploy.gateway.worklist.render import render_slice
from abdoserve.preprocessing.tasks import TASKS

log = logging.getLogger("abdoserve.gateway")


class Completions:
    """One thread that completes every waiting request whose inputs were given."""

    def __init__(
        self,
        processor: StudyProcessor,
        stopping: threading.Event,
        on_completed: Callable[[], None] = lambda: None,  # wakes the senders
        poll_s: float = 5.0,
    ) -> None:
        self.processor = processor
        self.on_completed = on_completed
        self.waiting = processor.waiting
        self.stopping = stopping
        self.poll_s = poll_s
        self.wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="completions", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self.wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self.stopping.is_set():
            self.wake.clear()
            try:
                if self.complete_given():
                    self.on_completed()
            except Interrupted:
                return
            except Exception:  # a bug must not end the thread; the inputs stay on disk
                log.exception("completing waiting requests failed; retried later")
            self.wake.wait(self.poll_s)

    def complete_given(self) -> int:
        """Complete every waiting request with given inputs; how many were completed."""
        done = 0
        for waiting in list(self.waiting.all()):
            given = waiting.given()
            if given is not None:
                self.complete(waiting, given)
                done += 1
        return done

    def complete(self, waiting: WaitingRequest, given: Given) -> dict[str, Any]:
        """Send, report and record one request; its kept instances go afterwards."""
        spool = self.processor.spool
        recorded = spool.outcome(waiting.study_uid, waiting.key)
        if recorded is not None and recorded.get("status") != "needs_input":
            self.waiting.release(waiting)  # stopped after recording, before tidying up
            return recorded
        request = dataclasses.replace(
            waiting.request, clinical={**waiting.request.clinical, **given.inputs}, missing=()
        )
        job = Job(waiting.study(), request, waiting.key, waiting.files())
        outcome = self.processor.answer(job, _headers(job))
        outcome["given"] = {"inputs": dict(given.inputs), "by": given.user, "at": given.at}
        if outcome["status"] == "answered":
            self._key_images(job)
        spool.record_outcome(waiting.study_uid, waiting.key, outcome)
        self.waiting.release(waiting)
        log.info(
            "study %s: %s completed with inputs given on the worklist (%s)",
            waiting.study_uid,
            request.task,
            outcome["status"],
        )
        return outcome

    def _key_images(self, job: Job) -> None:
        """The images the answer used, as the worklist showed them: kept with the result,
        since the instances go once it is recorded (results/<study>/<key>.images/<n>.png)."""
        spec = TASKS[job.request.task]
        folder = self.processor.spool.results / job.study.study_uid / f"{job.key}.images"
        folder.mkdir(parents=True, exist_ok=True)
        for number, file in enumerate(job.files):
            name = f"{job.key}.images/{number}.png"
            self.processor.spool.write_result(
                job.study.study_uid, name, render_slice(file, spec).png
            )


def _headers(job: Job) -> dict[str, Dataset]:
    """The request's headers by SOP Instance UID, for the report's references."""
    headers: dict[str, Dataset] = {}
    for sop, file in zip(job.request.instances, job.files, strict=True):
        headers[sop] = pydicom.dcmread(file, stop_before_pixels=True)
    return headers
