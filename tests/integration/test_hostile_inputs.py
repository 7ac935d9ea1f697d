"""Bombs, lying codestreams and nesting sent to the real server over the wire: each is
refused with INVALID_ARGUMENT naming its limit, the stubs' peak memory barely moves, no
stub restarts, and the server stays ready."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from abdoserve.deploy import stubs
from abdoserve.deploy.embedded import EmbeddedServer
from abdoserve.export.phantom import TRANSFER_SYNTAXES, build_study
from abdoserve.loadtests.hostile import HostileRequest, catalogue, flood_request, send
from abdoserve.loadtests.resources import peak_rss_mib
from tests.integration.triton_calls import decoding_stubs
from tests.mutations import random_mutation

CASES = catalogue()
PEAK_GROWTH_MIB = 300  # a refused 1 GiB bomb used to take 4.4 GB


@pytest.mark.parametrize("request_", CASES, ids=[case.name for case in CASES])
def test_a_hostile_request_is_refused_naming_its_limit_and_costs_little(
    server: EmbeddedServer, grpc_url: str, request_: HostileRequest
) -> None:
    assert server.process is not None
    before = stubs.stubs_of(server.process.pid)
    preprocess = decoding_stubs(before, request_.task)
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
    """A smaller fuzz run against the served pipeline (the full one is a unit test)."""
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


HONEST_BESIDE_FLOOD = 6
FLOOD_STUB_PEAK_MIB = 1024  # issue 19's probe took the stub to 5.96 GB (96 x 60 MiB kept)


def test_a_request_that_inflates_past_its_total_is_refused_and_its_neighbours_answered(
    server: EmbeddedServer, grpc_url: str
) -> None:
    """Issue 19's probe (96 x 60 MiB private elements from 30 MB) sent among honest
    studies, plain and deflated, queued for the same preprocess model at once."""
    assert server.process is not None
    task = "esophageal_cancer_ct"
    before = stubs.stubs_of(server.process.pid)
    preprocess = decoding_stubs(before, task)
    flood = flood_request()
    honest = [
        HostileRequest(
            "honest", task, build_study(task, seed=n, transfer_syntax=syntax).instances, b"", ""
        )
        for n, syntax in enumerate(
            ["ExplicitVRLittleEndian", "DeflatedExplicitVRLittleEndian"]
            * (HONEST_BESIDE_FLOOD // 2)
        )
    ]
    with ThreadPoolExecutor(len(honest) + 1) as pool:
        refusal = pool.submit(send, grpc_url, flood)
        answers = list(pool.map(lambda request: send(grpc_url, request), honest))
    assert answers == [None] * HONEST_BESIDE_FLOOD, answers
    error = refusal.result()
    assert error is not None and error.code == "INVALID_ARGUMENT", error
    assert (
        "instance 4: the request's instances inflate past the limit of 268435456 bytes "
        "per request" in error.message
    )
    peaks = [peak_rss_mib(pid) for pid in preprocess]
    assert max(peaks) < FLOOD_STUB_PEAK_MIB, f"preprocess stubs' peak RSS {peaks} MiB"
    assert set(stubs.stubs_of(server.process.pid)) == set(before), "a stub was replaced"
    assert server.is_ready()
