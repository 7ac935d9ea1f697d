"""The composing models called directly over gRPC, bypassing the ensemble (the shape
`serve --pipeline ensemble` and a GPU server run; the default fused shape has none).

Triton 2.51 cannot restrict a model to the ensemble, so `<task>_net`,
`<task>_postprocess` (which calls `<task>_net` itself) and `<task>_preprocess` answer
any client. Every malformed
tensor is refused with INVALID_ARGUMENT naming the tensor (by Triton's own config
checks or by `abdoserve.serving.validation`); tensors the real preprocess made, passed
by hand from model to model, get the ensemble's answer; no stub dies and the server
stays ready.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from abdoserve.deploy import stubs
from abdoserve.deploy.embedded import EmbeddedServer
from abdoserve.export.phantom import build_study
from abdoserve.preprocessing.specs import TaskSpec
from abdoserve.preprocessing.tasks import TASKS
from abdoserve.serving.validation import sample_count_range
from tests.integration.triton_calls import OUTPUTS, infer

Tensors = dict[str, np.ndarray]
SENDER_TEXT = "PHANTOM^ABDOMEN"  # sender-controlled text no refusal may echo
PREPARED = ("SAMPLES", "SAMPLE_SOURCE", "STUDY_INFO", "FEATURES")


def call(
    client: grpcclient.InferenceServerClient,
    model: str,
    tensors: Mapping[str, np.ndarray],
    outputs: Sequence[str],
) -> Tensors:
    """One direct request: each tensor already carries its batch axis."""
    inputs = []
    for name, value in tensors.items():
        item = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        item.set_data_from_numpy(value)
        inputs.append(item)
    result = client.infer(
        model,
        inputs,
        outputs=[grpcclient.InferRequestedOutput(name) for name in outputs],
        client_timeout=120,
    )
    return {name: result.as_numpy(name) for name in outputs}


def net_inputs(prepared: Tensors) -> Tensors:
    """What the ensemble maps from the preprocess model to the net."""
    return {name: prepared[name] for name in ("SAMPLES", "FEATURES") if name in prepared}


def postprocess_inputs(prepared: Tensors) -> Tensors:
    """What the ensemble maps from the preprocess model to the postprocess (which calls
    the net itself)."""
    return dict(prepared)


@dataclass(frozen=True)
class Chain:
    """One phantom study taken through the three composing models by hand."""

    prepared: Tensors  # the preprocess model's outputs
    output: np.ndarray  # the net's OUTPUT
    answered: Tensors  # the postprocess model's SCORES, STUDY, ANSWER


def study_tensors(task: str) -> Tensors:
    """The ensemble's inputs for the task's phantom study (what the preprocess takes)."""
    study = build_study(task, seed=2)
    return {
        "DICOM": np.array([list(study.instances)], dtype=np.object_),
        "CLINICAL": np.array([[json.dumps(study.clinical).encode()]], dtype=np.object_),
    }


def run_chain(client: grpcclient.InferenceServerClient, task: str) -> Chain:
    produced = [name for name in PREPARED if name != "FEATURES" or TASKS[task].feature_width]
    prepared = call(client, f"{task}_preprocess", study_tensors(task), produced)
    output = call(client, f"{task}_net", net_inputs(prepared), ["OUTPUT"])["OUTPUT"]
    answered = call(client, f"{task}_postprocess", postprocess_inputs(prepared), OUTPUTS)
    return Chain(prepared, output, answered)


@pytest.fixture(scope="module")
def server(ensemble_server: EmbeddedServer) -> EmbeddedServer:
    """Only the ensemble has composing models: `serve`'s default fuses them away."""
    return ensemble_server


@pytest.fixture(scope="module")
def grpc_url(server: EmbeddedServer) -> str:
    return f"{server.options.host}:{server.ports.grpc}"


@pytest.fixture(scope="module")
def stubs_before(server: EmbeddedServer) -> Iterator[dict[int, stubs.Stub]]:
    assert server.process is not None
    before = stubs.stubs_of(server.process.pid)
    assert before and not any(stub.dead for stub in before.values())
    yield before
    assert_no_stub_died(server, before)


