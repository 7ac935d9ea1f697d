"""Child processes that cannot outlive the command that started them.

Every external program AbdoServe runs (tritonserver and its Python stubs, nginx,
Prometheus, Orthanc, the PyTriton peer, replicas) is started here:

- in a process group of its own, so that a terminal's Ctrl-C reaches only us (we stop
  the child in order) and one `killpg` reaches the child and everything it forked
  (tritonserver's stubs, nginx's workers);
- with PR_SET_PDEATHSIG, so that the kernel signals the child when we die, even by
  SIGKILL. The setting survives `exec` (not a set-user-ID one), so it reaches
  tritonserver through `unshare --mount` and `sh -c 'exec "$@"'`, which exec in
  place. It is tied to the *thread* that forked: a child started from a thread that
  later ends (the supervisor's watcher) would be signalled then. So every child is
  forked by one daemon thread that lives as long as the process.

`stop` is the one "signal, wait, SIGKILL" of the project: the first signal to the child,
a grace period, then SIGKILL to its whole group, and a last SIGKILL sweep of the group
for anything the leader left behind. `interrupt_on_sigterm` makes a command treat SIGTERM
as Ctrl-C, so its context managers run (servers stopped, shared memory unlinked).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from types import FrameType
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_S = 0.05


class ProcessError(RuntimeError):
    """A child could not be started."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _die_with(parent: int, death_signal: int) -> Callable[[], None]:
    """The preexec_fn: ask for `death_signal` when the forking thread dies; if the parent
    already died between fork and here, we would never get it: take it now."""
    prctl = _libc().prctl  # resolved before fork: the child only calls it

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), death_signal)

    return preexec


_Job = tuple[Callable[[], "subprocess.Popen[Any]"], "Future[subprocess.Popen[Any]]"]


class _Spawner:
    """The one daemon thread that forks every child (see the module's note): it lives
    until the process exits, so no child's death signal fires early."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _serve(self) -> None:
        while True:
            make, result = self._jobs.get()
            try:
                result.set_result(make())
            except BaseException as error:  # handed to the caller's thread
                result.set_exception(error)

    def run(self, make: Callable[[], subprocess.Popen[Any]]) -> subprocess.Popen[Any]:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="spawner", daemon=True)
                self._thread.start()
        result: Future[subprocess.Popen[Any]] = Future()
        self._jobs.put((make, result))
        return result.result()


_SPAWNER = _Spawner()


def start(
    command: Sequence[str],
    *,
    death_signal: int = signal.SIGKILL,
    **popen: Any,
) -> subprocess.Popen[Any]:
    """`command` in a new process group (session), signalled with `death_signal` if
    this process dies. Other keyword arguments go to `subprocess.Popen`."""
    if "preexec_fn" in popen or "start_new_session" in popen:
        raise ValueError("start() sets the process group and the death signal itself")
    preexec = _die_with(os.getpid(), death_signal)

    def make() -> subprocess.Popen[Any]:
        # preexec only makes system calls (prctl, getppid): no lock that another thread
        # could hold at fork time.
        return subprocess.Popen(
            list(command),
            start_new_session=True,
            preexec_fn=preexec,  # noqa: PLW1509
            **popen,
        )

    return _SPAWNER.run(make)


def _signal_group(pgid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, number)


def _exited(process: subprocess.Popen[Any]) -> bool:
    """Whether the leader exited, without reaping it: while it is a zombie its pid
    (the group's id) cannot be reused, so a group signal still reaches only ours."""
    if process.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _wait_exit(process: subprocess.Popen[Any], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not _exited(process):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True


def stop(
    process: subprocess.Popen[Any] | None,
    *,
    first: int = signal.SIGTERM,
    grace_s: float = 30.0,
    linger_s: float = 5.0,
) -> int | None:
    """Stop `process` and its group: `first` to the leader, up to `grace_s` for it to
    exit, then SIGKILL to the group; whatever of the group outlived the leader is killed
    too. The leader's exit code (None if it was never started)."""
    if process is None:
        return None
    if not _exited(process):
        # The leader alone: it stops its own children in order (tritonserver its stubs,
        # the nginx master its workers); the group gets SIGKILL only past the grace.
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, first)
        if not _wait_exit(process, grace_s):
            _signal_group(process.pid, signal.SIGKILL)
    # Left-overs (a stub, an nginx worker) get `linger_s` to finish (a multiprocessing
    # resource tracker unlinks its shared memory once its parent is gone), then SIGKILL.
    deadline = time.monotonic() + linger_s
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    _signal_group(process.pid, signal.SIGKILL)
    return process.wait()


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` is still running (zombies do not count)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def sweep(process: subprocess.Popen[Any]) -> None:
    """SIGKILL what is left of an exited leader's group (its orphans)."""
    _signal_group(process.pid, signal.SIGKILL)


def interrupt_on_sigterm() -> None:
    """From now on SIGTERM and SIGINT raise KeyboardInterrupt in the main thread, as
    Ctrl-C does, so that `finally` blocks and context managers stop children and unlink
    regions. A
    command that waits for signals itself (`abdoserve serve`) installs its own handler
    after this one."""

    def interrupt(_number: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    # A command started in the background of a non-interactive shell (`cmd &` in a
    # script, CI) inherits SIGINT ignored, and Python then keeps it ignored: a
    # `kill -INT` did nothing and the bench ran on (seen in CI). Ctrl-C's path, always.
    signal.signal(signal.SIGINT, signal.default_int_handler)


# How often a main thread blocked waiting for a signal wakes to run a pending handler.
SIGNAL_POLL_S = 0.2


class Signals:
    """SIGTERM and SIGINT caught from the moment this is made: one that arrives while a
    server starts must not end the process before it can stop that server. `wait`
    blocks until one comes and says which."""

    def __init__(self) -> None:
        self.received = threading.Event()
        self.number = signal.SIGTERM
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, number: int, _frame: FrameType | None) -> None:
        self.number = signal.Signals(number)
        self.received.set()

    def wait(self) -> signal.Signals:
        # Timed waits: the kernel may hand the signal to any thread, and Python runs the
        # handler only when the main thread wakes; an untimed wait then never returned
        # (a SIGTERM'd replica that never drained, seen in CI).
        while not self.received.wait(timeout=SIGNAL_POLL_S):
            pass
        return self.number


def wait_for_signal() -> str:
    """Block until SIGINT or SIGTERM arrives; say which. A supervisor keeps its server
    running meanwhile (it restarts one that exits)."""
    return Signals().wait().name


def run(
    command: Sequence[str], *, timeout_s: float, **popen: Any
) -> subprocess.CompletedProcess[Any]:
    """`subprocess.run(..., capture_output=True)` for a short-lived tool, started as
    `start` does; on a timeout or an interrupt its whole group is killed."""
    process = start(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except BaseException:
        stop(process, first=signal.SIGKILL, grace_s=0, linger_s=0)
        raise
    return subprocess.CompletedProcess(list(command), process.returncode, stdout, stderr)
