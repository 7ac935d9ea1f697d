"""The client without a server: result parsing, retry policy, instance loading, CLI mapping."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from abdoserve_client import cli
from abdoserve_client.aio import AsyncAbdoServeClient
from abdoserve_client.client import AbdoServeClient
from abdoserve_client.display import as_json, as_text
from abdoserve_client.errors import (
    AbdoServeError,
    DeadlineExceededError,
    InvalidRequestError,
    ResponseError,
    ServerUnavailableError,
)
from abdoserve_client.instances import expand_paths, load_instances
from abdoserve_client.protocol import RetryPolicy, clinical_json
from abdoserve_client.results import (
    UNTRAINED_FALLBACK_NOTICE,
    BoneDensityResult,
    ClassificationResult,
    EsophagealCancerResult,
    FibrosisResult,
    LiverMassResult,
    ScoreResult,
    TaskInfo,
    parse_result,
)

NOTICE = "UNTRAINED REFERENCE WEIGHTS: not a diagnosis"
MODEL = {
    "name": "t",
    "version": "1",
    "weights_source": "reference-untrained",
    "weights_sha256": "ab" * 32,
    "untrained": True,
}


def parameters(task: str, kind: str, labels: list[str], unit: str = "") -> dict[str, str]:
    """Ensemble config parameters as the server publishes them."""
    return {
        "task": task,
        "title": f"{task} title",
        "paper": "Yasaka K et al.",
        "output_kind": kind,
        "labels": json.dumps(labels),
        "label_descriptions": json.dumps([f"about {label}" for label in labels]),
        "unit": unit,
        "clinical_inputs": "[]",
        "images": json.dumps({"roles": [], "min": 1, "max": 8}),
        "weights_source": "reference-untrained",
        "weights_sha256": "ab" * 32,
        "weights_untrained": "true",
    }


def answer(result: dict[str, Any], rows: list[list[float]], **extra: Any) -> bytes:
    document = {
        "task": "t",
        "model": MODEL,
        "result": result,
        "images": [{"instance": i, "values": row} for i, row in enumerate(rows)],
        "notice": NOTICE,
        **extra,
    }
    return json.dumps(document).encode()


FIBROSIS = TaskInfo.from_parameters(
    parameters("liver_fibrosis_ct", "regression", ["S", "G0", "G1", "G2"], "stage"), "1"
)


def test_classification_takes_labels_and_descriptions_from_the_config() -> None:
    info = TaskInfo.from_parameters(parameters("liver_mass_ct", "classification", ["X", "Y"]))
    probabilities = [[0.25, 0.75]]
    raw = answer({"label": "Y", "description": "ignored"}, probabilities)
    result = parse_result(info, raw, np.array([probabilities]), np.array([[0.25, 0.75]]))
    assert isinstance(result, LiverMassResult)
    assert (result.label, result.description) == ("Y", "about Y")
    assert result.probabilities == {"X": 0.25, "Y": 0.75}
    assert result.study_values.shape == (2,) and result.image_values.shape == (1, 2)
    assert result.images[0].instance == 0 and result.images[0].values == (0.25, 0.75)


def test_regression_reads_stage_and_description() -> None:
    raw = answer({"S": 1.2, "unit": "stage", "stage": "G1"}, [[1.0], [1.4]])
    result = parse_result(FIBROSIS, raw, np.array([[[1.0], [1.4]]]), np.array([[1.2]]))
    assert isinstance(result, FibrosisResult)
    assert result.score == pytest.approx(1.2) and result.unit == "stage"
    assert (result.stage, result.stage_description) == ("G1", "about G1")
    assert [image.values[0] for image in result.images] == [1.0, pytest.approx(1.4)]


def test_roles_name_the_instance_of_each_phase_or_level() -> None:
    info = TaskInfo.from_parameters(parameters("liver_mass_ct", "classification", ["X", "Y"]))
    roles = {"non_contrast": 2, "arterial": 0, "delayed": 1}
    raw = answer({"label": "Y"}, [[0.25, 0.75]], roles=roles)
    result = parse_result(info, raw, np.array([[[0.25, 0.75]]]), np.array([[0.25, 0.75]]))
    assert result.roles == roles and list(result.roles) == list(roles)
    plain = parse_result(FIBROSIS, answer({"S": 1.0}, [[1.0]]), np.ones((1, 1, 1)), np.ones((1, 1)))
    assert plain.roles == {}
    broken = answer({"label": "Y"}, [[0.25, 0.75]], roles={"arterial": "0"})
    with pytest.raises(ResponseError, match="roles"):
        parse_result(info, broken, np.array([[[0.25, 0.75]]]), np.array([[0.25, 0.75]]))


def test_flags_of_bone_density_and_esophageal_results() -> None:
    bmd_info = TaskInfo.from_parameters(parameters("bone_density_ct", "regression", ["BMD"]))
    raw = answer({"BMD": 0.6, "unit": "g/cm2", "osteoporosis": True}, [[0.6]])
    bone = parse_result(bmd_info, raw, np.array([[[0.6]]]), np.array([[0.6]]))
    assert isinstance(bone, BoneDensityResult)
    assert bone.bmd == pytest.approx(0.6) and bone.osteoporosis is True
    eso_info = TaskInfo.from_parameters(parameters("esophageal_cancer_ct", "probability", ["p"]))
    raw = answer({"p": 0.9, "unit": "", "suspicious": True}, [[0.1], [0.9]])
    eso = parse_result(eso_info, raw, np.array([[[0.1], [0.9]]]), np.array([[0.9]]))
    assert isinstance(eso, EsophagealCancerResult)
    assert eso.suspicious and eso.probability == pytest.approx(0.9)
    assert eso.image_probabilities == pytest.approx((0.1, 0.9))


def test_unknown_task_parses_by_output_kind() -> None:
    info = TaskInfo.from_parameters(parameters("spleen_ct", "classification", ["a", "b"]))
    raw = answer({"label": "a"}, [[0.6, 0.4]])
    result = parse_result(info, raw, np.array([[0.6, 0.4]]), np.array([0.6, 0.4]))
    assert type(result) is ClassificationResult
    info = TaskInfo.from_parameters(parameters("spleen_volume", "regression", ["ml"]))
    result = parse_result(info, answer({"ml": 2.0}, [[2.0]]), np.array([[2.0]]), np.array([2.0]))
    assert type(result) is ScoreResult and result.value == 2.0


def test_notice_is_kept_and_always_set_for_untrained_weights() -> None:
    rows = [[1.0]]
    result = parse_result(FIBROSIS, answer({}, rows), np.array(rows), np.array([1.0]))
    assert result.notice == NOTICE and result.untrained
    raw = json.loads(answer({}, rows))
    del raw["notice"]
    result = parse_result(FIBROSIS, json.dumps(raw), np.array(rows), np.array([1.0]))
    assert result.notice == UNTRAINED_FALLBACK_NOTICE
    raw["model"] = {**MODEL, "untrained": False}
    result = parse_result(FIBROSIS, json.dumps(raw), np.array(rows), np.array([1.0]))
    assert result.notice is None and not result.untrained


@pytest.mark.parametrize(
    ("raw", "scores", "study", "problem"),
    [
        (b"not json", [[1.0]], [1.0], "not JSON"),
        (b'{"images": []}', [[1.0]], [1.0], "result"),
        (answer({}, [[1.0]]), [[1.0], [2.0]], [1.0], "lists 1 images"),
        (answer({}, [[1.0]]), [[1.0]], [1.0, 2.0], "expected one value"),
        (answer({}, [[1.0]]), [[[1.0]], [[1.0]]], [1.0], "batch of 1"),
    ],
)
def test_malformed_responses_raise_response_error(
    raw: bytes, scores: list[Any], study: list[float], problem: str
) -> None:
    with pytest.raises(ResponseError, match=problem):
        parse_result(FIBROSIS, raw, np.array(scores), np.array(study))


def test_task_info_from_parameters_and_missing_keys() -> None:
    info = TaskInfo.from_parameters(parameters("t", "regression", ["S", "G0"], "stage"), "2")
    assert info.labels == ("S", "G0") and info.describe("G0") == "about G0"
    assert (info.model.version, info.model.untrained, info.max_images) == ("2", True, 8)
    with pytest.raises(ResponseError, match="task description"):
        TaskInfo.from_parameters({"task": "t"})


# --- retry policy -------------------------------------------------------------


def triton_error(code: str, message: str = "boom") -> InferenceServerException:
    return InferenceServerException(msg=message, status=f"StatusCode.{code}")


class FakeTriton:
    """Stands in for tritonclient's InferenceServerClient: fails `failures` times first."""

    def __init__(self, failures: list[str], message: str = "boom") -> None:
        self.failures = list(failures)
        self.message = message
        self.calls = 0

    def _respond(self, value: Any) -> Any:
        self.calls += 1
        if self.failures:
            raise triton_error(self.failures.pop(0), self.message)
        return value

    def get_model_config(self, task: str, client_timeout: float) -> Any:
        return self._respond("config")

    def close(self) -> None:
        pass