def assert_no_stub_died(server: EmbeddedServer, before: Mapping[int, stubs.Stub]) -> None:
    assert server.process is not None
    now = stubs.stubs_of(server.process.pid)
    assert set(now) == set(before), "a Python-backend stub restarted or died"
    assert not any(stub.dead or stub.stopped for stub in now.values())
    assert server.is_ready()


@pytest.fixture(scope="module")
def client(grpc_url: str, stubs_before: dict[int, stubs.Stub]) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(grpc_url)


@pytest.fixture(scope="module")
def chains(client: grpcclient.InferenceServerClient) -> dict[str, Chain]:
    return {task: run_chain(client, task) for task in sorted(TASKS)}


# --- a well-formed direct chain answers as the ensemble does -------------------------------


@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_direct_chain_answers_as_the_ensemble(
    client: grpcclient.InferenceServerClient, chains: dict[str, Chain], task: str
) -> None:
    study = build_study(task, seed=2)
    served = infer(client, task, study.instances, study.clinical)
    answered = chains[task].answered
    np.testing.assert_allclose(answered["SCORES"][0], served.scores, rtol=1e-6)
    np.testing.assert_allclose(answered["STUDY"][0], served.study, rtol=1e-6)
    assert json.loads(answered["ANSWER"][0, 0]) == served.answer


# --- malformed tensors, each refused naming its tensor -------------------------------------


Mutation = Callable[[TaskSpec, Tensors], Tensors]


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # "net", "postprocess" or "preprocess"
    tensor: str  # the tensor the refusal must name
    mutate: Mutation
    applies: Callable[[TaskSpec], bool] = lambda spec: True


def edited(name: str, change: Callable[[np.ndarray], np.ndarray | None]) -> Mutation:
    """A copy of the tensors with `name` changed in place (or replaced by `change`'s result)."""

    def mutate(spec: TaskSpec, tensors: Tensors) -> Tensors:
        copy = {key: value.copy() for key, value in tensors.items()}
        replaced = change(copy[name])
        if replaced is not None:
            copy[name] = replaced
        return copy

    return mutate


def put(index: tuple[int, ...], value: float) -> Callable[[np.ndarray], None]:
    def change(array: np.ndarray) -> None:
        array[index] = value

    return change


def rows(count: Callable[[TaskSpec], int], *names: str) -> Mutation:
    """The per-study rows of `names` resized to count(spec), repeating the first row."""

    def mutate(spec: TaskSpec, tensors: Tensors) -> Tensors:
        copy = dict(tensors)
        for name in names:
            first = tensors[name][:, :1]
            copy[name] = np.ascontiguousarray(np.repeat(first, count(spec), axis=1))
        return copy

    return mutate


def study_info(data: bytes) -> Mutation:
    return edited("STUDY_INFO", lambda _: np.array([[data]], dtype=np.object_))


def study_info_json(change: Callable[[dict[str, object]], object]) -> Mutation:
    def mutate(spec: TaskSpec, tensors: Tensors) -> Tensors:
        info = json.loads(tensors["STUDY_INFO"][0, 0])
        return study_info(json.dumps(change(info)).encode())(spec, tensors)

    return mutate


def without(name: str) -> Mutation:
    return lambda spec, tensors: {key: value for key, value in tensors.items() if key != name}


def too_many(spec: TaskSpec) -> int:
    return sample_count_range(spec)[1] + 1


def has_features(spec: TaskSpec) -> bool:
    return spec.feature_width > 0


def probabilities(spec: TaskSpec) -> bool:
    return spec.output.kind != "regression"


