"""`abdoserve model import` without a build: versions, pins, and the `_net` contract
checked on small hand-made ONNX graphs (onnx.helper)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import model_config_pb2 as mc

from abdoserve.export.configs import Tuning, net_config, preprocess_config, to_text
from abdoserve.export.fused import read_config
from abdoserve.export.model_import import (
    ContractError,
    ImportRefused,
    NetContract,
    check_graph,
    contract_problems,
    existing_versions,
    net_contract,
    next_version,
    pin_serving_versions,
    serving_versions,
    shape_fits,
    source_framework,
    spec_differences,
)
from abdoserve.export.repository import pin_versions
from abdoserve.preprocessing.specs import TaskSpec
from abdoserve.preprocessing.tasks import get_task

Dims = Sequence[int | str]


def contract(spec: TaskSpec) -> NetContract:
    return net_contract(spec, preprocess_config(spec, Tuning()), net_config(spec, Tuning(), {}))


def graph(
    samples: Dims = ("n", 1, 192, 192),
    features: Dims | None = ("n", 3),
    output: Dims = ("n", 1),
    *,
    names: tuple[str, str, str] = ("samples", "features", "output"),
    samples_type: int = TensorProto.FLOAT,
    extra_input: str | None = None,
) -> onnx.ModelProto:
    """A valid little `_net`: global average of the samples, [features], one MatMul."""
    sample_name, feature_name, output_name = names
    inputs = [helper.make_tensor_value_info(sample_name, samples_type, list(samples))]
    nodes = [
        helper.make_node("GlobalAveragePool", [sample_name], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
    ]
    width = 1
    joined = "flat"
    if features is not None:
        inputs.append(
            helper.make_tensor_value_info(feature_name, TensorProto.FLOAT, list(features))
        )
        nodes.append(helper.make_node("Concat", ["flat", feature_name], ["joined"], axis=1))
        width, joined = 1 + int(features[-1]), "joined"
    if extra_input:
        inputs.append(helper.make_tensor_value_info(extra_input, TensorProto.FLOAT, ["n", 1]))
    weight = numpy_helper.from_array(np.ones((width, int(output[-1])), np.float32), "weight")
    nodes.append(helper.make_node("MatMul", [joined, "weight"], [output_name]))
    outputs = [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, list(output))]
    built = helper.make_graph(nodes, "net", inputs, outputs, initializer=[weight])
    return helper.make_model(built, opset_imports=[helper.make_opsetid("", 17)])


FIBROSIS = get_task("liver_fibrosis_ct")  # SAMPLES [-1, 1, 192, 192], FEATURES [3], OUTPUT [1]
MASS = get_task("liver_mass_ct")  # SAMPLES [-1, 3, 64, 64], no FEATURES, OUTPUT [5]


def test_the_contract_comes_from_the_neighbours_configs() -> None:
    found = contract(FIBROSIS)
    assert [(t.triton_name, t.onnx_name, t.shape) for t in found.inputs] == [
        ("SAMPLES", "samples", (-1, 1, 192, 192)),
        ("FEATURES", "features", (-1, 3)),
    ]
    assert (found.output.triton_name, found.output.shape) == ("OUTPUT", (-1, 1))
    assert [t.triton_name for t in contract(MASS).inputs] == ["SAMPLES"]


def test_a_repository_that_disagrees_with_its_spec_is_refused() -> None:
    preprocess = preprocess_config(
        get_task("liver_fibrosis_ct", {"geometry.matrix": 224}), Tuning()
    )
    with pytest.raises(ImportRefused, match="SAMPLES disagrees with the liver_fibrosis_ct spec"):
        net_contract(FIBROSIS, preprocess, net_config(FIBROSIS, Tuning(), {}))


def test_a_fitting_graph_has_no_problems() -> None:
    assert contract_problems(contract(FIBROSIS), graph()) == []
    assert contract_problems(contract(MASS), graph(("n", 3, 64, 64), None, ("n", 5))) == []


def test_a_wrong_matrix_is_named_with_both_shapes() -> None:
    problems = contract_problems(contract(FIBROSIS), graph(samples=("n", 1, 224, 224)))
    assert problems == ["input SAMPLES: expected shape [-1, 1, 192, 192], got [-1, 1, 224, 224]"]


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            graph(samples=(1, 1, 192, 192)),
            "input SAMPLES: expected shape [-1, 1, 192, 192], got [1, 1, 192, 192]",
        ),
        (
            graph(samples=("n", 192, 192)),
            "input SAMPLES: expected shape [-1, 1, 192, 192], got [-1, 192, 192]",
        ),
        (graph(features=("n", 2)), "input FEATURES: expected shape [-1, 3], got [-1, 2]"),
        (graph(output=("n", 5)), "output OUTPUT: expected shape [-1, 1], got [-1, 5]"),
        (
            graph(samples_type=TensorProto.FLOAT16),
            "input SAMPLES: expected type FP32 (ONNX FLOAT), got FLOAT16",
        ),
        (
            graph(features=None),
            "input FEATURES: the graph has no input named 'features' (its inputs: 'samples')",
        ),
        (
            graph(names=("input", "features", "output")),
            "input SAMPLES: the graph has no input named 'samples' "
            "(its inputs: 'input', 'features')",
        ),
        (
            graph(names=("samples", "features", "logits")),
            "output OUTPUT: the graph has no output named 'output' (its outputs: 'logits')",
        ),
        (
            graph(extra_input="mask"),
            "input 'mask': the _net sends no such tensor (it sends features, samples)",
        ),
    ],
    ids=[
        "fixed-rows",
        "rank",
        "features",
        "output",
        "dtype",
        "no-features",
        "name",
        "output-name",
        "extra",
    ],
)
def test_each_mismatch_is_named(model: onnx.ModelProto, message: str) -> None:
    assert message in contract_problems(contract(FIBROSIS), model)


def test_a_graph_that_takes_any_matrix_takes_this_one() -> None:
    assert contract_problems(contract(FIBROSIS), graph(samples=("n", 1, "h", "w"))) == []
    assert shape_fits((-1, 1, 192, 192), (-1, 1, -1, -1))
    assert not shape_fits((-1, 1, 192, 192), (-1, 1, 192, 192, 1))
    assert not shape_fits((-1, 1), None)


def test_check_graph_refuses_a_file_naming_every_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "hospital.onnx"
    onnx.save(graph(samples=("n", 1, 224, 224), features=("n", 2)), path)
    with pytest.raises(ContractError) as refused:
        check_graph(contract(FIBROSIS), path, "liver_fibrosis_ct")
    assert str(refused.value) == (
        "hospital.onnx does not fit liver_fibrosis_ct_net: "
        "input SAMPLES: expected shape [-1, 1, 192, 192], got [-1, 1, 224, 224]; "
        "input FEATURES: expected shape [-1, 3], got [-1, 2]"
    )
    onnx.save(graph(), path)
    check_graph(contract(FIBROSIS), path, "liver_fibrosis_ct")


def test_check_graph_refuses_what_is_not_onnx(tmp_path: Path) -> None:
    path = tmp_path / "hospital.onnx"
    path.write_bytes(b"not a protobuf at all")
    with pytest.raises(ImportRefused, match=r"hospital\.onnx is not a valid ONNX model"):
        check_graph(contract(FIBROSIS), path, "liver_fibrosis_ct")


@pytest.mark.parametrize(
    ("name", "framework"),
    [("a.onnx", "onnx"), ("a.PT", "pytorch"), ("a.pth", "pytorch"), ("a.npz", "chainer")],
)
def test_the_framework_from_the_file(tmp_path: Path, name: str, framework: str) -> None:
    (tmp_path / name).write_bytes(b"\0")
    assert source_framework(tmp_path / name) == framework


def test_an_unknown_format_or_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ImportRefused, match=r"model.h5: unknown source format; known suffixes: \.onnx"
    ):
        source_framework(tmp_path / "model.h5")
    with pytest.raises(ImportRefused, match="no such file"):
        source_framework(tmp_path / "missing.onnx")


def test_versions_are_the_numbered_folders_triton_sees(tmp_path: Path) -> None:
    for name in ("1", "3", "10", "01", ".import-4-x", "latest"):
        (tmp_path / name).mkdir()
    (tmp_path / "7").write_text("a file, not a version")
    assert existing_versions(tmp_path) == (1, 3, 10)


def test_the_next_version_is_the_highest_plus_one() -> None:
    assert next_version((1,), None, "m") == 2
    assert next_version((1, 3), None, "m") == 4
    assert next_version((1,), 5, "m") == 5


def test_an_existing_version_is_refused_with_the_free_one() -> None:
    with pytest.raises(ImportRefused) as refused:
        next_version((1, 2), 2, "liver_fibrosis_ct_net")
    assert str(refused.value) == (
        "liver_fibrosis_ct_net version 2 exists already (versions 1, 2): choose another "
        "--version, or leave it out for 3"
    )
    with pytest.raises(ImportRefused, match="--version must be 1 or more, got 0"):
        next_version((1,), 0, "m")


def net_folder(tmp_path: Path, versions: Sequence[int], policy: str = "") -> Path:
    folder = tmp_path / "liver_fibrosis_ct_net"
    folder.mkdir()
    for version in versions:
        (folder / str(version)).mkdir()
    (folder / "config.pbtxt").write_text(
        f'name: "liver_fibrosis_ct_net"\n{policy}\nbackend: "python"\n'
    )
    return folder


@pytest.mark.parametrize(
    ("policy", "serving"),
    [
        ("", (3,)),
        ("version_policy { latest { num_versions: 2 } }", (2, 3)),
        ("version_policy { all { } }", (1, 2, 3)),
        ("version_policy { specific { versions: [1, 4] } }", (1,)),
    ],
    ids=["default", "latest-2", "all", "specific"],
)
def test_the_versions_that_serve_under_each_policy(policy: str, serving: tuple[int, ...]) -> None:
    config = mc.ModelConfig()
    text_format.Parse(policy, config)
    assert serving_versions(config, (1, 2, 3)) == serving


def test_an_unpinned_config_is_pinned_to_what_serves(tmp_path: Path) -> None:
    folder = net_folder(tmp_path, (1,))
    pin = pin_serving_versions(folder)
    assert (pin.versions, pin.changed) == ((1,), True)
    assert pin.before == "none (Triton's default: latest 1)"
    config = read_config(folder)
    assert list(config.version_policy.specific.versions) == [1]
    assert config.backend == "python"  # the rest as it was
    assert sorted(path.name for path in folder.iterdir()) == ["1", "config.pbtxt"]


def test_a_pinned_config_is_left_as_it_is(tmp_path: Path) -> None:
    folder = net_folder(tmp_path, (1, 2), "version_policy { specific { versions: 1 } }")
    before = (folder / "config.pbtxt").read_text()
    pin = pin_serving_versions(folder)
    assert (pin.versions, pin.changed) == ((1,), False)
    assert (folder / "config.pbtxt").read_text() == before


def test_a_build_pins_its_version() -> None:
    config = mc.ModelConfig(name="x")
    pin_versions(config, (1,))
    assert "version_policy {\n  specific {\n    versions: 1\n  }\n}" in to_text(config)


def test_the_card_names_the_spec_values_that_differ_from_the_defaults() -> None:
    assert spec_differences(FIBROSIS) == []
    spec = get_task("liver_fibrosis_ct", {"geometry.matrix": 224, "clinical_inputs.age.scale": 10})
    differences = {item.field: item for item in spec_differences(spec)}
    assert sorted(differences) == ["clinical_inputs.age.scale", "geometry.matrix"]
    matrix = differences["geometry.matrix"]
    assert (matrix.default, matrix.served, matrix.default_source) == (192, 224, "serving choice")
    json.dumps([vars(item) for item in differences.values()])  # JSON as it stands
    (flag,) = spec_differences(get_task("esophageal_cancer_ct", {"output.flag_below": 0.1}))
    assert (flag.field, flag.default, flag.served) == ("output.flag_below", None, 0.1)


# `abdoserve model import --help` and a refused import load no network runtime.
PROBE = """
import json, sys
from abdoserve.deploy.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as exit:
    status = exit.code
heavy = sorted(name for name in ("torch", "onnx", "onnxruntime", "openvino") if name in sys.modules)
print(json.dumps({"status": status, "heavy": heavy}))
"""


def test_the_help_imports_no_network_runtime() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "model", "import", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"status": 0, "heavy": []}
