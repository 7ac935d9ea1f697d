"""The workers' directories a SIGKILLed launcher leaves are swept by the next guard."""

from __future__ import annotations

import os
from pathlib import Path

from abdoserve.deploy.guard import OWNER_FILE, WORKERS_PREFIX, sweep_abandoned_worker_directories

GONE_PID = 2**22 + 12345  # above the kernel's pid_max default: never a live process


def made_by(parent: Path, name: str, pid: int | None) -> Path:
    folder = parent / f"{WORKERS_PREFIX}{name}"
    (folder / "body").mkdir(parents=True)
    if pid is not None:
        (folder / OWNER_FILE).write_text(f"{pid}\n")
    return folder


def test_only_the_directories_of_gone_launchers_are_removed(tmp_path: Path) -> None:
    abandoned = made_by(tmp_path, "abandoned", GONE_PID)
    running = made_by(tmp_path, "running", os.getpid())
    unowned = made_by(tmp_path, "being-made", None)  # no owner file yet: left alone
    stranger = tmp_path / "somebody-else"
    stranger.mkdir()
    assert sweep_abandoned_worker_directories(tmp_path) == [abandoned]
    assert not abandoned.exists()
    assert running.is_dir() and unowned.is_dir() and stranger.is_dir()
