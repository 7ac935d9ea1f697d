"""PyTorch -> ONNX export with named tensors, a dynamic batch axis and a parity check.

The graph's tensor names are a contract with `model_repository/` and the
clients: inputs "samples" [n, C, H, W] and, when the task has clinical inputs,
"features" [n, F]; output "output" [n, K]. The export uses the TorchScript-based
exporter: the dynamo exporter needs onnxscript, which this environment lacks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from numpy.typing import NDArray
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from abdoserve.export.architectures import run_network
from abdoserve.export.errors import ExportError, ParityError
from abdoserve.export.explain.twin import save_twin
from abdoserve.export.inputs import example_inputs
from abdoserve.export.weights import WeightsProvenance, load_network
from abdoserve.preprocessing.specs import TaskSpec

logger = logging.getLogger(__name__)

OPSET = 17
PARITY_TOLERANCE = 1e-4
BATCH_AXIS = "n"
_PARITY_BATCH = 4


@dataclass(frozen=True)
class ParityReport:
    """PyTorch vs ONNX Runtime on one batch: relative error = max|a-b| / max(max|a|, 1e-6)."""

    batch_size: int
    max_abs_error: float
    relative_error: float
    tolerance: float


@dataclass(frozen=True)
class ModelCost:
    parameters: int
    flops_per_sample: int


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    provenance: WeightsProvenance
    parameters: int
    flops_per_sample: int
    parity: ParityReport


def input_names(spec: TaskSpec) -> list[str]:
    return ["samples", "features"] if spec.feature_width > 0 else ["samples"]


def export_onnx(spec: TaskSpec, module: nn.Module, path: Path) -> None:
    """Writes the module as ONNX at `path` and checks the graph and its tensor names."""
    samples, features = example_inputs(spec, batch=2)  # 2, so no axis specialises to 1
    args = tuple(torch.from_numpy(a) for a in (samples, features) if a is not None)
    names = input_names(spec)
    axes = {name: {0: BATCH_AXIS} for name in [*names, "output"]}
    with warnings.catch_warnings():
        # the legacy exporter is chosen on purpose (see the module doc); a TorchScript
        # module has no Python signature, which the exporter notes and handles
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="no signature found for <torch.ScriptMethod")
        warnings.filterwarnings("ignore", "The feature will be removed", module=r"torch\.onnx\.")
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=names,
            output_names=["output"],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    _check_names(spec, model)


def _check_names(spec: TaskSpec, model: onnx.ModelProto) -> None:
    found = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    if found != (input_names(spec), ["output"]):
        # e.g. a TorchScript module that ignores its features: ONNX drops the input
        raise ExportError(
            f"{spec.name}: exported graph has inputs {found[0]} and outputs {found[1]}; "
            f"the contract is {input_names(spec)} -> ['output']"
        )


def check_parity(
    module: nn.Module,
    onnx_path: Path,
    samples: NDArray[Any],
    features: NDArray[Any] | None,
    tolerance: float = PARITY_TOLERANCE,
) -> ParityReport:
    """Runs both runtimes on the same batch; raises `ParityError` beyond `tolerance`."""
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    feeds = {"samples": samples}
    if features is not None:
        feeds["features"] = np.ascontiguousarray(features, dtype=np.float32)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    actual = np.asarray(session.run(["output"], feeds)[0])
    with torch.no_grad():
        tensors = {name: torch.from_numpy(value) for name, value in feeds.items()}
        expected = run_network(module.eval(), tensors["samples"], tensors.get("features")).numpy()
    if actual.shape != expected.shape:
        raise ParityError(f"ONNX Runtime answers {actual.shape}, PyTorch {expected.shape}")
    error = float(np.max(np.abs(actual - expected)))
    relative = error / max(float(np.max(np.abs(expected))), 1e-6)
    report = ParityReport(len(samples), error, relative, tolerance)
    if not relative <= tolerance:  # also catches NaN
        raise ParityError(f"{onnx_path.name}: relative error {relative:.3g} > {tolerance:g}")
    return report


def measure_cost(spec: TaskSpec, module: nn.Module) -> ModelCost:
    """Parameters and FLOPs of one sample (conv and matmul FLOPs, 2 per multiply-add)."""
    samples, features = example_inputs(spec, batch=1)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        run_network(
            module.eval(),
            torch.from_numpy(samples),
            None if features is None else torch.from_numpy(features),
        )
    parameters = sum(parameter.numel() for parameter in module.parameters())
    return ModelCost(parameters, int(counter.get_total_flops()))


def export_task(spec: TaskSpec, out_dir: Path, checkpoint: Path | None = None) -> ExportResult:
    """Builds or loads the task's network, writes `model.onnx`, `provenance.json` and, for
    the reference architecture, its PyTorch twin `twin.pt` (the explanation maps')."""
    started = time.perf_counter()
    loaded = load_network(spec, checkpoint)
    cost = measure_cost(spec, loaded.module)
    logger.info(
        "%s: params=%d, GFLOPs/sample=%.3f, weights=%s",
        spec.name,
        cost.parameters,
        cost.flops_per_sample / 1e9,
        loaded.provenance.source,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model.onnx"
    export_onnx(spec, loaded.module, onnx_path)
    samples, features = example_inputs(spec, batch=_PARITY_BATCH, seed=1)
    parity = check_parity(loaded.module, onnx_path, samples, features)
    # the explanation maps' PyTorch twin (none for a TorchScript module)
    save_twin(loaded.module, loaded.provenance.framework, out_dir)
    result = ExportResult(
        onnx_path, loaded.provenance, cost.parameters, cost.flops_per_sample, parity
    )
    _write_provenance(spec, result, out_dir / "provenance.json")
    logger.info(
        "%s: exported to %s in %.2f s, parity relative error %.2g",
        spec.name,
        onnx_path,
        time.perf_counter() - started,
        parity.relative_error,
    )
    return result


def _write_provenance(spec: TaskSpec, result: ExportResult, path: Path) -> None:
    record: dict[str, Any] = {
        "task": spec.name,
        **result.provenance.to_parameters(),
        "onnx_sha256": hashlib.sha256(result.onnx_path.read_bytes()).hexdigest(),
        "opset": OPSET,
        "sample_shape": list(spec.sample_shape),
        "feature_width": spec.feature_width,
        "output_width": spec.output.width,
        "parameters": result.parameters,
        "flops_per_sample": result.flops_per_sample,
        "parity": vars(result.parity),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
