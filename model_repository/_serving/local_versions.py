"""The network versions a fused model routes between, run in its own process.

Where every step is Python (the embedded CPU server), a task is one model and its
network runs in-process (abdoserve.serving.cpu_runtimes): there is no `<task>_net` to
call through BLS. So the fused model opens a runner for each version its routing needs,
from the numbered folders beside its own (`<task>/<version>/`, written by the build and
`abdoserve model import`), and calls them as `NetClient` calls `_net` versions: one
study or a batch of studies in, per-sample outputs out, checked against the output
contract (a version answering outside it has failed).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from abdoserve.preprocessing.errors import IntakeError
from abdoserve.preprocessing.specs import TaskSpec
from abdoserve.serving import validation
from abdoserve.serving.cpu_runtimes import configured_runner
from abdoserve.serving.net_versions import NetFailed
from abdoserve.serving.study_runner import StudyRunner

_LOG = logging.getLogger("abdoserve.serving.local_versions")


class LocalNets:
    """A runner per version, opened at load: a version that cannot be opened fails the
    load (the model commands then restore the previous routing), never a study."""

    def __init__(
        self,
        pb_utils: Any,
        spec: TaskSpec,
        parameters: Mapping[str, str],
        folder: Path,
        versions: Sequence[int],
        *,
        open_on_demand: bool = False,
    ) -> None:
        self.pb_utils = pb_utils
        self.spec = spec
        self.parameters = dict(parameters)
        self.folder = folder
        self.open_on_demand = open_on_demand  # the explanation model: any version asked
        self.runners: dict[int, StudyRunner] = {
            version: configured_runner(spec, parameters, folder / str(version))
            for version in versions
        }
        # The comparison thread runs a version beside execute: one run per runner at once.
        self._locks = {version: threading.Lock() for version in self.runners}

    def run(
        self, version: int, samples: Sequence[np.ndarray], features: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        """The studies' outputs from `version`, in order, as one batch; NetFailed if the
        run fails or any output leaves the contract."""
        runner = self.runners.get(version)
        if runner is None and self.open_on_demand:
            runner = self._open(version)
        if runner is None:
            raise self._failed(version, f"version {version} is not loaded in this model")
        try:
            with self._locks[version]:
                outputs = runner.run_studies(samples, features)
        except Exception as error:  # never raised out of execute: the router decides
            _LOG.error("%s version %d failed: %s", self.spec.name, version, error)
            raise self._failed(version, f"version {version} of the network failed") from error
        for output in outputs:
            try:
                validation.check_output(self.spec, output)
            except IntakeError as error:
                raise self._failed(
                    version, f"version {version} answered outside its contract: {error}"
                ) from error
        return outputs

    def call_blocking(self, version: int, samples: np.ndarray, features: np.ndarray) -> np.ndarray:
        """One study, for the comparison thread (`CompanionRunner`)."""
        return self.run(version, [samples], [features])[0]

    async def call(self, version: int, samples: np.ndarray, features: np.ndarray) -> np.ndarray:
        return self.call_blocking(version, samples, features)

    def _open(self, version: int) -> StudyRunner | None:
        folder = self.folder / str(version)
        if not (folder / "model.onnx").is_file() and not any(folder.glob("*.xml")):
            return None
        runner = configured_runner(self.spec, self.parameters, folder)
        self._locks.setdefault(version, threading.Lock())
        return self.runners.setdefault(version, runner)

    def _failed(self, version: int, message: str) -> NetFailed:
        error = self.pb_utils.TritonError(f"{self.spec.name}: {message}")
        return NetFailed(version, error)
