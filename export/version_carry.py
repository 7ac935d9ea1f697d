"""A rebuild keeps what the hospital added: imported versions, their cards and the
routing between versions, in either pipeline shape (the ensemble's `_net`, or the
fused model's folder), and from one shape to the other.

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

from abdoserve.export.configs import to_text
from abdoserve.export.fused import read_config
from abdoserve.serving.cpu_runtimes import RUNTIME_PARAMETER
from abdoserve.serving.routing import CARDS_PARAMETER, ROUTING_PARAMETER
from abdoserve.serving.task_models import on_disk

logger = logging.getLogger(__name__)
CONFIG_FILE = "config.pbtxt"
SPEC_PARAMETER = "spec_overrides"


def carry_versions(old: Path, new: Path, tasks: Iterable[str], built: int) -> dict[str, list[int]]:
    """Copy `old`'s imported versions of each task into `new`; returns what was carried."""
    carried = {}
    for task in tasks:
        versions = carry_task(old, new, task, built)
        if versions:
            carried[task] = versions
    return carried


def carry_task(old: Path, new: Path, task: str, built: int) -> list[int]:
    """Either shape to either (abdoserve.serving.task_models): the version folders are the
    same files, beside a `_net`'s code or a fused model's."""
    source, target = on_disk(old, task), on_disk(new, task)
    if source is None or target is None:
        return []
    folder = old / source.versions
    versions = sorted(
        int(entry.name)
        for entry in folder.iterdir()
        if entry.is_dir() and entry.name.isdigit() and int(entry.name) != built
    )
    if not versions:
        return []
    old_config, new_config = read_config(folder), read_config(new / target.versions)
    reason = misfit(old_config, new_config, same_shape=source.fused == target.fused)
    if reason:
        logger.warning(
            "%s: imported versions %s are not carried into the rebuild: %s",
            source.versions,
            versions,
            reason,
        )
        return []
    for version in versions:
        copied = new / target.versions / str(version)
        shutil.copytree(folder / str(version), copied, symlinks=True)
        (copied / "model.py").unlink(missing_ok=True)
        if not target.fused:  # Triton loads a `_net` version: this code's model file
            shutil.copyfile(new / target.versions / str(built) / "model.py", copied / "model.py")
    routing = parameter(read_config(old / source.router), ROUTING_PARAMETER)
    _carry_versions_config(old_config, new_config, set(versions) | {built}, target.fused)
    if target.router == target.versions and routing:
        new_config.parameters[ROUTING_PARAMETER].string_value = routing
    (new / target.versions / CONFIG_FILE).write_text(to_text(new_config))
    if target.router != target.versions and routing:
        new_router = read_config(new / target.router)
        new_router.parameters[ROUTING_PARAMETER].string_value = routing
        (new / target.router / CONFIG_FILE).write_text(to_text(new_router))
    logger.info("%s: imported versions %s carried into the rebuild", target.versions, versions)
    return versions


def misfit(old: mc.ModelConfig, new: mc.ModelConfig, *, same_shape: bool = True) -> str:
    """Why versions built for `old` would not run under `new` ("" if they would). Across
    shapes the configs' tensors differ by design: the spec's overrides decide then."""
    if old.backend != "python" or new.backend != "python":
        return "not the CPU server's Python _net"
    if not same_shape:
        if parameter(old, SPEC_PARAMETER) != parameter(new, SPEC_PARAMETER):
            return "the network's tensors differ (a spec override changed them)"
        return _runtime_misfit(old, new)

    def tensors(config: mc.ModelConfig) -> list[tuple[str, int, tuple[int, ...]]]:
        found = [(item.name, item.data_type, tuple(item.dims)) for item in config.input]
        return found + [(item.name, item.data_type, tuple(item.dims)) for item in config.output]

    if tensors(old) != tensors(new):
        return "the network's tensors differ (a spec override changed them)"
    return _runtime_misfit(old, new)


def _runtime_misfit(old: mc.ModelConfig, new: mc.ModelConfig) -> str:
    before, after = parameter(old, RUNTIME_PARAMETER), parameter(new, RUNTIME_PARAMETER)
    if before != after:
        return f"built for the {before or 'default'} runtime; the rebuild runs {after or 'that'}"
    return ""


def parameter(config: mc.ModelConfig, key: str) -> str:
    """A parameter's value, "" where absent (reading a protobuf map with [] adds the key)."""
    return config.parameters[key].string_value if key in config.parameters else ""


def _carry_versions_config(
    old: mc.ModelConfig, new: mc.ModelConfig, present: set[int], fused: bool
) -> None:
    """The cards, and for a `_net` the versions it had loaded (a fused model's policy
    stays pinned to its code)."""
    pinned = [version for version in old.version_policy.specific.versions if version in present]
    if pinned and not fused:
        kept = new.version_policy.specific.versions
        del kept[:]
        kept.extend(sorted(pinned))
    cards = parameter(old, CARDS_PARAMETER)
    if cards:
        new.parameters[CARDS_PARAMETER].string_value = cards
