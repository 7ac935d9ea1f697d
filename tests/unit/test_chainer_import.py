"""Chainer .npz import: names, layouts, Chainer's semantics and refusals, on numpy-written files.

Chainer itself is not needed here; tests/tools/test_chainer_parity.py checks against it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from abdoserve.export.architectures import build_network, run_network
from abdoserve.export.chainer_import import (
    CHAINER_BN_EPS,
    chainer_network,
    parameter_map,
    read_npz,
)
from abdoserve.export.errors import CheckpointError, CheckpointMismatchError
from abdoserve.export.inputs import example_inputs
from abdoserve.export.weights import load_network, reference_network
from abdoserve.preprocessing.specs import TaskSpec
from abdoserve.preprocessing.tasks import TASKS, get_task

MASS, FIBROSIS = TASKS["liver_mass_ct"], TASKS["liver_fibrosis_ct"]
SNAPSHOT = "updater/model:main/predictor/"
TRAINER_ENTRIES = {
    "updater/optimizer:main/predictor/conv1/W/msg": np.zeros((16, 1, 5, 5), np.float32),
    "updater/optimizer:main/t": np.array(1),
    "updater/iterator:main/current_position": np.array(0),
    "updater/iteration": np.array(1),
    "stop_trigger/previous_iteration": np.array(1),
    "extensions/_Snapshot/trigger/previous_iteration": np.array(1),
}


def _chainer_arrays(spec: TaskSpec, prefix: str = "predictor/") -> dict[str, np.ndarray]:
    """The reference weights under the twin's names, as save_npz would write them."""
    state = reference_network(spec).module.state_dict()
    names = parameter_map(build_network(spec))
    arrays = {prefix + chainer: state[key].numpy() for chainer, key in names.items()}
    for chainer in names:
        if chainer.endswith("/gamma"):  # BatchNormalization's update counter
            arrays[prefix + chainer.replace("/gamma", "/N")] = np.array(40)
    return arrays


def _write(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


def _outputs(module: nn.Module, spec: TaskSpec) -> np.ndarray:
    samples, features = example_inputs(spec, 2, seed=4)
    with torch.no_grad():
        result = run_network(
            module.eval(),
            torch.from_numpy(samples),
            None if features is None else torch.from_numpy(features),
        )
    return result.numpy()


def test_plain_cnn_names_follow_forward_order() -> None:
    names = parameter_map(build_network(MASS))
    assert len(names) == 2 * (6 + 3)
    assert names["conv1/W"] == "trunk.0.weight" and names["conv2/b"] == "trunk.2.bias"
    assert names["conv3/W"] == "trunk.5.weight" and names["conv6/b"] == "trunk.12.bias"
    assert names["fc1/W"] == "head.0.weight" and names["fc3/b"] == "head.4.bias"
    assert not any(name.startswith("bn") for name in names)


def test_batch_norm_names_and_no_conv_bias() -> None:
    names = parameter_map(build_network(FIBROSIS))
    assert names["conv1/W"] == "trunk.0.weight" and "conv1/b" not in names
    assert [names[f"bn1/{p}"] for p in ("gamma", "beta", "avg_mean", "avg_var")] == [
        "trunk.1.weight",
        "trunk.1.bias",
        "trunk.1.running_mean",
        "trunk.1.running_var",
    ]
    assert names["conv2/W"] == "trunk.4.weight" and names["bn7/avg_var"] == "trunk.22.running_var"
    assert names["fc1/W"] == "head.0.weight" and names["fc2/b"] == "head.2.bias"


@pytest.mark.parametrize("prefix", ["predictor/", SNAPSHOT, ""])
def test_each_layout_loads_the_arrays(tmp_path: Path, prefix: str) -> None:
    extra = TRAINER_ENTRIES if prefix == SNAPSHOT else {}
    path = _write(tmp_path / "hospital.npz", {**_chainer_arrays(FIBROSIS, prefix), **extra})
    loaded = load_network(FIBROSIS, path)
    reference = reference_network(FIBROSIS).module.state_dict()
    for key, value in loaded.module.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, reference[key]), key
    assert loaded.provenance.framework == "chainer" and not loaded.provenance.untrained
    assert loaded.provenance.to_parameters()["weights_framework"] == "chainer"
    # only eps differs from the reference: far below the FP32 tolerance
    expected = _outputs(reference_network(FIBROSIS).module, FIBROSIS)
    np.testing.assert_allclose(_outputs(loaded.module, FIBROSIS), expected, atol=1e-4)


def test_read_npz_strips_the_prefix_and_drops_trainer_entries() -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **{SNAPSHOT + "fc1/W": np.ones((2, 3), np.float32)}, **TRAINER_ENTRIES)
    arrays = read_npz(buffer.getvalue(), "snapshot.npz")
    assert arrays.prefix == SNAPSHOT and list(arrays.arrays) == ["fc1/W"]


