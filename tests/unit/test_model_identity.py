"""One model identity for the server, the client and the gateway: the answer the server
builds parses back, through the client, into an equal `ModelIdentity`; the ANSWER's
`model` object keeps its wire form; importing the type loads no gRPC stack."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from abdoserve.export.configs import describe_task
from abdoserve.preprocessing.tasks import TASKS
from abdoserve.serving import answer as serving_answer
from abdoserve.serving.answer import study_answer
from abdoserve_client.model_identity import ModelIdentity
from abdoserve_client.results import ModelInfo, TaskInfo, parse_result

DEVIATION = {"reference": "PyTorch FP32", "max_abs": 0.0123, "study_agreement": 1.0}
PARAMETERS = {
    "untrained": {"weights_source": "reference-untrained", "weights_sha256": "3f" * 32},
    "trained": {
        "weights_source": "hospital-checkpoint",
        "weights_sha256": "ab" * 32,
        "weights_untrained": "false",
        "runtime": "onnxruntime",
        "runtime_precision": "fp32",
    },
    "int8": {
        "weights_untrained": "FALSE",
        "runtime": "openvino-int8",
        "runtime_precision": "int8",
        "runtime_deviation": json.dumps(DEVIATION),
    },
}


def test_the_server_and_the_client_name_one_type() -> None:
    assert serving_answer.ModelIdentity is ModelIdentity
    assert ModelInfo is ModelIdentity


@pytest.mark.parametrize("kind", sorted(PARAMETERS))
@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_server_answer_parses_back_into_the_same_identity(task: str, kind: str) -> None:
    spec = TASKS[task]
    identity = ModelIdentity.from_parameters(task, "7", PARAMETERS[kind])
    per_sample = np.full((1, spec.output.width), 1.0 / spec.output.width, dtype=np.float32)
    study, answer = study_answer(spec, per_sample, [0], identity)
    info = TaskInfo.from_parameters(describe_task(spec), "7")
    result = parse_result(info, json.dumps(answer).encode(), per_sample[None], study[None])
    assert type(result.model) is ModelIdentity
    assert result.model == identity
    assert result.model.untrained is (kind == "untrained")
    assert result.model.quantized is (kind == "int8")


def test_the_answer_model_object_keeps_its_wire_form() -> None:
    identity = ModelIdentity.from_parameters(
        "liver_fibrosis_ct", "2", {**PARAMETERS["int8"], "card_id": "sha256:ab12"}
    )
    _, answer = study_answer(
        TASKS["liver_fibrosis_ct"], np.array([[1.5]], dtype=np.float32), [0], identity
    )
    assert json.dumps(answer["model"]) == (
        '{"name": "liver_fibrosis_ct", "version": "2", "weights_source": "unknown", '
        '"weights_sha256": "", "untrained": false, "runtime": {"name": "openvino-int8", '
        '"precision": "int8", "deviation": {"reference": "PyTorch FP32", "max_abs": 0.0123, '
        '"study_agreement": 1.0}}, "card_id": "sha256:ab12"}'
    )
    assert ModelIdentity.from_mapping(answer["model"]) == identity


@pytest.mark.parametrize(
    ("flag", "untrained"),
    [(False, False), ("false", False), (True, True), ("no", True), (0, True), (None, True)],
)
def test_only_an_explicit_false_reads_as_trained(flag: object, untrained: bool) -> None:
    assert ModelIdentity.from_mapping({"untrained": flag}).untrained is untrained


def test_a_broken_deviation_fails_the_server_and_reads_as_none_in_a_client() -> None:
    broken = {"runtime_deviation": "[1, 2]"}
    with pytest.raises(ValueError, match="runtime_deviation"):
        ModelIdentity.from_parameters("x", "1", broken)
    assert ModelIdentity.from_mapping(broken).deviation is None


def test_importing_the_identity_loads_no_grpc_stack() -> None:
    """The serving code imports it inside Triton's Python stub."""
    probe = (
        "import sys, abdoserve_client.model_identity; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'grpc', 'tritonclient', 'numpy', 'google'}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"
