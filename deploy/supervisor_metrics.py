"""The supervisor's own Prometheus families (prometheus-client: a process we own).

Served on the supervisor's port next to its health endpoints, scraped as the
`abdoserve-supervisor` job; alerts in deploy/prometheus/rules/abdoserve-alerts.yml.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class SupervisorMetrics:
    """Restarts, reloads and clean-ups, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.server_restarts = Counter(
            "abdoserve_supervisor_server_restarts",
            "tritonserver processes restarted after they exited unexpectedly",
            registry=registry,
        )
        self.model_reloads = Counter(
            "abdoserve_supervisor_model_reloads",
            "Models reloaded in place: a stub died or stopped (reason=stub_failed), or its "
            "shared memory outgrew the bound (reason=memory)",
            ["model", "reason"],
            registry=registry,
        )
        self.stub_failures = Counter(
            "abdoserve_supervisor_stub_failures",
            "Python-backend stubs found dead or stopped (stopped ones are killed)",
            ["model", "kind"],
            registry=registry,
        )
        self.server_freezes = Counter(
            "abdoserve_supervisor_server_freezes",
            "tritonserver processes found stopped or not answering liveness, then killed "
            "(and restarted, counted in server_restarts)",
            ["kind"],
            registry=registry,
        )
        self.guard_restarts = Counter(
            "abdoserve_supervisor_guard_restarts",
            "nginx guard processes started again after they exited",
            registry=registry,
        )
        self.orphans_killed = Counter(
            "abdoserve_supervisor_orphaned_stubs_killed",
            "Stubs of an exited tritonserver killed by the supervisor",
            registry=registry,
        )
        self.regions_removed = Counter(
            "abdoserve_supervisor_shm_regions_removed",
            "Stale /dev/shm regions of an exited tritonserver removed",
            registry=registry,
        )
        self.canary_rollbacks = Counter(
            "abdoserve_supervisor_canary_rollbacks",
            "Canaries sent to 0 % automatically: the candidate passed a bound (errors, "
            "latency, disagreement) over the rollback window",
            ["task", "version", "bound"],
            registry=registry,
        )
        self.canary_rollback_time = Gauge(
            "abdoserve_supervisor_canary_rollback_time_seconds",
            "When the last automatic rollback of this task's version happened (Unix time): "
            "what the alert reads",
            ["task", "version", "bound"],
            registry=registry,
        )
        self.drift_index = Gauge(
            "abdoserve_supervisor_drift_index",
            "Population stability index of the drift window against the version's acceptance "
            "cohort, by feature (manufacturer, kvp, slice_thickness_mm, pixel_spacing_mm, "
            "body_hu, answer); only for validated versions with enough studies in the window",
            ["task", "version", "feature"],
            registry=registry,
        )
        self.drift_studies = Gauge(
            "abdoserve_supervisor_drift_window_studies",
            "Studies answered by the version in the drift window, where an index is given",
            ["task", "version"],
            registry=registry,
        )
        self.degraded = Gauge(
            "abdoserve_supervisor_degraded_models",
            "Models with a failed stub, not yet reloaded",
            registry=registry,
        )
        self.server_up = Gauge(
            "abdoserve_supervisor_server_up",
            "1 while the supervised tritonserver runs",
            registry=registry,
        )
