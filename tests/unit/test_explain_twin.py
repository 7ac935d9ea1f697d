"""The PyTorch twin: written for the reference architecture, refused where there is none,
and held to the served output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from abdoserve.export.explain.errors import NoTwinError, TwinMismatchError
from abdoserve.export.explain.saliency import twin_output
from abdoserve.export.explain.twin import load_twin, parity, save_twin
from abdoserve.export.weights import reference_network
from abdoserve.preprocessing.tasks import get_task


def test_a_saved_twin_answers_as_the_network_it_was_saved_from(tmp_path: Path) -> None:
    spec = get_task("bone_density_ct")
    network = reference_network(spec).module
    assert save_twin(network, "pytorch", tmp_path)
    samples = np.random.default_rng(0).random((3, *spec.sample_shape), dtype=np.float32)
    expected = twin_output(network, samples, None)
    np.testing.assert_array_equal(twin_output(load_twin(spec, tmp_path), samples, None), expected)


def test_another_architecture_gets_no_twin_and_its_maps_are_refused(tmp_path: Path) -> None:
    spec = get_task("bone_density_ct")
    # a TorchScript archive loads as a module of its own, not the reference TaskNet
    assert not save_twin(torch.nn.Sequential(torch.nn.Flatten()), "pytorch", tmp_path)
    version = tmp_path / "2"
    version.mkdir()
    with pytest.raises(NoTwinError, match="version 2 of bone_density_ct_net has no PyTorch twin"):
        load_twin(spec, version)
    assert NoTwinError.code.value == "UNIMPLEMENTED"


def test_parity_bounds_fp32_and_fp16_and_reports_int8() -> None:
    served = np.array([[0.5], [1.0]], dtype=np.float32)
    close = served + np.float32(5e-5)
    assert parity(close, served, "fp32", 1).max_abs_difference == pytest.approx(5e-5, rel=1e-2)
    off = served + np.float32(5e-3)
    with pytest.raises(TwinMismatchError, match=r"over 0\.0001"):
        parity(off, served, "fp32", 1)
    assert parity(off, served, "fp16", 1).tolerance == 1e-2
    assert parity(served + 0.2, served, "int8", 1).tolerance is None
    with pytest.raises(TwinMismatchError):
        parity(np.full_like(served, np.nan), served, "fp32", 1)
