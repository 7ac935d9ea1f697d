"""`abdoserve serve`'s supervisor: keeps the embedded Triton server whole.

Triton 2.51 heals none of these itself; the supervisor does, with Triton's own means:

- a stub that died (a zombie of tritonserver): its model is reloaded in place through
  the restricted model-repository API (explicit model control); Triton loads the new
  instances beside the old ones and swaps them when ready;
- a stub that is stopped: killed at once, then reloaded. Once Triton's 1 s heartbeat
  has given up on it, a stub that resumes writes into freed shared memory and crashes
  the whole server (see docs/architecture.md), so it must never resume;
- a `tritonserver` that exited: its orphaned stubs are killed, its /dev/shm regions
  (all named with this launch's prefix) removed, and it is started again;
- a `tritonserver` that is frozen (stopped by a signal, or not answering its liveness
  endpoint for `frozen_after_s`): killed, then restarted as one that exited. Its calls
  in flight end at once (UNAVAILABLE, which clients retry; with replicas, the guard
  sends the retries to another one) instead of waiting for their deadlines.

While a model is being reloaded or the server restarted, `/health/ready` on the
supervisor's port answers 503; `/metrics` there counts restarts and reloads.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
import urllib.request
from dataclasses import dataclass, field, replace

from abdoserve.deploy import stubs
from abdoserve.deploy.drift_watch import DriftBounds, DriftFigure, DriftWatch, References
from abdoserve.deploy.embedded import (
    PORT_FLAGS,
    Binding,
    EmbeddedServer,
    Ports,
    ServerError,
    ServerOptions,
    check_bindings,
    free_port,
    public_bindings,
)
from abdoserve.deploy.guard import (
    GuardError,
    GuardLimits,
    GuardOptions,
    NginxGuard,
    ProxiedPort,
    TlsFiles,
)
from abdoserve.deploy.health import HealthServer
from abdoserve.deploy.model_control import ModelControl, ModelControlError, ModelControlTimeout
from abdoserve.deploy.rollback_watch import (
    Breach,
    RollbackBounds,
    RollbackWatch,
    Samples,
    parse_metrics,
)
from abdoserve.deploy.supervisor_metrics import SupervisorMetrics
from abdoserve.deploy.version_sync import VersionSync

log = logging.getLogger(__name__)
REGION_PREFIX = "abdoserve_shm_"
VERSIONS_JOIN_S = 15.0  # a versions check under way at stop: its calls time out by then
VERSIONS_CALL_S = 60.0  # a model load (a net version) may take this long under load


@dataclass(frozen=True)
class SupervisorOptions:
    health_host: str = "127.0.0.1"
    health_port: int | None = 8003  # None: no health/metrics endpoint
    interval_s: float = 0.25  # how often the stub table is read
    admin_key: str | None = None  # None: a fresh random key per launch
    stop_timeout_s: float = 15.0
    # After a reload the old instances finish what they hold, then their stubs are
    # killed: Triton 2.51 keeps a model version with a dead instance until shutdown.
    drain_s: float = 10.0
    # After a trim the old instances may hold a long queue (31 studies of 32 MiB queued
    # for 24 s; killed at 10 s, 13 failed "Stub process is not healthy"), and
    # Triton ends their stubs itself once drained: killed only past the longest call.
    trim_drain_s: float = 150.0
    # A model whose stubs' shared memory together outgrew this is reloaded in place,
    # at most once per `trim_every_s`: the Python backend's regions never shrink. Set at
    # twice the steady state measured under load, not just under it: at 64 MiB steady
    # bone-density traffic (regions at 66-71 MiB) reloaded its preprocess model every
    # 30-40 s; mixed traffic of 512x512 studies from 8 clients held 50 MiB at most
    # (docs/reliability.md). A study near the request limit still grows them far past it.
    trim_shm_bytes: int = 144 * 1024 * 1024
    trim_every_s: float = 30.0
    # A server whose /v2/health/live has not answered for this long is frozen. Under
    # full load on two cores it answered within 0.2 s (docs/reliability.md).
    frozen_after_s: float = 5.0
    live_timeout_s: float = 1.0
    # nginx on every public port (gRPC, HTTP, metrics, health), Triton and the health
    # endpoint behind it on loopback; None: no guard, Triton listens itself.
    guard: GuardLimits | None = None
    tls: TlsFiles | None = None  # the guard's certificates (TLS needs the guard)
    # Behind the guard, health is proxied by nginx (with its TLS). A pod keeps it on its
    # own plain port instead: the kubelet's probes present no client certificate.
    health_behind_guard: bool = True
    # Versions (abdoserve.deploy.version_sync): how often the live routing is compared
    # with the repository's, and the bounds past which a canary is rolled back.
    versions_every_s: float = 1.0
    rollback: RollbackBounds = field(default_factory=RollbackBounds)
    # Drift (abdoserve.deploy.drift_watch): the window compared with each validated
    # version's acceptance cohort.
    drift: DriftBounds = field(default_factory=DriftBounds)


@dataclass
class Liveness:
    """A server is frozen once it has not answered its liveness for `frozen_after_s`."""

    frozen_after_s: float
    answered_at: float = field(default_factory=time.monotonic)

    def frozen(self, answered: bool, now: float) -> bool:
        if answered:
            self.answered_at = now
        return now - self.answered_at > self.frozen_after_s


class Supervisor:
    """Starts, watches and stops one embedded server; use as a context manager."""

    def __init__(self, options: ServerOptions, supervision: SupervisorOptions) -> None:
        if supervision.tls is not None and supervision.guard is None:
            raise GuardError("TLS is served by the guard (nginx): it cannot be off with TLS")
        self.supervision = supervision
        self.health_address = self._health_address(supervision)
        self.admin_key = supervision.admin_key or secrets.token_urlsafe(32)
        # Where clients connect: the guard's address when there is one.
        self.public_host, self.public_ports = options.host, options.ports
        self.base_options = self._triton_options(options)
        self.guard: NginxGuard | None = None
        self.metrics = SupervisorMetrics()
        self.server: EmbeddedServer | None = None
        self.control: ModelControl | None = None
        self.generation = 0
        self.known: dict[int, stubs.Stub] = {}
        # The order stubs were first seen in: a newer stub of a model is a reload's
        self.found_at: dict[int, int] = {}
        self.discovered = 0
        # stubs of replaced instances -> when they may be killed, if still there
        self.retired: dict[int, float] = {}
        self.degraded: set[str] = set()
        self.trimmed_at: dict[str, float] = {}
        self.restarting = False
        self.draining = False
        self.liveness = Liveness(supervision.frozen_after_s)
        self.watch = RollbackWatch(supervision.rollback)
        self.drift = DriftWatch(supervision.drift, References(options.repository))
        self.drift_shown: set[tuple[str, str, str]] = set()
        self.versions: VersionSync | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._versions_thread: threading.Thread | None = None
        self._health: HealthServer | None = None
        # Before anything starts (every caller makes the supervisor first: serve, a
        # replica, the container): a taken port is refused here, by name (PortInUse).
        check_bindings(self.bindings())

    # -- lifecycle -----------------------------------------------------------------

    @staticmethod
    def _health_address(supervision: SupervisorOptions) -> tuple[str, int] | None:
        """Where the health endpoint listens: behind a guard, a loopback port it proxies."""
        if supervision.health_port is None:
            return None
        if supervision.guard is not None and supervision.health_behind_guard:
            return ("127.0.0.1", free_port())
        return (supervision.health_host, supervision.health_port)

    def _triton_options(self, options: ServerOptions) -> ServerOptions:
        """Behind a guard, Triton's ports move to loopback ports of their own, and serve
        inference only to requests the guard forwarded (it adds the key)."""
        if self.supervision.guard is None:
            return options
        internal = Ports(grpc=free_port(), http=free_port(), metrics=free_port())
        key = secrets.token_urlsafe(32)
        return replace(options, host="127.0.0.1", ports=internal, inference_key=key)

    def bindings(self) -> list[Binding]:
        """Every port this supervisor's processes will listen on: the public ones (the
        guard's, or Triton's without it), the supervisor's, and behind a guard the
        loopback ports of Triton and of the health endpoint."""
        found = public_bindings(self.public_host, self.public_ports)
        port = self.supervision.health_port
        if port is not None:
            host = self.public_host if self._health_proxied() else self.supervision.health_host
            found.append(Binding("supervisor", host, port, PORT_FLAGS["supervisor"]))
        if self.supervision.guard is not None:
            internal = self.base_options.ports.named().items()
            found += [
                Binding(f"Triton's {name} behind the guard", "127.0.0.1", number)
                for name, number in internal
            ]
        if self._health_proxied() and self.health_address is not None:
            found.append(Binding("supervisor behind the guard", *self.health_address))
        return found

    def _health_proxied(self) -> bool:
        return self.supervision.guard is not None and self.supervision.health_behind_guard

    def start(self) -> Supervisor:
        self._launch()
        self._start_guard()
        if self.health_address is not None:
            self._health = HealthServer(
                *self.health_address,
                ready=self.is_ready,
                metrics=self.metrics,
            ).start()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._thread.start()
        # A thread of its own: its calls to a slow or frozen server must never hold up the
        # watch that finds a frozen server (they did, 60 s, seen in CI).
        self._versions_thread = threading.Thread(
            target=self._watch_versions, name="versions", daemon=True
        )
        self._versions_thread.start()
        return self

    def stop(self) -> int | None:
        """Stop watching, let the guard finish what is in flight, stop the server (SIGINT,
        SIGKILL after the timeout), clean up."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._versions_thread is not None:
            self._versions_thread.join(timeout=VERSIONS_JOIN_S)
        if self.guard is not None:
            self.guard.stop()
        with self._lock:
            code = self._stop_server()
        if self._health is not None:
            self._health.stop()
        return code

    def __enter__(self) -> Supervisor:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def region_prefix(self) -> str:
        return f"{REGION_PREFIX}{os.getpid()}_{self.generation}_"

    def _launch(self) -> None:
        options = replace(
            self.base_options, admin_key=self.admin_key, shm_region_prefix=self.region_prefix
        )
        self.server = EmbeddedServer(options).start()
        self.control = ModelControl(self.server.url(""), self.admin_key)
        self.versions = VersionSync(
            ModelControl(self.server.url(""), self.admin_key, timeout_s=VERSIONS_CALL_S),
            options.repository,
            watch=self.watch,
            rolled_back=self._rolled_back,
        )
        # The stubs as the server reports ready, before /health/ready can say 200: a stub
        # that died before the watcher's first look (a zombie has no command line left to
        # read) was never known, so never healed (seen in the pod test, killed at once).
        assert self.server.process is not None
        self.known = stubs.stubs_of(self.server.process.pid)
        self.found_at = {}  # the launch's stubs all count as first
        self.retired = {}
        self.degraded = set()
        self.liveness = Liveness(self.supervision.frozen_after_s)
        self.metrics.server_up.set(1)

    def _start_guard(self) -> None:
        limits = self.supervision.guard
        if limits is None:
            return
        proxied = [ProxiedPort(self.public_ports.metrics, self.base_options.ports.metrics)]
        port = self.supervision.health_port
        if self.supervision.health_behind_guard and port is not None and self.health_address:
            proxied.append(ProxiedPort(port, self.health_address[1]))
        options = GuardOptions(
            host=self.public_host,
            grpc_port=self.public_ports.grpc,
            http_port=self.public_ports.http,
            upstream_grpc_port=self.base_options.ports.grpc,
            upstream_http_port=self.base_options.ports.http,
            limits=limits,
            tls=self.supervision.tls,
            proxied=tuple(proxied),
            upstream_key=self.base_options.inference_key,
        )
        prefix = self.base_options.log_file.parent / f"guard-{os.getpid()}"
        self.guard = NginxGuard(options, prefix).start()

    def _stop_server(self) -> int | None:
        server, self.server = self.server, None
        code = None if server is None else server.stop(self.supervision.stop_timeout_s)
        self._clean_up(self.region_prefix)
        self.metrics.server_up.set(0)
        return code

    def _clean_up(self, prefix: str) -> None:
        """Kill stubs and remove regions a server with `prefix` left behind."""
        orphans = [pid for pid in stubs.orphaned_stubs(prefix) if stubs.kill(pid)]
        removed = stubs.remove_regions(prefix)
        self.metrics.orphans_killed.inc(len(orphans))
        self.metrics.regions_removed.inc(removed)
        if orphans or removed:
            log.warning("cleaned up %d orphaned stubs, %d shm regions", len(orphans), removed)

    # -- watching ------------------------------------------------------------------

    def drain(self) -> None:
        """Answer not ready from now on, so that a balancer stops sending; the server
        keeps serving what it already holds until `stop`."""
        self.draining = True

    def is_ready(self) -> bool:
        """Ready: the server answers ready, no model is degraded or restarting, and it is
        not draining."""
        server = self.server
        if server is None or self.restarting or self.degraded or self.draining:
            return False
        if self.guard is not None and not self.guard.is_running():
            return False
        return server.is_ready()

    def _watch(self) -> None:
        while not self._stop.wait(self.supervision.interval_s):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    self.check_once()
                except (ServerError, ModelControlError, GuardError, OSError) as error:
                    log.error("supervisor check failed: %s", error)

    def check_once(self) -> None:
        server = self.server
        if server is None or server.process is None:
            return
        if server.process.poll() is not None:
            self._restart(server.process.returncode)
            return
        frozen = self._frozen(server)
        if frozen is not None:
            log.error("tritonserver is frozen (%s): killing it, to restart it", frozen)
            self.metrics.server_freezes.labels(kind=frozen).inc()
            self._kill_server()
            return
        if self.guard is not None and not self.guard.is_running():
            log.error("the guard (nginx) exited; starting it again")
            self.metrics.guard_restarts.inc()
            self.guard.start()
        failed = self._failed_models(server.process.pid)
        self.degraded |= failed
        for model in sorted(self.degraded):
            self._reload(model, "stub_failed")
        self._trim()
        self._end_drained()

    def _watch_versions(self) -> None:
        """Routing kept in the repository and across replicas, canaries watched
        (abdoserve.deploy.version_sync); a failure here never stops the watch."""
        while not self._stop.wait(self.supervision.versions_every_s):
            versions = self.versions
            if versions is None or self.restarting:
                continue
            try:
                samples = parse_metrics(self._triton_metrics())
                versions.check_once(samples)
                self._watch_drift(samples)
            except (ModelControlError, OSError) as error:
                log.warning("versions not synchronised this time: %s", error)
            except Exception:  # a malformed config or routing: logged, retried next time
                log.exception("versions not synchronised this time")

    def _watch_drift(self, samples: Samples) -> None:
        now = time.monotonic()
        if self.drift.due(now):
            self._show_drift(self.drift.update(samples, now))

    def _show_drift(self, figures: list[DriftFigure]) -> None:
        """The window's indices on the supervisor's /metrics; a version that no longer
        has one (too few studies, no reference) loses its series."""
        shown = set()
        for figure in figures:
            labels = (figure.task, figure.version, figure.feature)
            self.metrics.drift_index.labels(*labels).set(figure.index)
            self.metrics.drift_studies.labels(figure.task, figure.version).set(figure.studies)
            shown.add(labels)
        for labels in self.drift_shown - shown:
            self.metrics.drift_index.remove(*labels)
        gone = {labels[:2] for labels in self.drift_shown} - {labels[:2] for labels in shown}
        for series in gone:
            self.metrics.drift_studies.remove(*series)
        self.drift_shown = shown

    def _triton_metrics(self) -> str:
        server = self.server
        assert server is not None
        url = f"http://{server.options.host}:{server.ports.metrics}/metrics"
        with urllib.request.urlopen(url, timeout=2) as reply:
            text: str = reply.read().decode()
        return text

    def _rolled_back(self, task: str, version: int, breach: Breach) -> None:
        labels = {"task": task, "version": str(version), "bound": breach.bound}
        self.metrics.canary_rollbacks.labels(**labels).inc()
        self.metrics.canary_rollback_time.labels(**labels).set(time.time())

    def _frozen(self, server: EmbeddedServer) -> str | None:
        """'stopped' (SIGSTOP: seen at once), 'unresponsive' (no liveness answer for
        `frozen_after_s`), or None."""
        assert server.process is not None
        if stubs.process_state(server.process.pid) in stubs.STOPPED_STATES:
            return "stopped"
        answered = server.is_live(self.supervision.live_timeout_s)
        return "unresponsive" if self.liveness.frozen(answered, time.monotonic()) else None

    def _failed_models(self, server_pid: int) -> set[str]:
        """Models with a stub that died or stopped since the last look; stopped ones are
        killed here, before they can resume."""
        current = stubs.stubs_of(server_pid)
        for pid, stub in current.items():
            if pid not in self.retired and pid not in self.known:
                self.known[pid] = stub
                self.discovered += 1
                self.found_at[pid] = self.discovered
        failed: set[str] = set()
        for pid, stub in list(self.known.items()):
            state = stubs.process_state(pid)
            if state is None or state in stubs.DEAD_STATES:
                kind = "dead"
                if self._replaced(pid, stub, current):
                    log.info("stub of %s (pid %d) retired by a reload", stub.model, pid)
                    self._forget(pid)
                    continue
            elif state in stubs.STOPPED_STATES:
                kind = "stopped"
                stubs.kill(pid)
            else:
                continue
            log.warning("stub of %s (%s, pid %d) %s", stub.model, stub.instance, pid, kind)
            self.metrics.stub_failures.labels(model=stub.model, kind=kind).inc()
            failed.add(stub.model)
            self._forget(pid)
        return failed

    def _replaced(self, pid: int, stub: stubs.Stub, current: dict[int, stubs.Stub]) -> bool:
        return stubs.replaced(pid, stub, current, self.found_at)

    def _forget(self, pid: int) -> None:
        del self.known[pid]
        self.found_at.pop(pid, None)

    def _trim(self) -> None:
        """Reload a model whose stubs hold more shared memory than the bound (when idle
        or not: the old instances drain), so that the memory returns to the system."""
        usage: dict[str, int] = {}
        for stub in self.known.values():
            usage[stub.model] = usage.get(stub.model, 0) + stubs.region_bytes(stub)
        now = time.monotonic()
        for model, size in sorted(usage.items()):
            recent = now - self.trimmed_at.get(model, -1e9) < self.supervision.trim_every_s
            if size > self.supervision.trim_shm_bytes and not recent:
                log.info("%s holds %d MiB of shared memory: reloading it", model, size >> 20)
                self.trimmed_at[model] = now
                self._reload(model, "memory")

    def _reload(self, model: str, reason: str) -> None:
        assert self.control is not None
        # The old instances' stubs are retired: their exit is not a failure.
        drain_s = self.supervision.trim_drain_s if reason == "memory" else self.supervision.drain_s
        until = time.monotonic() + drain_s
        for pid, stub in list(self.known.items()):
            if stub.model == model:
                self.retired[pid] = until
                self._forget(pid)
        self.metrics.degraded.set(len(self.degraded))
        try:
            self.control.reload(model)
        except ModelControlTimeout:
            # Seen under load in 2.51: a load that never returns after a stub was
            # killed mid-request (the server then aborts). A wedged server heals only by
            # a restart: kill it, and the next check starts a new one.
            log.error("tritonserver did not finish reloading %s: restarting it", model)
            self._kill_server()
            raise
        self.degraded.discard(model)
        self.metrics.degraded.set(len(self.degraded))
        self.metrics.model_reloads.labels(model=model, reason=reason).inc()
        log.warning("reloaded %s (%s)", model, reason)

    def _kill_server(self) -> None:
        server = self.server
        if server is not None and server.process is not None:
            stubs.kill(server.process.pid)

    def _end_drained(self) -> None:
        """Kill retired stubs that outlived the drain time (their memory comes back)."""
        now = time.monotonic()
        for pid, until in list(self.retired.items()):
            state = stubs.process_state(pid)
            if state is None:
                del self.retired[pid]
            elif state not in stubs.DEAD_STATES and now > until:
                stubs.kill(pid)
                log.info("killed the drained stub %d of a replaced model instance", pid)

    def _restart(self, code: int | None) -> None:
        log.error("tritonserver exited (code %s); restarting it", code)
        self.restarting = True
        self.metrics.server_up.set(0)
        old_prefix = self.region_prefix
        if self.server is not None:
            self.server.stop()
        self._clean_up(old_prefix)
        self.generation += 1
        try:
            self._launch()
        finally:
            self.restarting = False
        self.metrics.server_restarts.inc()
