"""Contract tests: configs vs specs vs ONNX graphs vs ensemble maps. Tensor names are a contract."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from abdoserve.export.configs import explain_name, model_names, render_task, to_text
from abdoserve.export.locations import PYTHON_MODELS
from abdoserve.preprocessing.tasks import TASKS

# The committed configs, in this checkout.
SOURCE_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: mc.DataType.TYPE_FP32}
ALL_MODELS = [name for task in TASKS for name in (*model_names(task), explain_name(task))]


def parse(path: Path) -> mc.ModelConfig:
    config = mc.ModelConfig()
    text_format.Parse(path.read_text(), config)
    return config


def committed(name: str) -> mc.ModelConfig:
    return parse(SOURCE_REPOSITORY / name / "config.pbtxt")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_committed_config_parses_and_names_its_folder(name: str) -> None:
    config = committed(name)
    assert config.name == name
    assert config.max_batch_size == 8


def test_no_stray_model_folders() -> None:
    folders = {path.name for path in SOURCE_REPOSITORY.iterdir() if path.is_dir()}
    assert folders - {"_python_models", "_serving"} == set(ALL_MODELS)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_committed_configs_equal_the_specs_renderings(task: str) -> None:
    for name, config in render_task(TASKS[task]).items():
        assert (SOURCE_REPOSITORY / name / "config.pbtxt").read_text() == to_text(config), (
            f"{name}: run `make configs` after changing a spec"
        )


@pytest.mark.parametrize("task", sorted(TASKS))
def test_python_model_links_resolve_to_the_shared_sources(task: str) -> None:
    _, preprocess, net, postprocess = model_names(task)
    for name, source in (
        (preprocess, "preprocess.py"),
        (net, "net.py"),
        (postprocess, "postprocess.py"),
        (explain_name(task), "explain.py"),
    ):
        link = SOURCE_REPOSITORY / name / "1" / "model.py"
        assert link.is_symlink()
        assert link.resolve() == (PYTHON_MODELS / source).resolve()


def _tensors(config: mc.ModelConfig, kind: str) -> dict[str, tuple[int, list[int]]]:
    items = config.input if kind == "input" else config.output
    return {item.name: (item.data_type, list(item.dims)) for item in items}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_ensemble_maps_resolve_with_matching_types(task: str) -> None:
    ensemble = committed(task)
    available = _tensors(ensemble, "input")  # ensemble tensor name -> (dtype, dims)
    for step in ensemble.ensemble_scheduling.step:
        model = committed(step.model_name)
        inputs, outputs = _tensors(model, "input"), _tensors(model, "output")
        assert set(step.input_map) == set(inputs), f"{step.model_name}: inputs not all mapped"
        for model_input, ensemble_tensor in step.input_map.items():
            assert ensemble_tensor in available, f"{ensemble_tensor} used before produced"
            assert available[ensemble_tensor] == inputs[model_input], (
                f"{step.model_name}.{model_input} disagrees with its producer"
            )
        for model_output, ensemble_tensor in step.output_map.items():
            assert model_output in outputs, f"{step.model_name} has no output {model_output}"
            available[ensemble_tensor] = outputs[model_output]
    for name, signature in _tensors(ensemble, "output").items():
        assert available.get(name) == signature, f"ensemble output {name} not produced as declared"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_onnx_graph_matches_the_net_config(task: str, ensemble_repository: Path) -> None:
    _, _, net, _ = model_names(task)
    config = parse(ensemble_repository / net / "config.pbtxt")
    graph = onnx.load(str(ensemble_repository / net / "1" / "model.onnx")).graph
    expected = {
        **{item.name.lower(): item for item in config.input},
        **{item.name.lower(): item for item in config.output},
    }
    seen = set()
    for value in [*graph.input, *graph.output]:
        tensor = value.type.tensor_type
        declared = expected[value.name]
        assert ONNX_TO_TRITON[tensor.elem_type] == declared.data_type
        dims = [dim.dim_value if dim.dim_value else -1 for dim in tensor.shape.dim]
        # ONNX carries the per-request sample axis as its batch axis; the config's leading
        # -1 is that same axis (the configured batch axis is the request).
        assert dims[0] == -1
        if declared.name == "FEATURES":
            assert dims[1:] == list(declared.dims)
        else:
            assert dims[1:] == list(declared.dims)[1:]
        seen.add(value.name)
    assert seen == set(expected), f"{net}: ONNX graph and config name different tensors"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_ensemble_repository_carries_provenance_into_postprocess_and_ensemble(
    task: str, ensemble_repository: Path
) -> None:
    ensemble, _, net, postprocess = model_names(task)
    for name in (ensemble, net, postprocess):
        parameters = parse(ensemble_repository / name / "config.pbtxt").parameters
        assert parameters["weights_source"].string_value == "reference-untrained"
        assert len(parameters["weights_sha256"].string_value) == 64
        assert parameters["weights_untrained"].string_value == "true"
    for name in model_names(task)[1:]:
        assert (ensemble_repository / name / "1" / "model.py").is_file()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_the_fused_model_keeps_the_ensembles_contract_parameters_and_network(
    task: str, ensemble_repository: Path, built_repository: Path
) -> None:
    """`serve`'s default shape, fused from the same build: the ensemble's inputs are the
    preprocess model's, its outputs and published parameters the ensemble's, and the
    net's files lie in the fused model's version 1."""
    ensemble, preprocess, net, postprocess = model_names(task)
    fused = parse(built_repository / task / "config.pbtxt")
    assert fused.backend == "python" and not fused.platform
    assert list(fused.input) == list(parse(ensemble_repository / preprocess / "config.pbtxt").input)
    assert list(fused.output) == list(parse(ensemble_repository / ensemble / "config.pbtxt").output)
    for name in (ensemble, net, postprocess):
        for key, value in parse(ensemble_repository / name / "config.pbtxt").parameters.items():
            if key != "routing":  # the postprocess model's; the fused model has its own
                assert fused.parameters[key] == value, (name, key)
    version = built_repository / task / "1"
    assert (version / "model.onnx").read_bytes() == (
        ensemble_repository / net / "1" / "model.onnx"
    ).read_bytes()
    assert (version / "model.py").is_file()
    assert not any((built_repository / name).exists() for name in model_names(task)[1:])


@pytest.mark.parametrize("task", sorted(TASKS))
def test_explain_model_takes_the_ensembles_inputs_and_version_and_answers_the_client(
    task: str,
) -> None:
    from abdoserve_client.explanation import OUTPUT_NAMES, explain_model

    explain = committed(explain_model(task))
    ensemble = committed(task)
    inputs = {item.name: (item.data_type, list(item.dims)) for item in explain.input}
    public = {item.name: (item.data_type, list(item.dims)) for item in ensemble.input}
    assert inputs == {**public, "VERSION": (mc.DataType.TYPE_INT32, [1])}
    assert [item.name for item in explain.output] == list(OUTPUT_NAMES)
    assert all(item.data_type == mc.DataType.TYPE_STRING for item in explain.output)
