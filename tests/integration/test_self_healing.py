"""The supervisor under fire: a killed stub, a stopped stub, a killed server, a stop with a
dead stub. Real processes and signals on a real (one-task) server, real client traffic."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from abdoserve.deploy import stubs
from abdoserve.deploy.embedded import ServerOptions, free_port, free_ports
from abdoserve.deploy.guard import GuardLimits
from abdoserve.deploy.isolation import server_shm
from abdoserve.deploy.supervisor import Supervisor, SupervisorOptions
from abdoserve.export.configs import Tuning
from abdoserve.export.phantom import build_study
from abdoserve.loadtests.resources import peak_rss_mib
from abdoserve_client import AbdoServeClient
from abdoserve_client.errors import AbdoServeError

TASK = "bone_density_ct"
LARGE_TASK = "esophageal_cancer_ct"  # up to 128 slices: the largest studies
TRIM_BYTES = 16 * 1024 * 1024  # below every grown region, above every idle one
# `serve`'s default shape: one fused model per task, as many instances as preprocessing
# has. The ensemble's composing models heal in test_gpu_entrypoint's pod.
FUSED = TASK
RELOADS = "abdoserve_supervisor_model_reloads_total"
WAIT_S = 120.0  # upper bound of every wait below, so a broken build fails instead of hanging
EXPECTED_STUBS = {FUSED: Tuning().preprocess_instances}


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def small_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from abdoserve.export.repository import build_repository

    out = tmp_path_factory.mktemp("one-task") / "model_repository"
    build_repository(out, (TASK, LARGE_TASK))
    return out


@pytest.fixture
def supervisor(small_repository: Path, tmp_path: Path) -> Iterator[Supervisor]:
    options = ServerOptions(
        repository=small_repository, ports=free_ports(), log_file=tmp_path / "triton.log"
    )
    supervision = SupervisorOptions(
        health_port=free_port(),
        trim_shm_bytes=TRIM_BYTES,
        guard=GuardLimits(max_body_bytes=257 * 1024 * 1024),  # traffic goes through nginx
    )
    with Supervisor(options, supervision) as running:
        yield running


def grpc_url(supervisor: Supervisor) -> str:
    """The public endpoint: the guard's when there is one."""
    return f"{supervisor.public_host}:{supervisor.public_ports.grpc}"


class Traffic:
    """Client threads sending one study in a loop, with the client's default retries."""

    def __init__(self, url: str, instances: tuple[bytes, ...], threads: int = 2) -> None:
        self.url = url
        self.instances = instances
        self.answers: list[np.ndarray] = []
        self.failures: list[AbdoServeError] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        with AbdoServeClient(self.url, timeout_s=60) as client:
            while not self._stop.is_set():
                try:
                    self.answers.append(client.bone_density_ct(self.instances).study_values)
                except AbdoServeError as error:
                    self.failures.append(error)

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        wait_until(lambda: len(self.answers) >= 4, "the first answers")
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


