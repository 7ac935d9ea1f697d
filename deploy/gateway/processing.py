"""One quiet study: route its series, ask the server, write and queue the reports.

Every routed request ends in exactly one recorded outcome (answered, needs input,
failed) under results/<study>/<key>.outcome.json, written after its reports are
queued. A request whose outcome exists is skipped, so a study resumed after a crash
does only what was not finished; one resumed between queueing and recording queues
the same report again (its SOP Instance UID is derived from the request), which the
outbox and any PACS treat as the same object.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from abdoserve.deploy.gateway.inference import GaveUp, PersistentInference
from abdoserve.deploy.gateway.metrics import GatewayMetrics
from abdoserve.deploy.gateway.report import ReportContext, build_report, result_json
from abdoserve.deploy.gateway.routing import RoutedRequest, RuleSet
from abdoserve.deploy.gateway.sender import Destination
from abdoserve.deploy.gateway.spool import ClaimedStudy, Spool
from abdoserve.deploy.gateway.viewer_objects import AnsweredRequest, ViewerObjects
from abdoserve.deploy.gateway.waiting import WaitingRequests
from abdoserve_client.errors import AbdoServeError, InvalidRequestError, TaskNotFoundError
from abdoserve_client.results import StudyResult

log = logging.getLogger("abdoserve.gateway")


@dataclass(frozen=True)
class Headers:
    """A study's instances as the router sees them: headers by series; files and headers
    by SOP Instance UID."""

    by_series: Mapping[str, Sequence[Dataset]]
    files: Mapping[str, Path]
    by_instance: Mapping[str, Dataset]


def read_headers(files: Sequence[Path]) -> Headers:
    """Every spooled instance's header (pixel data left on disk)."""
    by_series: dict[str, list[Dataset]] = defaultdict(list)
    paths: dict[str, Path] = {}
    headers: dict[str, Dataset] = {}
    for file in files:
        try:
            header = pydicom.dcmread(file, stop_before_pixels=True)
        except Exception:  # parsed once at C-STORE; a file damaged since is skipped, said
            log.error("spooled instance %s cannot be read; left out", file.name)
            continue
        sop = str(header.SOPInstanceUID)
        by_series[str(header.get("SeriesInstanceUID", ""))].append(header)
        paths[sop] = file
        headers[sop] = header
    return Headers(dict(by_series), paths, headers)


def request_key(request: RoutedRequest) -> str:
    """A stable name for one routed request: same rule, images and inputs, same key."""
    content = json.dumps(
        [request.rule, request.task, list(request.instances), request.clinical], sort_keys=True
    )
    return hashlib.sha256(content.encode()).hexdigest()[:24]


