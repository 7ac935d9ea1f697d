"""A short soak against the session's server: zero failures, no growth after warm-up.

The 30-minute run and its figures are in docs/reliability.md (same command, longer,
RSS within 5 %). Eighty seconds cannot tell a leak from a high-water mark that the
warm-up did not reach (a batch size first seen late), so RSS and /dev/shm get 25 %
here; file descriptors and threads must not grow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abdoserve.deploy.cli import main as abdoserve_main
from abdoserve.deploy.embedded import EmbeddedServer


def test_a_short_soak_fails_nothing_and_grows_nothing(
    server: EmbeddedServer, grpc_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert server.process is not None
    code = abdoserve_main(
        [
            "soak",
            "--host", grpc_url,
            "--server-pid", str(server.process.pid),
            "--run-time", "80s",
            "--rate", "8",
            "--users", "4",
            "--pool-size", "1",
            "--warmup-s", "35",
            "--interval-s", "2",
            "--rss-tolerance", "0.25",
            "--shm-tolerance", "0.25",
            "--out", str(tmp_path),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "soak.json").read_text())
    assert result["failed_requests"] == 0, printed
    assert len(result["samples"]) >= 10
    assert {check["what"] for check in result["checks"]} >= {
        "RSS tritonserver (MiB)",
        "/dev/shm (MiB)",
        "file descriptors",
        "threads",
    }
    assert code == 0 and result["passed"], printed