class HealthProbe:
    """Polls the supervisor's /health/ready and records every status it saw."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/health/ready"
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def status(self) -> int:
        try:
            with urllib.request.urlopen(self.url, timeout=5) as reply:
                return int(reply.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.statuses.append(self.status())

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def metric(supervisor: Supervisor, name: str, **labels: str) -> float:
    value = supervisor.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def live_stubs(supervisor: Supervisor) -> dict[str, int]:
    assert supervisor.server is not None and supervisor.server.process is not None
    counts: dict[str, int] = {}
    for stub in stubs.stubs_of(supervisor.server.process.pid).values():
        if not stub.dead and not stub.stopped and stub.model in EXPECTED_STUBS:
            counts[stub.model] = counts.get(stub.model, 0) + 1
    return counts


def a_watched_stub_of(supervisor: Supervisor, model: str) -> int | None:
    """A live stub of `model` that the supervisor watches, if any. After a reload (e.g. a
    memory trim under traffic) the old stubs are retired, whose exit it rightly ignores,
    and the new ones are watched only from its next check on."""
    assert supervisor.server is not None and supervisor.server.process is not None
    found = stubs.stubs_of(supervisor.server.process.pid).values()
    watched = set(supervisor.known)
    candidates = [stub.pid for stub in found if stub.model == model and stub.pid in watched]
    return candidates[0] if candidates else None


def signal_a_stub(supervisor: Supervisor, model: str, number: int) -> int:
    """Send `number` to a watched stub of `model` with the supervisor between checks, so
    that no reload retires it in between."""
    deadline = time.monotonic() + WAIT_S
    while True:
        with supervisor._lock:
            victim = a_watched_stub_of(supervisor, model)
            if victim is not None:
                os.kill(victim, number)
                return victim
        if time.monotonic() > deadline:
            raise AssertionError(f"no watched stub of {model}")
        time.sleep(0.05)


def assert_whole(supervisor: Supervisor, reference: np.ndarray) -> None:
    wait_until(lambda: live_stubs(supervisor) == EXPECTED_STUBS, "the stub table to settle")
    with AbdoServeClient(grpc_url(supervisor), timeout_s=60, retries=0) as client:
        for _ in range(6):  # every instance of every model answers again
            values = client.bone_density_ct(build_study(TASK, seed=5).instances).study_values
            np.testing.assert_allclose(values, reference, rtol=1e-6)


def test_a_killed_stub_is_reloaded_under_traffic_and_no_call_fails(
    supervisor: Supervisor,
) -> None:
    study = build_study(TASK, seed=5)
    server_pid = supervisor.server.process.pid  # type: ignore[union-attr]
    assert supervisor.supervision.health_port is not None
    with (
        HealthProbe(supervisor.supervision.health_port) as probe,
        Traffic(grpc_url(supervisor), study.instances) as traffic,
    ):
        reference = traffic.answers[0]
        signal_a_stub(supervisor, FUSED, signal.SIGKILL)
        wait_until(
            lambda: metric(supervisor, RELOADS, model=FUSED, reason="stub_failed") == 1,
            "the reload",
        )
        served_before = len(traffic.answers)
        wait_until(lambda: len(traffic.answers) >= served_before + 20, "answers after the reload")
        wait_until(lambda: probe.status() == 200, "ready again")
    assert traffic.failures == []
    for values in traffic.answers:
        np.testing.assert_allclose(values, reference, rtol=1e-6)
    assert 503 in probe.statuses, "health never turned red while the model was degraded"
    assert probe.statuses[0] == 200 and probe.statuses[-1] == 200
    assert (
        metric(supervisor, "abdoserve_supervisor_stub_failures_total", model=FUSED, kind="dead")
        == 1
    )
    assert supervisor.server.process.pid == server_pid  # type: ignore[union-attr]
    assert_whole(supervisor, reference)


def test_a_stopped_stub_is_killed_before_it_can_resume_and_crash_the_server(
    supervisor: Supervisor,
) -> None:
    study = build_study(TASK, seed=5)
    server_pid = supervisor.server.process.pid  # type: ignore[union-attr]
    with Traffic(grpc_url(supervisor), study.instances) as traffic:
        reference = traffic.answers[0]
        victim = signal_a_stub(supervisor, FUSED, signal.SIGSTOP)
        time.sleep(10)  # the stall the hostile test used; the supervisor acts long before
        with contextlib.suppress(ProcessLookupError):  # killed and reaped: cannot resume
            os.kill(victim, signal.SIGCONT)
        served_before = len(traffic.answers)
        wait_until(lambda: len(traffic.answers) >= served_before + 20, "answers after the stall")
    assert traffic.failures == []
    assert supervisor.server.process.poll() is None  # type: ignore[union-attr]
    assert supervisor.server.process.pid == server_pid  # type: ignore[union-attr]
    assert stubs.process_state(victim) in (None, "Z")
    kind = {"model": FUSED, "kind": "stopped"}
    assert metric(supervisor, "abdoserve_supervisor_stub_failures_total", **kind) == 1
    assert metric(supervisor, "abdoserve_supervisor_server_restarts_total") == 0
    assert_whole(supervisor, reference)


def test_a_killed_server_is_restarted_and_leaves_no_stub_or_region_behind(
    supervisor: Supervisor,
) -> None:
    study = build_study(TASK, seed=5)
    with AbdoServeClient(grpc_url(supervisor), timeout_s=60) as client:
        reference = client.bone_density_ct(study.instances).study_values
    server = supervisor.server
    assert server is not None and server.process is not None
    old_prefix, old_pid = supervisor.region_prefix, server.process.pid
    old_stubs = list(stubs.stubs_of(old_pid))
    assert old_stubs and stubs.stale_regions(old_prefix, server_shm(old_pid))
    os.kill(old_pid, signal.SIGKILL)
    wait_until(
        lambda: metric(supervisor, "abdoserve_supervisor_server_restarts_total") == 1,
        "the restart",
    )
    wait_until(supervisor.is_ready, "the restarted server")
    assert supervisor.server is not None and supervisor.server.process is not None
    assert supervisor.server.process.pid != old_pid
    # With the server and every stub gone, nothing holds its mount namespace: the private
    # tmpfs and its regions went with them; the host's /dev/shm never held one.
    wait_until(
        lambda: all(stubs.process_state(pid) is None for pid in old_stubs),
        "the orphaned stubs to exit",
    )
    assert stubs.stale_regions(old_prefix) == []
    assert supervisor.region_prefix != old_prefix
    assert_whole(supervisor, reference)


def test_a_frozen_server_is_killed_and_restarted_and_its_calls_end_at_once(
    supervisor: Supervisor,
) -> None:
    """SIGSTOP of tritonserver: before, every call waited for its deadline (or the
    guard's 300 s read timeout), and nothing restarted the server."""
    study = build_study(TASK, seed=9)
    with AbdoServeClient(grpc_url(supervisor), timeout_s=60) as client:
        reference = client.bone_density_ct(study.instances).value
    assert supervisor.server is not None and supervisor.server.process is not None
    frozen = supervisor.server.process.pid
    os.kill(frozen, signal.SIGSTOP)
    started = time.monotonic()
    with (
        AbdoServeClient(grpc_url(supervisor), timeout_s=60, retries=0) as client,
        pytest.raises(AbdoServeError) as caught,
    ):
        client.bone_density_ct(study.instances)
    ended_after = time.monotonic() - started
    assert caught.value.code == "UNAVAILABLE", caught.value
    assert ended_after < 30, f"the call waited {ended_after:.1f} s on a frozen server"
    assert metric(supervisor, "abdoserve_supervisor_server_freezes_total", kind="stopped") == 1
    wait_until(lambda: stubs.process_state(frozen) is None, "the frozen server to be gone")
    wait_until(supervisor.is_ready, "the restarted server")
    assert metric(supervisor, "abdoserve_supervisor_server_restarts_total") == 1
    with AbdoServeClient(grpc_url(supervisor), timeout_s=60) as client:
        assert client.bone_density_ct(study.instances).value == pytest.approx(reference)


def test_stop_is_graceful_with_a_dead_stub_and_leaves_nothing_behind(
    small_repository: Path, tmp_path: Path
) -> None:
    options = ServerOptions(
        repository=small_repository, ports=free_ports(), log_file=tmp_path / "triton.log"
    )
    supervisor = Supervisor(options, SupervisorOptions(health_port=None)).start()
    prefix = supervisor.region_prefix
    server_pid = supervisor.server.process.pid  # type: ignore[union-attr]
    victim = next(s.pid for s in stubs.stubs_of(server_pid).values() if s.model == FUSED)
    os.kill(victim, signal.SIGKILL)
    code = supervisor.stop()
    assert code == 0, "tritonserver did not exit by itself (SIGKILL after the timeout)"
    assert stubs.stale_regions(prefix) == []
    assert stubs.orphaned_stubs(prefix) == []


def footprint_mib(supervisor: Supervisor) -> dict[str, int]:
    """Private memory of tritonserver and of each model's stubs, and the server's /dev/shm."""
    assert supervisor.server is not None and supervisor.server.process is not None
    server_pid = supervisor.server.process.pid
    parts = {"tritonserver": anonymous_mib(server_pid)}
    for pid, stub in stubs.stubs_of(server_pid).items():
        if not stub.dead:
            parts[stub.model] = parts.get(stub.model, 0) + anonymous_mib(pid)
    shm = stubs.stale_regions(supervisor.region_prefix, server_shm(server_pid))
    parts["/dev/shm"] = sum(path.stat().st_size for path in shm) >> 20
    return parts


def settled(supervisor: Supervisor) -> bool:
    """Every model runs exactly its configured instances (replaced ones have exited)."""
    assert supervisor.server is not None and supervisor.server.process is not None
    counts: dict[str, int] = {}
    for stub in stubs.stubs_of(supervisor.server.process.pid).values():
        if not stub.dead:
            counts[stub.model] = counts.get(stub.model, 0) + 1
    wanted = {
        model: count
        for task in (TASK, LARGE_TASK)
        for model, count in ((task, Tuning().preprocess_instances), (f"{task}_explain", 1))
    }
    return counts == wanted


def anonymous_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) // 1024
    return 0


