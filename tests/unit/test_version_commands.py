"""The model commands' transitions, listing and admin key, without a server
(abdoserve.deploy.versions, version_cli, operator_key)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from abdoserve.deploy.operator_key import (
    OperatorKeyError,
    forget_operator_key,
    keep_operator_key,
    operator_key_path,
    read_operator_key,
)
from abdoserve.deploy.version_cli import listing
from abdoserve.deploy.versions import (
    TaskVersions,
    VersionError,
    canary,
    promote,
    rollback,
    shadow,
)
from abdoserve.serving.routing import Routing

START = Routing(production=1)


def test_shadow_then_canary_then_promote_then_rollback() -> None:
    shadowed = shadow(START, 2, 10.0)
    assert (shadowed.candidate, shadowed.mode, shadowed.percent) == (2, "shadow", 10.0)
    canaried = canary(shadowed, 2, 25.0)
    assert (canaried.mode, canaried.percent, canaried.generation) == ("canary", 25.0, 2)
    promoted = promote(canaried, 2, now=100.0, window_s=60.0)
    assert (promoted.production, promoted.candidate, promoted.previous) == (2, None, 1)
    assert promoted.previous_until == 160.0 and promoted.versions(now=100.0) == (1, 2)
    back = rollback(promoted, now=159.0)
    assert (back.production, back.previous, back.generation) == (1, None, 4)
    assert back.reason == "rolled back to version 1"


def test_rollback_ends_an_experiment_before_it_undoes_a_promote() -> None:
    promoted = promote(START, 2, now=0.0, window_s=60.0)
    trial = canary(promoted, 3, 5.0)
    ended = rollback(trial, now=1.0)
    assert (ended.production, ended.candidate, ended.previous) == (2, None, 1)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda: canary(START, 1, 5.0), "version 1 is the one that serves"),
        (lambda: shadow(canary(START, 2, 5.0), 3, 5.0), "version 2 is already in canary"),
        (lambda: promote(START, 1, 0.0, 60.0), "version 1 already serves"),
        (lambda: rollback(START, 0.0), "nothing to roll back: no candidate"),
        (
            lambda: rollback(promote(START, 2, 0.0, 60.0), 61.0),
            "version 1's rollback window has closed",
        ),
    ],
)
def test_changes_that_make_no_sense_are_refused(change: object, match: str) -> None:
    with pytest.raises(VersionError, match=match):
        change()  # type: ignore[operator]


def test_the_listing_names_each_versions_state_and_card() -> None:
    routing = canary(promote(START, 2, now=0.0, window_s=3600.0), 3, 25.0)
    routing = replace(routing, acceptance=((3, "passed"),))
    state = TaskVersions(
        "bone_density_ct", routing, {1: "READY", 2: "READY", 3: "READY"}, {3: "3f9c0a1b2d4e"}
    )
    lines = listing(state, now=10.0)
    assert lines[0] == "bone_density_ct"
    assert lines[1].split() == ["1", "previous", "READY", "card", "-", "validation", "-"]
    assert lines[2].split() == ["2", "serving", "READY", "card", "-", "validation", "-"]
    assert lines[3].split() == [
        "3",
        "canary",
        "25",
        "%",
        "READY",
        "card",
        "3f9c0a1b2d4e",
        "validation",
        "passed",
    ]
    assert "canary 25 %" in lines[4]


def test_promote_needs_a_passed_validation_or_a_forced_reason() -> None:
    from abdoserve.deploy.versions import check_accepted

    routing = replace(START, acceptance=((2, "passed"), (3, "failed")))
    state = TaskVersions("bone_density_ct", routing, {}, {})
    check_accepted(state, 2, forced="")
    with pytest.raises(VersionError, match="version 3 failed its validation"):
        check_accepted(state, 3, forced="")
    with pytest.raises(VersionError, match="version 4 was never validated"):
        check_accepted(state, 4, forced="")
    check_accepted(state, 4, forced="the vendor's own study")
    promoted = promote(START, 4, now=0.0, window_s=60.0, forced="the vendor's own study")
    assert promoted.reason == "promoted, replacing version 1; forced: the vendor's own study"


def test_the_operator_key_is_private_and_found_by_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    path = keep_operator_key(8001, "s3cret")
    assert path == operator_key_path(8001) == tmp_path / ".abdoserve" / "admin-key-8001"
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert read_operator_key(None, None, "127.0.0.1:8001") == "s3cret"
    assert read_operator_key(None, None, "localhost:8001") == "s3cret"
    assert read_operator_key(None, "from-env", "127.0.0.1:8001") == "from-env"
    with pytest.raises(OperatorKeyError, match=r"no admin key for 10\.0\.0\.5:8001"):
        read_operator_key(None, None, "10.0.0.5:8001")  # another host's serve
    with pytest.raises(OperatorKeyError, match=r"no admin key for 127\.0\.0\.1:9001"):
        read_operator_key(None, None, "127.0.0.1:9001")
    forget_operator_key(path, "another serve's key")
    assert path.exists()
    forget_operator_key(path, "s3cret")
    assert not path.exists()


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    given = tmp_path / "admin.key"
    given.write_text("k\n")
    given.chmod(0o644)
    with pytest.raises(OperatorKeyError, match="readable by other users: chmod 600"):
        read_operator_key(given, None, "127.0.0.1:8001")
    given.chmod(0o600)
    assert read_operator_key(given, None, "127.0.0.1:8001") == "k"


def test_the_commands_without_a_key_say_where_to_find_one(tmp_path: Path) -> None:
    environment = {**os.environ, "HOME": str(tmp_path)}
    environment.pop("ABDOSERVE_ADMIN_KEY", None)
    done = subprocess.run(
        [sys.executable, "-m", "abdoserve.deploy.cli", "model", "list", "--url", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
        timeout=120,
    )
    assert done.returncode == 2
    assert "no admin key for 127.0.0.1:1: give --admin-key-file" in done.stdout
