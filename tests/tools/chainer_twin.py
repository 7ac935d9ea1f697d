"""Chainer 7.8.1 twins of the reference architectures: trains, answers, saves.

Run by tests/tools/test_chainer_parity.py in its own Chainer environment (not
.venv): `python chainer_twin.py CASES.json`. Each case names a plan (the shape of
export/architectures.py's ConvPlan, as JSON), input .npy files and a folder, into
which this writes, all from real Chainer:

- `snapshot.npz`: a `Trainer` snapshot (`extensions.snapshot()`) after one
  MomentumSGD iteration of `L.Classifier(twin)`: keys `updater/model:main/predictor/...`
  next to the optimizer's and the trainer's own entries;
- `model.npz`: `serializers.save_npz(path, classifier)`, keys `predictor/...`;
- `outputs.npy`: the twin's final values in test mode (`train=False`) on the inputs.

The twin follows the naming convention of export/chainer_import.py: links
conv1..convN, bn1..bnN (with batch norm), fc1..fcM, and Chainer's own defaults
(BatchNormalization eps, `max_pooling_2d` cover_all, `L.Linear`'s implicit flatten).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
from chainer import training
from chainer.datasets import TupleDataset
from chainer.iterators import SerialIterator
from chainer.training import extensions

# He-normal, as usual before ReLUs (and as the reference weights): answers that vary
HE = chainer.initializers.HeNormal()


class Twin(chainer.Chain):
    """conv/bn/relu stages with a 2x2 max-pool after each, readout, fc head (logits)."""

    def __init__(self, plan: dict[str, Any]) -> None:
        super().__init__()
        self.batch_norm = bool(plan["batch_norm"])
        self.readout = plan["readout"]
        self.stages = _stages(plan)
        with self.init_scope():
            for index, (inputs, outputs, kernel, stride) in enumerate(_convs(plan), 1):
                conv = L.Convolution2D(
                    inputs, outputs, kernel, stride, kernel // 2, self.batch_norm, HE
                )
                setattr(self, f"conv{index}", conv)
                if self.batch_norm:
                    setattr(self, f"bn{index}", L.BatchNormalization(outputs))
            widths = [*plan["hidden"], plan["output_width"]]
            self.fcs = len(widths)
            for index, width in enumerate(widths, 1):
                # fc1's input width is found on the first call, the usual Chainer idiom
                setattr(self, f"fc{index}", L.Linear(None, width, initialW=HE))

    def forward(self, x: Any, features: Any = None) -> Any:
        h, index = x, 0
        for convolutions in self.stages:
            for _ in range(convolutions):
                index += 1
                h = self[f"conv{index}"](h)
                if self.batch_norm:
                    h = self[f"bn{index}"](h)
                h = F.relu(h)
            h = F.max_pooling_2d(h, 2)  # cover_all=True, Chainer's default
        if self.readout == "global_average":
            h = F.mean(h, axis=(2, 3))
        if features is not None:
            h = F.concat((F.reshape(h, (h.shape[0], -1)), features), axis=1)
        for index in range(1, self.fcs + 1):
            if index > 1:
                h = F.relu(h)
            h = self[f"fc{index}"](h)  # fc1 flattens (N, C, H, W) itself
        return h


def _convs(plan: dict[str, Any]) -> list[tuple[int, int, int, int]]:
    convs, channels = [], plan["channels"]
    if plan["stem"] is not None:
        width, kernel, stride = plan["stem"]
        convs.append((channels, width, kernel, stride))
        channels = width
    for width, count in plan["blocks"]:
        for _ in range(count):
            convs.append((channels, width, 3, 1))
            channels = width
    return convs


def _stages(plan: dict[str, Any]) -> list[int]:
    stem = [1] if plan["stem"] is not None else []
    return stem + [count for _, count in plan["blocks"]]


def activation(logits: np.ndarray, output: dict[str, Any]) -> np.ndarray:
    """The head's activation, as export/architectures.py's HeadActivation."""
    if output["kind"] == "classification":
        return F.softmax(logits, axis=1).array
    squashed = F.sigmoid(logits).array
    if output["kind"] == "probability":
        return squashed
    return output["low"] + (output["high"] - output["low"]) * squashed


def randomise(twin: Twin, rng: np.random.Generator) -> None:
    """Non-trivial biases and BatchNorm statistics, so that every array matters."""
    for name, param in twin.namedparams():
        if name.endswith("/b"):
            param.array[...] = rng.normal(0.0, 0.05, param.shape)
    for link in twin.links():
        if isinstance(link, L.BatchNormalization):
            size = link.avg_mean.shape
            link.gamma.array[...] = 1.0 + rng.normal(0.0, 0.1, size)
            link.beta.array[...] = rng.normal(0.0, 0.1, size)
            link.avg_mean[...] = rng.normal(0.0, 0.1, size)
            link.avg_var[...] = np.exp(rng.normal(0.0, 0.1, size))


def small_variances(twin: Twin, rng: np.random.Generator) -> None:
    """Every fourth channel gets a variance near eps (gamma scaled to match): eps matters."""
    for link in twin.links():
        if isinstance(link, L.BatchNormalization):
            picked = slice(None, None, 4)
            variance = rng.uniform(2e-5, 1e-4, link.avg_var[picked].shape)
            link.avg_var[picked] = variance
            link.gamma.array[picked] *= np.sqrt(variance)


def run_case(case: dict[str, Any]) -> None:
    out = Path(case["out"])
    out.mkdir(parents=True, exist_ok=True)
    np.random.seed(case["seed"])  # Chainer's initialisers draw from numpy's global RNG
    rng = np.random.default_rng(case["seed"])
    samples = np.load(case["samples"])
    features = np.load(case["features"]) if case["features"] else None
    inputs = (samples,) if features is None else (samples, features)
    twin = Twin(case["plan"])
    model = L.Classifier(twin, lossfun=F.mean_squared_error)
    model.compute_accuracy = False
    with chainer.using_config("train", False):
        twin(*inputs)  # sizes fc1 (in_size=None) before the arrays are randomised
    randomise(twin, rng)
    targets = np.zeros((len(samples), case["plan"]["output_width"]), np.float32)
    snapshot = train_one_iteration(model, TupleDataset(*inputs, targets), out)
    small_variances(twin, rng)
    snapshot()  # the extension again, so the snapshot holds the final arrays
    chainer.serializers.save_npz(str(out / "model.npz"), model)
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        logits = twin(*inputs)
    np.save(out / "outputs.npy", activation(logits, case["plan"]["output"]).astype(np.float32))


def train_one_iteration(model: L.Classifier, dataset: TupleDataset, out: Path) -> Any:
    """A real Trainer run; returns a call that writes its snapshot now."""
    iterator = SerialIterator(dataset, len(dataset), repeat=True, shuffle=False)
    optimizer = chainer.optimizers.MomentumSGD(lr=1e-4)
    optimizer.setup(model)
    updater = training.updaters.StandardUpdater(iterator, optimizer)
    trainer = training.Trainer(updater, (1, "iteration"), out=str(out))
    snapshot = extensions.snapshot(filename="snapshot.npz")
    trainer.extend(snapshot, trigger=(1, "iteration"))
    trainer.run()
    return lambda: snapshot(trainer)


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    for case in cases:
        run_case(case)
    print(json.dumps({"chainer": chainer.__version__, "cases": len(cases)}))


if __name__ == "__main__":
    main()
