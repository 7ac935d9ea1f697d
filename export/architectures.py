"""Reference architectures, one per task, built from the task's spec.

`liver_mass_ct` follows its paper: 6 convolutional, 3 max-pooling and 3 fully
connected layers (Yasaka et al., Radiology 2018). The papers give no more than
that, so the other four are serving choices in the same spirit: plain 2017-2019
CNNs of a few conv blocks, global average pooling and a small fully connected
head, about 0.1-0.3 GFLOP per sample so that the CPU path stays fast. Clinical
features join the image features at the first fully connected layer.

Every network takes `samples` [N, C, H, W] (and `features` [N, F] when the spec
has clinical inputs) and returns final values [N, K]: the head's activation is
part of the network, so an exported graph answers in the spec's units.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from abdoserve.export.errors import ExportError
from abdoserve.preprocessing.specs import OutputKind, TaskSpec


@dataclass(frozen=True)
class ConvPlan:
    """The shape of one reference CNN.

    `stem` is (channels, kernel, stride) of a strided first convolution; each of
    `blocks` is (channels, convolutions). Stem and blocks are each followed by a
    2x2 max-pool. `hidden` are the widths of the fully connected layers before
    the output layer.
    """

    stem: tuple[int, int, int] | None
    blocks: tuple[tuple[int, int], ...]
    batch_norm: bool
    readout: Literal["flatten", "global_average"]
    hidden: tuple[int, ...]


_GAP_BLOCKS = ((32, 2), (64, 2), (128, 2))

PLANS: Mapping[str, ConvPlan] = {
    # paper: 6 conv + 3 max-pool + 3 fully connected; no BatchNorm (Chainer, 2017)
    "liver_mass_ct": ConvPlan(None, _GAP_BLOCKS, False, "flatten", (256, 64)),
    "liver_fibrosis_ct": ConvPlan((16, 5, 2), _GAP_BLOCKS, True, "global_average", (64,)),
    "liver_fibrosis_mri": ConvPlan((16, 5, 2), _GAP_BLOCKS, True, "global_average", (64,)),
    "bone_density_ct": ConvPlan((16, 5, 2), _GAP_BLOCKS, True, "global_average", (64,)),
    # one more block: a small tumour is a small part of a 192 px slice
    "esophageal_cancer_ct": ConvPlan(
        (16, 5, 2), (*_GAP_BLOCKS, (256, 2)), True, "global_average", (64,)
    ),
}


class HeadActivation(nn.Module):
    """Turns logits into the spec's answer: softmax, sigmoid or a scaled sigmoid."""

    def __init__(self, kind: OutputKind, value_range: tuple[float, float]) -> None:
        super().__init__()
        self.kind = kind
        self.low, self.high = float(value_range[0]), float(value_range[1])

    def forward(self, logits: Tensor) -> Tensor:
        if self.kind == "classification":
            return torch.softmax(logits, dim=1)
        squashed = torch.sigmoid(logits)
        if self.kind == "probability":
            return squashed
        return self.low + (self.high - self.low) * squashed


class TaskNet(nn.Module):
    """Conv trunk -> [image features, clinical features] -> FC head -> activation."""

    def __init__(
        self, trunk: nn.Sequential, head: nn.Sequential, activation: HeadActivation, features: int
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.activation = activation
        self.feature_width = features

    def forward(self, samples: Tensor, features: Tensor | None = None) -> Tensor:
        pooled: Tensor = self.trunk(samples)
        if self.feature_width > 0:
            if features is None:
                raise ValueError(f"this network needs features [N, {self.feature_width}]")
            pooled = torch.cat((pooled, features), dim=1)
        result: Tensor = self.activation(self.head(pooled))
        return result


def build_network(spec: TaskSpec) -> nn.Module:
    """The task's reference architecture in eval mode, with PyTorch's default init."""
    plan = PLANS.get(spec.name)
    if plan is None:
        raise ExportError(f"no reference architecture for task {spec.name!r}")
    trunk = _trunk(plan, spec.sample_shape[0])
    widths = (_trunk_width(spec, trunk) + spec.feature_width, *plan.hidden, spec.output.width)
    activation = HeadActivation(spec.output.kind, spec.output.value_range)
    return TaskNet(trunk, _head(widths), activation, spec.feature_width).eval()


def run_network(module: nn.Module, samples: Tensor, features: Tensor | None) -> Tensor:
    """Calls a network (ours or a hospital's TorchScript) the way the contract says."""
    result: Tensor = module(samples) if features is None else module(samples, features)
    return result


def _trunk(plan: ConvPlan, channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    if plan.stem is not None:
        width, kernel, stride = plan.stem
        layers += _conv(channels, width, kernel, stride, plan.batch_norm)
        layers.append(nn.MaxPool2d(2))
        channels = width
    for width, convolutions in plan.blocks:
        for _ in range(convolutions):
            layers += _conv(channels, width, 3, 1, plan.batch_norm)
            channels = width
        layers.append(nn.MaxPool2d(2))
    if plan.readout == "global_average":
        layers.append(nn.AdaptiveAvgPool2d(1))
    layers.append(nn.Flatten())
    return nn.Sequential(*layers)


def _conv(inputs: int, outputs: int, kernel: int, stride: int, batch_norm: bool) -> list[nn.Module]:
    # a bias before BatchNorm is redundant: BatchNorm's shift replaces it
    conv = nn.Conv2d(inputs, outputs, kernel, stride, padding=kernel // 2, bias=not batch_norm)
    norm: list[nn.Module] = [nn.BatchNorm2d(outputs)] if batch_norm else []
    return [conv, *norm, nn.ReLU()]


def _head(widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index, (inputs, outputs) in enumerate(itertools.pairwise(widths)):
        if index > 0:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(inputs, outputs))
    return nn.Sequential(*layers)


def _trunk_width(spec: TaskSpec, trunk: nn.Sequential) -> int:
    """Image features the trunk yields; a dry run, so any matrix size works or fails here."""
    try:
        with torch.no_grad():
            width = int(trunk.eval()(torch.zeros(1, *spec.sample_shape)).shape[1])
    except RuntimeError as error:
        raise ExportError(
            f"{spec.name}: a {spec.matrix} px matrix is too small for its architecture"
        ) from error
    if width == 0:
        raise ExportError(f"{spec.name}: a {spec.matrix} px matrix is too small")
    return width
