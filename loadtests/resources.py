"""What a running server holds, read from /proc: memory, file descriptors, threads, /dev/shm.

A soak compares these after warm-up with their values at the end: a leak shows as
growth. Stubs are grouped by model (a supervisor may replace one stub by another),
and tritonserver stands alone.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from abdoserve.deploy import stubs

SERVER = "tritonserver"
SHM = Path("/dev/shm")


@dataclass(frozen=True)
class Sample:
    """One look at the server, `at_s` seconds into the run."""

    at_s: float
    rss_mib: dict[str, float] = field(default_factory=dict)  # tritonserver, then per model
    fds: int = 0
    threads: int = 0
    shm_mib: float = 0.0


def _status(pid: int) -> dict[str, str]:
    values: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            values[key] = value.strip()
    return values


def _kib(value: str) -> float:
    return float(value.split(maxsplit=1)[0]) if value else 0.0


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def sample(server_pid: int, at_s: float) -> Sample:
    """tritonserver and its live stubs, and the Python backend's regions in /dev/shm."""
    live = [stub for stub in stubs.stubs_of(server_pid).values() if not stub.dead]
    processes = {server_pid: SERVER} | {stub.pid: stub.model for stub in live}
    rss: dict[str, float] = {}
    fds = threads = 0
    for pid, group in processes.items():
        status = _status(pid)
        rss[group] = rss.get(group, 0.0) + _kib(status.get("VmRSS", "")) / 1024
        threads += int(status.get("Threads", "0") or 0)
        fds += _fds(pid)
    shm = sum(stubs.region_bytes(stub) for stub in live)
    return Sample(at_s, rss, fds, threads, shm / 2**20)


def peak_rss_mib(pid: int) -> float:
    """The process's lifetime peak RSS (VmHWM): a single request's cost shows as its rise."""
    return _kib(_status(pid).get("VmHWM", "")) / 1024
