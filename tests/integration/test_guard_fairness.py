"""Slow and greedy peers against the guard (issue 19, item 1), on a real server.

Before: 31 HTTP/2 streams that sent their headers and 1 KB, then a byte every 20 s, held
the guard's whole in-flight budget for as long as they trickled; every other caller got
RESOURCE_EXHAUSTED and `/v2/health/ready` answered 503. Here the same peers come from
other loopback addresses (127.0.0.2, ...) than the honest client (127.0.0.1).
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from abdoserve.deploy import stubs
from abdoserve.deploy.embedded import ServerOptions, free_ports
from abdoserve.deploy.guard import WORKER_USER, GuardLimits
from abdoserve.deploy.supervisor import Supervisor, SupervisorOptions
from abdoserve.export.phantom import build_study
from abdoserve.loadtests.slow_streams import SlowStreamOptions, SlowStreams
from abdoserve_client import AbdoServeClient
from abdoserve_client.errors import AbdoServeError

TASK = "bone_density_ct"
KSERVE_EXAMPLE = Path(__file__).resolve().parents[2] / "clients" / "examples" / "kserve_http.py"
MIB = 1024 * 1024
REQUEST_TIMEOUT_S = 6
WAIT_S = 120.0
DEADLINE_EXCEEDED = 4
RESOURCE_EXHAUSTED = 8


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from abdoserve.export.repository import build_repository

    out = tmp_path_factory.mktemp("fairness") / "model_repository"
    build_repository(out, (TASK,))
    return out


def start(repository: Path, folder: Path, limits: GuardLimits) -> Supervisor:
    options = ServerOptions(repository=repository, ports=free_ports(), log_file=folder / "t.log")
    return Supervisor(options, SupervisorOptions(health_port=None, guard=limits)).start()


@pytest.fixture(scope="module")
def guarded(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    """The default budget (31 studies of 257 MiB), a short request timeout."""
    limits = GuardLimits(257 * MIB, request_timeout_s=REQUEST_TIMEOUT_S)
    assert (limits.max_inflight, limits.max_inflight_per_client) == (31, 15)
    supervisor = start(repository, tmp_path_factory.mktemp("guarded"), limits)
    yield supervisor
    supervisor.stop()


@pytest.fixture(scope="module")
def small_budget(
    repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Supervisor]:
    """A budget of 8 requests, 4 per client address: two addresses fill it."""
    limits = GuardLimits(8 * MIB, max_inflight_bytes=64 * MIB, request_timeout_s=REQUEST_TIMEOUT_S)
    assert (limits.max_inflight, limits.max_inflight_per_client) == (8, 4)
    supervisor = start(repository, tmp_path_factory.mktemp("small"), limits)
    yield supervisor
    supervisor.stop()


def grpc_url(supervisor: Supervisor) -> str:
    return f"{supervisor.public_host}:{supervisor.public_ports.grpc}"


def slow(supervisor: Supervisor, source: str, count: int) -> SlowStreams:
    options = SlowStreamOptions(
        supervisor.public_host, supervisor.public_ports.grpc, count, source, interval_s=1.0
    )
    return SlowStreams(options)


def answered_value(supervisor: Supervisor) -> float:
    study = build_study(TASK, seed=3)
    with AbdoServeClient(grpc_url(supervisor), timeout_s=60, retries=0) as client:
        return float(client.bone_density_ct(study.instances).value)


def refusal(supervisor: Supervisor) -> str | None:
    try:
        answered_value(supervisor)
    except AbdoServeError as error:
        return f"{error.code}: {error.message}"
    return None


def http_answer(supervisor: Supervisor) -> float:
    """The study's answer over KServe v2 HTTP, the way clients/examples/kserve_http.py
    sends it: a body far over nginx's 16 KiB in-memory buffer."""
    spec = importlib.util.spec_from_file_location("kserve_http_example", KSERVE_EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    url = f"http://{supervisor.public_host}:{supervisor.public_ports.http}"
    study = build_study(TASK, seed=3)
    assert sum(len(item) for item in study.instances) > 64 * 1024
    outputs = example.infer(url, TASK, study.instances, timeout=60)
    return float(example.answer_json(outputs)["result"]["BMD"])


def http_ready(supervisor: Supervisor) -> int:
    url = f"http://{supervisor.public_host}:{supervisor.public_ports.http}/v2/health/ready"
    with urllib.request.urlopen(url, timeout=10) as reply:
        return int(reply.status)


def grpc_ready(supervisor: Supervisor) -> bool:
    client = triton_grpc.InferenceServerClient(grpc_url(supervisor))
    try:
        return bool(client.is_server_ready(client_timeout=10))
    finally:
        client.close()


def test_one_address_holds_only_its_share_and_others_keep_being_answered(
    guarded: Supervisor,
) -> None:
    reference = answered_value(guarded)
    with slow(guarded, "127.0.0.2", 31) as streams:
        share = 15  # half of 31
        wait_until(lambda: len(streams.ends) >= 31 - share, "the streams past the share refused")
        refused = [end for end in streams.ends.values() if end.grpc_status == RESOURCE_EXHAUSTED]
        assert len(refused) == 31 - share, streams.ends
        assert streams.open_streams() == share
        for _ in range(3):  # while the 7 trickle, the honest client is answered
            assert answered_value(guarded) == pytest.approx(reference)
        assert http_ready(guarded) == 200 and grpc_ready(guarded)


def test_a_trickling_call_is_ended_at_the_request_timeout(guarded: Supervisor) -> None:
    with slow(guarded, "127.0.0.3", 4) as streams:
        wait_until(lambda: len(streams.ends) == 4, "the guard's deadline to end the calls")
    for end in streams.ends.values():
        assert end.grpc_status == DEADLINE_EXCEEDED, streams.ends
        # ended at the guard's deadline, not later by the trickle's own pace
        assert REQUEST_TIMEOUT_S - 0.5 <= end.seconds < REQUEST_TIMEOUT_S + 5, end


def test_many_addresses_fill_the_budget_yet_health_answers_and_the_slots_come_back(
    small_budget: Supervisor,
) -> None:
    with ExitStack() as stack:
        sources = ["127.0.0.2", "127.0.0.3"]
        streams = [stack.enter_context(slow(small_budget, source, 4)) for source in sources]
        wait_until(lambda: all(s.open_streams() == 4 for s in streams), "8 slow streams open")
        busy = refusal(small_budget)
        assert busy is not None and busy.startswith("RESOURCE_EXHAUSTED: "), busy
        assert "server busy: 8 requests in flight" in busy, busy
        # health has a budget of its own: a full inference budget is not a dead server
        assert http_ready(small_budget) == 200 and grpc_ready(small_budget)
        # the guard's deadline ends the trickles; the budget is whole again
        wait_until(lambda: all(s.open_streams() == 0 for s in streams), "the slots back")
        assert refusal(small_budget) is None


def test_slow_http_bodies_never_hold_the_in_flight_budget(small_budget: Supervisor) -> None:
    host, port = small_budget.public_host, small_budget.public_ports.http
    head = (
        f"POST /v2/models/{TASK}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    with ExitStack() as stack:
        for host_byte in range(2, 7):  # 10 slow bodies from 5 addresses, 2 each
            for _ in range(2):
                sock = socket.create_connection(
                    (host, port), source_address=(f"127.0.0.{host_byte}", 0)
                )
                stack.callback(sock.close)
                sock.sendall(head + b"\0" * 1000)
        time.sleep(1.0)  # every body is being read by nginx, none is whole
        # 10 bodies in progress > the budget of 8, and still every call is answered,
        # over gRPC and over HTTP (a whole body, buffered by nginx, then passed on)
        assert np.isfinite(answered_value(small_budget))
        assert http_ready(small_budget) == 200
        assert http_answer(small_budget) == pytest.approx(answered_value(small_budget), rel=1e-5)


@pytest.mark.skipif(os.geteuid() != 0, reason="nginx's workers change user only under root")
def test_the_workers_run_as_their_own_user_whose_memory_nobody_else_reads(
    guarded: Supervisor,
) -> None:
    """Before, the workers ran as `nobody`: any process of that user could read their
    memory, where the guard's key to Triton was found 9 times."""
    assert guarded.guard is not None and guarded.guard.process is not None
    master = guarded.guard.process.pid
    workers = [pid for pid in all_pids() if stubs.parent_of(pid) == master]
    assert workers, "no nginx worker under the guard's master"
    own = pwd.getpwnam(WORKER_USER).pw_uid
    for pid in workers:
        status = Path(f"/proc/{pid}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        assert {int(uid) for uid in uids} == {own}, uids
        if shutil.which("runuser"):
            as_nobody = subprocess.run(
                ["runuser", "-u", "nobody", "--", "cat", f"/proc/{pid}/environ"],
                capture_output=True,
                check=False,
            )
            assert as_nobody.returncode != 0 and not as_nobody.stdout


def all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
