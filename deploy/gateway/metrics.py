"""The gateway's Prometheus metrics: counts, queue depth and age, and result latency.

Labels are drawn from fixed vocabularies (task names, rule names, configured
destination names, refusal reasons): never a UID, never anything from a header.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "abdoserve_gateway"

# Why a received instance or a routed request did not go on (the `reason` label).
REFUSAL_REASONS = (
    "invalid_uid",  # a UID that is not a UID: never used as a file name
    "unmatched",  # no routing rule matches its series
    "not_authorised",  # the calling AE is not allowed
    "spool_error",  # the disk refused the write
    "too_large",  # over --max-instance-mib
    "disk_full",  # under --min-free-mib free in the spool (A700: the sender retries)
    "unparsable",  # not a data set pydicom can read
)
# Why a connection was dropped before pynetdicom read it whole (connections.py).
CONNECTION_REASONS = (
    "pdu_too_large",  # a PDU header claiming more than the cap: its body is never read
    "bad_pdu",  # a header with no PDU type
    "too_slow",  # a PDU not whole within its total time
    "caller_limit",  # an address already holding its share of the association slots
)
FAILURE_REASONS = ("invalid_argument", "not_found", "gave_up", "report_error", "server_error")

# From the last instance to the report stored: seconds to minutes (server down: hours).
LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 900, 3600, 4 * 3600, 24 * 3600)


class GatewayMetrics:
    """Every metric the gateway exports, on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.instances_received = self._counter(
            "instances_received_total", "Instances spooled and acknowledged"
        )
        self.instances_refused = self._counter(
            "instances_refused_total", "C-STOREs refused, by reason", ["reason"]
        )
        self.connections_refused = self._counter(
            "connections_refused_total",
            "DICOM connections dropped for size, slowness or their address's share, by reason",
            ["reason"],
        )
        for reason in CONNECTION_REASONS:  # present from the start, at zero
            self.connections_refused.labels(reason)
        self.studies_received = self._counter(
            "studies_received_total", "Studies that went quiet and were taken for routing"
        )
        self.series_unmatched = self._counter(
            "series_unmatched_total", "Series no routing rule matched (never sent anywhere)"
        )
        self.requests_routed = self._counter(
            "requests_routed_total", "Requests a rule built from a study", ["task", "rule"]
        )
        self.requests_answered = self._counter(
            "requests_answered_total", "Requests the server answered", ["task"]
        )
        self.requests_failed = self._counter(
            "requests_failed_total", "Requests refused or abandoned, by reason", ["task", "reason"]
        )
        self.requests_needs_input = self._counter(
            "requests_needs_input_total",
            "Requests missing a clinical input or images (reported, never guessed)",
            ["task"],
        )
        self.study_errors = self._counter(
            "study_errors_total",
            "Studies left claimed by an unexpected error (resumed at the next start)",
        )
        self.inference_retries = self._counter(
            "inference_retries_total", "Server calls retried after UNAVAILABLE or a deadline"
        )
        self.reports_stored = self._counter(
            "reports_stored_total", "Reports a destination took", ["destination"]
        )
        self.reports_rejected = self._counter(
            "reports_rejected_total",
            "Reports a destination refused for good (kept under failed/reports)",
            ["destination"],
        )
        self.report_send_failures = self._counter(
            "report_send_failures_total", "Report sends that failed (retried)", ["destination"]
        )
        self.explanations_sent = self._counter(
            "explanations_sent_total",
            "Answers whose maps and key-object selection were queued beside the SR",
            ["task"],
        )
        self.viewer_objects_stored = self._counter(
            "viewer_objects_stored_total",
            "Explanation maps (Secondary Captures) and key-object selections a destination took",
            ["destination"],
        )
        self.explanation_failures = self._counter(
            "explanation_failures_total",
            "Answers whose maps could not be made (the SR went without them)",
            ["task"],
        )
        self.result_latency = Histogram(
            f"{PREFIX}_result_latency_seconds",
            "From a study's last instance received to its report stored at a destination",
            ["destination"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_studies",
            "Studies received and not yet finished (arriving, quiet or in work)",
            registry=self.registry,
        )
        self.queue_age = Gauge(
            f"{PREFIX}_queue_oldest_age_seconds",
            "Age of the oldest unfinished study's last instance",
            registry=self.registry,
        )
        self.outbox_depth = Gauge(
            f"{PREFIX}_outbox_reports",
            "Reports waiting for a destination",
            ["destination"],
            registry=self.registry,
        )

    def _counter(self, name: str, documentation: str, labels: Iterable[str] = ()) -> Counter:
        return Counter(f"{PREFIX}_{name}", documentation, list(labels), registry=self.registry)

    def watch_queue(self, arrivals: Callable[[], Iterable[float]]) -> None:
        """Depth and age are read from the spool at each scrape, so they cannot drift."""

        def depth() -> float:
            return float(sum(1 for _ in arrivals()))

        def age() -> float:
            times = list(arrivals())
            return max(0.0, time.time() - min(times)) if times else 0.0

        self.queue_depth.set_function(depth)
        self.queue_age.set_function(age)

    def watch_outbox(self, destination: str, pending: Callable[[], int]) -> None:
        self.outbox_depth.labels(destination).set_function(lambda: float(pending()))
        # Present from the start, so a rate() has a zero to start from.
        self.reports_stored.labels(destination)
        self.report_send_failures.labels(destination)
