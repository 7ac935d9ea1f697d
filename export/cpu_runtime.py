"""A `_net`'s CPU runtime at build time: its model file, and its deviation measured.

The default (ONNX Runtime FP32 on `model.onnx`) adds nothing to a build: the export's
parity check already holds it to PyTorch. Any other runtime gets its file
(`runtime_models`), then a deviation report on held-out phantom studies
(`deviation`); an FP32 runtime beyond the bound fails the build.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abdoserve.export.calibration import CalibrationPlan, phantom_tensors
from abdoserve.export.configs import Tuning
from abdoserve.export.deviation import DeviationReport, check_fp32, measure_deviation
from abdoserve.export.reference import TorchReference
from abdoserve.export.runtime_models import write_runtime_model
from abdoserve.preprocessing.specs import TaskSpec
from abdoserve.serving.cpu_runtimes import (
    DEVIATION_PARAMETER,
    PRECISION_PARAMETER,
    RUNTIME_PARAMETER,
    CpuRuntime,
    open_runner,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeBuild:
    runtime: CpuRuntime
    deviation: DeviationReport | None  # None for the default runtime
    plan: CalibrationPlan | None
    seconds: float

    def parameters(self) -> dict[str, str]:
        """Config parameters of `_net`, `_postprocess` and the ensemble; answers repeat them."""
        parameters = {
            RUNTIME_PARAMETER: self.runtime.name,
            PRECISION_PARAMETER: self.runtime.precision,
        }
        if self.deviation is not None:
            parameters[DEVIATION_PARAMETER] = json.dumps(
                self.deviation.to_json(), separators=(",", ":")
            )
        return parameters

    def record(self) -> dict[str, Any]:
        """This task's runtime entry in BUILD.json."""
        record: dict[str, Any] = {
            "name": self.runtime.name,
            "engine": self.runtime.engine,
            "precision": self.runtime.precision,
            "model_file": self.runtime.model_file,
            "build_seconds": round(self.seconds, 2),
        }
        if self.plan is not None and self.runtime.precision == "int8":
            record["calibration_seeds"] = list(self.plan.calibration_seeds())
        if self.deviation is not None:
            record["deviation"] = self.deviation.to_json()
        return record


def build_cpu_runtime(
    spec: TaskSpec,
    version_folder: Path,
    runtime: CpuRuntime,
    *,
    checkpoint: Path | None,
    plan: CalibrationPlan,
    tuning: Tuning,
) -> RuntimeBuild:
    """Writes the runtime's file beside `model.onnx` and measures it against PyTorch."""
    if runtime.is_default:
        return RuntimeBuild(runtime, None, None, 0.0)
    started = time.perf_counter()
    calibration = (
        phantom_tensors(spec, plan.calibration_seeds()) if runtime.precision == "int8" else []
    )
    write_runtime_model(runtime, version_folder, calibration)
    runner = open_runner(
        runtime,
        version_folder,
        intra_op_threads=tuning.net_intra_op_threads,
        max_samples=tuning.max_samples_per_run,
    )
    reference = TorchReference(spec, checkpoint)
    report = measure_deviation(
        spec,
        runtime,
        runner,
        reference,
        phantom_tensors(spec, plan.held_out_seeds()),
        untrained=reference.provenance.untrained,
    )
    check_fp32(report)
    seconds = time.perf_counter() - started
    logger.info(
        "%s: %s built in %.1f s; vs PyTorch FP32 max %.2g, mean %.2g, %s agreement %s",
        spec.name,
        runtime.name,
        seconds,
        report.max_abs,
        report.mean_abs,
        report.agreement_of or "no",
        report.study_agreement,
    )
    return RuntimeBuild(runtime, report, plan, seconds)