NET_CASES = [
    Case("samples_nan", "net", "SAMPLES", edited("SAMPLES", put((0, 0, 0, 5, 7), np.nan))),
    Case("samples_inf", "net", "SAMPLES", edited("SAMPLES", put((0, -1, -1, 0, 0), np.inf))),
    Case(
        "samples_far_out_of_range", "net", "SAMPLES", edited("SAMPLES", put((0, 0, 0, 1, 1), 1e6))
    ),
    Case("samples_negative", "net", "SAMPLES", edited("SAMPLES", put((0, 0, 0, 0, 0), -1.0))),
    Case("samples_none", "net", "SAMPLES", rows(lambda spec: 0, "SAMPLES")),
    Case("samples_one_too_many", "net", "SAMPLES", rows(too_many, "SAMPLES")),
    Case(
        "samples_wrong_matrix",
        "net",
        "SAMPLES",
        edited("SAMPLES", lambda array: np.zeros((*array.shape[:3], 17, 17), np.float32)),
    ),
    Case(
        "samples_wrong_channels",
        "net",
        "SAMPLES",
        edited("SAMPLES", lambda array: np.concatenate([array, array], axis=2)),
    ),
    Case("samples_rank_4", "net", "SAMPLES", edited("SAMPLES", lambda array: array[:, 0])),
    Case(
        "samples_fp64", "net", "SAMPLES", edited("SAMPLES", lambda array: array.astype(np.float64))
    ),
    Case(
        "two_studies_in_one_request",
        "net",
        "SAMPLES",
        lambda spec, tensors: {key: np.concatenate([value] * 2) for key, value in tensors.items()},
    ),
    Case("features_nan", "net", "FEATURES", edited("FEATURES", put((0, 0), np.nan)), has_features),
    Case(
        "features_out_of_range",
        "net",
        "FEATURES",
        edited("FEATURES", put((0, 0), 1e6)),
        has_features,
    ),
    Case(
        "features_not_one_hot",
        "net",
        "FEATURES",
        edited("FEATURES", put((0, -1), 0.5)),
        has_features,
    ),
    Case("features_missing", "net", "FEATURES", without("FEATURES"), has_features),
    Case(
        "features_wrong_width",
        "net",
        "FEATURES",
        edited("FEATURES", lambda array: np.concatenate([array, array], axis=1)),
        has_features,
    ),
]

POSTPROCESS_CASES = [
    Case(
        "post_samples_nan",
        "postprocess",
        "SAMPLES",
        edited("SAMPLES", put((0, 0, 0, 5, 7), np.nan)),
    ),
    Case(
        "post_samples_wrong_matrix",
        "postprocess",
        "SAMPLES",
        edited("SAMPLES", lambda array: np.zeros((*array.shape[:3], 17, 17), np.float32)),
    ),
    Case(
        "post_samples_none",
        "postprocess",
        "SAMPLES",
        rows(lambda spec: 0, "SAMPLES", "SAMPLE_SOURCE"),
    ),
    Case(
        "post_samples_one_too_many",
        "postprocess",
        "SAMPLES",
        rows(too_many, "SAMPLES", "SAMPLE_SOURCE"),
    ),
    Case(
        "post_features_not_one_hot",
        "postprocess",
        "FEATURES",
        edited("FEATURES", put((0, -1), 0.5)),
        has_features,
    ),
    Case(
        "sources_longer_than_output",
        "postprocess",
        "SAMPLE_SOURCE",
        edited("SAMPLE_SOURCE", lambda array: np.concatenate([array, array[:, :1]], axis=1)),
    ),
    Case(
        "sources_beyond_instances",
        "postprocess",
        "SAMPLE_SOURCE",
        edited("SAMPLE_SOURCE", put((0, 0), 300)),
    ),
    Case(
        "sources_negative", "postprocess", "SAMPLE_SOURCE", edited("SAMPLE_SOURCE", put((0, 0), -1))
    ),
    Case(
        "sources_int64",
        "postprocess",
        "SAMPLE_SOURCE",
        edited("SAMPLE_SOURCE", lambda array: array.astype(np.int64)),
    ),
    Case(
        "study_info_garbage",
        "postprocess",
        "STUDY_INFO",
        study_info(b"\xff\xfe" + SENDER_TEXT.encode()),
    ),
    Case("study_info_not_json", "postprocess", "STUDY_INFO", study_info(SENDER_TEXT.encode())),
    Case("study_info_not_an_object", "postprocess", "STUDY_INFO", study_info(b"[1, 2]")),
    Case("study_info_nested_deep", "postprocess", "STUDY_INFO", study_info(b"[" * 3000)),
    Case("study_info_too_big", "postprocess", "STUDY_INFO", study_info(b" " * 100_000)),
    Case(
        "study_info_unknown_key",
        "postprocess",
        "STUDY_INFO",
        study_info_json(lambda info: {**info, SENDER_TEXT: 1}),
    ),
    Case(
        "study_info_wrong_roles",
        "postprocess",
        "STUDY_INFO",
        study_info_json(lambda info: {**info, "roles": {SENDER_TEXT: 0}}),
    ),
    Case(
        "study_info_key_not_a_digest",
        "postprocess",
        "STUDY_INFO",
        study_info_json(lambda info: {**info, "key": SENDER_TEXT}),
    ),
    Case(
        "study_info_no_instances",
        "postprocess",
        "STUDY_INFO",
        study_info_json(lambda info: {**info, "instances": 0}),
    ),
    Case(
        "study_info_two_elements",
        "postprocess",
        "STUDY_INFO",
        edited("STUDY_INFO", lambda array: np.concatenate([array, array], axis=1)),
    ),
]

