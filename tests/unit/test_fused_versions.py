"""The fused model file (`_python_models/pipeline.py`) with a fake pb_utils and real
networks in its folder: it routes between the versions beside it as the postprocess
model does, one batch per version; a failing candidate's studies are answered by
production; every answer names its version; a bad request answers alone."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, save

from abdoserve.export.phantom import build_study
from abdoserve.preprocessing.study import StudyPreparer
from abdoserve.preprocessing.tasks import get_task
from abdoserve.serving.routing import Routing
from tests.unit.fake_pb_utils import FakePbUtils, FakeResponse, FakeTritonError
from tests.unit.test_composing_validation import load_model, output_of, tensors
from tests.unit.test_postprocess_routing import RecordingFamily, recorded

TASK = "bone_density_ct"
BONE = get_task(TASK)
VALUES = {1: 0.9, 2: 0.5, 3: float("nan")}  # g/cm2 per version; 3 leaves the contract


def constant_graph(path: Path, value: float) -> None:
    """A network of the task's signature that answers `value` for every sample."""
    samples = helper.make_tensor_value_info("samples", TensorProto.FLOAT, ["N", 1, 192, 192])
    output = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1])
    nodes = [
        helper.make_node("ReduceMean", ["samples"], ["mean"], axes=[2, 3], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["zeroed"]),
        helper.make_node("Add", ["zeroed", "value"], ["output"]),
    ]
    constants = [
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("value", TensorProto.FLOAT, [], [value]),
    ]
    graph = helper.make_graph(nodes, "constant", [samples], [output], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    save(model, str(path))


class RecordingPbUtils(FakePbUtils):
    MetricFamily = RecordingFamily


@pytest.fixture
def pb_utils(monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingPbUtils]:
    fake = RecordingPbUtils()
    RecordingFamily.recorded.clear()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    root = logging.getLogger("abdoserve")
    handlers, level = list(root.handlers), root.level
    yield fake
    root.handlers[:] = handlers
    root.setLevel(level)


def fused(tmp_path: Path, routing: Routing) -> Any:
    folder = tmp_path / TASK
    for version, value in VALUES.items():
        constant_graph(folder / str(version) / "model.onnx", value)
    parameters = {"task": TASK, "routing": routing.to_json()}
    config = {"parameters": {key: {"string_value": value} for key, value in parameters.items()}}
    return load_model("pipeline", TASK, folder, config)


def request(seed: int) -> dict[str, Any]:
    study = build_study(TASK, seed=seed, slices=2)
    return tensors(DICOM=np.array(list(study.instances), dtype=np.object_))


def key_of(seed: int) -> str:
    study = build_study(TASK, seed=seed, slices=2)
    return StudyPreparer(BONE)(study.instances, study.clinical).study_key


def answer_of(reply: FakeResponse) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(output_of(reply, "ANSWER")[0, 0])
    return answer


def test_a_canary_answers_its_share_from_the_version_beside_it(
    pb_utils: RecordingPbUtils, tmp_path: Path
) -> None:
    routing = Routing(production=1, candidate=2, mode="canary", percent=50.0)
    model = fused(tmp_path, routing)
    seeds = range(12)
    garbage = tensors(DICOM=np.array([b"not dicom"], dtype=np.object_))
    replies = model.execute([*(request(seed) for seed in seeds), garbage])
    assert model.metrics_writer.flush()  # metrics update off the request's path
    assert replies[-1].error is not None and "DICOM" in replies[-1].error.message
    answers = [answer_of(reply) for reply in replies[:-1]]
    versions = [int(answer["model"]["version"]) for answer in answers]
    assert versions == [routing.answering(key_of(seed)) for seed in seeds]
    assert set(versions) == {1, 2}
    for answer, version in zip(answers, versions, strict=True):
        assert answer["result"]["BMD"] == pytest.approx(VALUES[version])
    assert len(recorded("abdoserve_version_answers_total", version="2", route="canary")) == (
        versions.count(2)
    )
    assert len(recorded("abdoserve_drift_answer_score", version="2")) == versions.count(2)
    model.router.companions.jobs.join()
    assert model.metrics_writer.flush()
    # Production ran beside each canary answer: 0.5 against 0.9 disagrees on no flag
    # (neither is osteoporotic) but differs by 0.4.
    deltas = recorded("abdoserve_version_score_delta", answering="2", companion="1")
    assert deltas and all(delta == pytest.approx(0.4) for delta in deltas)
    model.finalize()


def test_a_candidate_outside_the_contract_costs_no_study(
    pb_utils: RecordingPbUtils, tmp_path: Path
) -> None:
    model = fused(tmp_path, Routing(production=1, candidate=3, mode="canary", percent=100.0))
    replies = model.execute([request(seed) for seed in range(3)])
    assert model.metrics_writer.flush()  # metrics update off the request's path
    answers = [answer_of(reply) for reply in replies]
    assert [answer["model"]["version"] for answer in answers] == ["1", "1", "1"]
    assert all(answer["result"]["BMD"] == pytest.approx(0.9) for answer in answers)
    assert len(recorded("abdoserve_version_failures_total", version="3")) == 6  # asked twice
    assert len(recorded("abdoserve_version_answers_total", version="1", route="fallback")) == 3
    model.finalize()


def test_a_failing_production_is_each_studys_error(
    pb_utils: RecordingPbUtils, tmp_path: Path
) -> None:
    model = fused(tmp_path, Routing(production=3))
    replies = model.execute([request(seed) for seed in range(2)])
    assert model.metrics_writer.flush()  # metrics update off the request's path
    for reply in replies:
        assert reply.error is not None and reply.output_tensors == []
        assert "version 3 answered outside its contract" in reply.error.message
    # Triton counts these error responses as successes: the model counts each failure
    assert recorded("abdoserve_rejected_requests_total", reason="internal") == [1.0, 1.0]
    model.finalize()


def test_every_refusal_reason_is_counted_from_zero(pb_utils: RecordingPbUtils) -> None:
    """A series born at its first increment hides that increment from rate(): each
    reason exists from the model's load."""
    from abdoserve.preprocessing import errors
    from abdoserve.serving.metrics import IntakeMetrics, known_reasons

    IntakeMetrics(pb_utils, TASK)
    reasons = known_reasons()
    assert {"not_dicom", "wrong_modality", "input_too_large", "internal"} <= set(reasons)
    assert errors.NotDicomError.reason in reasons
    created = {
        dict(pairs)["reason"]
        for (name, pairs) in RecordingFamily.recorded
        if name == "abdoserve_rejected_requests_total"
    }
    assert created == set(reasons)
    assert recorded("abdoserve_rejected_requests_total") == []  # none incremented


def test_a_version_that_is_not_there_fails_the_load(
    pb_utils: RecordingPbUtils, tmp_path: Path
) -> None:
    with pytest.raises(Exception, match="7"):
        fused(tmp_path, Routing(production=1, candidate=7, mode="shadow", percent=10.0))


def test_a_request_whose_client_left_is_answered_cancelled_and_counted(
    pb_utils: RecordingPbUtils, tmp_path: Path
) -> None:
    """Triton counts a Python model's error response as a success: the fused model counts
    the requests it drops itself, and runs no network for them."""
    model = fused(tmp_path, Routing(production=1))
    gone = request(1)
    gone.cancelled = True
    replies = model.execute([request(0), gone, request(2)])
    assert model.metrics_writer.flush()  # metrics update off the request's path
    assert replies[1].error is not None and replies[1].error.code == FakeTritonError.CANCELLED
    assert replies[1].output_tensors == []
    assert [answer_of(replies[n])["result"]["BMD"] for n in (0, 2)] == pytest.approx([0.9] * 2)
    assert recorded("abdoserve_cancelled_requests_total", task=TASK) == [1.0]
    assert len(recorded("abdoserve_version_answers_total", version="1")) == 2
    model.finalize()
