"""Grad-CAM on the PyTorch twin, with captum (`LayerGradCam`).

The layer is the trunk's last ReLU: the deepest map that still has a spatial grid
(12x12 or 6x6 for a 192 px matrix). The gradient is taken of the explained output (the
answered class, else the one value) after the head's activation, so the map is about
the number the answer states. Each map is brought to the matrix by bilinear upsampling
and scaled by its own maximum to [0, 1]; an all-zero map stays zero (nothing pushed the
value up), and says so in the description.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import Tensor, nn

from abdoserve.export.architectures import run_network

METHOD = "Grad-CAM (captum LayerGradCam) on the PyTorch twin"


@dataclass(frozen=True, eq=False)
class SaliencyMaps:
    maps: np.ndarray  # float32 (n, matrix, matrix), each in [0, 1]
    peaks: np.ndarray  # float64 (n,): each map's maximum before scaling
    layer: str  # the module the maps were taken at


def last_relu(module: nn.Module) -> tuple[str, nn.Module]:
    """The trunk's last ReLU by name (the Grad-CAM layer)."""
    found = [
        (name, layer)
        for name, layer in module.named_modules()
        if name.startswith("trunk.") and isinstance(layer, nn.ReLU)
    ]
    if not found:
        raise ValueError("the network has no ReLU in its trunk")
    return found[-1]


def grad_cam(
    module: nn.Module, samples: np.ndarray, features: np.ndarray | None, target: int
) -> SaliencyMaps:
    """Maps of `samples` (n, C, M, M) for output column `target`."""
    name, layer = last_relu(module)
    inputs = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    extra = None
    if features is not None:
        extra = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))

    def forward(batch: Tensor, clinical: Tensor | None = None) -> Tensor:
        return run_network(module, batch, clinical)

    cam = LayerGradCam(forward, layer)
    raw = cam.attribute(
        inputs,
        target=target,
        additional_forward_args=(extra,) if extra is not None else None,
        relu_attributions=True,
    )
    matrix = samples.shape[-1]
    upsampled = LayerAttribution.interpolate(raw.detach(), (matrix, matrix), "bilinear")
    maps = upsampled[:, 0].numpy().astype(np.float64)
    maps = np.clip(maps, 0.0, None)  # bilinear rounding cannot make a negative relevance
    peaks = maps.reshape(len(maps), -1).max(axis=1)
    scaled = maps / np.where(peaks > 0, peaks, 1.0)[:, None, None]
    return SaliencyMaps(scaled.astype(np.float32), peaks, name)


def twin_output(module: nn.Module, samples: np.ndarray, features: np.ndarray | None) -> np.ndarray:
    """The twin's (n, K) output on the samples, features repeated per sample."""
    with torch.no_grad():
        extra = None if features is None else torch.from_numpy(features)
        result = run_network(module, torch.from_numpy(samples), extra)
    return np.asarray(result.numpy(), dtype=np.float32)
