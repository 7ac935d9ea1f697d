"""A server interrupted while it loads is stopped by its own `start`.

`with EmbeddedServer(...)` never reaches `__exit__` when `__enter__` raises, so a Ctrl-C
(or a SIGTERM, which every command turns into one) while `tritonserver` loaded its
models left that server running. Here the "server" is a shell script that ignores its
arguments and sleeps: it never answers readiness.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from abdoserve.deploy.embedded import EmbeddedServer, ServerError, ServerOptions, free_ports
from abdoserve.deploy.isolation import ShmIsolation


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def stalled_server(tmp_path: Path) -> EmbeddedServer:
    stalled = tmp_path / "tritonserver"
    stalled.write_text("#!/bin/sh\nexec sleep 600\n")
    stalled.chmod(0o755)
    (tmp_path / "repository").mkdir()
    options = ServerOptions(
        repository=tmp_path / "repository",
        ports=free_ports(),
        log_file=tmp_path / "server.log",
        startup_timeout_s=2.0,
        binary=stalled,
        shm=ShmIsolation(private=False),
    )
    return EmbeddedServer(options)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, ServerError], ids=["ctrl-c", "timeout"])
def test_a_server_that_never_came_ready_is_stopped(
    tmp_path: Path, stop: type[BaseException]
) -> None:
    server = stalled_server(tmp_path)
    started: list[int] = []
    real_wait = server.wait_ready

    def remember_then_wait() -> None:
        assert server.process is not None
        started.append(server.process.pid)
        if stop is KeyboardInterrupt:
            raise KeyboardInterrupt  # as the signal would, while it loads
        real_wait()

    server.wait_ready = remember_then_wait  # type: ignore[method-assign]
    with pytest.raises(stop), server:
        pass
    assert started and not alive(started[0])
    assert server.process is None
    assert os.path.exists(server.options.log_file)
