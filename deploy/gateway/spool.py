"""The gateway's spool: every instance is on disk before its C-STORE is acknowledged.

Layout under the spool folder (UIDs are checked to be UIDs before they name a path):

    tmp/                              files being written (fsynced, then renamed into place)
    incoming/<StudyUID>/<SOPUID>.dcm  a study still arriving, or quiet and not yet claimed
    claimed/<StudyUID>.<n>/           a study a worker took; resumed after a restart
    results/<StudyUID>/<key>.*        each routed request's outcome (JSON copy, SR, refusal)
    failed/<StudyUID>/<key>/          the instances and reason of a refused request
    outbox/<destination>/<SOPUID>.*   reports waiting for a destination to take them

A study's last arrival is its `incoming` folder's modification time (a rename into the
folder updates it), so the quiet period survives a restart. A worker claims a quiet
study by renaming its folder into `claimed/`; an instance arriving later starts a new
`incoming` folder of the same study, processed on its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A DICOM UID: dot-separated decimal components, at most 64 characters (PS3.5 9.1).
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
MAX_UID_LENGTH = 64
COPY_CHUNK = 4 * 1024 * 1024


class SpoolError(ValueError):
    """An instance that cannot be spooled; the message names the attribute, never its value."""


def check_uid(value: object, keyword: str) -> str:
    """`value` as a UID safe to use as a file name, or SpoolError naming `keyword`."""
    text = str(value) if value is not None else ""
    if not text or len(text) > MAX_UID_LENGTH or not UID_PATTERN.match(text):
        raise SpoolError(f"{keyword} is missing or not a valid UID")
    return text


@dataclass(frozen=True)
class ClaimedStudy:
    """A quiet study a worker took: its folder and when its last instance arrived."""

    study_uid: str
    folder: Path
    last_arrival: float  # seconds since the epoch
    claimed_at: float = 0.0  # when a worker took it (the first claim, across restarts)

    def instance_files(self) -> list[Path]:
        return sorted(self.folder.glob("*.dcm"))


class Spool:
    """Durable storage of instances, claims, outcomes and outgoing reports."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.incoming = root / "incoming"
        self.claimed = root / "claimed"
        self.results = root / "results"
        self.failed = root / "failed"
        self.outbox = root / "outbox"
        # Patient data: only the gateway's user may list or read it (files are 0600).
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        root.chmod(0o700)
        for folder in (self.tmp, self.incoming, self.claimed, self.results, self.failed):
            folder.mkdir(parents=True, exist_ok=True)
        self.outbox.mkdir(parents=True, exist_ok=True)
        # Placing an instance and claiming its study must not interleave (same process).
        self._lock = threading.Lock()

    # Arrival -------------------------------------------------------------------------

    def store_instance(self, study_uid: str, sop_uid: str, data: bytes) -> Path:
        """Write one instance durably into its study's incoming folder; return its path."""
        study = check_uid(study_uid, "StudyInstanceUID")
        sop = check_uid(sop_uid, "SOPInstanceUID")
        return self._place(study, sop, self._write_durably(data))

    def store_file(self, study_uid: str, sop_uid: str, received: Path) -> Path:
        """`store_instance` for an instance received into a file (copied, then fsynced)."""
        study = check_uid(study_uid, "StudyInstanceUID")
        sop = check_uid(sop_uid, "SOPInstanceUID")
        descriptor, name = _temporary(self.tmp)
        try:
            with open(received, "rb") as source, os.fdopen(descriptor, "wb") as target:
                shutil.copyfileobj(source, target, COPY_CHUNK)
                target.flush()
                os.fsync(target.fileno())
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return self._place(study, sop, Path(name))

    def _place(self, study: str, sop: str, staged: Path) -> Path:
        with self._lock:
            folder = self.incoming / study
            folder.mkdir(exist_ok=True)
            final = folder / f"{sop}.dcm"
            os.replace(staged, final)
            _fsync_folder(folder)
        return final

    def _write_durably(self, data: bytes) -> Path:
        descriptor, name = _temporary(self.tmp)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name)

    def free_bytes(self) -> int:
        """Free space on the spool's filesystem, for the unprivileged user."""
        return shutil.disk_usage(self.root).free

    # Claims --------------------------------------------------------------------------

    def quiet_studies(self, quiet_s: float, now: float | None = None) -> list[str]:
        """Incoming studies whose last instance arrived at least `quiet_s` ago, oldest first."""
        moment = time.time() if now is None else now
        ready = []
        for folder in self.incoming.iterdir():
            arrival = _mtime(folder)
            if arrival is not None and moment - arrival >= quiet_s:
                ready.append((arrival, folder.name))
        return [name for _, name in sorted(ready)]

    def claim(self, study_uid: str) -> ClaimedStudy | None:
        """Take an incoming study for processing (None if it vanished or is empty)."""
        with self._lock:
            source = self.incoming / study_uid
            arrival = _mtime(source)
            if arrival is None:
                return None
            if not any(source.glob("*.dcm")):
                shutil.rmtree(source, ignore_errors=True)
                return None
            target = self.claimed / f"{study_uid}.{time.time_ns()}"
            os.replace(source, target)
            _fsync_folder(self.claimed)
        claimed_at = time.time()
        meta = {"last_arrival": arrival, "claimed_at": claimed_at}
        _write_json(target.parent / f"{target.name}.json", meta)
        return ClaimedStudy(study_uid, target, arrival, claimed_at)

    def claimed_studies(self) -> list[ClaimedStudy]:
        """Studies claimed before a restart and not finished: resumed first."""
        studies = []
        for folder in sorted(self.claimed.iterdir()):
            if folder.is_dir():
                meta = _read_json(folder.parent / f"{folder.name}.json")
                arrival = float(meta.get("last_arrival", _mtime(folder) or time.time()))
                claimed_at = float(meta.get("claimed_at", arrival))
                studies.append(ClaimedStudy(_study_of(folder), folder, arrival, claimed_at))
        return studies

    def release(self, study: ClaimedStudy, *, keep_folder: Path | None = None) -> None:
        """A finished study: its instances go (or move to `keep_folder`)."""
        if keep_folder is not None:
            keep_folder.parent.mkdir(parents=True, exist_ok=True)
            os.replace(study.folder, keep_folder)
        else:
            shutil.rmtree(study.folder, ignore_errors=True)
        (study.folder.parent / f"{study.folder.name}.json").unlink(missing_ok=True)

    # Outcomes ------------------------------------------------------------------------

    def outcome(self, study_uid: str, key: str) -> dict[str, Any] | None:
        """The recorded outcome of routed request `key` of a study, if any."""
        path = self.results / study_uid / f"{key}.outcome.json"
        return _read_json(path) if path.exists() else None

    def record_outcome(self, study_uid: str, key: str, outcome: dict[str, Any]) -> Path:
        folder = self.results / study_uid
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{key}.outcome.json"
        _write_json(path, outcome)
        return path

    def write_result(self, study_uid: str, name: str, data: bytes) -> Path:
        """A result file (the SR, its JSON copy, an explanation map) kept under
        results/<study>/; `name` may hold a subfolder (`<key>.explain/0.png`)."""
        path = self.results / study_uid / name
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._write_durably(data), path)
        _fsync_folder(path.parent)
        return path

    def keep_failed(
        self, study: ClaimedStudy, key: str, files: list[Path], reason: dict[str, Any]
    ) -> Path:
        """Copy a refused request's instances and its reason into failed/<study>/<key>/."""
        folder = self.failed / study.study_uid / key
        folder.mkdir(parents=True, exist_ok=True)
        for file in files:
            shutil.copy2(file, folder / file.name)
        _write_json(folder / "reason.json", reason)
        return folder

    # Outbox --------------------------------------------------------------------------

    def enqueue(self, destination: str, sop_uid: str, data: bytes, meta: dict[str, Any]) -> Path:
        """Queue a report for `destination`; the same report queued twice is one file."""
        folder = self.outbox / destination
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / f"{sop_uid}.json", meta)
        path = folder / f"{sop_uid}.dcm"
        os.replace(self._write_durably(data), path)
        _fsync_folder(folder)
        return path

    def pending(self, destination: str) -> list[Path]:
        """Reports waiting for `destination`, oldest first."""
        folder = self.outbox / destination
        if not folder.is_dir():
            return []
        # a file the sender delivers between the listing and its stat is no longer waiting
        timed = [(_mtime(path), path) for path in folder.glob("*.dcm")]
        return [path for mtime, path in sorted(item for item in timed if item[0] is not None)]

    def delivered(self, report: Path) -> None:
        report.unlink(missing_ok=True)
        report.with_suffix(".json").unlink(missing_ok=True)

    def set_aside(self, destination: str, report: Path, reason: dict[str, Any]) -> Path:
        """A report the destination refused for good: kept in failed/reports/<destination>/."""
        folder = self.failed / "reports" / destination
        folder.mkdir(parents=True, exist_ok=True)
        meta = {**self.report_meta(report), **reason}
        _write_json(folder / f"{report.stem}.json", meta)
        os.replace(report, folder / report.name)
        report.with_suffix(".json").unlink(missing_ok=True)
        return folder

    def report_meta(self, report: Path) -> dict[str, Any]:
        meta = report.with_suffix(".json")
        return _read_json(meta) if meta.exists() else {}

    # Sizes for the metrics -----------------------------------------------------------

    def waiting_studies(self) -> Iterator[float]:
        """The last-arrival time of every study not yet finished (incoming and claimed)."""
        for folder in self.incoming.iterdir():
            arrival = _mtime(folder)
            if arrival is not None:
                yield arrival
        for study in self.claimed_studies():
            yield study.last_arrival


def _study_of(folder: Path) -> str:
    """The Study Instance UID of a claimed folder `<StudyUID>.<ns>`."""
    return folder.name.rsplit(".", maxsplit=1)[0]


def _temporary(folder: Path) -> tuple[int, str]:
    return tempfile.mkstemp(dir=folder, suffix=".part")


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` survive a power cut, not only a process crash."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_json(path: Path, content: dict[str, Any]) -> None:
    staged = path.with_name(f".{path.name}.part")
    with open(staged, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staged, path)
    _fsync_folder(path.parent)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
