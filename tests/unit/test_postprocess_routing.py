"""The postprocess model file with a fake pb_utils and fake BLS: a bad request never fails
the good ones batched with it, each answer names the version that ran, a canary splits
studies by key, a failing candidate costs no study, and a companion version is
compared after the answer."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from abdoserve.serving.routing import Routing
from tests.unit.fake_pb_utils import (
    FakeBls,
    FakeInferenceRequest,
    FakePbUtils,
    FakeResponse,
    FakeTensor,
    FakeTritonError,
)
from tests.unit.test_composing_validation import (
    MASS,
    MASS_ROLES,
    FakeMetric,
    load_model,
    samples,
    study_info_tensor,
)

PROBABILITIES = {  # per version: liver_mass_ct class probabilities A..E
    1: np.array([0.1, 0.6, 0.1, 0.1, 0.1], dtype=np.float32),  # B
    2: np.array([0.1, 0.1, 0.6, 0.1, 0.1], dtype=np.float32),  # C
    3: np.array([0.1, 0.56, 0.14, 0.1, 0.1], dtype=np.float32),  # B, close to version 1
}


def constant(version: int, batch: np.ndarray) -> np.ndarray:
    return np.tile(PROBABILITIES[version], (batch.shape[0], batch.shape[1], 1))


def broken(batch: np.ndarray) -> np.ndarray:
    raise RuntimeError("onnxruntime: bad allocation")


class RecordingFamily:
    HISTOGRAM = "histogram"
    COUNTER = "counter"
    recorded: ClassVar[dict[tuple[str, frozenset[tuple[str, str]]], FakeMetric]] = {}

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name = name

    def Metric(self, labels: dict[str, str], buckets: list[float] | None = None) -> FakeMetric:
        key = (self.name, frozenset(labels.items()))
        return self.recorded.setdefault(key, FakeMetric())


def recorded(name: str, **labels: str) -> list[float]:
    return [
        value
        for (found, pairs), metric in RecordingFamily.recorded.items()
        if found == name and set(labels.items()) <= pairs
        for value in metric.values
    ]


class BlsPbUtils(FakePbUtils):
    MetricFamily = RecordingFamily

    def __init__(self) -> None:
        super().__init__()
        self.bls = FakeBls({version: partial(constant, version) for version in PROBABILITIES})
        self.InferenceRequest = partial(FakeInferenceRequest, self.bls)


@pytest.fixture
def pb_utils(monkeypatch: pytest.MonkeyPatch) -> Iterator[BlsPbUtils]:
    fake = BlsPbUtils()
    RecordingFamily.recorded.clear()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    root = logging.getLogger("abdoserve")
    handlers, level = list(root.handlers), root.level
    yield fake
    root.handlers[:] = handlers
    root.setLevel(level)


def postprocess(tmp_path: Path, routing: Routing | None = None) -> Any:
    parameters = {"task": {"string_value": MASS.name}}
    if routing is not None:
        parameters["routing"] = {"string_value": routing.to_json()}
    folder = tmp_path / f"{MASS.name}_postprocess"
    folder.mkdir(exist_ok=True)
    return load_model("postprocess", MASS.name, folder, {"parameters": parameters})


def key(number: int) -> str:
    return hashlib.sha256(f"study {number}".encode()).hexdigest()


def request(
    number: int = 0,
    sample: np.ndarray | None = None,
    sources: np.ndarray | None = None,
    info: Any = None,
) -> dict[str, FakeTensor]:
    arrays = {
        "SAMPLES": samples(MASS, 1) if sample is None else sample,
        "SAMPLE_SOURCE": np.array([1], np.int32) if sources is None else sources,
    }
    tensors = {name: FakeTensor(name, value[None, ...]) for name, value in arrays.items()}
    if info is None:
        info = {"roles": MASS_ROLES, "instances": 3, "key": key(number)}
    tensors["STUDY_INFO"] = FakeTensor("STUDY_INFO", study_info_tensor(info)[None, ...])
    return tensors


def run(model: Any, requests: list[dict[str, FakeTensor]]) -> list[FakeResponse]:
    replies: list[FakeResponse] = asyncio.run(model.execute(requests))
    assert model.metrics_writer.flush()  # metrics update off the request's path
    return replies


def answer_of(reply: FakeResponse) -> dict[str, Any]:
    assert reply.error is None, reply.error
    found = {tensor.name: tensor.value for tensor in reply.output_tensors}
    answer: dict[str, Any] = json.loads(found["ANSWER"][0, 0])
    return answer


def invalid(reply: FakeResponse, tensor: str) -> str:
    assert reply.error is not None and reply.output_tensors == []
    assert reply.error.code == FakeTritonError.INVALID_ARG
    assert f"'{tensor}'" in reply.error.message
    return reply.error.message


def test_the_good_requests_of_a_batch_are_answered_beside_bad_ones(
    pb_utils: BlsPbUtils, tmp_path: Path
) -> None:
    model = postprocess(tmp_path)
    nan = samples(MASS, 1)
    nan[0, 0, 0, 0] = np.nan
    replies = run(
        model,
        [
            request(1),
            request(2, sources=np.array([0, 1], np.int32)),
            request(3, sources=np.array([3], np.int32)),
            request(4, info=b"\x00garbage"),
            request(5, sample=nan),
            request(6, sample=samples(MASS, 2)),
            request(7, info={"roles": {}, "instances": 3, "key": key(7)}),
            request(8),
        ],
    )
    for good in (replies[0], replies[7]):
        answer = answer_of(good)
        assert answer["result"]["label"] == "B"
        assert answer["model"]["version"] == "1"
        assert answer["images"] == [{"instance": 1, "values": [0.1, 0.6, 0.1, 0.1, 0.1]}]
    assert "one per OUTPUT row" in invalid(replies[1], "SAMPLE_SOURCE")
    assert "instance indices in [0, 2]" in invalid(replies[2], "SAMPLE_SOURCE")
    assert "not valid JSON" in invalid(replies[3], "STUDY_INFO")
    assert "finite values" in invalid(replies[4], "SAMPLES")
    assert "exactly 1 sample per study" in invalid(replies[5], "SAMPLES")
    assert "roles" in invalid(replies[6], "STUDY_INFO")
    # Only the checked studies reached the network.
    assert pb_utils.bls.calls == [(f"{MASS.name}_net", 1)] * 2


def test_a_canary_answers_its_share_and_each_answer_names_the_version_that_ran(
    pb_utils: BlsPbUtils, tmp_path: Path
) -> None:
    routing = Routing(production=1, candidate=2, mode="canary", percent=25.0)
    model = postprocess(tmp_path, routing)
    numbers = range(400)
    replies = run(model, [request(number) for number in numbers])
    versions = [answer_of(reply)["model"]["version"] for reply in replies]
    labels = [answer_of(reply)["result"]["label"] for reply in replies]
    assert set(zip(versions, labels, strict=True)) == {
        ("1", "B"),
        ("2", "C"),
    }
    assert versions.count("2") / len(versions) == pytest.approx(0.25, abs=0.06)
    assert versions == [str(routing.answering(key(number))) for number in numbers]
    again = run(model, [request(number) for number in numbers])
    assert [answer_of(reply)["model"]["version"] for reply in again] == versions
    model.router.companions.jobs.join()
    assert model.metrics_writer.flush()
    # Production ran beside every canary answer (C against B: all disagree), or the
    # comparison was dropped by its bounded queue, never the answer.
    name = "abdoserve_version_comparisons_total"
    disagreed, dropped = recorded(name, result="disagree"), recorded(name, result="dropped")
    assert len(disagreed) + len(dropped) == 2 * versions.count("2")
    assert disagreed and not recorded(name, result="agree")
    assert recorded("abdoserve_version_answers_total", version="2", route="canary")
    model.finalize()


def test_a_failing_candidate_costs_no_study(pb_utils: BlsPbUtils, tmp_path: Path) -> None:
    pb_utils.bls.versions[2] = broken
    model = postprocess(tmp_path, Routing(production=1, candidate=2, mode="canary", percent=100))
    replies = run(model, [request(number) for number in range(5)])
    assert [answer_of(reply)["model"]["version"] for reply in replies] == ["1"] * 5
    # Asked twice each (a swap in between can refuse one call), then production answers.
    assert len(recorded("abdoserve_version_failures_total", version="2")) == 10
    assert len(recorded("abdoserve_version_answers_total", version="1", route="fallback")) == 5
    model.finalize()


def test_a_candidate_answering_outside_the_contract_has_failed(
    pb_utils: BlsPbUtils, tmp_path: Path
) -> None:
    pb_utils.bls.versions[2] = lambda batch: np.full((1, 1, 5), np.nan, np.float32)
    model = postprocess(tmp_path, Routing(production=1, candidate=2, mode="canary", percent=100))
    [reply] = run(model, [request()])
    assert answer_of(reply)["model"]["version"] == "1"
    model.finalize()


def test_a_failing_production_is_the_request_error_with_the_nets_own_code(
    pb_utils: BlsPbUtils, tmp_path: Path
) -> None:
    model = postprocess(tmp_path, Routing(production=4))  # not loaded
    [reply] = run(model, [request()])
    assert reply.error is not None and reply.error.code == FakeTritonError.UNAVAILABLE
    assert "version 4" in reply.error.message
    model.finalize()


def test_a_shadow_never_answers_and_its_agreement_is_recorded(
    pb_utils: BlsPbUtils, tmp_path: Path
) -> None:
    model = postprocess(tmp_path, Routing(production=1, candidate=3, mode="shadow", percent=100))
    for start in range(0, 20, 4):  # within the comparison queue's bound
        replies = run(model, [request(number) for number in range(start, start + 4)])
        assert {answer_of(reply)["model"]["version"] for reply in replies} == {"1"}
        model.router.companions.jobs.join()
        assert model.metrics_writer.flush()
    pair = {"answering": "1", "companion": "3"}
    assert len(recorded("abdoserve_version_comparisons_total", result="agree", **pair)) == 20
    deltas = recorded("abdoserve_version_score_delta", **pair)
    assert deltas == pytest.approx([0.04] * 20, abs=1e-6)
    model.finalize()


def test_each_version_is_named_from_its_own_folder(pb_utils: BlsPbUtils, tmp_path: Path) -> None:
    imported = tmp_path / f"{MASS.name}_net" / "2"
    imported.mkdir(parents=True)
    (imported / "provenance.json").write_text(
        json.dumps(
            {
                "weights_source": "hospital.npz",
                "weights_sha256": "ab" * 32,
                "weights_untrained": "false",
            }
        )
    )
    (imported / "card.json").write_text(json.dumps({"card_id": "sha256:c0ffee"}))
    model = postprocess(tmp_path, Routing(production=2, candidate=1, mode="shadow", percent=0))
    answer = answer_of(run(model, [request()])[0])
    assert answer["model"]["version"] == "2"
    assert answer["model"]["weights_source"] == "hospital.npz"
    assert answer["model"]["untrained"] is False and "notice" not in answer
    assert answer["model"]["card_id"] == "sha256:c0ffee"
    model.finalize()


def test_what_arrived_and_what_was_answered_count_under_the_version_that_ran(
    pb_utils: BlsPbUtils, tmp_path: Path
) -> None:
    from abdoserve.preprocessing.study_profile import StudyProfile

    model = postprocess(tmp_path, Routing(production=1, candidate=2, mode="canary", percent=25.0))
    profile = StudyProfile("siemens", 100.0, 1.0, 0.7, 40.0).to_json()
    numbers = range(40)
    with_profile = [
        request(n, info={"roles": MASS_ROLES, "instances": 3, "key": key(n), "profile": profile})
        for n in numbers
    ]
    made_up = {**profile, "manufacturer": "Doe^Jane"}
    hostile = {"roles": MASS_ROLES, "instances": 3, "key": key(99), "profile": made_up}
    replies = run(model, [*with_profile, request(99, info=hostile), request(100)])
    message = invalid(replies[40], "STUDY_INFO")
    assert "'manufacturer' must be one of" in message and "Doe" not in message
    versions = [answer_of(reply)["model"]["version"] for reply in replies[:40]]
    last = answer_of(replies[41])["model"]["version"]
    for version, label in (("1", "B"), ("2", "C")):
        answered = versions.count(version)
        assert answered > 0
        assert len(recorded("abdoserve_drift_input_kvp", version=version)) == answered
        assert recorded("abdoserve_drift_input_kvp", version=version)[0] == 100.0
        classes = recorded("abdoserve_drift_answer_class_total", version=version)
        assert len(classes) == answered + (last == version)
        assert recorded("abdoserve_drift_answer_class_total", version=version, **{"class": label})
        assert recorded("abdoserve_drift_input_manufacturer_total", manufacturer="siemens")
    # A study sent straight to the postprocess model without a profile counts as missing.
    assert recorded("abdoserve_drift_input_manufacturer_total", manufacturer="missing") == [1.0]
    assert recorded("abdoserve_drift_input_missing_total", feature="kvp") == [1.0]
    model.finalize()