def sync_client(fake: FakeTriton, sleeps: list[float], retries: int = 3) -> AbdoServeClient:
    client = AbdoServeClient("127.0.0.1:1", retries=retries, backoff_s=0.1)
    client._triton = fake
    client._sleep = sleeps.append
    return client


def config_call(client: AbdoServeClient, fake: FakeTriton) -> Any:
    """One model-config RPC under the client's retry policy and deadline."""

    def action(timeout: float) -> Any:
        return fake.get_model_config("t", timeout)

    return client._call("config", action, client._deadline())


def test_unavailable_is_retried_with_exponential_backoff_then_succeeds() -> None:
    sleeps: list[float] = []
    fake = FakeTriton(["UNAVAILABLE", "UNAVAILABLE"])
    client = sync_client(fake, sleeps)
    assert config_call(client, fake) == "config"
    assert fake.calls == 3 and sleeps == pytest.approx([0.1, 0.2])


def test_unavailable_raises_after_the_configured_retries() -> None:
    sleeps: list[float] = []
    fake = FakeTriton(["UNAVAILABLE"] * 10)
    client = sync_client(fake, sleeps, retries=3)
    with pytest.raises(ServerUnavailableError, match="after 4 attempts") as raised:
        client.task_info("t")
    assert fake.calls == 4 and sleeps == pytest.approx([0.1, 0.2, 0.4])
    assert isinstance(raised.value.__cause__, InferenceServerException)
    assert raised.value.code == "UNAVAILABLE"


