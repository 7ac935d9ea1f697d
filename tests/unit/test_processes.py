"""abdoserve.deploy.processes: children stop with their group, die with their parent, and
a command takes SIGTERM as Ctrl-C. Children are small Python programs (this interpreter)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from abdoserve.deploy import processes
from abdoserve.deploy.stubs import process_state

PYTHON = sys.executable
IGNORES_SIGTERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(600)"
)
# A child that forks a grandchild (same group), prints its pid and sleeps.
HAS_GRANDCHILD = (
    "import subprocess, sys, time; "
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
    "print(g.pid, flush=True); time.sleep(600)"
)


def alive(pid: int) -> bool:
    """Running or sleeping: a zombie (dead, not yet reaped by its new parent) is not."""
    return process_state(pid) not in (None, "Z", "X")


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def first_line(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    return process.stdout.readline().strip()


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    child = processes.start([PYTHON, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE, text=True)
    assert first_line(child) == "ready"
    assert processes.stop(child, grace_s=0.5) == -signal.SIGKILL
    assert not alive(child.pid)


def test_a_grandchild_dies_with_the_group() -> None:
    child = processes.start([PYTHON, "-c", HAS_GRANDCHILD], stdout=subprocess.PIPE, text=True)
    grandchild = int(first_line(child))
    assert alive(grandchild)
    # The child exits on SIGTERM (default action) and leaves the grandchild behind:
    # the sweep of its group kills it.
    assert processes.stop(child, grace_s=10, linger_s=0.5) == -signal.SIGTERM
    wait_for(lambda: not alive(grandchild), "the grandchild outlived its group")


def test_a_child_dies_with_its_parent_even_on_sigkill() -> None:
    script = (
        "import sys, time; from abdoserve.deploy import processes; "
        f"c = processes.start([sys.executable, '-c', {IGNORES_SIGTERM!r}]); "
        "print(c.pid, flush=True); time.sleep(600)"
    )
    parent = subprocess.Popen([PYTHON, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(first_line(parent))
    assert alive(child)
    parent.kill()
    parent.wait()
    wait_for(lambda: not alive(child), "the child outlived its SIGKILLed parent")


def test_a_child_started_from_a_thread_outlives_that_thread() -> None:
    """The death signal follows the forking thread: the spawner thread keeps it ours."""
    started: list[subprocess.Popen[str]] = []
    thread = threading.Thread(
        target=lambda: started.append(
            processes.start([PYTHON, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE, text=True)
        )
    )
    thread.start()
    thread.join()
    child = started[0]
    assert first_line(child) == "ready"
    time.sleep(0.5)  # a death signal on the thread's exit would have landed by now
    assert alive(child.pid)
    processes.stop(child, first=signal.SIGKILL, grace_s=0)


def test_sigterm_takes_the_ctrl_c_path(tmp_path: Path) -> None:
    marker = tmp_path / "cleaned"
    script = (
        "import time; from abdoserve.deploy.processes import interrupt_on_sigterm; "
        "interrupt_on_sigterm()\n"
        # 'ready' inside the try: a SIGTERM right after it must land in the handler.
        "try:\n    print('ready', flush=True)\n    time.sleep(600)\nexcept KeyboardInterrupt:\n"
        f"    open({str(marker)!r}, 'w').write('interrupted')"
    )
    command = processes.start([PYTHON, "-c", script], stdout=subprocess.PIPE, text=True)
    assert first_line(command) == "ready"
    command.send_signal(signal.SIGTERM)
    assert command.wait(timeout=30) == 0
    assert marker.read_text() == "interrupted"


def test_run_returns_what_the_tool_printed() -> None:
    done = processes.run([PYTHON, "-c", "print('out')"], timeout_s=30, text=True)
    assert (done.returncode, done.stdout) == (0, "out\n")


def test_a_signal_the_kernel_hands_to_another_thread_still_ends_the_wait() -> None:
    """The kernel may deliver a process's SIGTERM to any thread; Python runs the handler
    only in the main thread. An untimed wait slept on until a second signal came (a
    replica that never drained, in CI)."""
    script = (
        "import signal, threading, time\n"
        "from abdoserve.deploy.processes import Signals\n"
        "signals = Signals()\n"
        "def elsewhere():\n"
        "    time.sleep(0.5)  # the main thread is in wait() by then\n"
        "    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)\n"
        "threading.Thread(target=elsewhere).start()\n"
        "print(signals.wait().name, flush=True)\n"
    )
    command = processes.start([PYTHON, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        # The bound detects a hang; the answer comes within a poll of the signal.
        stdout, _ = command.communicate(timeout=60)
    finally:
        processes.stop(command, first=signal.SIGKILL, grace_s=0)
    assert (command.returncode, stdout) == (0, "SIGTERM\n")
