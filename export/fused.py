"""The fused CPU pipeline: a task's ensemble turned into one Python model of the same name.

It is the default shape where every step is Python (the embedded CPU server): measured
against the ensemble and against PyTriton in docs/benchmarks.md. Where the net runs in a
native backend (a GPU server's TensorRT or ONNX Runtime) the ensemble stays, so that
the net batches on its own across studies.

A build writes the ensemble and its three composing models first (every check and
export is the same); fusing then writes one model from them: the preprocess model's
inputs and scheduling, the ensemble's outputs and published parameters, the `_net`'s
runtime parameters and files, the warm-up study, and `pipeline.py`
(`model_repository/_python_models`). Clients see the same contract; the server saves
two Python-backend hops per study. The composing models are removed, unless the fused
model is written beside them under another name (the benchmark compares the two).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from abdoserve.export.configs import explain_name, model_names, to_text
from abdoserve.serving.task_models import FUSED_CODE_VERSION, VERSIONS_MODEL_PARAMETER

Pipeline = Literal["ensemble", "fused"]
PIPELINES: tuple[Pipeline, ...] = ("ensemble", "fused")
PIPELINE_SOURCE = "pipeline.py"


def default_pipeline(net_runtime: str) -> Pipeline:
    """The shape a build takes when none is asked for: fused where the net is a Python
    model too, the ensemble where it runs in a native backend."""
    return "fused" if net_runtime == "python" else "ensemble"


def read_config(folder: Path) -> mc.ModelConfig:
    config = mc.ModelConfig()
    text_format.Parse((folder / "config.pbtxt").read_text(), config)
    return config


def fused_config(root: Path, task: str, name: str) -> mc.ModelConfig:
    """One Python model with the ensemble's contract and the composing models' settings."""
    ensemble, preprocess, net, postprocess = (
        read_config(root / model) for model in model_names(task)
    )
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=ensemble.max_batch_size)
    config.dynamic_batching.CopyFrom(preprocess.dynamic_batching)
    config.instance_group.extend(preprocess.instance_group)
    config.input.extend(preprocess.input)  # ragged: studies of any size batch together
    config.output.extend(ensemble.output)
    # Triton loads the code's folder alone; the network versions beside it (model import
    # writes <task>/<N>/) are opened by the model itself, as its routing says.
    config.version_policy.specific.versions.append(FUSED_CODE_VERSION)
    for source in (ensemble, net, postprocess, preprocess):
        for key, value in source.parameters.items():
            config.parameters[key].CopyFrom(value)
    return config


def point_explanations_at(folder: Path, net: mc.ModelConfig, task: str) -> None:
    """The explanation model of a fused build runs the version it explains in its own
    process, as the fused model does (there is no `_net` to ask): its config names where
    the versions lie and gets the `_net`'s runtime parameters."""
    if not (folder / "config.pbtxt").is_file():
        return
    config = read_config(folder)
    for key, value in net.parameters.items():
        if key not in config.parameters:
            config.parameters[key].CopyFrom(value)
    config.parameters[VERSIONS_MODEL_PARAMETER].string_value = task
    (folder / "config.pbtxt").write_text(to_text(config))


def fuse_task(root: Path, task: str, python_models: Path, *, name: str | None = None) -> Path:
    """Write the fused model of `task` into `root` as `name` (default: the task itself,
    replacing the ensemble and its composing models); returns its folder."""
    ensemble, preprocess, net, postprocess = model_names(task)
    target_name = name or task
    config = fused_config(root, task, target_name)
    staging = root / f".{target_name}.fusing"
    shutil.rmtree(staging, ignore_errors=True)
    version = staging / "1"
    shutil.copytree(root / net / "1", version)
    shutil.copytree(root / preprocess / "1" / "warmup", version / "warmup")
    shutil.copyfile(python_models / PIPELINE_SOURCE, version / "model.py")  # over net.py
    (staging / "config.pbtxt").write_text(to_text(config))
    if name is None:
        point_explanations_at(root / explain_name(task), read_config(root / net), task)
        for model in (ensemble, preprocess, net, postprocess):
            shutil.rmtree(root / model)
    else:
        shutil.rmtree(root / target_name, ignore_errors=True)
    staging.rename(root / target_name)
    return root / target_name
