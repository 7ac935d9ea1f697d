"""`bench hostile --freeze`: a tritonserver frozen by SIGSTOP, as a failing machine would.

The supervisor must see it within seconds, kill it and start a new one; a call already
on its way must end at once (UNAVAILABLE) instead of at its deadline. The case measures
how long that call took to end, how long until a call was answered again, and whether
the frozen process is gone. It restarts the server: opt-in only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass

from abdoserve.deploy import stubs
from abdoserve.export.phantom import PhantomStudy
from abdoserve.loadtests.bench.hostile_peers import PeerRow
from abdoserve_client import AbdoServeClient
from abdoserve_client.errors import AbdoServeError

CALL_DEADLINE_S = 60.0  # the stalled call's own deadline: ending near it is a failure


@dataclass(frozen=True)
class FreezeResult:
    ended_s: float  # the call sent to the frozen server, until it ended
    ended_with: str  # its gRPC code, or "answered"
    answered_again_s: float | None  # from the SIGSTOP until a call was answered
    killed: bool  # the frozen process is gone
    task: str

    def row(self) -> PeerRow:
        back = "never" if self.answered_again_s is None else f"{self.answered_again_s:.1f} s"
        fate = "killed" if self.killed else "NOT killed"
        return PeerRow(
            case="a frozen tritonserver (SIGSTOP)",
            sent=f"SIGSTOP, then one {self.task} call (deadline {CALL_DEADLINE_S:.0f} s)",
            outcome=f"the call ended {self.ended_with}; the frozen server {fate}",
            time=f"call ended in {self.ended_s:.2f} s; answered again after {back}",
            rss_rise_mib=0.0,
            answered=0 if self.answered_again_s is None else 1,
            attempted=1,
            honest=f"{self.task} call after the restart",
        )


def one_call(url: str, study: PhantomStudy, task: str) -> str:
    """'answered', or the error's gRPC code; one attempt, the deadline above."""
    with AbdoServeClient(url, timeout_s=CALL_DEADLINE_S, retries=0) as client:
        try:
            client.infer(task, study.instances, study.clinical)
        except AbdoServeError as error:
            return error.code
    return "answered"


def answered_again(url: str, study: PhantomStudy, task: str, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if one_call(url, study, task) == "answered":
            return True
        time.sleep(0.5)
    return False


def frozen_server(
    url: str, server_pid: int, study: PhantomStudy, task: str, wait_s: float
) -> FreezeResult:
    os.kill(server_pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        ended_with = one_call(url, study, task)
        ended_s = time.monotonic() - frozen_at
        back = answered_again(url, study, task, wait_s)
        answered_again_s = time.monotonic() - frozen_at if back else None
    finally:
        killed = stubs.process_state(server_pid) is None
        with contextlib.suppress(ProcessLookupError):  # nothing healed it: let it go on
            os.kill(server_pid, signal.SIGCONT)
    return FreezeResult(ended_s, ended_with, answered_again_s, killed, task)
