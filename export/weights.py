"""Network weights: seeded reference weights, or a hospital's own checkpoint.

No trained weights are public, so every task gets deterministic reference
weights seeded from its name: labelled "reference-untrained" everywhere and never
committed. A hospital's checkpoint goes through the same path: a state_dict file
(`torch.save(model.state_dict())`, or a dict holding it under "state_dict" or
"model") is loaded into the reference architecture; a TorchScript archive is
taken as is, provided it answers [N, K] for the spec's inputs. A `.npz` file is a
Chainer `save_npz` model file or trainer snapshot (export/chainer_import.py).
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from abdoserve.export.architectures import build_network, run_network
from abdoserve.export.chainer_import import load_chainer
from abdoserve.export.errors import CheckpointError, CheckpointMismatchError
from abdoserve.export.inputs import example_inputs
from abdoserve.preprocessing.specs import TaskSpec

REFERENCE_SOURCE = "reference-untrained"
_SHOWN_KEYS = 5


@dataclass(frozen=True)
class WeightsProvenance:
    """Where a network's weights came from, as every response reports it."""

    source: str
    weights_sha256: str
    untrained: bool
    framework: str = "pytorch"  # what wrote the weights: "pytorch" or "chainer"

    def to_parameters(self) -> dict[str, str]:
        """Triton config `parameters` entries (Triton parameters are strings)."""
        parameters = {
            "weights_source": self.source,
            "weights_sha256": self.weights_sha256,
            "weights_untrained": "true" if self.untrained else "false",
        }
        # named only when not PyTorch, so that PyTorch builds' configs stay as they were
        if self.framework != "pytorch":
            parameters["weights_framework"] = self.framework
        return parameters


@dataclass(frozen=True)
class LoadedNetwork:
    module: nn.Module
    provenance: WeightsProvenance


def load_network(spec: TaskSpec, checkpoint: Path | None = None) -> LoadedNetwork:
    """The task's network in eval mode: reference weights, or the checkpoint's."""
    if checkpoint is None:
        return reference_network(spec)
    return load_checkpoint(spec, checkpoint)


def reference_seed(task_name: str) -> int:
    """A seed from the task's name: stable across processes, unlike `hash()`."""
    return int.from_bytes(hashlib.sha256(task_name.encode()).digest()[:8], "little") >> 1


def reference_network(spec: TaskSpec) -> LoadedNetwork:
    module = build_network(spec)
    initialise(module, reference_seed(spec.name))
    digest = state_sha256(module.state_dict())
    return LoadedNetwork(module.eval(), WeightsProvenance(REFERENCE_SOURCE, digest, untrained=True))


