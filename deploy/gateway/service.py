"""The running gateway: the SCP, the quiet-study scheduler, workers, senders and metrics.

Threads of one process, all state on disk in the spool: at start, studies claimed
before a crash are resumed first, incoming ones are picked up when quiet, and every
outbox is drained. Stopping closes the port first, then lets the workers reach a
point where the spool is consistent (an interrupted study stays claimed).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server

from abdoserve.deploy.gateway.completion import Completions
from abdoserve.deploy.gateway.inference import (
    Infer,
    Interrupted,
    PersistentInference,
    RetryOptions,
)
from abdoserve.deploy.gateway.metrics import GatewayMetrics
from abdoserve.deploy.gateway.processing import StudyProcessor
from abdoserve.deploy.gateway.routing import RuleSet
from abdoserve.deploy.gateway.scp import ScpOptions, StorageServer, StoreHandler
from abdoserve.deploy.gateway.sender import Destination, ReportSender
from abdoserve.deploy.gateway.spool import ClaimedStudy, Spool
from abdoserve.deploy.gateway.viewer_objects import Explain, ViewerObjects
from abdoserve.deploy.gateway.worklist import WorklistOptions, WorklistServer
from abdoserve_client.results import StudyResult

log = logging.getLogger("abdoserve.gateway")


@dataclass(frozen=True)
class GatewayOptions:
    """Everything `abdoserve gateway` is told, in one place."""

    spool: Path
    scp: ScpOptions = field(default_factory=ScpOptions)
    destinations: Sequence[Destination] = ()
    quiet_s: float = 10.0
    workers: int = 2
    retry: RetryOptions = field(default_factory=RetryOptions)
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 8005  # None: no metrics endpoint (tests read the registry)
    keep_instances: bool = False
    image_library: bool = False  # TID 1600 in each SR: optional, and 3-4x slower to build
    poll_s: float = 0.25
    worklist: WorklistOptions | None = None  # the web worklist; None: not served


class Gateway:
    """Use as a context manager, or `start()` and `stop()`."""

    def __init__(
        self, options: GatewayOptions, rules: RuleSet, infer: Infer, explain: Explain | None = None
    ) -> None:
        """`explain`: the maps beside each SR (viewer_objects.py); None: no maps."""
        self.options = options
        self.spool = Spool(options.spool)
        self.metrics = GatewayMetrics()
        self.metrics.watch_queue(self.spool.waiting_studies)
        self.stopping = threading.Event()
        inference = PersistentInference(infer, options.retry, self.metrics, self.stopping)
        self.processor = StudyProcessor(
            self.spool,
            rules,
            inference,
            self.metrics,
            options.destinations,
            keep_instances=options.keep_instances,
            image_library=options.image_library,
            viewer=None
            if explain is None
            else ViewerObjects(self.spool, self.metrics, options.destinations, explain),
        )
        handler = StoreHandler(
            self.spool,
            rules,
            self.metrics,
            max_instance_bytes=options.scp.max_instance_bytes,
            min_free_bytes=options.scp.min_free_bytes,
        )
        self.scp = StorageServer(options.scp, handler)
        # Requests completed with inputs given on the worklist (or given before a stop).
        self.completions = Completions(self.processor, self.stopping, self._wake_senders)
        self.worklist = (
            None
            if options.worklist is None
            else WorklistServer(options.worklist, options.spool, self._given)
        )
        self.senders = [
            ReportSender(
                d, self.spool, self.metrics, self.stopping, calling_ae=options.scp.ae_title
            )
            for d in options.destinations
        ]
        self._pool = ThreadPoolExecutor(options.workers, thread_name_prefix="study")
        self._in_work: dict[str, Future[None]] = {}
        self._scheduler = threading.Thread(target=self._schedule, name="scheduler", daemon=True)
        self._metrics_server: Any = None

    def __enter__(self) -> Gateway:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self.options.metrics_port is not None:
            self._metrics_server = start_http_server(
                self.options.metrics_port, self.options.metrics_host, self.metrics.registry
            )
        for study in self.spool.claimed_studies():
            log.info("resuming study %s (claimed before the last stop)", study.study_uid)
            self._submit(study)
        for sender in self.senders:
            sender.start()
        self.completions.start()
        if self.worklist is not None:
            self.worklist.start()
        self.scp.start()
        self._scheduler.start()

    def stop(self) -> None:
        self.scp.stop()  # no new instances: senders retry elsewhere or later
        if self.worklist is not None:
            self.worklist.stop()  # no new inputs; given ones are on disk
        self.stopping.set()
        self._scheduler.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.completions.join(timeout=30)
        for sender in self.senders:
            sender.join(timeout=30)
        if self._metrics_server is not None:
            server, thread = self._metrics_server
            server.shutdown()
            thread.join(timeout=5)
        log.info("gateway stopped; unfinished studies stay in %s", self.options.spool)

    def _schedule(self) -> None:
        while not self.stopping.wait(self.options.poll_s):
            for study_uid in self.spool.quiet_studies(self.options.quiet_s):
                claimed = self.spool.claim(study_uid)
                if claimed is not None:
                    self.metrics.studies_received.inc()
                    self._submit(claimed)

    def _submit(self, study: ClaimedStudy) -> None:
        future = self._pool.submit(self._process, study)
        self._in_work[study.folder.name] = future
        future.add_done_callback(lambda _: self._in_work.pop(study.folder.name, None))

    def _process(self, study: ClaimedStudy) -> None:
        try:
            self.processor.process(study)
        except Interrupted:
            log.info("study %s interrupted by the stop; resumed at the next start", study.study_uid)
            return
        except Exception:  # a bug must not kill the worker; the study stays claimed
            self.metrics.study_errors.inc()
            log.exception("study %s could not be processed; it stays claimed", study.study_uid)
            return
        self._wake_senders()

    def _wake_senders(self) -> None:
        for sender in self.senders:
            sender.wake.set()

    def _given(self) -> None:
        """Inputs were given on the worklist: complete the request now, then send it."""
        self.completions.wake.set()

    def idle(self) -> bool:
        """Nothing arriving, in work or waiting to be sent (for tests and benchmarks)."""
        pending = any(self.spool.pending(d.name) for d in self.options.destinations)
        waiting = any(True for _ in self.spool.waiting_studies())
        return not pending and not waiting and not self._in_work


def client_infer(url: str, options: Mapping[str, Any]) -> Infer:
    """`Infer` through one `AbdoServeClient` per worker thread (each holds its channels)."""
    from abdoserve_client.client import AbdoServeClient

    local = threading.local()

    def infer(task: str, instances: Sequence[bytes], clinical: Mapping[str, Any]) -> StudyResult:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = AbdoServeClient(url, **options)
        return client.infer(task, instances, clinical)

    return infer
