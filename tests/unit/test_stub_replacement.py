"""A stub that exits because Triton retired its instance (a reload through the API: the
model commands, the version sync) is told from one that crashed (deploy.stubs.replaced):
only a newer stub of the same model, version and instance replaces it."""

from __future__ import annotations

import os

from abdoserve.deploy.stubs import Stub, replaced

ALIVE = os.getpid()  # a running process stands in for a live stub
GONE = 2**22 + 17  # above the default pid_max: no such process


def stub(pid: int, instance: str = "m_0_0", version: str = "1") -> Stub:
    return Stub(pid, "m", instance, "S", "", version)


def test_a_newer_stub_of_the_same_instance_replaces_it() -> None:
    old = stub(GONE)
    current = {GONE: old, ALIVE: stub(ALIVE)}
    assert replaced(GONE, old, current, {GONE: 0, ALIVE: 3})


def test_a_sibling_instance_or_another_version_is_no_replacement() -> None:
    old = stub(GONE)
    assert not replaced(GONE, old, {ALIVE: stub(ALIVE, "m_0_1")}, {GONE: 1, ALIVE: 2})
    assert not replaced(GONE, old, {ALIVE: stub(ALIVE, version="2")}, {GONE: 1, ALIVE: 2})


def test_an_older_or_dead_stub_is_no_replacement() -> None:
    old = stub(GONE)
    assert not replaced(GONE, old, {ALIVE: stub(ALIVE)}, {GONE: 5, ALIVE: 2})
    dead = GONE + 1
    assert not replaced(GONE, old, {dead: stub(dead)}, {GONE: 1, dead: 2})
