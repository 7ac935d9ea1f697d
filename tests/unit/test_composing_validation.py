"""Composing models called directly: every malformed tensor is that request's INVALID_ARGUMENT.

The checks (`abdoserve.serving.validation`) run against each task spec; the model
files (`_python_models/*.py`) run with a fake pb_utils (the one of test_triton_adapter)
to show that a bad request never fails the good ones batched with it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from abdoserve.export.phantom import build_study
from abdoserve.preprocessing.clinical import feature_vector
from abdoserve.preprocessing.errors import IntakeError, StatusCode
from abdoserve.preprocessing.specs import TaskSpec
from abdoserve.preprocessing.study import StudyPreparer
from abdoserve.preprocessing.tasks import TASKS
from abdoserve.serving import validation
from tests.unit.fake_pb_utils import (
    FakePbUtils,
    FakeRequest,
    FakeResponse,
    FakeTensor,
    FakeTritonError,
)

PYTHON_MODELS = Path(__file__).resolve().parents[2] / "model_repository" / "_python_models"
SENDER_TEXT = "PHANTOM^ABDOMEN"  # sender-controlled text that must never be echoed

BONE = TASKS["bone_density_ct"]  # series of 1-32 slices, 1 x 192 x 192, regression
FIBROSIS = TASKS["liver_fibrosis_ct"]  # series of 1-16 slices, features: age, sex one-hot
MRI = TASKS["liver_fibrosis_mri"]  # 3 levels as channels, features: field strength, hbv, hcv
MASS = TASKS["liver_mass_ct"]  # 3 phases as channels, 3 x 64 x 64, 5 classes
OESOPHAGUS = TASKS["esophageal_cancer_ct"]  # 1-128 slices, probability


def samples(spec: TaskSpec, count: int, value: float = 0.5) -> np.ndarray:
    return np.full((count, *spec.sample_shape), value, dtype=np.float32)


def refused(match: str) -> Any:
    return pytest.raises(IntakeError, match=match)


# --- SAMPLES -----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [BONE, FIBROSIS, MRI, MASS, OESOPHAGUS], ids=lambda s: s.name)
def test_samples_within_the_specs_bounds_pass(spec: TaskSpec) -> None:
    low, high = validation.sample_count_range(spec)
    for count in {low, high}:
        validation.check_samples(spec, samples(spec, count))
    edges = samples(spec, low, 0.0)
    edges.reshape(-1)[-1] = 1.0
    validation.check_samples(spec, edges)


@pytest.mark.parametrize(
    ("spec", "array", "match"),
    [
        (BONE, samples(BONE, 1).astype(np.float64), r"'SAMPLES' must be FP32, got float64"),
        (
            BONE,
            np.zeros((1, 192, 192), np.float32),
            r"'SAMPLES' must have shape \[s, 1, 192, 192\]",
        ),
        (BONE, np.zeros((1, 1, 64, 64), np.float32), r"got \[1, 1, 64, 64\]"),
        (MASS, np.zeros((1, 1, 64, 64), np.float32), r"\[s, 3, 64, 64\] per study"),
        (BONE, samples(BONE, 0), r"'SAMPLES' must hold 1 to 32 samples per study, got shape \[0,"),
        (BONE, samples(BONE, 33), r"'SAMPLES' must hold 1 to 32 samples per study"),
        (OESOPHAGUS, samples(OESOPHAGUS, 129), r"1 to 128 samples per study"),
        (MASS, samples(MASS, 2), r"'SAMPLES' must hold exactly 1 sample per study, got shape \[2,"),
        (MRI, samples(MRI, 0), r"'SAMPLES' must hold exactly 1 sample per study"),
    ],
)
def test_samples_of_the_wrong_dtype_or_shape_are_refused(
    spec: TaskSpec, array: np.ndarray, match: str
) -> None:
    with refused(match) as caught:
        validation.check_samples(spec, array)
    assert caught.value.code is StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1.5, -0.5, 1e30, 1.0001])
def test_samples_outside_the_preprocess_range_are_refused(bad: float) -> None:
    array = samples(BONE, 3)
    array[1, 0, 17, 42] = bad
    with refused(r"'SAMPLES' must hold finite values in \[0, 1\] \(the preprocess' range\)"):
        validation.check_samples(BONE, array)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_what_the_real_preprocess_emits_passes_every_check(task: str) -> None:
    spec = TASKS[task]
    study = build_study(task, seed=5)
    prepared = StudyPreparer(spec)(study.instances, study.clinical)
    validation.check_samples(spec, prepared.samples)
    if spec.feature_width:
        validation.check_features(spec, prepared.features)
    info = {
        "roles": dict(zip(prepared.roles, prepared.role_sources, strict=True)),
        "instances": len(study.instances),
        "key": prepared.study_key,
    }
    parsed = validation.study_info(spec, study_info_tensor(info))
    rows = prepared.samples.shape[0]
    validation.check_sample_source(prepared.sources, rows, parsed.instances)


# --- FEATURES ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "values"),
    [
        (FIBROSIS, {"age": 0.0, "sex": "M"}),
        (FIBROSIS, {"age": 120.0, "sex": "F"}),
        (MRI, {"field_strength": 0.2, "hbv": "negative", "hcv": "positive"}),
        (MRI, {"field_strength": 7.0, "hbv": "positive", "hcv": "negative"}),
    ],
)
def test_features_at_the_clinical_limits_pass(spec: TaskSpec, values: dict[str, Any]) -> None:
    validation.check_features(spec, feature_vector(spec, values))


def fibrosis_features(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.array([0.05, 0.0, 1.0]), r"'FEATURES' must be FP32, got float64"),
        (fibrosis_features(0.05, 0.0, 1.0, 0.0), r"'FEATURES' must have shape \[3\] per study"),
        (np.zeros((1, 3), np.float32), r"'FEATURES' must have shape \[3\] per study, got \[1, 3\]"),
        (fibrosis_features(np.nan, 0.0, 1.0), r"'FEATURES' must hold finite values"),
        (fibrosis_features(0.05, np.inf, 1.0), r"'FEATURES' must hold finite values"),
        (
            fibrosis_features(3.5, 0.0, 1.0),
            r"'FEATURES' \[0\] \('age', scaled\) must lie in \[-3, 3\]",
        ),
        (fibrosis_features(-3.01, 0.0, 1.0), r"\('age', scaled\) must lie in \[-3, 3\]"),
        (fibrosis_features(0.0, 1.0, 1.0), r"'FEATURES' \[1:3\] must one-hot encode 'sex'"),
        (fibrosis_features(0.0, 0.0, 0.0), r"one-hot encode 'sex' over 2 choices"),
        (fibrosis_features(0.0, 0.5, 0.5), r"one-hot encode 'sex'"),
        (fibrosis_features(0.0, -1.0, 2.0), r"one-hot encode 'sex'"),
    ],
)
def test_features_the_preprocess_would_never_emit_are_refused(
    array: np.ndarray, match: str
) -> None:
    with refused(match):
        validation.check_features(FIBROSIS, array)


def test_every_category_of_the_mri_features_is_checked() -> None:
    good = feature_vector(MRI, {"field_strength": 3.0, "hbv": "negative", "hcv": "positive"})
    bad = good.copy()
    bad[3:5] = 1.0
    with refused(r"'FEATURES' \[3:5\] must one-hot encode 'hcv'"):
        validation.check_features(MRI, bad)


# --- OUTPUT, SAMPLE_SOURCE, STUDY_INFO ---------------------------------------------------


def outputs(spec: TaskSpec, count: int, value: float = 0.2) -> np.ndarray:
    return np.full((count, spec.output.width), value, dtype=np.float32)


@pytest.mark.parametrize(
    ("spec", "array", "match"),
    [
        (MASS, outputs(MASS, 1).astype(np.float16), r"'OUTPUT' must be FP32, got float16"),
        (MASS, np.zeros((1, 4), np.float32), r"'OUTPUT' must have shape \[s, 5\] per study"),
        (BONE, np.zeros(3, np.float32), r"'OUTPUT' must have shape \[s, 1\] per study, got \[3\]"),
        (BONE, outputs(BONE, 0), r"'OUTPUT' must hold 1 to 32 samples per study"),
        (BONE, outputs(BONE, 33), r"'OUTPUT' must hold 1 to 32 samples per study"),
        (MASS, outputs(MASS, 2), r"'OUTPUT' must hold exactly 1 sample per study"),
        (BONE, outputs(BONE, 2, np.nan), r"'OUTPUT' must hold finite values"),
        (BONE, outputs(BONE, 2, np.inf), r"'OUTPUT' must hold finite values"),
        (MASS, outputs(MASS, 1, 1.5), r"'OUTPUT' must hold probabilities in \[0, 1\]"),
        (OESOPHAGUS, outputs(OESOPHAGUS, 4, -0.1), r"'OUTPUT' must hold probabilities"),
        (OESOPHAGUS, outputs(OESOPHAGUS, 4, np.nan), r"'OUTPUT' must hold probabilities"),
    ],
)
def test_outputs_the_net_would_never_emit_are_refused(
    spec: TaskSpec, array: np.ndarray, match: str
) -> None:
    with refused(match):
        validation.check_output(spec, array)


def test_a_regression_output_need_only_be_finite() -> None:
    # A hospital's head may leave the nominal 0.2-2.0 g/cm2; the answer still reads.
    validation.check_output(BONE, outputs(BONE, 2, 2.5))


@pytest.mark.parametrize(
    ("array", "rows", "match"),
    [
        (np.array([0, 1], np.int64), 2, r"'SAMPLE_SOURCE' must be INT32, got int64"),
        (np.array([0, 1, 2], np.int32), 2, r"'SAMPLE_SOURCE' must have shape \[2\] per study"),
        (np.array([0], np.int32), 2, r"\(one per OUTPUT row\), got \[1\]"),
        (np.array([[0, 1]], np.int32), 2, r"'SAMPLE_SOURCE' must have shape \[2\]"),
        (np.array([0, 3], np.int32), 2, r"'SAMPLE_SOURCE' must hold instance indices in \[0, 2\]"),
        (np.array([-1, 0], np.int32), 2, r"instance indices in \[0, 2\]"),
    ],
)
def test_sample_sources_that_disagree_are_refused(array: np.ndarray, rows: int, match: str) -> None:
    with refused(match):
        validation.check_sample_source(array, rows, instances=3)


def study_info_tensor(value: Any) -> np.ndarray:
    data = value if isinstance(value, bytes) else json.dumps(value).encode()
    return np.array([data], dtype=np.object_)


MASS_ROLES = {"non_contrast": 0, "arterial": 1, "delayed": 2}
KEY = "0123456789abcdef" * 4  # a study key as the preprocess writes it (64 hex digits)


def test_study_info_as_the_preprocess_writes_it_is_read() -> None:
    info = validation.study_info(
        MASS, study_info_tensor({"roles": MASS_ROLES, "instances": 3, "key": KEY})
    )
    assert info == validation.StudyInfo(3, MASS_ROLES, KEY)
    series = validation.study_info(
        BONE, study_info_tensor({"roles": {}, "instances": 32, "key": KEY})
    )
    assert series == validation.StudyInfo(32, {}, KEY)


@pytest.mark.parametrize(
    ("spec", "value", "match"),
    [
        (BONE, b"\xff\xfe" + SENDER_TEXT.encode(), r"'STUDY_INFO' is not valid JSON"),
        (BONE, SENDER_TEXT.encode(), r"'STUDY_INFO' is not valid JSON \(JSONDecodeError\)"),
        (BONE, b"", r"'STUDY_INFO' is not valid JSON"),
        (BONE, b"[" * 3000, r"'STUDY_INFO' is not valid JSON \(RecursionError\)"),
        (BONE, b" " * 4097, r"'STUDY_INFO' exceeds 4096 bytes"),
        (BONE, [1, 2], r"'STUDY_INFO' must be a JSON object with keys instances, key, roles"),
        (BONE, {"instances": 1}, r"keys instances, key, roles"),
        (BONE, {"instances": 1, "roles": {}, SENDER_TEXT: 1}, r"keys instances, key, roles"),
        (BONE, {"instances": 1, "roles": {}, "key": SENDER_TEXT}, r"'key' must be 64 lowercase"),
        (BONE, {"instances": 1, "roles": {}, "key": KEY.upper()}, r"'key' must be 64 lowercase"),
        (BONE, {"instances": 1, "roles": {}, "key": KEY + "0"}, r"'key' must be 64 lowercase"),
        (BONE, {"instances": 1, "roles": {}, "key": 7}, r"'key' must be 64 lowercase"),
        (
            BONE,
            {"instances": True, "roles": {}, "key": KEY},
            r"'instances' must be an integer in \[1, 256\]",
        ),
        (
            BONE,
            {"instances": 0, "roles": {}, "key": KEY},
            r"'instances' must be an integer in \[1, 256\]",
        ),
        (BONE, {"instances": 257, "roles": {}, "key": KEY}, r"'instances' must be an integer"),
        (BONE, {"instances": "3", "roles": {}, "key": KEY}, r"'instances' must be an integer"),
        (BONE, {"instances": 2.0, "roles": {}, "key": KEY}, r"'instances' must be an integer"),
        (
            BONE,
            {"instances": 3, "roles": MASS_ROLES, "key": KEY},
            r"'roles' must map exactly these roles: none",
        ),
        (
            MASS,
            {"instances": 3, "roles": {}, "key": KEY},
            r"roles: non_contrast, arterial, delayed",
        ),
        (
            MASS,
            {"instances": 3, "roles": [0, 1, 2], "key": KEY},
            r"'roles' must map exactly these roles",
        ),
        (
            MASS,
            {"instances": 3, "roles": {**MASS_ROLES, SENDER_TEXT: 0}, "key": KEY},
            r"'roles' must map exactly these roles",
        ),
        (
            MASS,
            {"instances": 3, "roles": {**MASS_ROLES, "delayed": 3}, "key": KEY},
            r"'roles' must map each role to an instance index in \[0, 2\]",
        ),
        (
            MASS,
            {"instances": 3, "roles": {**MASS_ROLES, "delayed": SENDER_TEXT}, "key": KEY},
            r"to an instance index in \[0, 2\]",
        ),
    ],
)
def test_study_info_the_preprocess_would_never_write_is_refused(
    spec: TaskSpec, value: Any, match: str
) -> None:
    with refused(match) as caught:
        validation.study_info(spec, study_info_tensor(value))
    assert SENDER_TEXT not in str(caught.value)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.array([b"a", b"b"], dtype=np.object_), r"'STUDY_INFO' must have shape \[1\] BYTES"),
        (np.array([[b"{}"]], dtype=np.object_), r"\[1\] BYTES per study, got \[1, 1\]"),
        (np.array([1.0], dtype=np.float32), r"'STUDY_INFO' must have shape \[1\] BYTES"),
    ],
)
def test_study_info_of_the_wrong_shape_is_refused(array: np.ndarray, match: str) -> None:
    with refused(match):
        validation.study_info(BONE, array)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros(3, dtype=np.float32), r"input 'DICOM' must be BYTES, got float32"),
        (np.array([[b"x"]], dtype=np.object_), r"'DICOM' must have shape \[n\] per study"),
    ],
)
def test_bytes_inputs_of_the_wrong_dtype_or_rank_are_refused(array: np.ndarray, match: str) -> None:
    with refused(match):
        validation.check_bytes_input(array, "DICOM")


# --- the model files, batched, with a fake pb_utils ---------------------------------------


@dataclass
class FakeMetric:
    values: list[float] = field(default_factory=list)

    def observe(self, value: float) -> None:
        self.values.append(value)

    def increment(self, value: float) -> None:
        self.values.append(value)


class FakeMetricFamily:
    HISTOGRAM = "histogram"
    COUNTER = "counter"

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name = name

    def Metric(self, labels: dict[str, str], buckets: list[float] | None = None) -> FakeMetric:
        return FakeMetric()


class ModelPbUtils(FakePbUtils):
    MetricFamily = FakeMetricFamily


@pytest.fixture
def pb_utils(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModelPbUtils]:
    """The stub's injected module; the models' log routing is undone afterwards."""
    fake = ModelPbUtils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    root = logging.getLogger("abdoserve")
    handlers, level = list(root.handlers), root.level
    yield fake
    root.handlers[:] = handlers
    root.setLevel(level)


def load_model(role: str, task: str, folder: Path, config: dict[str, Any] | None = None) -> Any:
    """`_python_models/<role>.py`'s TritonPythonModel, initialised as Triton would."""
    source = importlib.util.spec_from_file_location(
        f"composing_{role}", PYTHON_MODELS / f"{role}.py"
    )
    assert source is not None and source.loader is not None
    module = importlib.util.module_from_spec(source)
    source.loader.exec_module(module)
    model = module.TritonPythonModel()
    config = config or {"parameters": {"task": {"string_value": task}}}
    model.initialize(
        {
            "model_config": json.dumps(config),
            "model_repository": str(folder),
            "model_version": "1",
            "model_name": f"{task}_{role}",  # as Triton passes it
        }
    )
    return model


