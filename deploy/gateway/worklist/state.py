"""Where every study stands, read from the spool: the worklist's rows.

The spool is the state (nothing is cached here), so the page shows what a restarted
gateway would resume:

| state       | where in the spool                                                  |
|-------------|---------------------------------------------------------------------|
| received    | incoming/<study>/ (still arriving, or quiet and not yet claimed)    |
| in work     | claimed/<study>.<n>/; waiting/<study>/<key>/ with inputs given      |
| needs input | results/<study>/<key>.outcome.json, status needs_input              |
| answered    | the same, status answered                                           |
| failed      | the same, status failed                                             |

Reasons are built from UIDs, task names, input names, counts and the server's messages
(which name attributes, never values): no patient attribute is read here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abdoserve.deploy.gateway.waiting import WaitingRequests

STATES = ("received", "in_work", "needs_input", "answered", "failed")
TITLES = {
    "received": "Received",
    "in_work": "In work",
    "needs_input": "Needs input",
    "answered": "Answered",
    "failed": "Failed",
}


@dataclass(frozen=True)
class Entry:
    """One row: a study (received, in work) or one routed request of it."""

    state: str
    study_uid: str
    key: str | None
    task: str | None
    reason: str
    when: float  # seconds since the epoch: the last change the spool shows
    can_give: bool = False  # needs input, its images kept, and no input given yet


def list_studies(spool_root: Path, limit: int = 500) -> dict[str, list[Entry]]:
    """Every state's rows, newest first, at most `limit` per state."""
    waiting = WaitingRequests(spool_root)
    rows: dict[str, list[Entry]] = {state: [] for state in STATES}
    for entry in _received(spool_root / "incoming"):
        rows["received"].append(entry)
    for entry in _claimed(spool_root / "claimed"):
        rows["in_work"].append(entry)
    given = set()
    for request in waiting.all():
        who = request.given()
        if who is not None:
            given.add((request.study_uid, request.key))
            reason = f"inputs given by {who.user}; being answered"
            rows["in_work"].append(
                Entry(
                    "in_work", request.study_uid, request.key, request.request.task, reason, who.at
                )
            )
    kept = {(request.study_uid, request.key) for request in waiting.all()}
    for entry in _outcomes(spool_root / "results", kept, given):
        rows[entry.state].append(entry)
    return {state: sorted(items, key=lambda e: -e.when)[:limit] for state, items in rows.items()}


def _received(folder: Path) -> Iterator[Entry]:
    for study in _folders(folder):
        count = sum(1 for _ in study.glob("*.dcm"))
        when = study.stat().st_mtime
        yield Entry("received", study.name, None, None, f"{count} instances received", when)


def _claimed(folder: Path) -> Iterator[Entry]:
    for study in _folders(folder):
        uid = study.name.rsplit(".", maxsplit=1)[0]
        count = sum(1 for _ in study.glob("*.dcm"))
        reason = f"{count} instances; being routed and answered"
        yield Entry("in_work", uid, None, None, reason, study.stat().st_mtime)


def _outcomes(
    folder: Path, kept: set[tuple[str, str]], given: set[tuple[str, str]]
) -> Iterator[Entry]:
    for path in folder.glob("*/*.outcome.json"):
        outcome = _read(path)
        status = outcome.get("status")
        study_uid, key = path.parent.name, path.name.removesuffix(".outcome.json")
        if status not in ("needs_input", "answered", "failed") or (study_uid, key) in given:
            continue
        yield Entry(
            state=str(status),
            study_uid=study_uid,
            key=key,
            task=outcome.get("task"),
            reason=reason_of(outcome),
            when=path.stat().st_mtime,
            can_give=status == "needs_input" and (study_uid, key) in kept,
        )


def reason_of(outcome: dict[str, Any]) -> str:
    """One line on why a request is where it is."""
    status = outcome.get("status")
    if status == "needs_input":
        problem = outcome.get("problem")
        return str(problem) if problem else "missing " + ", ".join(outcome.get("missing", []))
    if status == "failed":
        return f"{outcome.get('code')}: {outcome.get('message')}"
    copy = outcome.get("result", {})
    result = copy.get("result", {})
    model = copy.get("model", {})
    summary = result.get("label") or result.get("stage") or ""
    given = " (inputs given on the worklist)" if "given" in outcome else ""
    return f"{summary} by {model.get('name')} version {model.get('version')}{given}".strip()


def _folders(folder: Path) -> list[Path]:
    return [path for path in folder.iterdir() if path.is_dir()] if folder.is_dir() else []


def _read(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
