"""Chainer checkpoints: `serializers.save_npz` files loaded onto the reference architectures.

The papers' models were trained with Chainer, so a hospital's weights may be a
Chainer .npz. It is read with numpy alone (Chainer is not needed at run time),
either as a model file (`save_npz(path, L.Classifier(net))`: keys
`predictor/<link>/<param>`, or `<link>/<param>` for a bare `save_npz(path, net)`)
or as a trainer snapshot (`extensions.snapshot()`: the model under
`updater/model:main/`; optimizer, iterator and trainer entries are ignored).

The Chainer twin of a task's reference architecture (export/architectures.py) is
one `chainer.Chain` whose links are numbered in forward order:

- conv1..convN: `L.Convolution2D(in, out, k, stride, pad=k // 2, nobias=<batch norm>)`,
  the trunk's `nn.Conv2d` in order; W (out, in, k, k) -> weight, b (out,) -> bias,
  b only without batch norm (a bias before BatchNorm is redundant).
- bn1..bnN, only when the plan has batch norm: `L.BatchNormalization(out)` after convI,
  the trunk's `nn.BatchNorm2d` in order; gamma -> weight, beta -> bias, avg_mean ->
  running_mean, avg_var -> running_var; N (its update count) is accepted and ignored,
  as `num_batches_tracked` is.
- fc1..fcM: `L.Linear(in, out)` (fc1 may be `L.Linear(None, out)`), the head's
  `nn.Linear` in order; W (out, in) -> weight, b (out,) -> bias; fc1 takes
  [image features, clinical features].

Forward: `relu(bnI(convI(h)))`, `F.max_pooling_2d(h, 2)` after the stem and after
each block, then `F.mean(h, axis=(2, 3))` for a global-average readout (nothing for
a flatten readout), `F.concat` with the clinical features, then fc1, relu, fc2, ...;
the head's softmax/sigmoid carries no parameters and may live outside the chain.
Chainer's W shapes equal PyTorch's, so arrays are copied as they are.

Chainer semantics the reference architectures exercise, kept in the built module:
- BatchNormalization eps is 2e-5 (PyTorch 1e-5): every `BatchNorm2d.eps` is set.
- `F.max_pooling_2d(h, 2)` has `cover_all=True`: an odd-sized input keeps its last
  row and column (25 -> 13, PyTorch's default 12). With pad 0 and kernel = stride
  that is exactly `ceil_mode=True`, set on every `MaxPool2d`; the default specs
  only pool even sizes, a `geometry.matrix` override may not, and fc1's width is
  then fitted to the trunk (a flatten readout grows with the map).
- `L.Linear` flattens (N, C, H, W) to (N, C*H*W) in C order, as `nn.Flatten` does
  on NCHW: the flatten readout (`liver_mass_ct`) needs no permutation of fc1's W.
Not exercised, so not handled: padded pooling (pad > 0), Chainer's conv
`cover_all`, dilation or groups, and Dropout (absent from the architectures).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from abdoserve.export.architectures import TaskNet, build_network
from abdoserve.export.errors import CheckpointError, CheckpointMismatchError
from abdoserve.preprocessing.specs import TaskSpec

CHAINER_BN_EPS = 2e-5
SNAPSHOT_MODEL = "updater/model:main/"
PREDICTOR = "predictor/"
_SHOWN = 12

# Chainer's parameter name -> PyTorch's, per link type
_CONV = {"W": "weight", "b": "bias"}
_NORM = {"gamma": "weight", "beta": "bias", "avg_mean": "running_mean", "avg_var": "running_var"}
_LINEAR = {"W": "weight", "b": "bias"}
_IGNORED_NORM = ("N",)  # BatchNormalization's update counter: no part of inference


@dataclass(frozen=True)
class ChainerArrays:
    """A checkpoint's model arrays, named relative to the twin chain.

    `prefix` is what the file puts before each name (`predictor/`,
    `updater/model:main/predictor/` or nothing), so messages quote the file's own keys.
    """

    arrays: dict[str, NDArray[np.generic]]
    prefix: str


def load_chainer(spec: TaskSpec, data: bytes, name: str) -> nn.Module:
    """The task's reference architecture with Chainer's semantics and the file's weights."""
    checkpoint = read_npz(data, name)
    module = chainer_network(spec)
    apply_chainer_arrays(spec, module, checkpoint, name)
    return module.eval()


def chainer_network(spec: TaskSpec) -> nn.Module:
    """`build_network(spec)` with Chainer's BatchNorm eps and max-pooling rounding."""
    module = build_network(spec)
    if not isinstance(module, TaskNet):
        raise CheckpointError(f"{spec.name}: the reference architecture is not a TaskNet")
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.eps = CHAINER_BN_EPS
        elif isinstance(layer, nn.MaxPool2d):
            layer.ceil_mode = True  # cover_all=True (see the module doc)
    _fit_first_linear(spec, module)
    return module.eval()


