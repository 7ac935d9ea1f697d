"""`abdoserve model import` on whole builds: each source kind becomes version 2 of a
task's `_net` beside version 1, with its card and its parity; what does not fit is
refused and leaves the repository as it was."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from abdoserve.deploy.cli import main
from abdoserve.export import model_import
from abdoserve.export.architectures import PLANS, build_network
from abdoserve.export.configs import to_text
from abdoserve.export.errors import CheckpointMismatchError
from abdoserve.export.fused import read_config
from abdoserve.export.model_card import CARD_FILE, NOT_GIVEN, ModelCard, read_card
from abdoserve.export.model_import import ContractError, ImportRefused, import_model
from abdoserve.export.onnx_export import export_onnx
from abdoserve.export.weights import initialise, reference_network
from abdoserve.preprocessing.tasks import get_task

TASK = "liver_fibrosis_ct"  # a stem, BatchNorm, global average and clinical features
NET = f"{TASK}_net"
SPEC = get_task(TASK)
# hospitals still ship TorchScript; the tests make such archives with torch.jit.trace
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from abdoserve.export.repository import build_repository

    out = tmp_path_factory.mktemp("built") / "model_repository"
    build_repository(out, (TASK,), pipeline="ensemble")
    return out


@pytest.fixture
def repository(built: Path, tmp_path: Path) -> Path:
    """A fresh copy of the one-task build for each test."""
    copy = tmp_path / "model_repository"
    shutil.copytree(built, copy, symlinks=True)
    return copy


def snapshot(repository: Path) -> dict[str, str]:
    """Every file under the repository and its hash: what a refused import must not touch."""
    return {
        str(path.relative_to(repository)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(repository.rglob("*"))
        if path.is_file()
    }


def perturbed_module(
    seed: int = 7, spec_overrides: dict[str, object] | None = None
) -> torch.nn.Module:
    """The reference architecture with weights of its own (a 'hospital's training')."""
    module = build_network(get_task(TASK, spec_overrides))
    initialise(module, seed)
    return module.eval()


def state_dict_file(folder: Path, **kwargs: object) -> Path:
    path = folder / "hospital.pt"
    torch.save(perturbed_module(**kwargs).state_dict(), path)  # type: ignore[arg-type]
    return path


def chainer_npz(folder: Path, seed: int = 11) -> Path:
    """A Chainer `save_npz(path, L.Classifier(net))` file, written with numpy alone in the
    naming convention of export/chainer_import.py: conv1..N (no b: batch norm), bn1..N,
    fc1..M under `predictor/`, He-normal weights, non-trivial BatchNorm statistics."""
    rng = np.random.default_rng(seed)
    plan = PLANS[TASK]
    assert plan.stem is not None and plan.batch_norm and plan.readout == "global_average"
    convolutions = [(1, plan.stem[0], plan.stem[1])]
    channels = plan.stem[0]
    for width, count in plan.blocks:
        for _ in range(count):
            convolutions.append((channels, width, 3))
            channels = width
    arrays: dict[str, np.ndarray] = {}

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    for index, (inputs, outputs, kernel) in enumerate(convolutions, 1):
        arrays[f"predictor/conv{index}/W"] = normal(
            (outputs, inputs, kernel, kernel), np.sqrt(2 / (inputs * kernel * kernel))
        )
        arrays[f"predictor/bn{index}/gamma"] = 1 + normal((outputs,), 0.1)
        arrays[f"predictor/bn{index}/beta"] = normal((outputs,), 0.1)
        arrays[f"predictor/bn{index}/avg_mean"] = normal((outputs,), 0.1)
        arrays[f"predictor/bn{index}/avg_var"] = np.exp(normal((outputs,), 0.1))
        arrays[f"predictor/bn{index}/N"] = np.array(100)
    widths = [channels + SPEC.feature_width, *plan.hidden, SPEC.output.width]
    for index, (inputs, outputs) in enumerate(itertools.pairwise(widths), 1):
        arrays[f"predictor/fc{index}/W"] = normal((outputs, inputs), np.sqrt(1 / inputs))
        arrays[f"predictor/fc{index}/b"] = normal((outputs,), 0.01)
    path = folder / "hospital.npz"
    np.savez(path, **arrays)
    return path


def other_architecture_onnx(folder: Path, *, poison: bool = False) -> Path:
    """A graph of no reference architecture: mean intensity and the clinical features
    through one dense layer, a scaled sigmoid to 0..4. `poison`: a log of a negative
    number on the way, so every answer is NaN."""
    inputs = [
        helper.make_tensor_value_info("samples", TensorProto.FLOAT, ["rows", 1, 192, 192]),
        helper.make_tensor_value_info("features", TensorProto.FLOAT, ["rows", 3]),
    ]
    weight = numpy_helper.from_array(np.array([[2.0], [0.3], [-0.2], [0.1]], np.float32), "w")
    four = numpy_helper.from_array(np.array([4.0], np.float32), "four")
    minus = numpy_helper.from_array(np.array([-1.0], np.float32), "minus")
    nodes = [
        helper.make_node("GlobalAveragePool", ["samples"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Concat", ["flat", "features"], ["joined"], axis=1),
        helper.make_node("MatMul", ["joined", "w"], ["logit"]),
    ]
    last = "logit"
    if poison:
        nodes += [
            helper.make_node("Abs", ["logit"], ["size"]),
            helper.make_node("Mul", ["size", "minus"], ["negative"]),
            helper.make_node("Sub", ["negative", "four"], ["below"]),
            helper.make_node("Log", ["below"], ["nan"]),
        ]
        last = "nan"
    nodes += [
        helper.make_node("Sigmoid", [last], ["squashed"]),
        helper.make_node("Mul", ["squashed", "four"], ["output"]),
    ]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["rows", 1])]
    constants = [weight, four, minus] if poison else [weight, four]
    graph = helper.make_graph(nodes, "other", inputs, outputs, initializer=constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what ONNX Runtime of this environment reads
    path = folder / ("poisoned.onnx" if poison else "other.onnx")
    onnx.save(model, path)
    return path


def check_version_two(repository: Path, source: Path, framework: str) -> ModelCard:
    folder = repository / NET / "2"
    # The reference architecture's weights come with a twin for the explanation maps;
    # TorchScript and ONNX have none.
    twin = ["twin.pt"] if framework in ("pytorch", "chainer") else []
    assert sorted(path.name for path in folder.iterdir()) == [
        CARD_FILE,
        "model.onnx",
        "model.py",
        "provenance.json",
        *twin,
    ]
    assert sorted(path.name for path in (repository / NET).iterdir()) == ["1", "2", "config.pbtxt"]
    card = read_card(folder / CARD_FILE)
    assert (card.task, card.model, card.version) == (TASK, NET, 2)
    assert card.source.file_name == source.name
    assert card.source.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert card.source.framework == framework
    assert card.acceptance is None
    assert card.spec_differences == []
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["weights_sha256"] == card.source.sha256
    assert list(read_config(repository / NET).version_policy.specific.versions) == [1]
    return card


def test_a_state_dict_becomes_version_2_within_parity(repository: Path, tmp_path: Path) -> None:
    before = snapshot(repository)
    source = state_dict_file(tmp_path)
    result = import_model(repository, TASK, source, intended_use="staging of adults")
    assert result.version == 2
    card = check_version_two(repository, source, "pytorch")
    assert (card.intended_use, card.training_data) == ("staging of adults", NOT_GIVEN)
    parity = card.parity
    assert parity.max_abs_diff is not None and parity.max_abs_diff <= 1e-4
    assert parity.study_seeds == [2000, 2001, 2002] and parity.samples > 3
    assert parity.served_by == {"runtime": "onnxruntime", "precision": "fp32", "file": "model.onnx"}
    # version 1 and the other models are as they were; only version 2 is new, and the
    # net's config names its card (the policy still pins version 1)
    after = snapshot(repository)
    config = f"{NET}/config.pbtxt"
    assert {name: after[name] for name in before if name != config} == {
        name: digest for name, digest in before.items() if name != config
    }
    net_config = read_config(repository / NET)
    assert json.loads(net_config.parameters["version_cards"].string_value) == {"2": card.card_id}
    assert list(net_config.version_policy.specific.versions) == [1]
    assert sorted(set(after) - set(before)) == [
        f"{NET}/2/{name}"
        for name in (CARD_FILE, "model.onnx", "model.py", "provenance.json", "twin.pt")
    ]
    served_1 = (repository / NET / "1" / "model.onnx").read_bytes()
    assert (repository / NET / "2" / "model.onnx").read_bytes() != served_1


def test_a_chainer_npz_becomes_version_2_within_parity(repository: Path, tmp_path: Path) -> None:
    source = chainer_npz(tmp_path)
    import_model(repository, TASK, source, training_data="300 biopsy-proven cases, 2015-2017")
    card = check_version_two(repository, source, "chainer")
    assert card.parity.max_abs_diff is not None and card.parity.max_abs_diff <= 1e-4
    assert any("eps 2e-05" in line for line in card.import_adaptations)
    assert any("ceil_mode" in line for line in card.import_adaptations)
    provenance = json.loads((repository / NET / "2" / "provenance.json").read_text())
    assert provenance["weights_framework"] == "chainer"


def test_a_torchscript_module_becomes_version_2(repository: Path, tmp_path: Path) -> None:
    source = tmp_path / "hospital.pth"
    samples = torch.rand(2, *SPEC.sample_shape)
    features = torch.rand(2, SPEC.feature_width)
    torch.jit.trace(perturbed_module(), (samples, features)).save(str(source))  # type: ignore[no-untyped-call]
    import_model(repository, TASK, source)
    card = check_version_two(repository, source, "torchscript")
    assert card.parity.max_abs_diff is not None and card.parity.max_abs_diff <= 1e-4


def test_an_onnx_graph_of_another_architecture_is_imported_without_parity(
    repository: Path, tmp_path: Path
) -> None:
    source = other_architecture_onnx(tmp_path)
    import_model(repository, TASK, source)
    card = check_version_two(repository, source, "onnx")
    assert card.parity.reference is None and card.parity.max_abs_diff is None
    assert card.parity.status.startswith("n/a: no source framework")
    assert card.parity.ort_self_check.finite and card.parity.ort_self_check.output_shape[1] == 1
    assert (repository / NET / "2" / "model.onnx").read_bytes() == source.read_bytes()


def refused(repository: Path, action: Callable[[], object], message: str) -> None:
    before = snapshot(repository)
    with pytest.raises(ImportRefused) as error:
        action()
    assert message in str(error.value)
    assert snapshot(repository) == before
    assert not [path for path in (repository / NET).iterdir() if path.name.startswith(".")]


def test_an_onnx_graph_for_another_matrix_is_refused_by_name(
    repository: Path, tmp_path: Path
) -> None:
    source = tmp_path / "hospital_224.onnx"
    export_onnx(get_task(TASK, {"geometry.matrix": 224}), perturbed_module(), source)
    refused(
        repository,
        lambda: import_model(repository, TASK, source),
        "input SAMPLES: expected shape [-1, 1, 192, 192], got [-1, 1, 224, 224]",
    )
    with pytest.raises(ContractError):
        import_model(repository, TASK, source)


def test_a_graph_answering_nan_is_refused(repository: Path, tmp_path: Path) -> None:
    source = other_architecture_onnx(tmp_path, poison=True)
    refused(
        repository,
        lambda: import_model(repository, TASK, source),
        "the graph answers non-finite values",
    )


def test_parity_beyond_the_bound_is_refused(
    repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_import, "PARITY_TOLERANCE", 0.0)
    source = state_dict_file(tmp_path)
    refused(
        repository,
        lambda: import_model(repository, TASK, source),
        "parity: the served version differs from the eager pytorch network by",
    )


def test_an_existing_version_is_refused_by_the_command(
    repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = state_dict_file(tmp_path)
    before = snapshot(repository)
    words = [
        "model",
        "import",
        TASK,
        str(source),
        "--version",
        "1",
        "--repository",
        str(repository),
    ]
    assert main(words) == 2
    assert capsys.readouterr().out == (
        f"error: {NET} version 1 exists already (versions 1): choose another --version, "
        "or leave it out for 2\n"
    )
    assert snapshot(repository) == before
    assert main([*words[:4], "--repository", str(repository)]) == 0
    printed = capsys.readouterr().out
    assert f"{NET} version 2 written to {repository / NET / '2'}" in printed
    assert "serving     version 1 (pinned); version 2 is not served" in printed


def test_a_checkpoint_of_another_shape_is_refused(repository: Path, tmp_path: Path) -> None:
    source = tmp_path / "mass.pt"
    torch.save(reference_network(get_task("liver_mass_ct")).module.state_dict(), source)
    before = snapshot(repository)
    with pytest.raises(CheckpointMismatchError, match="does not fit liver_fibrosis_ct"):
        import_model(repository, TASK, source)
    assert snapshot(repository) == before


def test_an_unpinned_build_is_pinned_to_the_version_that_serves(
    repository: Path, tmp_path: Path
) -> None:
    config = read_config(repository / NET)
    config.ClearField("version_policy")  # a build from before the pin
    (repository / NET / "config.pbtxt").write_text(to_text(config))
    result = import_model(repository, TASK, state_dict_file(tmp_path))
    assert result.pin.changed and result.pin.versions == (1,)
    assert list(read_config(repository / NET).version_policy.specific.versions) == [1]


def test_an_overridden_matrix_is_on_the_card(tmp_path: Path) -> None:
    from abdoserve.export.repository import build_repository

    repository = tmp_path / "model_repository"
    overrides = {"geometry.matrix": 224}
    build_repository(repository, (TASK,), overrides={TASK: overrides}, pipeline="ensemble")
    source = state_dict_file(tmp_path, spec_overrides=overrides)
    card = import_model(repository, TASK, source).card
    assert [(d.field, d.default, d.served) for d in card.spec_differences] == [
        ("geometry.matrix", 192, 224)
    ]
    assert card.parity.max_abs_diff is not None and card.parity.max_abs_diff <= 1e-4


def test_a_rebuild_keeps_imported_versions_their_cards_and_the_routing(
    repository: Path, tmp_path: Path
) -> None:
    """`serve` rebuilds the repository when the code or the tuning changed: what the
    hospital imported, and the routing between versions, must come through it."""
    from abdoserve.export.configs import Tuning
    from abdoserve.export.repository import build_repository

    result = import_model(repository, TASK, state_dict_file(tmp_path))
    post = repository / f"{TASK}_postprocess"
    routed = read_config(post)
    routed.parameters["routing"].string_value = json.dumps({"production": 2, "generation": 4})
    (post / "config.pbtxt").write_text(to_text(routed))
    net = read_config(repository / NET)
    del net.version_policy.specific.versions[:]
    net.version_policy.specific.versions.extend([2])
    (repository / NET / "config.pbtxt").write_text(to_text(net))
    imported = snapshot(repository / NET / "2")

    build_repository(repository, (TASK,), tuning=Tuning(net_instances=1), pipeline="ensemble")
    assert sorted(p.name for p in (repository / NET).iterdir()) == ["1", "2", "config.pbtxt"]
    after = snapshot(repository / NET / "2")
    assert {name: digest for name, digest in after.items() if name != "model.py"} == {
        name: digest for name, digest in imported.items() if name != "model.py"
    }
    assert read_card(repository / NET / "2" / CARD_FILE).card_id == result.card.card_id
    rebuilt = read_config(repository / NET)
    assert list(rebuilt.version_policy.specific.versions) == [2]
    assert json.loads(rebuilt.parameters["version_cards"].string_value) == {
        "2": result.card.card_id
    }
    assert rebuilt.instance_group[0].count == 1  # the new tuning
    routing = json.loads(read_config(post).parameters["routing"].string_value)
    assert routing == {"production": 2, "generation": 4}


def test_a_rebuild_whose_network_inputs_changed_leaves_imported_versions_behind(
    repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from abdoserve.export.repository import build_repository

    import_model(repository, TASK, state_dict_file(tmp_path))
    build_repository(
        repository, (TASK,), overrides={TASK: {"geometry.matrix": 160}}, pipeline="ensemble"
    )
    assert sorted(p.name for p in (repository / NET).iterdir()) == ["1", "config.pbtxt"]
    assert "imported versions [2] are not carried into the rebuild: the network's tensors" in (
        caplog.text
    )
    assert list(read_config(repository / NET).version_policy.specific.versions) == [1]


def test_a_version_imported_into_the_ensemble_comes_through_a_fused_rebuild_and_back(
    repository: Path, tmp_path: Path
) -> None:
    """The version folders are the same files in either shape: `serve --pipeline fused`
    rebuilds into one model per task, and the versions, cards and routing come with it
    (beside the fused model's code, its policy still pinned to that code)."""
    from abdoserve.export.repository import build_repository

    result = import_model(repository, TASK, state_dict_file(tmp_path))
    post = repository / f"{TASK}_postprocess"
    routed = read_config(post)
    routed.parameters["routing"].string_value = json.dumps({"production": 2, "generation": 3})
    (post / "config.pbtxt").write_text(to_text(routed))
    onnx_digest = snapshot(repository / NET / "2")["model.onnx"]

    build_repository(repository, (TASK,), pipeline="fused")
    fused = repository / TASK
    assert not (repository / NET).exists()
    names = {p.name for p in (fused / "2").iterdir()}
    assert {"model.onnx", "provenance.json", CARD_FILE} <= names
    assert "model.py" not in names  # Triton never loads a fused model's network versions
    assert snapshot(fused / "2")["model.onnx"] == onnx_digest
    config = read_config(fused)
    assert list(config.version_policy.specific.versions) == [1]
    assert json.loads(config.parameters["routing"].string_value)["production"] == 2
    assert json.loads(config.parameters["version_cards"].string_value) == {"2": result.card.card_id}

    build_repository(repository, (TASK,), pipeline="ensemble")  # and back to the ensemble
    assert (repository / NET / "2" / "model.py").is_file()
    assert snapshot(repository / NET / "2")["model.onnx"] == onnx_digest
    assert json.loads(read_config(post).parameters["routing"].string_value)["production"] == 2