def test_memory_comes_back_after_a_study_near_the_limit(supervisor: Supervisor) -> None:
    small = build_study(LARGE_TASK, seed=1, slices=8)
    halves = [build_study(LARGE_TASK, seed=seed, slices=64, interval_mm=5.0) for seed in (1, 2)]
    large = halves[0].instances + halves[1].instances  # 128 slices, 64 MiB
    with AbdoServeClient(grpc_url(supervisor), timeout_s=300) as client:
        for _ in range(2):
            client.esophageal_cancer_ct(small.instances)
        before = footprint_mib(supervisor)
        client.esophageal_cancer_ct(large)
        during = footprint_mib(supervisor)
        wait_until(
            lambda: footprint_mib(supervisor)["/dev/shm"] <= before["/dev/shm"] * 1.1 + 2,
            "the supervisor to trim the grown shared memory",
        )
        wait_until(lambda: settled(supervisor), "the replaced stubs to exit")
        client.esophageal_cancer_ct(small.instances)
    after = footprint_mib(supervisor)
    assert during["/dev/shm"] > before["/dev/shm"] + 32, "the large study grew nothing?"
    assert sum(after.values()) <= 1.1 * sum(before.values()), (before, during, after)
    reloads = metric(supervisor, RELOADS, model=LARGE_TASK, reason="memory")
    assert reloads >= 1