def initialise(module: nn.Module, seed: int) -> None:
    """He-normal weights from a private generator, so global RNG state never matters.

    BatchNorm gets non-trivial statistics so that the exported graph's folded
    BatchNorm is exercised by parity checks.
    """
    generator = torch.Generator().manual_seed(seed)
    layers = [layer for layer in module.modules() if isinstance(layer, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Conv2d | nn.Linear):
                # the output layer has no ReLU after it: unit gain keeps logits near 1
                gain = 1.0 if layer is layers[-1] else math.sqrt(2.0)
                fan_in = layer.weight[0].numel()
                layer.weight.copy_(_normal(layer.weight, generator, gain / math.sqrt(fan_in)))
                if layer.bias is not None:
                    layer.bias.copy_(_normal(layer.bias, generator, 0.01))
            elif isinstance(layer, nn.BatchNorm2d):
                _initialise_norm(layer, generator)


def _initialise_norm(layer: nn.BatchNorm2d, generator: torch.Generator) -> None:
    assert layer.running_mean is not None and layer.running_var is not None
    layer.weight.copy_(1.0 + _normal(layer.weight, generator, 0.1))
    layer.bias.copy_(_normal(layer.bias, generator, 0.1))
    layer.running_mean.copy_(_normal(layer.running_mean, generator, 0.1))
    layer.running_var.copy_(torch.exp(_normal(layer.running_var, generator, 0.1)))


def _normal(like: Tensor, generator: torch.Generator, std: float) -> Tensor:
    return torch.randn(like.shape, generator=generator) * std


def state_sha256(state: Mapping[str, Tensor]) -> str:
    """sha256 over every tensor in state_dict order, each as float32 little-endian bytes."""
    digest = hashlib.sha256()
    for tensor in state.values():
        array = tensor.detach().cpu().to(torch.float32).contiguous().numpy()
        digest.update(array.astype("<f4", copy=False).tobytes())
    return digest.hexdigest()


def load_checkpoint(spec: TaskSpec, path: Path) -> LoadedNetwork:
    """A hospital's checkpoint; provenance names the file and hashes its bytes."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path.name}: {error}") from error
    framework = "pytorch"
    if path.suffix.lower() == ".npz":
        module, framework = load_chainer(spec, data, path.name), "chainer"
    elif is_torchscript(data):
        module = _load_torchscript(spec, data, path.name)
    else:
        module = build_network(spec)
        apply_state_dict(spec, module, _read_state_dict(data, path.name))
    digest = hashlib.sha256(data).hexdigest()
    provenance = WeightsProvenance(path.name, digest, untrained=False, framework=framework)
    return LoadedNetwork(module.eval(), provenance)


def is_torchscript(data: bytes) -> bool:
    """Whether checkpoint bytes are a TorchScript archive (else a pickled state_dict)."""
    # both formats are zip archives; only TorchScript carries code/ and constants.pkl
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return False
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
    return any(name.endswith("constants.pkl") or "/code/" in name for name in names)


def _load_torchscript(spec: TaskSpec, data: bytes, name: str) -> nn.Module:
    try:
        with warnings.catch_warnings():
            # deprecated upstream, yet the format hospitals ship; see the module doc
            warnings.filterwarnings("ignore", message="`torch.jit.load` is deprecated")
            # torch.jit.load carries no annotations
            module: nn.Module = torch.jit.load(io.BytesIO(data), map_location="cpu")  # type: ignore[no-untyped-call]
    except RuntimeError as error:
        raise CheckpointError(f"{name}: unreadable TorchScript archive: {error}") from error
    samples, features = example_inputs(spec, batch=2)
    try:
        with torch.no_grad():
            output = run_network(
                module.eval(),
                torch.from_numpy(samples),
                None if features is None else torch.from_numpy(features),
            )
    except RuntimeError as error:
        raise CheckpointMismatchError(
            f"{name}: TorchScript module fails on {spec.name} inputs {samples.shape}: {error}"
        ) from error
    if tuple(output.shape) != (2, spec.output.width):
        raise CheckpointMismatchError(
            f"{name}: TorchScript module answers {tuple(output.shape)} for 2 samples; "
            f"{spec.name} needs (2, {spec.output.width})"
        )
    return module


def _read_state_dict(data: bytes, name: str) -> dict[str, Tensor]:
    try:
        # weights_only: a checkpoint file must not be able to run code on load
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many unrelated types for a bad file
        raise CheckpointError(f"{name} is not a PyTorch checkpoint: {error}") from error
    if isinstance(payload, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(payload.get(key), Mapping):
                payload = payload[key]
                break
    if not isinstance(payload, Mapping) or not payload:
        raise CheckpointError(f"{name} holds no state_dict (found {type(payload).__name__})")
    bad = [str(key) for key, value in payload.items() if not isinstance(value, Tensor)]
    if bad:
        raise CheckpointError(f"{name} is not a state_dict: {bad[0]!r} is not a tensor")
    return _strip_prefix({str(key): value for key, value in payload.items()}, "module.")


def _strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    # DataParallel-saved checkpoints prefix every key with "module."
    if all(key.startswith(prefix) for key in state):
        return {key[len(prefix) :]: value for key, value in state.items()}
    return state


def apply_state_dict(spec: TaskSpec, module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Loads `state` into `module`, or says exactly which keys do not fit."""
    expected = module.state_dict()
    # BatchNorm's step counter plays no part in eval mode; Chainer exports lack it
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in expected]
    problems = [
        f"shape mismatch for {key}: checkpoint {tuple(state[key].shape)}, "
        f"network {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    if missing:
        problems.append(f"missing keys: {_shown(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_shown(unexpected)}")
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint does not fit {spec.name}'s architecture "
            f"(sample shape {spec.sample_shape}): {'; '.join(problems)}"
        )
    module.load_state_dict(state, strict=False)


def _shown(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else ""
    return ", ".join(keys[:_SHOWN_KEYS]) + more
