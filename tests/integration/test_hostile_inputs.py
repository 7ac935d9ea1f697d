"""Bombs, lying codestreams and nesting sent to the real server over the wire: each is
refused with INVALID_ARGUMENT naming its limit, the stubs' peak memory barely moves, no
stub restarts, and the server stays ready."""

from __future__ import annotations

import random

import pytest

from abdoserve.deploy import stubs
from abdoserve.deploy.embedded import EmbeddedServer
from abdoserve.export.phantom import TRANSFER_SYNTAXES, build_study
from abdoserve.loadtests.hostile import HostileRequest, catalogue, send
from abdoserve.loadtests.resources import peak_rss_mib
from tests.mutations import random_mutation

CASES = catalogue()
PEAK_GROWTH_MIB = 300  # a refused 1 GiB bomb used to take 4.4 GB


@pytest.mark.parametrize("request_", CASES, ids=[case.name for case in CASES])
def test_a_hostile_request_is_refused_naming_its_limit_and_costs_little(
    server: EmbeddedServer, grpc_url: str, request_: HostileRequest
) -> None:
    assert server.process is not None
    before = stubs.stubs_of(server.process.pid)
    preprocess = [
        pid for pid, stub in before.items() if stub.model == f"{request_.task}_preprocess"
    ]
    peaks = {pid: peak_rss_mib(pid) for pid in preprocess}
    refusal = send(grpc_url, request_)
    assert refusal is not None, f"{request_.name} was answered"
    assert refusal.code == "INVALID_ARGUMENT", refusal
    assert request_.refusal in refusal.message
    growth = max(peak_rss_mib(pid) - peaks[pid] for pid in preprocess)
    assert growth < PEAK_GROWTH_MIB, f"a stub's peak RSS grew by {growth} MiB"
    assert set(stubs.stubs_of(server.process.pid)) == set(before), "a stub was replaced"
    assert server.is_ready()


FUZZED_STUDIES = 40


def test_mutated_studies_are_answered_or_refused_and_no_stub_restarts(
    server: EmbeddedServer, grpc_url: str
) -> None:
    """A smaller fuzz run against the served ensemble (the full one is a unit test)."""
    assert server.process is not None
    before = set(stubs.stubs_of(server.process.pid))
    rng = random.Random(20261130)
    seeds = [
        build_study("bone_density_ct", seed=4, transfer_syntax=name, slices=2).instances
        for name in TRANSFER_SYNTAXES
    ]
    outcomes: dict[str, int] = {}
    for _ in range(FUZZED_STUDIES):
        instances = list(rng.choice(seeds))
        name, instances[0] = random_mutation(instances[0], rng)
        outcome = answer_or_refusal(grpc_url, tuple(instances))
        assert outcome in ("answered", "INVALID_ARGUMENT"), (name, outcome)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("INVALID_ARGUMENT", 0) > 0 and outcomes.get("answered", 0) > 0
    assert set(stubs.stubs_of(server.process.pid)) == before, "a stub was replaced"
    assert server.is_ready()


def answer_or_refusal(url: str, instances: tuple[bytes, ...]) -> str:
    refusal = send(url, HostileRequest("fuzzed", "bone_density_ct", instances, b"", ""))
    return "answered" if refusal is None else refusal.code
