"""The worklist's audit log: one JSON line per action, appended and fsynced, never rewritten.

A line says when, who, what, and which study and request by UID and key, and which
inputs by name: never a patient attribute and never an input's value (those are kept
in the request's outcome, in the spool).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# A fixed vocabulary: what a reader of the log can search for.
ACTIONS = frozenset(
    {
        "login",
        "login_refused",
        "logout",
        "view_study",
        "give_inputs",
        "give_inputs_refused",
        "csrf_refused",
    }
)


class AuditLog:
    """Appends to `path` (O_APPEND, 0600): a line is whole or absent, and none is rewritten."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def record(
        self,
        action: str,
        user: str | None,
        *,
        study_uid: str | None = None,
        key: str | None = None,
        inputs: Sequence[str] = (),
        detail: str | None = None,
    ) -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown audit action {action!r}")
        entry: dict[str, Any] = {"time": round(time.time(), 3), "action": action, "user": user}
        if study_uid is not None:
            entry["study_uid"] = study_uid
        if key is not None:
            entry["key"] = key
        if inputs:
            entry["inputs"] = sorted(inputs)
        if detail is not None:
            entry["detail"] = detail
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        with self._lock:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(descriptor, line)
                os.fsync(descriptor)
            finally:
                os.close(descriptor)

    def entries(self) -> list[dict[str, Any]]:
        """Every line, oldest first (for tests and a reader's tools)."""
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