PREPROCESS_CASES = [
    Case(
        "clinical_garbage",
        "preprocess",
        "CLINICAL",
        edited("CLINICAL", lambda _: np.array([[b"\xff" + SENDER_TEXT.encode()]], np.object_)),
    ),
    Case(
        "clinical_two_elements",
        "preprocess",
        "CLINICAL",
        edited("CLINICAL", lambda array: np.concatenate([array, array], axis=1)),
    ),
    Case(
        "clinical_fp32",
        "preprocess",
        "CLINICAL",
        edited("CLINICAL", lambda _: np.ones((1, 1), np.float32)),
    ),
    Case("dicom_rank_3", "preprocess", "DICOM", edited("DICOM", lambda array: array[:, None, :])),
]

CASES = [
    (task, case)
    for task in sorted(TASKS)
    for case in NET_CASES + POSTPROCESS_CASES + PREPROCESS_CASES
    if case.applies(TASKS[task])
]


def good_inputs(chain: Chain, model: str, task: str) -> Tensors:
    if model == "net":
        return net_inputs(chain.prepared)
    if model == "postprocess":
        return postprocess_inputs(chain.prepared)
    return study_tensors(task)


@pytest.mark.parametrize(
    ("task", "case"), CASES, ids=[f"{task}-{case.model}-{case.name}" for task, case in CASES]
)
def test_a_malformed_direct_call_is_refused_naming_its_tensor(
    client: grpcclient.InferenceServerClient, chains: dict[str, Chain], task: str, case: Case
) -> None:
    spec = TASKS[task]
    tensors = case.mutate(spec, good_inputs(chains[task], case.model, task))
    with pytest.raises(InferenceServerException) as caught:
        call(client, f"{task}_{case.model}", tensors, ["OUTPUT"] if case.model == "net" else [])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value
    message = str(caught.value.message())
    assert case.tensor in message, message
    assert SENDER_TEXT not in message


# --- a bad request batched with good ones --------------------------------------------------


def test_bad_direct_calls_among_concurrent_good_ones(
    grpc_url: str, chains: dict[str, Chain], stubs_before: dict[int, stubs.Stub]
) -> None:
    chain = chains["liver_fibrosis_ct"]
    good = net_inputs(chain.prepared)
    bad = edited("SAMPLES", put((0, 0, 0, 0, 0), np.nan))(TASKS["liver_fibrosis_ct"], good)

    def direct(index: int) -> np.ndarray | InferenceServerException:
        local = grpcclient.InferenceServerClient(grpc_url)
        try:
            return call(
                local, "liver_fibrosis_ct_net", bad if index % 4 == 1 else good, ["OUTPUT"]
            )["OUTPUT"]
        except InferenceServerException as error:
            return error

    with ThreadPoolExecutor(max_workers=12) as pool:
        outcomes = list(pool.map(direct, range(24)))
    for index, outcome in enumerate(outcomes):
        if index % 4 == 1:
            assert isinstance(outcome, InferenceServerException)
            assert outcome.status() == "StatusCode.INVALID_ARGUMENT"
        else:
            assert isinstance(outcome, np.ndarray), outcome
            np.testing.assert_allclose(outcome, chain.output, rtol=1e-5)


def test_the_server_is_ready_and_no_stub_died(
    server: EmbeddedServer, stubs_before: dict[int, stubs.Stub]
) -> None:
    assert_no_stub_died(server, stubs_before)