def tiny_graph(spec: TaskSpec, path: Path) -> None:
    """A `_net` graph of the spec's signature: output = mean pixel (+ sum of features)."""
    from onnx import TensorProto, helper, save

    channels, rows, columns = spec.sample_shape
    width = spec.feature_width
    inputs = [
        helper.make_tensor_value_info("samples", TensorProto.FLOAT, ["N", channels, rows, columns])
    ]
    nodes = [
        helper.make_node("ReduceMean", ["samples"], ["mean"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Flatten", ["mean"], ["pixels"], axis=1),
    ]
    weights = []
    if width:
        inputs.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", width]))
        weights.append(helper.make_tensor("ones", TensorProto.FLOAT, [width, 1], [1.0] * width))
        nodes.append(helper.make_node("MatMul", ["features", "ones"], ["summed"]))
        nodes.append(helper.make_node("Add", ["pixels", "summed"], ["output"]))
    else:
        nodes.append(helper.make_node("Identity", ["pixels"], ["output"]))
    output = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1])
    graph = helper.make_graph(nodes, "tiny", inputs, [output], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    save(model, str(path))


def net_model(spec: TaskSpec, folder: Path) -> Any:
    tiny_graph(spec, folder / "1" / "model.onnx")
    return load_model("net", spec.name, folder)


def tensors(**arrays: np.ndarray) -> FakeRequest:
    """One request: each array gets the batch axis of one study."""
    return FakeRequest({name: FakeTensor(name, value[None, ...]) for name, value in arrays.items()})


def assert_invalid(reply: FakeResponse, tensor: str) -> str:
    assert reply.error is not None and reply.output_tensors == []
    assert reply.error.code == FakeTritonError.INVALID_ARG
    assert f"'{tensor}'" in reply.error.message
    return reply.error.message


def output_of(reply: FakeResponse, name: str) -> np.ndarray:
    assert reply.error is None
    found = {tensor.name: tensor.value for tensor in reply.output_tensors}
    return found[name]


def test_net_answers_the_good_requests_of_a_batch_with_bad_ones(
    pb_utils: ModelPbUtils, tmp_path: Path
) -> None:
    model = net_model(FIBROSIS, tmp_path)
    good = samples(FIBROSIS, 3, 0.25)
    features = fibrosis_features(0.05, 0.0, 1.0)
    nan = good.copy()
    nan[0, 0, 0, 0] = np.nan
    requests = [
        tensors(SAMPLES=good, FEATURES=features),
        tensors(SAMPLES=nan, FEATURES=features),
        tensors(SAMPLES=samples(FIBROSIS, 17), FEATURES=features),
        tensors(SAMPLES=samples(FIBROSIS, 0), FEATURES=features),
        tensors(SAMPLES=good),
        tensors(SAMPLES=good, FEATURES=fibrosis_features(0.05, 1.0, 1.0)),
        {"SAMPLES": FakeTensor("SAMPLES", np.stack([good, good]))},  # two studies in one
        tensors(SAMPLES=samples(FIBROSIS, 1, 0.75), FEATURES=features),
    ]
    replies = model.execute(requests)
    assert len(replies) == len(requests)
    # mean pixel + sum of features (0.05 + 0 + 1)
    np.testing.assert_allclose(output_of(replies[0], "OUTPUT"), [[[1.3]] * 3], rtol=1e-6)
    np.testing.assert_allclose(output_of(replies[7], "OUTPUT"), [[[1.8]]], rtol=1e-6)
    assert "finite values in [0, 1]" in assert_invalid(replies[1], "SAMPLES")
    assert "1 to 16 samples" in assert_invalid(replies[2], "SAMPLES")
    assert "got shape [0, 1, 192, 192]" in assert_invalid(replies[3], "SAMPLES")
    assert "is missing" in assert_invalid(replies[4], "FEATURES")
    assert "one-hot" in assert_invalid(replies[5], "FEATURES")
    assert "batch dimension 1" in assert_invalid(replies[6], "SAMPLES")


def test_net_without_features_and_an_empty_batch(pb_utils: ModelPbUtils, tmp_path: Path) -> None:
    model = net_model(BONE, tmp_path)
    assert model.execute([]) == []
    replies = model.execute(
        [tensors(SAMPLES=samples(BONE, 32, 1.0)), tensors(SAMPLES=samples(BONE, 33))]
    )
    np.testing.assert_allclose(output_of(replies[0], "OUTPUT"), np.ones((1, 32, 1)))
    assert_invalid(replies[1], "SAMPLES")


def test_a_failed_network_run_fails_its_requests_without_raising(
    pb_utils: ModelPbUtils, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = net_model(BONE, tmp_path)

    def broken(*args: object) -> list[np.ndarray]:
        raise RuntimeError("onnxruntime failed")

    monkeypatch.setattr(model.runner, "run_studies", broken)
    replies = model.execute([tensors(SAMPLES=samples(BONE, 1)), tensors(SAMPLES=samples(BONE, 0))])
    assert replies[0].error is not None and replies[0].error.code == FakeTritonError.INTERNAL
    assert_invalid(replies[1], "SAMPLES")


def test_net_refuses_to_load_a_graph_that_disagrees_with_the_spec(
    pb_utils: ModelPbUtils, tmp_path: Path
) -> None:
    tiny_graph(BONE, tmp_path / "1" / "model.onnx")  # no features; liver_fibrosis_ct has 3
    with pytest.raises(ValueError, match="the ONNX graph's inputs disagree with the spec"):
        load_model("net", "liver_fibrosis_ct", tmp_path)


def test_preprocess_checks_its_tensors_and_answers_the_good_request(
    pb_utils: ModelPbUtils, tmp_path: Path
) -> None:
    model = load_model("preprocess", "bone_density_ct", tmp_path)  # no warm-up study there
    study = build_study("bone_density_ct", seed=1, slices=2)
    dicom = np.array(list(study.instances), dtype=np.object_)
    requests = [
        tensors(DICOM=dicom),
        tensors(DICOM=dicom[None, :]),  # rank 2 per study
        tensors(DICOM=np.zeros(2, np.float32)),
        tensors(DICOM=dicom, CLINICAL=np.array([[b"{}"]], dtype=np.object_)),
        tensors(DICOM=dicom, CLINICAL=np.array([b"\xff" + SENDER_TEXT.encode()], np.object_)),
        tensors(DICOM=dicom, CLINICAL=np.array([b"{}"], dtype=np.object_)),
    ]
    replies = model.execute(requests)
    for good in (replies[0], replies[5]):
        assert output_of(good, "SAMPLES").shape == (1, 2, 1, 192, 192)
        info = json.loads(output_of(good, "STUDY_INFO")[0, 0])
        assert validation.study_info(BONE, study_info_tensor(info)).instances == 2
    assert "[n] per study" in assert_invalid(replies[1], "DICOM")
    assert "must be BYTES" in assert_invalid(replies[2], "DICOM")
    assert "[n] per study, got [1, 1]" in assert_invalid(replies[3], "CLINICAL")
    assert SENDER_TEXT not in assert_invalid(replies[4], "CLINICAL")


def test_a_built_net_checks_against_the_overridden_spec(
    pb_utils: ModelPbUtils, tmp_path: Path
) -> None:
    """The build gives `_net` the hospital's overrides too, so its bounds follow them."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from abdoserve.export.configs import Tuning
    from abdoserve.export.repository import build_task

    build_task(tmp_path, "bone_density_ct", None, {"images.max_images": 8}, Tuning())
    folder = tmp_path / "bone_density_ct_net"
    config = text_format.Parse((folder / "config.pbtxt").read_text(), mc.ModelConfig())
    assert json.loads(config.parameters["spec_overrides"].string_value) == {"images.max_images": 8}
    as_triton_passes_it = json_format.MessageToDict(config, preserving_proto_field_name=True)
    model = load_model("net", "bone_density_ct", folder, as_triton_passes_it)
    replies = model.execute([tensors(SAMPLES=samples(BONE, 9)), tensors(SAMPLES=samples(BONE, 8))])
    assert "1 to 8 samples" in assert_invalid(replies[0], "SAMPLES")
    assert output_of(replies[1], "OUTPUT").shape == (1, 8, 1)
