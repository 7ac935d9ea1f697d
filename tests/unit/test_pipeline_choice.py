"""Which shape a build and `serve` take: fused where every step is Python, the ensemble
where the net runs in a native backend; a named repository keeps the shape it has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abdoserve.deploy.serve import served_pipeline
from abdoserve.export.fused import default_pipeline


@pytest.mark.parametrize(
    ("net_runtime", "shape"),
    [("python", "fused"), ("tensorrt", "ensemble"), ("onnxruntime", "ensemble")],
)
def test_the_net_runtime_picks_the_default_shape(net_runtime: str, shape: str) -> None:
    assert default_pipeline(net_runtime) == shape


def built(folder: Path, shape: str | None) -> Path:
    folder.mkdir()
    record: dict[str, object] = {"bone_density_ct": {}}
    if shape is not None:
        record["pipeline"] = shape
    (folder / "BUILD.json").write_text(json.dumps(record))
    return folder


def test_serve_keeps_a_named_repositorys_shape_unless_asked(tmp_path: Path) -> None:
    ensemble = built(tmp_path / "ensemble", "ensemble")
    older = built(tmp_path / "older", None)  # built before the shapes: an ensemble
    assert served_pipeline(None, ensemble) == "ensemble"
    assert served_pipeline(None, older) == "ensemble"
    assert served_pipeline("fused", ensemble) == "fused"
    assert served_pipeline(None, built(tmp_path / "fused", "fused")) == "fused"


def test_serve_defaults_to_fused_where_nothing_is_built(tmp_path: Path) -> None:
    assert served_pipeline(None, None) == "fused"  # the default repository
    assert served_pipeline(None, tmp_path / "not-yet") == "fused"
    assert served_pipeline("ensemble", None) == "ensemble"