STUB_DIED = (
    "in ensemble 'bone_density_ct', Stub process 'bone_density_ct_preprocess_0_1' is not healthy."
)


def test_a_stub_that_failed_under_the_request_is_retried() -> None:
    sleeps: list[float] = []
    fake = FakeTriton(["INTERNAL", "INTERNAL"], message=STUB_DIED)
    client = sync_client(fake, sleeps)
    assert config_call(client, fake) == "config"
    assert fake.calls == 3 and sleeps == pytest.approx([0.1, 0.2])


def test_a_stub_failure_that_outlasts_the_retries_keeps_its_code_and_cause() -> None:
    sleeps: list[float] = []
    fake = FakeTriton(["INTERNAL"] * 10, message=STUB_DIED)
    client = sync_client(fake, sleeps, retries=2)
    with pytest.raises(AbdoServeError, match=r"failed after 3 attempts.*is not healthy") as raised:
        client.task_info("t")
    assert raised.value.code == "INTERNAL" and fake.calls == 3
    assert isinstance(raised.value.__cause__, InferenceServerException)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("INVALID_ARGUMENT", InvalidRequestError),
        ("DEADLINE_EXCEEDED", DeadlineExceededError),
        ("INTERNAL", AbdoServeError),
    ],
)
def test_other_errors_are_not_retried(code: str, kind: type[AbdoServeError]) -> None:
    sleeps: list[float] = []
    fake = FakeTriton([code, code])
    client = sync_client(fake, sleeps)
    with pytest.raises(kind) as raised:
        client.task_info("t")
    assert fake.calls == 1 and sleeps == []
    assert raised.value.code == code and raised.value.message == "boom"
    assert isinstance(raised.value.__cause__, InferenceServerException)


class FakeAsyncTriton:
    """tritonclient.grpc.aio's client, faked over FakeTriton."""

    def __init__(self, failures: list[str]) -> None:
        self.sync = FakeTriton(failures)

    async def get_model_config(self, task: str, client_timeout: float) -> Any:
        return self.sync.get_model_config(task, client_timeout)

    async def close(self) -> None:
        pass


def test_async_client_follows_the_same_policy() -> None:
    sleeps: list[float] = []
    fake = FakeAsyncTriton(["UNAVAILABLE"] * 10)

    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    async def scenario() -> None:
        async with AsyncAbdoServeClient("127.0.0.1:1", retries=2, backoff_s=0.5) as client:
            client._client, client._sleep = fake, sleep
            with pytest.raises(ServerUnavailableError, match="after 3 attempts"):
                await client.task_info("t")
            fake.sync.failures = ["INVALID_ARGUMENT"]
            with pytest.raises(InvalidRequestError):
                await client.task_info("t")

    asyncio.run(scenario())
    assert fake.sync.calls == 4 and sleeps == pytest.approx([0.5, 1.0])


def test_retry_policy_rejects_negative_values() -> None:
    with pytest.raises(ValueError, match="negative"):
        RetryPolicy(retries=-1)


def test_clinical_json_drops_none_and_refuses_unserialisable_values() -> None:
    assert json.loads(clinical_json({"hbv": "negative", "field_strength": None})) == {
        "hbv": "negative"
    }
    with pytest.raises(InvalidRequestError, match="JSON"):
        clinical_json({"age": float("nan")})


# --- instances and the CLI -----------------------------------------------------