def parameter_map(module: nn.Module) -> dict[str, str]:
    """Chainer twin name (relative to the chain) -> the module's state_dict key."""
    names: dict[str, str] = {}
    counts = {"conv": 0, "bn": 0, "fc": 0}
    for path, layer in module.named_modules():
        link, table = _link_kind(layer)
        if link is None:
            continue
        counts[link] += 1
        for chainer, torch_name in table.items():
            if chainer == "b" and getattr(layer, "bias", None) is None:
                continue  # nobias=True: the twin has no b either
            names[f"{link}{counts[link]}/{chainer}"] = f"{path}.{torch_name}"
    return names


def read_npz(data: bytes, name: str) -> ChainerArrays:
    """A `save_npz` file's model arrays, from a model file or a trainer snapshot."""
    try:
        members = _npy_members(data, name)
        prefix = _model_prefix(members, name)
        arrays: dict[str, NDArray[np.generic]] = {}
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            for key in members:
                if key.startswith(prefix):
                    arrays[key[len(prefix) :]] = _array(archive, key, name)
    except (zipfile.BadZipFile, OSError, EOFError) as error:  # a damaged archive
        raise CheckpointError(f"{name}: unreadable .npz archive: {error}") from error
    return ChainerArrays(arrays, prefix)


def apply_chainer_arrays(
    spec: TaskSpec, module: nn.Module, checkpoint: ChainerArrays, name: str
) -> None:
    """Copies the arrays into `module`, or lists every parameter that does not fit."""
    expected = module.state_dict()
    names = parameter_map(module)
    problems = _problems(checkpoint, {key: tuple(expected[t].shape) for key, t in names.items()})
    if problems:
        raise CheckpointMismatchError(
            f"{name} does not fit {spec.name}'s Chainer twin "
            f"(sample shape {spec.sample_shape}): {'; '.join(problems)}"
        )
    state = {
        names[key]: torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        for key, array in checkpoint.arrays.items()
        if key in names
    }
    module.load_state_dict(state, strict=False)  # num_batches_tracked stays as built


def _fit_first_linear(spec: TaskSpec, module: TaskNet) -> None:
    # ceil_mode can enlarge an odd-sized map, and a flatten readout's width with it
    with torch.no_grad():
        width = int(module.trunk(torch.zeros(1, *spec.sample_shape)).shape[1])
    first = module.head[0]
    if isinstance(first, nn.Linear) and first.in_features != width + spec.feature_width:
        module.head[0] = nn.Linear(width + spec.feature_width, first.out_features)


def _link_kind(layer: nn.Module) -> tuple[str | None, Mapping[str, str]]:
    if isinstance(layer, nn.Conv2d):
        return "conv", _CONV
    if isinstance(layer, nn.BatchNorm2d):
        return "bn", _NORM
    if isinstance(layer, nn.Linear):
        return "fc", _LINEAR
    return None, {}


def _npy_members(data: bytes, name: str) -> list[str]:
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise CheckpointError(f"{name} is not a NumPy .npz archive (Chainer save_npz)")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = archive.namelist()
    # a PyTorch checkpoint is a zip too, of pickles rather than .npy arrays
    if not members or not all(member.endswith(".npy") for member in members):
        raise CheckpointError(f"{name} is a zip archive but not a NumPy .npz of arrays")
    return [member.removesuffix(".npy") for member in members]


def _model_prefix(keys: list[str], name: str) -> str:
    if any(key.startswith("updater/") for key in keys):
        if not any(key.startswith(SNAPSHOT_MODEL) for key in keys):
            raise CheckpointError(f"{name}: a trainer snapshot without {SNAPSHOT_MODEL!r}")
        model = [key[len(SNAPSHOT_MODEL) :] for key in keys if key.startswith(SNAPSHOT_MODEL)]
        return SNAPSHOT_MODEL + _predictor(model)
    return _predictor(keys)


def _predictor(keys: list[str]) -> str:
    # L.Classifier puts the network under `predictor/`; a bare chain has no prefix
    return PREDICTOR if keys and all(key.startswith(PREDICTOR) for key in keys) else ""


def _array(archive: Mapping[str, NDArray[np.generic]], key: str, name: str) -> NDArray[np.generic]:
    try:
        return archive[key]
    except ValueError as error:  # an object array (an uninitialised link saves None)
        raise CheckpointError(f"{name}: {key} is not a numeric array: {error}") from error


def _problems(checkpoint: ChainerArrays, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    arrays, prefix = checkpoint.arrays, checkpoint.prefix
    missing = [prefix + key for key in shapes if key not in arrays]
    unexpected = [prefix + key for key in arrays if key not in shapes and not _ignored(key, shapes)]
    problems = [
        f"{prefix}{key}: expected {shapes[key]}, got {tuple(array.shape)}"
        for key, array in arrays.items()
        if key in shapes and tuple(array.shape) != shapes[key]
    ]
    problems += [
        f"{prefix}{key}: dtype {array.dtype}, not floating point"
        for key, array in arrays.items()
        if key in shapes and array.dtype.kind != "f"
    ]
    if missing:
        problems.append(f"missing {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listed(unexpected)}")
    return problems


def _ignored(key: str, shapes: Mapping[str, tuple[int, ...]]) -> bool:
    # only a BatchNormalization link the twin has may bring its counter
    link, _, parameter = key.rpartition("/")
    return parameter in _IGNORED_NORM and f"{link}/gamma" in shapes


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more