def test_a_trim_under_a_queue_loses_no_call(small_repository: Path, tmp_path: Path) -> None:
    """A memory trim retires instances with calls still queued: they drain, unkilled
    (31 studies of 32 MiB queued 24 s; killed at the 10 s drain, 13 of them failed)."""
    options = ServerOptions(
        repository=small_repository, ports=free_ports(), log_file=tmp_path / "triton.log"
    )
    # A drain after a stub failure this short would kill the queue, were it used here.
    supervision = SupervisorOptions(health_port=None, trim_shm_bytes=TRIM_BYTES, drain_s=0.5)
    study = build_study(LARGE_TASK, seed=2, slices=64, interval_mm=5.0)  # 32 MiB
    failures: list[str] = []

    def send(url: str) -> None:
        with AbdoServeClient(url, timeout_s=120, retries=0) as client:
            try:
                client.esophageal_cancer_ct(study.instances)
            except AbdoServeError as error:
                failures.append(f"{error.code}: {error.message}")

    with Supervisor(options, supervision) as running:
        url = f"{running.public_host}:{running.public_ports.grpc}"
        threads = [threading.Thread(target=send, args=(url,)) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        reloads = metric(running, RELOADS, model=LARGE_TASK, reason="memory")
    assert reloads >= 1, "no trim happened under the queue: the test proves nothing"
    assert failures == [], failures[:3]


GUARD = GuardLimits(8 * 1024 * 1024, max_inflight_bytes=16 * 1024 * 1024, body_timeout_s=2)


@pytest.fixture
def guarded(small_repository: Path, tmp_path: Path) -> Iterator[Supervisor]:
    """A server behind a guard with small limits, so that they are easy to reach."""
    options = ServerOptions(
        repository=small_repository, ports=free_ports(), log_file=tmp_path / "triton.log"
    )
    with Supervisor(options, SupervisorOptions(health_port=None, guard=GUARD)) as running:
        yield running


def test_the_guard_refuses_an_oversized_request_before_triton_holds_it(
    guarded: Supervisor,
) -> None:
    assert guarded.server is not None and guarded.server.process is not None
    server_pid = guarded.server.process.pid
    study = build_study(LARGE_TASK, seed=1, slices=64, interval_mm=5.0)  # 32 MiB
    peak_before = peak_rss_mib(server_pid)
    with AbdoServeClient(grpc_url(guarded), timeout_s=60) as client:
        with pytest.raises(AbdoServeError) as caught:
            client.esophageal_cancer_ct(study.instances)
        assert caught.value.code == "RESOURCE_EXHAUSTED"
        assert "exceeds the limit of 8388608 bytes" in caught.value.message
        assert np.isfinite(client.esophageal_cancer_ct(build_study(LARGE_TASK).instances).value)
    assert peak_rss_mib(server_pid) - peak_before < 24, "Triton held the oversized request"


def test_the_guard_refuses_requests_past_its_budget_at_once(guarded: Supervisor) -> None:
    study = build_study(TASK, seed=5)
    outcomes: list[str] = []
    clients = [AbdoServeClient(grpc_url(guarded), timeout_s=60, retries=0) for _ in range(8)]
    for client in clients:
        client.task_info(TASK)  # fetched once, outside the burst
    start = threading.Barrier(len(clients))

    def send(client: AbdoServeClient) -> None:
        start.wait()
        try:
            client.bone_density_ct(study.instances)
            outcomes.append("answered")
        except AbdoServeError as error:
            outcomes.append(f"{error.code}: {error.message}")

    threads = [threading.Thread(target=send, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for client in clients:
        client.close()
    refused = [item for item in outcomes if item != "answered"]
    assert refused and len(refused) < len(outcomes), outcomes
    for item in refused:
        assert item.startswith("RESOURCE_EXHAUSTED: "), item
        assert "server busy: 2 requests in flight (the guard's budget)" in item


def test_the_guard_drops_a_request_whose_body_stalls(guarded: Supervisor) -> None:
    with socket.create_connection((guarded.public_host, guarded.public_ports.http)) as sock:
        sock.settimeout(WAIT_S)
        head = (
            "POST /v2/models/bone_density_ct/infer HTTP/1.1\r\nHost: x\r\n"
            "Content-Length: 1000000\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        sock.sendall(head.encode() + b"\0" * 1000)  # then nothing: a stalled sender
        reply = b""
        while chunk := sock.recv(4096):  # until nginx closes the connection
            reply += chunk
    # nginx answers 408 (or just closes, once it has started to stream to Triton): the
    # connection ends instead of holding its buffers for as long as the sender likes.
    assert not reply.startswith(b"HTTP/1.1 200"), reply[:80]