@pytest.fixture
def study_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "study"
    folder.mkdir()
    for name in ("0002.dcm", "0001.dcm", ".hidden", "truth.json"):
        (folder / name).write_bytes(name.encode())
    (folder / "request.json").write_text(json.dumps({"age": 61, "sex": "F"}))
    return folder


def test_instances_from_bytes_paths_and_folders(study_folder: Path) -> None:
    single = study_folder / "0002.dcm"
    loaded = load_instances([b"raw", bytearray(b"ba"), str(single), single, study_folder])
    assert loaded == [b"raw", b"ba", b"0002.dcm", b"0002.dcm", b"0001.dcm", b"0002.dcm"]
    assert [path.name for path in expand_paths([study_folder])] == ["0001.dcm", "0002.dcm"]
    with pytest.raises(FileNotFoundError):
        load_instances([study_folder / "missing.dcm"])


def parse_cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_flags_map_to_clinical_inputs(tmp_path: Path) -> None:
    args = parse_cli("liver_mass_ct", str(tmp_path), "--roi", "10", "20", "30.5", "40")
    assert cli.clinical_inputs(args) == {"roi": [10, 20, 30.5, 40]}
    args = parse_cli("liver_fibrosis_mri", "x.dcm", "--field-strength", "3", "--hbv", "negative")
    assert cli.clinical_inputs(args) == {"field_strength": 3, "hbv": "negative"}
    assert parse_cli("t", "x.dcm").url == "127.0.0.1:8001"


def test_cli_reads_request_json_and_flags_override(study_folder: Path, tmp_path: Path) -> None:
    args = parse_cli("liver_fibrosis_ct", str(study_folder))
    assert cli.clinical_inputs(args) == {"age": 61, "sex": "F"}
    args = parse_cli("liver_fibrosis_ct", str(study_folder), "--age", "70")
    assert cli.clinical_inputs(args) == {"age": 70, "sex": "F"}
    explicit = tmp_path / "clinical.json"
    explicit.write_text(json.dumps({"age": 50}))
    args = parse_cli("liver_fibrosis_ct", str(study_folder), "--clinical-json", str(explicit))
    assert cli.clinical_inputs(args) == {"age": 50}  # replaces request.json
    explicit.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        cli.clinical_inputs(args)


class RaisingClient:
    """Replaces AbdoServeClient in the CLI; every inference fails with `error`."""

    error: Exception = AbdoServeError("x")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> RaisingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def infer(self, *args: Any) -> Any:
        raise self.error


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidRequestError("instance 0: (7FE0,0010) Pixel Data is missing"), 2),
        (ServerUnavailableError("no server"), 1),
        (DeadlineExceededError("slow"), 1),
    ],
)
def test_cli_exit_codes(
    error: Exception,
    code: int,
    study_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import abdoserve_client.client

    monkeypatch.setattr(RaisingClient, "error", error)
    monkeypatch.setattr(abdoserve_client.client, "AbdoServeClient", RaisingClient)
    assert cli.run(parse_cli("bone_density_ct", str(study_folder))) == code
    assert str(getattr(error, "message", "")) in capsys.readouterr().err
    assert cli.run(parse_cli("bone_density_ct", str(study_folder / "none"))) == 2


def test_text_output_shows_notice_answer_images_and_provenance() -> None:
    raw = answer({"S": 1.2, "unit": "stage", "stage": "G1"}, [[1.0], [1.4]])
    result = parse_result(FIBROSIS, raw, np.array([[[1.0], [1.4]]]), np.array([[1.2]]))
    text = as_text(result, FIBROSIS, ["a.dcm", "b.dcm"])
    assert NOTICE in text and "liver_fibrosis_ct title" in text
    assert "S = 1.2000 stage" in text and "stage G1 (about G1)" in text
    assert "[1] b.dcm: 1.4000" in text and "reference-untrained" in text
    document = json.loads(as_json(result))
    assert document["answer"]["notice"] == NOTICE
    assert document["study_values"] == [pytest.approx(1.2)]


def run_python(code: str) -> set[str]:
    """Top-level modules loaded after running `code` in a fresh interpreter."""
    probe = f"{code}; import sys; print(' '.join(sorted(sys.modules)))"
    output = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    return {name.split(".")[0] for name in output.split()}


def test_client_imports_neither_torch_nor_server_packages() -> None:
    loaded = run_python(
        "import abdoserve_client.client, abdoserve_client.aio, abdoserve_client.cli, "
        "abdoserve_client.display"
    )
    assert not loaded & {"torch", "onnx", "onnxruntime", "abdoserve", "pydicom"}
    # The CLI module is imported eagerly by `abdoserve`'s parser: it must stay light.
    assert not run_python("import abdoserve_client.cli") & {"tritonclient", "grpc", "numpy"}