def test_chainer_semantics_are_set_on_the_built_module_only() -> None:
    module = chainer_network(FIBROSIS)
    norms = [layer for layer in module.modules() if isinstance(layer, nn.BatchNorm2d)]
    pools = [layer for layer in module.modules() if isinstance(layer, nn.MaxPool2d)]
    assert len(norms) == 7 and all(layer.eps == CHAINER_BN_EPS == 2e-5 for layer in norms)
    assert len(pools) == 4 and all(layer.ceil_mode for layer in pools)
    plain = build_network(FIBROSIS)
    assert all(layer.eps == 1e-5 for layer in plain.modules() if isinstance(layer, nn.BatchNorm2d))


def test_cover_all_pooling_fits_fc1_to_an_odd_map() -> None:
    # 60 px: 30, 15, then cover_all keeps 8 (floor would give 7)
    spec = get_task("liver_mass_ct", {"geometry.matrix": 60})
    module = chainer_network(spec)
    assert module.state_dict()["head.0.weight"].shape == (256, 128 * 8 * 8)
    assert _outputs(module, spec).shape == (2, 5)


def test_every_misfit_is_listed_by_its_chainer_name(tmp_path: Path) -> None:
    arrays = _chainer_arrays(FIBROSIS, SNAPSHOT)
    del arrays[SNAPSHOT + "conv2/W"]
    arrays[SNAPSHOT + "conv9/W"] = np.zeros((8, 8, 3, 3), np.float32)
    arrays[SNAPSHOT + "fc1/W"] = np.zeros((64, 128), np.float32)
    arrays[SNAPSHOT + "bn2/beta"] = np.zeros(32, np.int32)
    path = _write(tmp_path / "snapshot_iter_100.npz", arrays)
    with pytest.raises(CheckpointMismatchError) as raised:
        load_network(FIBROSIS, path)
    message = str(raised.value)
    assert message.startswith("snapshot_iter_100.npz does not fit liver_fibrosis_ct")
    assert f"{SNAPSHOT}fc1/W: expected (64, 131), got (64, 128)" in message
    assert f"{SNAPSHOT}bn2/beta: dtype int32, not floating point" in message
    assert f"missing {SNAPSHOT}conv2/W" in message
    assert f"unexpected {SNAPSHOT}conv9/W" in message


def test_a_batch_norm_counter_without_its_layer_is_unexpected(tmp_path: Path) -> None:
    arrays = {**_chainer_arrays(MASS), "predictor/bn1/N": np.array(3)}
    with pytest.raises(CheckpointMismatchError, match="unexpected predictor/bn1/N"):
        load_network(MASS, _write(tmp_path / "mass.npz", arrays))


def test_a_long_listing_is_cut(tmp_path: Path) -> None:
    arrays = {f"predictor/other{i}/W": np.zeros(2, np.float32) for i in range(20)}
    with pytest.raises(CheckpointMismatchError) as raised:
        load_network(MASS, _write(tmp_path / "resnet.npz", arrays))
    assert "missing predictor/conv1/W, predictor/conv1/b" in str(raised.value)
    assert "and 8 more" in str(raised.value)


@pytest.mark.parametrize("kind", ["garbage", "npy", "pytorch", "empty"])
def test_a_file_that_is_not_an_npz_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "weights.npz"
    if kind == "garbage":
        path.write_bytes(b"\x93NUMPY but not really" * 10)
    elif kind == "npy":
        np.save(tmp_path / "array.npy", np.zeros(3))
        path.write_bytes((tmp_path / "array.npy").read_bytes())
    elif kind == "pytorch":
        torch.save(build_network(MASS).state_dict(), path)
    else:
        np.savez(path)
    with pytest.raises(CheckpointError, match=r"weights\.npz") as raised:
        load_network(MASS, path)
    assert not isinstance(raised.value, CheckpointMismatchError)


def test_a_damaged_npz_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "damaged.npz", _chainer_arrays(MASS))
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # inside fc1/W: a CRC error
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"damaged\.npz: unreadable \.npz archive"):
        load_network(MASS, path)


def test_a_snapshot_without_a_main_model_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "snapshot.npz", TRAINER_ENTRIES)
    with pytest.raises(CheckpointError, match="updater/model:main/"):
        load_network(FIBROSIS, path)


def test_an_uninitialised_link_is_refused_by_name(tmp_path: Path) -> None:
    # Chainer saves None for a lazily sized L.Linear that never ran
    arrays: dict[str, np.ndarray] = {**_chainer_arrays(MASS), "predictor/fc1/W": np.array(None)}
    with pytest.raises(CheckpointError, match="predictor/fc1/W is not a numeric array"):
        load_network(MASS, _write(tmp_path / "lazy.npz", arrays))