class StudyProcessor:
    """Routes, infers and reports one claimed study."""

    def __init__(
        self,
        spool: Spool,
        rules: RuleSet,
        infer: PersistentInference,
        metrics: GatewayMetrics,
        destinations: Sequence[Destination],
        *,
        keep_instances: bool = False,
        image_library: bool = False,
        viewer: ViewerObjects | None = None,
    ) -> None:
        self.spool = spool
        self.viewer = viewer  # the maps and key images beside each SR; None: off
        self.rules = rules
        self.infer = infer
        self.metrics = metrics
        self.destinations = tuple(destinations)
        self.keep_instances = keep_instances
        self.image_library = image_library
        self.waiting = WaitingRequests(spool.root)  # needs-input requests' instances, kept

    def process(self, study: ClaimedStudy) -> None:
        """Every request of the study to its outcome, then the instances released.

        Raises `Interrupted` (the gateway is stopping) with the study left claimed."""
        headers = read_headers(study.instance_files())
        routing = self.rules.route_study(headers.by_series)
        for series_uid in routing.unmatched:
            self.metrics.series_unmatched.inc()
            log.info("study %s: series %s matches no rule; not sent", study.study_uid, series_uid)
        for request in routing.requests:
            key = request_key(request)
            if self.spool.outcome(study.study_uid, key) is None:
                self.metrics.requests_routed.labels(request.task, request.rule).inc()
                outcome = self._outcome(study, request, key, headers)
                self.spool.record_outcome(study.study_uid, key, outcome)
        keep = self.spool.root / "done" / study.folder.name if self.keep_instances else None
        self.spool.release(study, keep_folder=keep)

    def _outcome(
        self, study: ClaimedStudy, request: RoutedRequest, key: str, headers: Headers
    ) -> dict[str, Any]:
        job = Job(study, request, key, [headers.files[sop] for sop in request.instances])
        if request.missing or request.problem:
            return self._needs_input(job)
        return self.answer(job, headers.by_instance)

    def answer(self, job: Job, by_instance: Mapping[str, Dataset]) -> dict[str, Any]:
        """Ask the server and report: the one path of every request with all its inputs
        (a routed one, or a waiting one completed on the worklist)."""
        request = job.request
        try:
            data = [file.read_bytes() for file in job.files]
            result = self.infer(request.task, data, request.clinical)
            answered_at = time.time()
        except (InvalidRequestError, TaskNotFoundError) as error:
            return self._failed(job, error.code, error.message)
        except GaveUp as error:
            return self._failed(job, "GAVE_UP", str(error))
        except AbdoServeError as error:  # an unexpected answer: kept for a person to look at
            return self._failed(job, error.code, error.message)
        sources = [by_instance[sop] for sop in request.instances]
        try:
            return self._answered(job, result, sources, answered_at)
        except ValueError as error:  # an answer that does not fit its images: kept, said
            return self._failed(job, "REPORT", f"no report could be written: {error}")

    def _needs_input(self, job: Job) -> dict[str, Any]:
        request = job.request
        self.metrics.requests_needs_input.labels(request.task).inc()
        why = request.problem or "missing " + ", ".join(request.missing)
        if not request.problem:  # images chosen, inputs missing: kept for the worklist
            self.waiting.keep(job.study, job.key, request, job.files)
        log.warning("study %s: %s needs input (%s)", job.study.study_uid, request.task, why)
        return {
            **job.summary(),
            "status": "needs_input",
            "missing": list(request.missing),
            "problem": request.problem,
        }

    def _failed(self, job: Job, code: str, message: str) -> dict[str, Any]:
        reason = _failure_reason(code)
        outcome = {
            **job.summary(),
            "status": "failed",
            "reason": reason,
            "code": code,
            "message": message,
        }
        folder = self.spool.keep_failed(job.study, job.key, job.files, outcome)
        # Counted once kept: whoever the count alerts finds the study and its reason.
        self.metrics.requests_failed.labels(job.request.task, reason).inc()
        log.error(
            "study %s: %s failed (%s): %s; kept in %s",
            job.study.study_uid,
            job.request.task,
            code,
            message,
            folder,
        )
        return outcome

    def _answered(
        self, job: Job, result: StudyResult, sources: Sequence[Dataset], answered_at: float
    ) -> dict[str, Any]:
        study_uid, request = job.study.study_uid, job.request
        context = ReportContext(
            task=request.task, rule=request.rule, image_library=self.image_library
        )
        report = build_report(result, sources, context)
        encoded = encode(report)
        copy = result_json(result, report, context)
        self.spool.write_result(study_uid, f"{job.key}.sr.dcm", encoded)
        text = json.dumps(copy, indent=2, sort_keys=True).encode()
        self.spool.write_result(study_uid, f"{job.key}.json", text)
        meta = {
            "last_arrival": job.study.last_arrival,
            "study_uid": study_uid,
            "task": request.task,
        }
        report_uid = str(report.SOPInstanceUID)
        for destination in self.destinations:
            self.spool.enqueue(destination.name, report_uid, encoded, meta)
        self.metrics.requests_answered.labels(request.task).inc()
        log.info("study %s: %s answered; report %s queued", study_uid, request.task, report_uid)
        timings = {
            "last_arrival": job.study.last_arrival,
            "claimed": job.study.claimed_at,
            "answered": answered_at,
            "queued": time.time(),
        }
        viewer_objects = self._viewer_objects(job, result, sources)
        return {
            **job.summary(),
            "status": "answered",
            "report_uid": report_uid,
            "result": copy,
            "timings": timings,  # epoch seconds: where a study's latency went
            **({"viewer_objects": viewer_objects} if viewer_objects else {}),
        }

    def _viewer_objects(
        self, job: Job, result: StudyResult, sources: Sequence[Dataset]
    ) -> dict[str, Any] | None:
        """The maps and key-object selection, after the SR is queued (viewer_objects.py)."""
        if self.viewer is None:
            return None
        request = job.request
        answered = AnsweredRequest(
            job.study.study_uid, job.key, request.task, job.files, request.clinical, result, sources
        )
        return self.viewer.send(answered)


@dataclass(frozen=True)
class Job:
    """One routed request of a claimed study, with its key and instance files."""

    study: ClaimedStudy
    request: RoutedRequest
    key: str
    files: list[Path]

    def summary(self) -> dict[str, Any]:
        """What every outcome record says: UIDs, task and rule, nothing from a header."""
        return {
            "study_uid": self.study.study_uid,
            "task": self.request.task,
            "rule": self.request.rule,
            "series": list(self.request.series_uids),
            "instances": list(self.request.instances),
        }


def encode(report: Dataset) -> bytes:
    """The report as a DICOM file (preamble and file meta), as it is stored and sent."""
    buffer = io.BytesIO()
    report.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _failure_reason(code: str) -> str:
    """The metric label for a client error code (a fixed vocabulary)."""
    return {
        "INVALID_ARGUMENT": "invalid_argument",
        "NOT_FOUND": "not_found",
        "GAVE_UP": "gave_up",
        "REPORT": "report_error",
    }.get(code, "server_error")
