"""The Python-backend stub processes of one `tritonserver`, read from /proc.

Triton 2.51 never restarts a stub: a stub that dies stays a zombie and every
request routed to its model instance fails with "Stub process ... is not
healthy", while the server still reports ready. A stub that is stopped (SIGSTOP,
a debugger) is worse: Triton gives up on its request after its 1 s heartbeat and
frees the request's shared memory; when the stub resumes it writes into that
memory and the server dies (SIGSEGV, or SIGABRT on a boost lock_exception). The
supervisor reads this table to find both kinds early.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from abdoserve.deploy.isolation import server_shm

STUB_BINARY = "triton_python_backend_stub"
PROC = Path("/proc")
SHM = Path("/dev/shm")
DEAD_STATES = frozenset({"Z", "X"})  # zombie, dead
STOPPED_STATES = frozenset({"T", "t"})  # stopped by a signal or a tracer


@dataclass(frozen=True)
class Stub:
    """One stub process: the model (and instance) it serves, and its scheduler state."""

    pid: int
    model: str
    instance: str
    state: str
    region: str = ""  # its shared-memory region's name in /dev/shm
    version: str = ""  # the model version folder it runs

    @property
    def dead(self) -> bool:
        return self.state in DEAD_STATES

    @property
    def stopped(self) -> bool:
        return self.state in STOPPED_STATES


def process_state(pid: int) -> str | None:
    """The one-letter state of `pid` ('R', 'S', 'T', 'Z', ...), or None if it is gone."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def parent_of(pid: int) -> int | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def read_stub(pid: int) -> Stub | None:
    """The stub at `pid`, from its command line: `stub <model.py> <region> ... <instance> ...`.

    A zombie has no command line any more: the caller remembers stubs it saw alive.
    """
    try:
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if len(argv) < 9 or not argv[0].endswith(STUB_BINARY.encode()):
        return None
    model_file = Path(argv[1].decode(errors="replace"))
    state = process_state(pid)
    if state is None:
        return None
    # <repository>/<model>/<version>/model.py
    model = model_file.parent.parent.name
    region = argv[2].decode(errors="replace")
    instance = argv[8].decode(errors="replace")
    return Stub(pid, model, instance, state, region, model_file.parent.name)


def stubs_of(server_pid: int) -> dict[int, Stub]:
    """Every stub whose parent is `server_pid`, by pid."""
    found: dict[int, Stub] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if parent_of(pid) != server_pid:
            continue
        stub = read_stub(pid)
        if stub is not None:
            found[pid] = stub
    return found


def replaced(
    pid: int, stub: Stub, current: Mapping[int, Stub], found_at: Mapping[int, int]
) -> bool:
    """Whether the exited stub `pid` was retired by a reload rather than crashed: a stub
    of the same model, version and instance, first seen after it (`found_at`: the order
    stubs were first seen in), runs. Triton retires an old instance only once its new
    one is ready; a sibling instance started later has another instance name."""
    found = found_at.get(pid, 0)
    return any(
        (other.model, other.version, other.instance) == (stub.model, stub.version, stub.instance)
        and found_at.get(other_pid, 0) > found
        and process_state(other_pid) not in (None, *DEAD_STATES)
        for other_pid, other in current.items()
        if other_pid != pid
    )


def region_bytes(stub: Stub) -> int:
    """The current size of the stub's shared-memory region (it only ever grows), read
    through the stub's own view of /dev/shm (the server's private tmpfs)."""
    try:
        return (server_shm(stub.pid) / stub.region).stat().st_size if stub.region else 0
    except OSError:
        return 0


def kill(pid: int) -> bool:
    """SIGKILL `pid`; False if it was already gone."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def orphaned_stubs(region_prefix: str) -> list[int]:
    """Stubs left behind by a dead server: their shared-memory region carries its prefix."""
    pids = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            is_stub = len(argv) > 2 and argv[0].endswith(STUB_BINARY.encode())
            if is_stub and argv[2].decode(errors="replace").startswith(region_prefix):
                pids.append(int(entry.name))
    return pids


def stale_regions(region_prefix: str, shm: Path = SHM) -> list[Path]:
    """Shared-memory files named with `region_prefix` (the server's own, by construction)."""
    return sorted(path for path in shm.glob(f"{region_prefix}*") if path.is_file())


def remove_regions(region_prefix: str, shm: Path = SHM) -> int:
    removed = 0
    for path in stale_regions(region_prefix, shm):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed
