"""`abdoserve bench serving` stopped by SIGTERM (kill, systemd, a pod) or SIGINT (Ctrl-C)
leaves nothing behind: no tritonserver, Python stub, nginx or PyTriton process it started,
and no file in /dev/shm (its 600 MB shared-memory region among them).

Before abdoserve.deploy.processes, SIGTERM killed the bench at once: its tritonserver
with every stub, and the PyTriton peer with its own server, ran on as orphans.

Every process the bench starts inherits a marker in its environment, so processes of
other users of this machine are never counted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from abdoserve.deploy.isolation import HOST_SHM
from abdoserve.deploy.stubs import parent_of, process_state

MARK = "ABDOSERVE_TEST_MARK"
PROGRAMS = ("tritonserver", "triton_python_backend_stub", "nginx", "pytriton")
ABDOSERVE = Path(sys.executable).parent / "abdoserve"


def marked(mark: str) -> dict[int, str]:
    """Living processes with `mark` in their environment: pid -> command line."""
    found = {}
    needle = f"{MARK}={mark}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or process_state(int(entry.name)) in (None, "Z", "X"):
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # it exited meanwhile
        found[int(entry.name)] = command
    return found


def started_programs(mark: str) -> dict[int, str]:
    return {pid: cmd for pid, cmd in marked(mark).items() if any(p in cmd for p in PROGRAMS)}


def wait_for(condition: Callable[[], bool], what: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 900  # builds a one-task repository first
    while not condition():
        assert process.poll() is None, f"the bench exited ({process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.5)


def peer_server_up(mark: str) -> bool:
    """The PyTriton peer runs, and so does the tritonserver PyTriton started under it."""
    running = marked(mark)
    peers = {pid for pid, command in running.items() if "pytriton_peer" in command}
    return any(
        "bin/tritonserver" in command and parent_of(pid) in peers
        for pid, command in running.items()
    )


@pytest.mark.parametrize(
    ("number", "moment"),
    [(signal.SIGTERM, "the PyTriton peer's server"), (signal.SIGINT, "the bench's server")],
    ids=["sigterm-peer-running", "sigint-server-running"],
)
def test_a_signalled_bench_leaves_no_process_and_no_shared_memory(
    tmp_path: Path, number: signal.Signals, moment: str
) -> None:
    mark = uuid.uuid4().hex
    shm_before = set(os.listdir(HOST_SHM))
    output = tmp_path / "bench.out"
    command = [str(ABDOSERVE), "bench", "serving", "--tasks", "bone_density_ct"]
    command += ["--requests", "400", "--concurrency", "1", "--images", "none", "--pool", "1"]
    command += ["--forms", "pytriton,served,shared_memory"]
    command += ["--repository", str(tmp_path / "repository"), "--log-file", str(tmp_path / "t.log")]
    with output.open("wb") as out:
        bench = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=os.environ | {MARK: mark}
        )
    try:
        if number == signal.SIGTERM:
            wait_for(lambda: peer_server_up(mark), moment, bench)
        else:
            wait_for(lambda: b"started tritonserver" in output.read_bytes(), moment, bench)
        started = started_programs(mark)
        assert any("bin/tritonserver" in cmd for cmd in started.values()), started
        assert any("triton_python_backend_stub" in cmd for cmd in started.values()), started
        assert set(os.listdir(HOST_SHM)) - shm_before, "the bench's shared region is missing"
        bench.send_signal(number)
        assert bench.wait(timeout=300) == 130, output.read_text(errors="replace")[-2000:]
    finally:
        if bench.poll() is None:
            bench.kill()
    left = started_programs(mark)
    assert left == {}, f"left running after {number.name}: {left}"
    leaked = set(os.listdir(HOST_SHM)) - shm_before
    assert not leaked, f"left in {HOST_SHM}: {sorted(leaked)}"


def test_a_killed_bench_leaves_no_process(tmp_path: Path) -> None:
    """SIGKILL gives the bench no chance to stop anything: its children's death signals
    must, down to PyTriton's own tritonserver, a grandchild. (It inherited the peer's
    blocked SIGTERM and SIGINT, and left only when PyTriton escalated, about 45 s here;
    a bench started with SIGINT ignored left it running for good.) Only the bench's own
    shared-memory region may stay: no process is left to unlink it."""
    mark = uuid.uuid4().hex
    shm_before = set(os.listdir(HOST_SHM))
    command = [str(ABDOSERVE), "bench", "serving", "--tasks", "bone_density_ct"]
    command += ["--requests", "400", "--concurrency", "1", "--images", "none", "--pool", "1"]
    command += ["--forms", "pytriton,served"]
    command += ["--repository", str(tmp_path / "repository"), "--log-file", str(tmp_path / "t.log")]
    with (tmp_path / "bench.out").open("wb") as out:
        bench = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=os.environ | {MARK: mark}
        )
    try:
        wait_for(lambda: peer_server_up(mark), "the PyTriton peer's server", bench)
    finally:
        bench.kill()
        bench.wait(timeout=60)
    deadline = time.monotonic() + 60
    while started_programs(mark) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert started_programs(mark) == {}
    leaked = set(os.listdir(HOST_SHM)) - shm_before
    own_region = {f"abdoserve-bench-{bench.pid}"}
    for name in leaked & own_region:
        (Path(HOST_SHM) / name).unlink()
    assert not leaked - own_region, f"left in {HOST_SHM}: {sorted(leaked - own_region)}"
