"""Reports to their destinations with C-STORE: retried with backoff, never dropped.

One thread per destination drains its outbox folder, oldest report first, over one
association at a time. A report leaves the outbox only when the destination answered
success (or a warning, which DICOM counts as stored). A destination that is down
delays its reports; the others are not held up by it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom import uid
from pynetdicom import AE

from abdoserve.deploy.gateway.metrics import GatewayMetrics
from abdoserve.deploy.gateway.spool import Spool

log = logging.getLogger("abdoserve.gateway")

REPORT_SYNTAXES = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian]


@dataclass(frozen=True)
class Destination:
    """A DICOM node that takes the reports: `AE@HOST:PORT`."""

    ae_title: str
    host: str
    port: int

    @property
    def name(self) -> str:
        """The outbox folder and metric label: the AE title (configured, not sent to us)."""
        return self.ae_title

    @classmethod
    def parse(cls, text: str) -> Destination:
        try:
            ae_title, address = text.split("@", 1)
            host, port = address.rsplit(":", 1)
            destination = cls(ae_title.strip(), host.strip("[]"), int(port))
        except ValueError as error:
            raise ValueError(f"destination {text!r} is not AE@HOST:PORT") from error
        if not 0 < len(destination.ae_title) <= 16 or not 0 < destination.port < 65536:
            raise ValueError(f"destination {text!r}: AE title of 1-16 characters, port 1-65535")
        return destination


def stored(status: Any) -> bool:
    """Success (0x0000) or a warning (0x0001, 0xBxxx): the destination kept the object."""
    if status is None or "Status" not in status:
        return False
    code = int(status.Status)
    return code in {0x0000, 0x0001} or (code & 0xF000) == 0xB000


class ReportSender(threading.Thread):
    """Drains one destination's outbox until `stopping` is set."""

    def __init__(
        self,
        destination: Destination,
        spool: Spool,
        metrics: GatewayMetrics,
        stopping: threading.Event,
        *,
        calling_ae: str,
        first_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
    ) -> None:
        super().__init__(name=f"sender-{destination.name}", daemon=True)
        self.destination = destination
        self.spool = spool
        self.metrics = metrics
        self.stopping = stopping
        self.calling_ae = calling_ae
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self.wake = threading.Event()  # set when a report is queued
        metrics.watch_outbox(destination.name, lambda: len(spool.pending(destination.name)))

    def run(self) -> None:
        backoff = self.first_backoff_s
        while not self.stopping.is_set():
            pending = self.spool.pending(self.destination.name)
            if not pending:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            if self.send(pending):
                backoff = self.first_backoff_s
                continue
            self.metrics.report_send_failures.labels(self.destination.name).inc()
            log.warning(
                "destination %s unreachable or refusing; %d report(s) wait, retry in %.0f s",
                self.destination.name,
                len(pending),
                backoff,
            )
            self.stopping.wait(backoff)
            backoff = min(2 * backoff, self.max_backoff_s)

    def send(self, reports: list[Path]) -> bool:
        """Send `reports` over one association; False at the first that was not stored."""
        ae = AE(ae_title=self.calling_ae)
        classes = {
            str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID) for path in reports
        }
        for sop_class in sorted(classes):
            ae.add_requested_context(sop_class, REPORT_SYNTAXES)
        association = ae.associate(
            self.destination.host, self.destination.port, ae_title=self.destination.ae_title
        )
        if not association.is_established:
            return False
        try:
            return all(self._send_one(association, report) for report in reports)
        finally:
            association.release()

    def _send_one(self, association: Any, report: Path) -> bool:
        if not report.exists():  # delivered by an earlier pass
            return True
        status = association.send_c_store(pydicom.dcmread(report))
        if not stored(status):
            return self._not_stored(report, status)
        meta = self.spool.report_meta(report)
        if "last_arrival" in meta:
            latency = max(0.0, time.time() - float(meta["last_arrival"]))
            self.metrics.result_latency.labels(self.destination.name).observe(latency)
        if meta.get("kind") == "explanation":  # a map or key-object selection, not a report
            self.metrics.viewer_objects_stored.labels(self.destination.name).inc()
        else:
            self.metrics.reports_stored.labels(self.destination.name).inc()
        self.spool.delivered(report)
        log.info("report %s stored at %s", report.stem, self.destination.name)
        return True

    def _not_stored(self, report: Path, status: Any) -> bool:
        """A refusal the destination will repeat (A9xx, Cxxx) sets the report aside, so it
        does not hold up the queue; anything else (no answer, out of resources) is retried."""
        code = None if status is None or "Status" not in status else int(status.Status)
        shown = "none" if code is None else f"0x{code:04X}"
        log.warning(
            "destination %s did not store %s (status %s)", self.destination.name, report.stem, shown
        )
        if code is None or not permanent(code):
            return False
        kept = self.spool.set_aside(self.destination.name, report, {"status": shown})
        self.metrics.reports_rejected.labels(self.destination.name).inc()
        log.error("report %s refused by %s; kept in %s", report.stem, self.destination.name, kept)
        return True


def permanent(code: int) -> bool:
    """A C-STORE failure the destination gives again for the same object."""
    return (code & 0xFF00) == 0xA900 or (code & 0xF000) == 0xC000 or code == 0x0122
