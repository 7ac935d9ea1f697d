"""Requests waiting for a person's input: their instances kept until the input is given.

A request that lacks clinical inputs no header holds (a liver mass's ROI, HBV/HCV) is
"needs input". Its instances would go with the study; here they are copied first, so
the worklist can show them and the request can be completed later:

    waiting/<StudyUID>/<key>/<SOPUID>.dcm    the request's instances
    waiting/<StudyUID>/<key>/request.json    the routed request and the study's times
    waiting/<StudyUID>/<key>/given.json      the inputs a person gave, and who (once)

`given.json` is written once, atomically, before anything is sent: a second submit
finds it and changes nothing, and a gateway that stops halfway finds it at its next
start and completes the request then. The folder goes once the outcome is recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abdoserve.deploy.gateway.routing import RoutedRequest
from abdoserve.deploy.gateway.spool import ClaimedStudy, check_uid

REQUEST_FILE = "request.json"
GIVEN_FILE = "given.json"


@dataclass(frozen=True)
class Given:
    """Inputs a person gave for a waiting request: the values, who, and when."""

    inputs: Mapping[str, Any]
    user: str
    at: float  # seconds since the epoch


@dataclass(frozen=True)
class WaitingRequest:
    """One needs-input request kept on disk."""

    study_uid: str
    key: str
    folder: Path
    request: RoutedRequest
    last_arrival: float
    claimed_at: float

    def files(self) -> list[Path]:
        """The instances, in the request's order."""
        return [self.folder / f"{sop}.dcm" for sop in self.request.instances]

    def study(self) -> ClaimedStudy:
        """The request's study as the processor sees a claimed one (its times kept)."""
        return ClaimedStudy(self.study_uid, self.folder, self.last_arrival, self.claimed_at)

    def given(self) -> Given | None:
        content = _read(self.folder / GIVEN_FILE)
        if content is None:
            return None
        return Given(dict(content["inputs"]), str(content["user"]), float(content["at"]))


class WaitingRequests:
    """The `waiting/` folder of a spool."""

    def __init__(self, spool_root: Path) -> None:
        self.root = spool_root / "waiting"
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def keep(
        self, study: ClaimedStudy, key: str, request: RoutedRequest, files: Sequence[Path]
    ) -> Path:
        """Copy a needs-input request's instances and the request itself (idempotent)."""
        folder = self.root / study.study_uid / key
        folder.mkdir(parents=True, exist_ok=True)
        for file in files:
            shutil.copy2(file, folder / file.name)
        record = {
            "request": _request_json(request),
            "last_arrival": study.last_arrival,
            "claimed_at": study.claimed_at,
        }
        _write_once(folder / REQUEST_FILE, record, replace=True)
        return folder

    def get(self, study_uid: str, key: str) -> WaitingRequest | None:
        """The waiting request, or None (never kept, completed, or not a UID and key)."""
        try:
            check_uid(study_uid, "StudyInstanceUID")
        except ValueError:
            return None
        if not (key.isalnum() and key.islower()):
            return None
        return _load(self.root / study_uid / key)

    def all(self) -> Iterator[WaitingRequest]:
        for folder in sorted(self.root.glob("*/*")):
            found = _load(folder)
            if found is not None:
                yield found

    def give(self, waiting: WaitingRequest, inputs: Mapping[str, Any], user: str) -> bool:
        """Record the given inputs once; False when they had been given already."""
        content = {"inputs": dict(inputs), "user": user, "at": time.time()}
        return _write_once(waiting.folder / GIVEN_FILE, content, replace=False)

    def release(self, waiting: WaitingRequest) -> None:
        """The request has its outcome: its instances go."""
        shutil.rmtree(waiting.folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # the study's folder, once it holds no request
            waiting.folder.parent.rmdir()


def _request_json(request: RoutedRequest) -> dict[str, Any]:
    return {
        "rule": request.rule,
        "task": request.task,
        "series_uids": list(request.series_uids),
        "instances": list(request.instances),
        "clinical": request.clinical,
        "missing": list(request.missing),
    }


def _load(folder: Path) -> WaitingRequest | None:
    record = _read(folder / REQUEST_FILE)
    if record is None:
        return None
    stored = record["request"]
    request = RoutedRequest(
        rule=str(stored["rule"]),
        task=str(stored["task"]),
        series_uids=tuple(stored["series_uids"]),
        instances=tuple(stored["instances"]),
        clinical=dict(stored["clinical"]),
        missing=tuple(stored["missing"]),
    )
    return WaitingRequest(
        study_uid=folder.parent.name,
        key=folder.name,
        folder=folder,
        request=request,
        last_arrival=float(record["last_arrival"]),
        claimed_at=float(record["claimed_at"]),
    )


def _read(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _write_once(path: Path, content: dict[str, Any], *, replace: bool) -> bool:
    """Write JSON durably; without `replace`, only where no such file exists (atomic:
    of two racing writers exactly one wins)."""
    staged = path.with_name(f".{path.name}.{os.getpid()}.{time.time_ns()}.part")
    with open(staged, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        if replace:
            os.replace(staged, path)
        else:
            os.link(staged, path)  # fails where the file exists: the first submit wins
    except FileExistsError:
        return False
    finally:
        staged.unlink(missing_ok=True)
    descriptor = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return True
