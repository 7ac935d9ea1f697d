"""A tritonserver that stops answering its model-repository API is restarted: the
supervisor kills it when a reload times out (the next check starts a new one)."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from abdoserve.deploy.embedded import ServerOptions
from abdoserve.deploy.model_control import ModelControl, ModelControlTimeout
from abdoserve.deploy.supervisor import Supervisor, SupervisorOptions


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A port that accepts connections and never answers (as a wedged Triton)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    listener.close()


def test_a_call_without_an_answer_is_a_timeout(silent_server: str) -> None:
    with pytest.raises(ModelControlTimeout, match="no answer in"):
        ModelControl(silent_server, "key", timeout_s=0.3).reload("bone_density_ct_preprocess")


def test_a_reload_that_times_out_kills_the_wedged_server(silent_server: str) -> None:
    supervisor = Supervisor(ServerOptions(Path("/unused")), SupervisorOptions(health_port=None))
    wedged = subprocess.Popen(["sleep", "60"])
    try:
        supervisor.server = SimpleNamespace(process=wedged)  # type: ignore[assignment]
        supervisor.control = ModelControl(silent_server, "key", timeout_s=0.3)
        with pytest.raises(ModelControlTimeout):
            supervisor._reload("bone_density_ct_preprocess", "stub_failed")
        assert wedged.wait(timeout=10) == -9  # SIGKILL: the next check restarts it
    finally:
        wedged.kill()
        wedged.wait()
