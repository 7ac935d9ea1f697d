"""Children are started and stopped in one place, `abdoserve.deploy.processes`.

Its `start` puts a child in its own process group with a parent-death signal, and its
`stop` is the project's one "signal, grace, SIGKILL of the group"; a second copy of
either would be where an orphan comes from. Short tools that finish on their own
(`nginx -t`, the `unshare` probe, locust, trtexec) may use `subprocess.run`, which kills
its child on any exception, Ctrl-C included. The supervisor's SIGKILL of one stopped
Python stub (`deploy/stubs.py`) is its job, not a process it started.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("preprocessing", "export", "model_repository", "deploy", "loadtests", "clients")
HELPER = ROOT / "deploy" / "processes.py"
# Signals that do not stop a child (nginx's SIGHUP reload, a replica's drain, which
# `processes.stop` then waits out) are not counted.
STARTS_OR_STOPS = re.compile(r"subprocess\.Popen\(|\.terminate\(\)|\.kill\(\)|os\.killpg\(")


def product_sources() -> list[Path]:
    return [
        path
        for folder in PRODUCT
        for path in sorted((ROOT / folder).rglob("*.py"))
        if "build" not in path.relative_to(ROOT).parts
    ]


def test_only_the_helper_starts_or_stops_a_child() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in product_sources()
        if path != HELPER
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if STARTS_OR_STOPS.search(line)
    ]
    assert found == []


def test_the_pattern_finds_what_it_forbids() -> None:
    for line in ("p = subprocess.Popen(cmd)", "p.terminate()", "p.kill()", "os.killpg(g, 9)"):
        assert STARTS_OR_STOPS.search(line)
    assert STARTS_OR_STOPS.search(HELPER.read_text())
