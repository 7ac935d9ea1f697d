"""A rebuild keeps what the hospital added: imported `_net` versions, their cards and the
routing between versions.

`build_repository` writes a repository from scratch (new code, other tuning) and then
replaces the old one. Before it does, each task's imported versions (every version
folder but the built one) are copied into the new build, with the Python model file of
this code, along with the `_net`'s version policy and `version_cards` and the
postprocess' `routing`. A version is carried only where it still fits: the same tensor
contract and the same CPU runtime as the new build's `_net` (a matrix override or
another runtime makes a different network input, or needs files the version lacks);
one that does not fit is left behind, and the build log names it.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from abdoserve.export.configs import model_names, to_text
from abdoserve.export.fused import read_config
from abdoserve.serving.cpu_runtimes import RUNTIME_PARAMETER
from abdoserve.serving.routing import CARDS_PARAMETER, ROUTING_PARAMETER

logger = logging.getLogger(__name__)
CONFIG_FILE = "config.pbtxt"


def carry_versions(old: Path, new: Path, tasks: Iterable[str], built: int) -> dict[str, list[int]]:
    """Copy `old`'s imported versions of each task into `new`; returns what was carried."""
    carried = {}
    for task in tasks:
        versions = carry_task(old, new, task, built)
        if versions:
            carried[task] = versions
    return carried


def carry_task(old: Path, new: Path, task: str, built: int) -> list[int]:
    _, _, net, post = model_names(task)
    if not (old / net / CONFIG_FILE).is_file() or not (new / net / CONFIG_FILE).is_file():
        return []
    versions = sorted(
        int(entry.name)
        for entry in (old / net).iterdir()
        if entry.is_dir() and entry.name.isdigit() and int(entry.name) != built
    )
    if not versions:
        return []
    old_net, new_net = read_config(old / net), read_config(new / net)
    reason = misfit(old_net, new_net)
    if reason:
        logger.warning(
            "%s: imported versions %s are not carried into the rebuild: %s", net, versions, reason
        )
        return []
    python_model = new / net / str(built) / "model.py"
    for version in versions:
        target = new / net / str(version)
        shutil.copytree(old / net / str(version), target, symlinks=True)
        shutil.copyfile(python_model, target / "model.py")  # this code's model file
    _carry_net_config(old_net, new_net, set(versions) | {built})
    (new / net / CONFIG_FILE).write_text(to_text(new_net))
    if (old / post / CONFIG_FILE).is_file() and (new / post / CONFIG_FILE).is_file():
        routing = parameter(read_config(old / post), ROUTING_PARAMETER)
        if routing:
            new_post = read_config(new / post)
            new_post.parameters[ROUTING_PARAMETER].string_value = routing
            (new / post / CONFIG_FILE).write_text(to_text(new_post))
    logger.info("%s: imported versions %s carried into the rebuild", net, versions)
    return versions


def misfit(old: mc.ModelConfig, new: mc.ModelConfig) -> str:
    """Why versions built for `old` would not run under `new` ("" if they would)."""
    if old.backend != "python" or new.backend != "python":
        return "not the CPU server's Python _net"

    def tensors(config: mc.ModelConfig) -> list[tuple[str, int, tuple[int, ...]]]:
        found = [(item.name, item.data_type, tuple(item.dims)) for item in config.input]
        return found + [(item.name, item.data_type, tuple(item.dims)) for item in config.output]

    if tensors(old) != tensors(new):
        return "the network's tensors differ (a spec override changed them)"
    before, after = parameter(old, RUNTIME_PARAMETER), parameter(new, RUNTIME_PARAMETER)
    if before != after:
        return f"built for the {before or 'default'} runtime; the rebuild runs {after or 'that'}"
    return ""


def parameter(config: mc.ModelConfig, key: str) -> str:
    """A parameter's value, "" where absent (reading a protobuf map with [] adds the key)."""
    return config.parameters[key].string_value if key in config.parameters else ""


def _carry_net_config(old: mc.ModelConfig, new: mc.ModelConfig, present: set[int]) -> None:
    pinned = [version for version in old.version_policy.specific.versions if version in present]
    if pinned:
        kept = new.version_policy.specific.versions
        del kept[:]
        kept.extend(sorted(pinned))
    cards = parameter(old, CARDS_PARAMETER)
    if cards:
        new.parameters[CARDS_PARAMETER].string_value = cards
