"""The PyTorch twin of a served `_net` version: the same weights in the reference
architecture, so that saliency can be computed where the served runtime (ONNX Runtime,
OpenVINO, TensorRT) has no gradients.

Every export that starts from a PyTorch module of the reference architecture (the
build's reference weights, a hospital's state_dict, a Chainer .npz) writes `twin.pt`
beside `model.onnx`: the state_dict and the framework whose semantics it needs (Chainer's
BatchNorm eps and pooling). A TorchScript or ONNX import has none, and is refused by name.
The twin is trusted only once it gives the served version's own output (`parity`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from abdoserve.export.architectures import TaskNet, build_network
from abdoserve.export.chainer_import import chainer_network
from abdoserve.export.explain.errors import NoTwinError, TwinMismatchError
from abdoserve.preprocessing.specs import TaskSpec

TWIN_FILE = "twin.pt"
# The twin against the served output, relative as the export's parity check: FP32
# runtimes as the build's bound, FP16 (TensorRT) as the GPU bound; INT8 is reported only.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


def save_twin(module: nn.Module, framework: str, folder: Path) -> bool:
    """Write `twin.pt` where the module is the reference architecture; False where it
    is not (a TorchScript archive), so the version will have no maps."""
    if not isinstance(module, TaskNet):
        return False
    state = {key: value.detach().cpu() for key, value in module.state_dict().items()}
    torch.save({"framework": framework, "state_dict": state}, folder / TWIN_FILE)
    return True


def load_twin(spec: TaskSpec, folder: Path) -> nn.Module:
    """The twin of the version in `folder`, in eval mode."""
    path = folder / TWIN_FILE
    if not path.is_file():
        raise NoTwinError(
            f"version {folder.name} of {spec.name}_net has no PyTorch twin (an ONNX or "
            "TorchScript import): no saliency can be computed for it"
        )
    # weights_only: the file holds tensors and a name, never code
    payload = torch.load(path, map_location="cpu", weights_only=True)
    framework = str(payload.get("framework", "pytorch"))
    module = chainer_network(spec) if framework == "chainer" else build_network(spec)
    module.load_state_dict(payload["state_dict"])
    return module.eval()


@dataclass(frozen=True)
class Parity:
    """The twin's output against the served version's, on this study's samples."""

    max_abs_difference: float
    relative_difference: float  # max |twin - served| / max(max |served|, 1e-6)
    tolerance: float | None  # None: reported only (INT8)

    def to_json(self) -> dict[str, float | None]:
        return {
            "max_abs_difference": self.max_abs_difference,
            "relative_difference": self.relative_difference,
            "tolerance": self.tolerance,
        }


def parity(twin: np.ndarray, served: np.ndarray, precision: str, version: int) -> Parity:
    """Compare; refuse a twin that answers otherwise than the served version."""
    if twin.shape != served.shape:
        raise TwinMismatchError(f"the twin answers {twin.shape}, version {version} {served.shape}")
    difference = float(np.max(np.abs(twin.astype(np.float64) - served)))
    relative = difference / max(float(np.max(np.abs(served))), 1e-6)
    tolerance = TOLERANCE.get(precision)
    if tolerance is not None and not relative <= tolerance:  # NaN fails too
        raise TwinMismatchError(
            f"the PyTorch twin of version {version} differs from its {precision} output by "
            f"{relative:.2g} (relative), over {tolerance:g}: no map from another network"
        )
    return Parity(difference, relative, tolerance)
