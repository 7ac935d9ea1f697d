"""Where a task's routing and network versions live, in either pipeline shape.

- The ensemble: the routing is the `routing` parameter of `<task>_postprocess`, the
  versions are Triton versions of `<task>_net` (its `version_policy` says which are
  loaded), and the cards are `<task>_net`'s `version_cards` parameter.
- The fused model: one Python model `<task>` holds the routing and runs the versions
  in its own process; they are the numbered folders beside its own code (`<task>/1/`,
  which Triton alone loads: its policy is pinned to 1), and its config holds the cards.
  A change is a reload of `<task>`, nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "config.pbtxt"
FUSED_CODE_VERSION = 1  # the fused model's own Triton version: its code, and version 1
# Set on a fused build's explanation model: the model whose folder holds the versions.
VERSIONS_MODEL_PARAMETER = "versions_model"


@dataclass(frozen=True)
class TaskModels:
    task: str
    fused: bool

    @property
    def router(self) -> str:
        """The model whose `routing` parameter says which version answers."""
        return self.task if self.fused else f"{self.task}_postprocess"

    @property
    def versions(self) -> str:
        """The model whose folder holds the versions, and whose config their cards."""
        return self.task if self.fused else f"{self.task}_net"


def on_disk(repository: Path, task: str) -> TaskModels | None:
    """The task's shape in a repository; None where it has neither."""
    if (repository / f"{task}_net" / CONFIG_FILE).is_file():
        return TaskModels(task, fused=False)
    if (repository / task / CONFIG_FILE).is_file() and not (
        repository / f"{task}_preprocess"
    ).is_dir():
        return TaskModels(task, fused=True)
    return None


def routed_tasks(repository: Path) -> list[TaskModels]:
    """Every task in the repository that routes between versions, in either shape: an
    ensemble's `<task>_postprocess` beside its `_net`, or a fused model (a config that
    names its own folder as its task, with no composing models beside it)."""
    found = []
    for config in sorted(repository.glob(f"*/{CONFIG_FILE}")):
        name = config.parent.name
        task = name.removesuffix("_postprocess")
        if name.endswith("_postprocess") and on_disk(repository, task) == TaskModels(task, False):
            found.append(TaskModels(task, fused=False))
        elif _names_task(config.read_text(errors="replace"), name) and on_disk(
            repository, name
        ) == TaskModels(name, True):
            found.append(TaskModels(name, fused=True))
    return found


def _names_task(config_text: str, name: str) -> bool:
    """A fused model's config: the Python backend, with a `task` parameter of its name."""
    pattern = r'key:\s*"task"\s*value\s*\{\s*string_value:\s*"' + re.escape(name) + '"'
    return 'backend: "python"' in config_text and re.search(pattern, config_text) is not None
