"""`abdoserve model import`: a hospital's network as a new version of a task's `_net`.

The version is written beside the one that serves, never over it, and nothing that
serves changes:

1. The source: an ONNX graph of any architecture, or a checkpoint of the reference
   architecture (PyTorch state_dict, TorchScript, Chainer .npz: `load_checkpoint`),
   which goes through the build's own path to a version folder
   (`repository.write_net_version`: export, export parity, CPU runtime, Python model).
2. The contract: the graph's inputs are what `<task>_preprocess` produces and its
   output what `<task>_postprocess` reads (names, shapes with their dynamic dims,
   FP32), read from the repository's configs; a mismatch is refused by name. ONNX
   Runtime then runs the graph once on a phantom study: a non-finite answer is refused.
3. Parity: where the source framework is here (PyTorch, TorchScript, Chainer weights
   on their PyTorch twin), the eager network against the version folder run by the
   runner the `_net` builds from its config, on phantom studies: max |diff| at most
   `PARITY_TOLERANCE` (FP32) or the import is refused. An ONNX source has none (n/a).
4. The model card (export/model_card.py), checked as it is written.
5. The version: the highest + 1 unless given; an existing one is refused. The folder
   is built under a hidden name beside it (Triton ignores names that are not numbers)
   and renamed into place.
6. The `_net` config pins the versions that serve (`version_policy { specific }`)
   before the new folder appears, so a restart or a reload keeps serving them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tritonclient.grpc import model_config_pb2 as mc

from abdoserve.export.calibration import HELD_OUT_FIRST_SEED, StudyTensors, phantom_tensors
from abdoserve.export.chainer_import import CHAINER_BN_EPS
from abdoserve.export.configs import Tuning, model_names, to_text
from abdoserve.export.errors import ExportError
from abdoserve.export.fused import read_config
from abdoserve.export.model_card import (
    NOT_GIVEN,
    Importer,
    ModelCard,
    Parity,
    SelfCheck,
    Source,
    SpecDifference,
    utc_now,
    write_card,
)
from abdoserve.export.onnx_export import OPSET
from abdoserve.export.reference import TorchReference
from abdoserve.export.repository import (
    DEFAULT_CALIBRATION,
    copy_net_model,
    pin_versions,
    write_net_version,
)
from abdoserve.export.runtime_models import write_runtime_model
from abdoserve.export.weights import is_torchscript
from abdoserve.preprocessing.specs import ClinicalInput, TaskSpec, leaf_paths, provenance_of
from abdoserve.preprocessing.specs import Source as SpecSource
from abdoserve.preprocessing.tasks import TASKS, get_task
from abdoserve.serving.cpu_runtimes import (
    CPU_RUNTIMES,
    DEFAULT_CPU_RUNTIME,
    RUNTIME_PARAMETER,
    CpuRuntime,
    configured_runner,
    open_runner,
)
from abdoserve.serving.routing import CARDS_PARAMETER

logger = logging.getLogger(__name__)

SOURCE_SUFFIXES = {".onnx": "onnx", ".pt": "pytorch", ".pth": "pytorch", ".npz": "chainer"}
PARITY_TOLERANCE = 1e-4  # max |eager - served|, FP32, absolute
# Held-out phantom studies (calibration.py keeps their seeds apart from the others').
PARITY_SEEDS = (HELD_OUT_FIRST_SEED, HELD_OUT_FIRST_SEED + 1, HELD_OUT_FIRST_SEED + 2)
SELF_CHECK_SEED = PARITY_SEEDS[0]
IMPORTER = "abdoserve model import"
# What the parity's eager side ran, by source framework (all through load_checkpoint).
EAGER_REFERENCES = {
    "pytorch": "the state_dict in the reference architecture, eager PyTorch",
    "torchscript": "the TorchScript module, eager PyTorch",
    "chainer": "the Chainer weights on the PyTorch twin (Chainer's semantics), eager PyTorch",
}
FP32_ONNX = onnx.TensorProto.FLOAT
_TRITON_FP32 = mc.DataType.TYPE_FP32


class ImportRefused(ExportError):
    """The source, the repository or the version asked for cannot be imported."""


class ContractError(ImportRefused):
    """The graph's inputs or output are not those of the task's `_net`."""


@dataclass(frozen=True)
class TensorContract:
    """One tensor between the `_net` and its neighbours: Triton's name, the graph's name,
    its shape with -1 for a dynamic dim (the rows of a study), its ONNX element type."""

    triton_name: str
    onnx_name: str
    shape: tuple[int, ...]
    elem_type: int = FP32_ONNX


@dataclass(frozen=True)
class NetContract:
    inputs: tuple[TensorContract, ...]
    output: TensorContract


@dataclass(frozen=True)
class PinChange:
    """The `_net` config's version policy: `before` as found, `versions` pinned after."""

    before: str
    versions: tuple[int, ...]
    changed: bool


@dataclass(frozen=True)
class ImportResult:
    task: str
    version: int
    folder: Path
    card: ModelCard
    pin: PinChange
    seconds: float


@dataclass(frozen=True)
class NetModel:
    """A repository's `_net`: its folder, config, spec and the CPU runtime it runs."""

    task: str
    folder: Path
    config: mc.ModelConfig
    spec: TaskSpec
    runtime: CpuRuntime
    contract: NetContract

    @property
    def parameters(self) -> dict[str, str]:
        return {key: value.string_value for key, value in self.config.parameters.items()}

    @property
    def versions(self) -> tuple[int, ...]:
        return existing_versions(self.folder)

    def tuning(self) -> Tuning:
        parameters = self.parameters
        return Tuning(
            net_intra_op_threads=int(parameters.get("intra_op_threads", "0")),
            max_samples_per_run=int(parameters.get("max_samples_per_run", "64")),
        )


def import_model(
    repository: Path,
    task: str,
    source: Path,
    *,
    version: int | None = None,
    intended_use: str | None = None,
    training_data: str | None = None,
) -> ImportResult:
    """Writes `source` as a new version of `task`'s `_net` in `repository`; returns what
    it wrote. Raises `ImportRefused` (or another `ExportError`) and leaves the repository
    as it was, the pin apart (which only names what already serves)."""
    started = time.perf_counter()
    framework = source_framework(source)
    net = net_model(repository, task)
    with _locked(net.folder):
        number = next_version(net.versions, version, net.folder.name)
        staging = Path(tempfile.mkdtemp(prefix=f".import-{number}-", dir=net.folder))
        # mkdtemp's 0700 would hide the version from a server running as another user
        staging.chmod(stat.S_IMODE(net.folder.stat().st_mode))
        try:
            card = _write_version(
                net,
                source,
                staging,
                framework=framework,
                version=number,
                intended_use=intended_use or "",
                training_data=training_data or "",
            )
            pin = pin_serving_versions(net.folder)
            final = net.folder / str(number)
            if final.exists():  # another writer despite the lock (a build?): never merge
                raise ImportRefused(f"{net.folder.name} version {number} appeared meanwhile")
            staging.rename(final)
            record_card(net.folder, number, card.card_id)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - started
    logger.info(
        "%s: version %d imported from %s in %.1f s", net.folder.name, number, source.name, seconds
    )
    return ImportResult(task, number, final, card, pin, seconds)


def source_framework(source: Path) -> str:
    """onnx, pytorch, torchscript or chainer, from the file's suffix (and, for .pt/.pth,
    its content)."""
    framework = SOURCE_SUFFIXES.get(source.suffix.lower())
    if framework is None:
        known = ", ".join(SOURCE_SUFFIXES)
        raise ImportRefused(f"{source.name}: unknown source format; known suffixes: {known}")
    if not source.is_file():
        raise ImportRefused(f"{source}: no such file")
    if framework == "pytorch" and is_torchscript(source.read_bytes()):
        return "torchscript"
    return framework


def net_model(repository: Path, task: str) -> NetModel:
    """The task's `_net` in a built repository, with the contract its neighbours set."""
    if task not in TASKS:
        raise ImportRefused(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if not repository.is_dir():
        raise ImportRefused(
            f"no model repository at {repository}: build one first "
            "(`abdoserve build-repository`, or `abdoserve serve`)"
        )
    _, preprocess, net, _ = model_names(task)
    folder = repository / net
    fused = (
        not (folder / "config.pbtxt").is_file() and (repository / task / "config.pbtxt").is_file()
    )
    if fused:
        folder = repository / task  # its versions are the folders beside its code's
    elif not (folder / "config.pbtxt").is_file():
        raise ImportRefused(f"{repository} has no {net}: {task} is not built there")
    config = read_config(folder)
    if config.backend != "python":
        kind = config.platform or config.backend
        raise ImportRefused(
            f"{net} runs on {kind} (a GPU build): model import writes versions of the "
            "CPU server's Python-backend _net only"
        )
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    spec = get_task(task, json.loads(parameters.get("spec_overrides") or "{}"))
    runtime = CPU_RUNTIMES.get(parameters.get(RUNTIME_PARAMETER, DEFAULT_CPU_RUNTIME))
    if runtime is None:
        raise ImportRefused(f"{net}: unknown runtime {parameters.get(RUNTIME_PARAMETER)!r}")
    contract = (
        spec_contract(spec)
        if fused
        else net_contract(spec, read_config(repository / preprocess), config)
    )
    return NetModel(task, folder, config, spec, runtime, contract)


def spec_contract(spec: TaskSpec) -> NetContract:
    """A fused model's network contract: no composing configs to read it from, so the
    spec's own shapes, which the build checked the composing models against."""
    inputs = [TensorContract("SAMPLES", "samples", (-1, *spec.sample_shape))]
    if spec.feature_width:
        inputs.append(TensorContract("FEATURES", "features", (-1, spec.feature_width)))
    return NetContract(tuple(inputs), TensorContract("OUTPUT", "output", (-1, spec.output.width)))


def net_contract(spec: TaskSpec, preprocess: mc.ModelConfig, net: mc.ModelConfig) -> NetContract:
    """What the `_net` graph must take and answer: the preprocess model's SAMPLES
    [-1, C, M, M] (and FEATURES [F], one row per sample in the graph: [-1, F]) and the
    OUTPUT [-1, K] every version of the `_net` gives the postprocess, each FP32; checked
    against the spec."""
    produced = {item.name: item for item in preprocess.output}
    read = {item.name: item for item in net.output}
    wanted: list[tuple[str, tuple[int, ...]]] = [("SAMPLES", (-1, *spec.sample_shape))]
    if spec.feature_width:
        wanted.append(("FEATURES", (spec.feature_width,)))
    inputs = []
    for name, spec_dims in wanted:
        tensor = produced.get(name)
        if tensor is None or tuple(tensor.dims) != spec_dims or tensor.data_type != _TRITON_FP32:
            raise ImportRefused(f"{preprocess.name}'s {name} disagrees with the {spec.name} spec")
        rows = tuple(tensor.dims) if name == "SAMPLES" else (-1, *tensor.dims)
        inputs.append(TensorContract(name, name.lower(), rows))
    output = read.get("OUTPUT")
    if output is None or tuple(output.dims) != (-1, spec.output.width):
        raise ImportRefused(f"{net.name}'s OUTPUT disagrees with the {spec.name} spec")
    return NetContract(tuple(inputs), TensorContract("OUTPUT", "output", tuple(output.dims)))


def contract_problems(contract: NetContract, model: onnx.ModelProto) -> list[str]:
    """Each way the graph's inputs and outputs miss the contract, in words."""
    initializers = {item.name for item in model.graph.initializer}
    inputs = {item.name: item for item in model.graph.input if item.name not in initializers}
    outputs = {item.name: item for item in model.graph.output}
    problems = []
    for wanted in contract.inputs:
        problems += _tensor_problems("input", wanted, inputs)
    expected_inputs = {wanted.onnx_name for wanted in contract.inputs}
    problems += [
        f"input {name!r}: the _net sends no such tensor "
        f"(it sends {', '.join(sorted(expected_inputs))})"
        for name in inputs
        if name not in expected_inputs
    ]
    problems += _tensor_problems("output", contract.output, outputs)
    return problems


def _tensor_problems(
    kind: str, wanted: TensorContract, found: Mapping[str, onnx.ValueInfoProto]
) -> list[str]:
    label = f"{kind} {wanted.triton_name}"
    value = found.get(wanted.onnx_name)
    if value is None:
        names = ", ".join(repr(name) for name in found) or "none"
        return [
            f"{label}: the graph has no {kind} named {wanted.onnx_name!r} (its {kind}s: {names})"
        ]
    problems = []
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        return [f"{label}: expected a tensor, got {value.type.WhichOneof('value')}"]
    if tensor.elem_type != wanted.elem_type:
        problems.append(
            f"{label}: expected type FP32 (ONNX FLOAT), got "
            f"{onnx.TensorProto.DataType.Name(tensor.elem_type)}"
        )
    shape = graph_shape(value)
    if not shape_fits(wanted.shape, shape):
        problems.append(
            f"{label}: expected shape {_shown(wanted.shape)}, got "
            f"{'unknown rank' if shape is None else _shown(shape)}"
        )
    return problems


def _shown(shape: Sequence[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def graph_shape(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    """A graph tensor's shape, -1 for each dynamic dim; None where the rank is unknown."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return tuple(dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor.shape.dim)


def shape_fits(expected: Sequence[int], found: Sequence[int] | None) -> bool:
    """Same rank; a dynamic dim where the contract has one (the rows: a study's count
    varies); a fixed dim equal, or dynamic (a graph that takes any size takes this one,
    and the self-check runs it at this one)."""
    if found is None or len(found) != len(expected):
        return False
    return all(
        got == -1 if want == -1 else got in (want, -1)
        for want, got in zip(expected, found, strict=True)
    )


def check_graph(contract: NetContract, path: Path, task: str) -> onnx.ModelProto:
    """The ONNX file, loaded and checked against the contract (every mismatch named)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as error:  # onnx raises its own and protobuf's errors
        raise ImportRefused(f"{path.name} is not a valid ONNX model: {error}") from error
    external = [
        item.name
        for item in model.graph.initializer
        if item.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        raise ImportRefused(
            f"{path.name} keeps weights in external data files ({external[0]}, ...): "
            "give one self-contained .onnx file"
        )
    problems = contract_problems(contract, model)
    if problems:
        raise ContractError(f"{path.name} does not fit {task}_net: " + "; ".join(problems))
    return model


def self_check(net: NetModel, graph: Path) -> SelfCheck:
    """ONNX Runtime runs the graph once on a phantom study; non-finite answers refused."""
    import onnxruntime as ort

    (study,) = phantom_tensors(net.spec, (SELF_CHECK_SEED,))
    try:
        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        output = np.asarray(session.run(["output"], study.feeds())[0])
    except Exception as error:  # ONNX Runtime's errors have no common public base
        raise ImportRefused(f"ONNX Runtime cannot run the graph: {error}") from error
    expected = (len(study.samples), net.spec.output.width)
    if output.shape != expected:
        raise ContractError(
            f"output OUTPUT: {list(output.shape)} for a phantom study of {expected[0]} "
            f"samples, expected {list(expected)}"
        )
    finite = np.isfinite(output)
    if not finite.all():
        raise ImportRefused(
            f"the graph answers non-finite values ({int((~finite).sum())} of {output.size}) "
            f"on phantom study {SELF_CHECK_SEED}"
        )
    return SelfCheck(SELF_CHECK_SEED, list(output.shape), True, float(np.abs(output).max()))


def existing_versions(folder: Path) -> tuple[int, ...]:
    """The version folders Triton would see: numeric names not starting with 0."""
    return tuple(
        sorted(
            int(path.name)
            for path in folder.iterdir()
            if path.is_dir() and path.name.isdigit() and not path.name.startswith("0")
        )
    )


def next_version(existing: Sequence[int], asked: int | None, model: str) -> int:
    """The version asked for, or the highest + 1; an existing one is refused."""
    highest = max(existing, default=0)
    if asked is None:
        return highest + 1
    if asked < 1:
        raise ImportRefused(f"--version must be 1 or more, got {asked}")
    if asked in existing:
        shown = ", ".join(map(str, existing))
        raise ImportRefused(
            f"{model} version {asked} exists already (versions {shown}): choose another "
            f"--version, or leave it out for {highest + 1}"
        )
    return asked


def serving_versions(config: mc.ModelConfig, existing: Sequence[int]) -> tuple[int, ...]:
    """The versions Triton loads from `existing` under the config's version policy."""
    policy = config.version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "specific":
        return tuple(sorted(set(policy.specific.versions) & set(existing)))
    if kind == "all":
        return tuple(existing)
    count = policy.latest.num_versions if kind == "latest" else 1
    return tuple(sorted(existing)[-max(count, 1) :])


def pin_serving_versions(folder: Path) -> PinChange:
    """Pins the `_net` config to the versions that serve now, unless it names some
    already (a build since issue 20 pins version 1); written by an atomic rename."""
    config = read_config(folder)
    policy = config.version_policy
    before = _policy_text(config)
    if policy.WhichOneof("policy_choice") == "specific":
        return PinChange(before, tuple(policy.specific.versions), changed=False)
    versions = serving_versions(config, existing_versions(folder))
    if not versions:
        raise ImportRefused(f"{folder.name}: no version serves now; nothing to pin")
    pin_versions(config, versions)
    temporary = folder / ".config.pbtxt.import"
    temporary.write_text(to_text(config))
    os.replace(temporary, folder / "config.pbtxt")
    return PinChange(before, versions, changed=True)


def record_card(folder: Path, version: int, card_id: str) -> None:
    """Name the version's card in the `_net` config (its `version_cards` parameter), where
    the server's model config shows it and `abdoserve model list` reads it; a running
    server's supervisor reads it in once nothing routes to a replaced version."""
    config = read_config(folder)
    parameter = config.parameters[CARDS_PARAMETER]
    cards = json.loads(parameter.string_value or "{}")
    cards[str(version)] = card_id
    parameter.string_value = json.dumps(dict(sorted(cards.items(), key=lambda item: int(item[0]))))
    temporary = folder / ".config.pbtxt.import"
    temporary.write_text(to_text(config))
    os.replace(temporary, folder / "config.pbtxt")


def _policy_text(config: mc.ModelConfig) -> str:
    if not config.HasField("version_policy"):
        return "none (Triton's default: latest 1)"
    return " ".join(to_text(mc.ModelConfig(version_policy=config.version_policy)).split())


def _write_version(
    net: NetModel,
    source: Path,
    folder: Path,
    *,
    framework: str,
    version: int,
    intended_use: str,
    training_data: str,
) -> ModelCard:
    """The version's files in `folder`, checked, with its card; returns the card."""
    deviation = None
    if framework == "onnx":
        adaptations = _write_onnx_version(net, source, folder)
    else:
        adaptations, deviation = _write_checkpoint_version(net, source, framework, folder)
    check_graph(net.contract, folder / "model.onnx", net.task)
    checked = self_check(net, folder / "model.onnx")
    if framework == "onnx":
        parity = Parity(
            reference=None,
            served_by=_served_by(net.runtime),
            study_seeds=[],
            samples=0,
            max_abs_diff=None,
            tolerance=PARITY_TOLERANCE,
            status="n/a: no source framework for an ONNX file (the graph is what serves); "
            "ONNX Runtime self-check passed",
            ort_self_check=checked,
        )
    else:
        parity = measure_parity(
            net, source, folder, framework=framework, checked=checked, deviation=deviation
        )
    card = ModelCard(
        task=net.task,
        model=f"{net.task}_net",  # the network, whichever shape serves it
        version=version,
        source=Source(source.name, _sha256(source), framework),
        importer=_importer(),
        intended_use=_given(intended_use),
        training_data=_given(training_data),
        spec_differences=spec_differences(net.spec),
        import_adaptations=adaptations,
        parity=parity,
    )
    write_card(card, folder)
    return card.with_id()


def _write_checkpoint_version(
    net: NetModel, source: Path, framework: str, folder: Path
) -> tuple[list[str], dict[str, Any] | None]:
    """The build's own path: export (with its parity), the CPU runtime, model.py; what
    the import adapted, and an INT8 runtime's deviation from the network (else None)."""
    _, built = write_net_version(
        net.spec,
        folder,
        source,
        runtime=net.runtime,
        calibration=DEFAULT_CALIBRATION,
        tuning=net.tuning(),
    )
    adaptations = {
        "pytorch": ["state_dict loaded into the reference architecture"],
        "torchscript": ["TorchScript module exported as it is (its own architecture)"],
        "chainer": [
            "Chainer links mapped onto the PyTorch twin (conv/bn/fc, export/chainer_import.py)",
            f"BatchNorm eps {CHAINER_BN_EPS:g} (Chainer's; PyTorch's is 1e-5)",
            "max pooling with ceil_mode (Chainer's cover_all=True)",
        ],
    }[framework]
    adaptations.append(f"exported to ONNX opset {OPSET} (model.onnx)")
    if not net.runtime.is_default:
        adaptations.append(f"{net.runtime.model_file} written for the {net.runtime.name} runtime")
    deviation = built.deviation.to_json() if built.deviation is not None else None
    return adaptations, deviation


def _write_onnx_version(net: NetModel, source: Path, folder: Path) -> list[str]:
    """The graph as given (checked first), its provenance, its runtime file, model.py."""
    if net.runtime.precision != "fp32":
        raise ImportRefused(
            f"{net.folder.name} runs {net.runtime.name}: its INT8 file needs calibration "
            "and a deviation measured against a source framework, which an ONNX file lacks; "
            "import the checkpoint instead, or into a repository with an FP32 runtime"
        )
    check_graph(net.contract, source, net.task)
    shutil.copyfile(source, folder / "model.onnx")
    _write_onnx_provenance(net.spec, source, folder)
    adaptations = ["none to the graph: served as given, named model.onnx"]
    if not net.runtime.is_default:
        write_runtime_model(net.runtime, folder, [])
        adaptations.append(f"{net.runtime.model_file} written for the {net.runtime.name} runtime")
    copy_net_model(folder)
    return adaptations


def _write_onnx_provenance(spec: TaskSpec, source: Path, folder: Path) -> None:
    import onnxruntime

    model = onnx.load(str(source), load_external_data=False)
    digest = _sha256(source)
    record = {
        "task": spec.name,
        "weights_source": source.name,
        "weights_sha256": digest,
        "weights_untrained": "false",
        "weights_framework": "onnx",
        "onnx_sha256": digest,
        "opset": max(
            (item.version for item in model.opset_import if item.domain in ("", "ai.onnx")),
            default=0,
        ),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "sample_shape": list(spec.sample_shape),
        "feature_width": spec.feature_width,
        "output_width": spec.output.width,
        "onnxruntime": onnxruntime.__version__,
    }
    (folder / "provenance.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def measure_parity(
    net: NetModel,
    source: Path,
    folder: Path,
    *,
    framework: str,
    checked: SelfCheck,
    deviation: dict[str, Any] | None = None,
) -> Parity:
    """The eager network vs the version folder as the `_net` runs it, on phantom studies.

    The runner is the one the `_net` model builds from its config (runtime, threads,
    rows per run); an INT8 runtime is held to its own measured deviation instead, and
    the FP32 graph it is made from runs here."""
    reference = TorchReference(net.spec, source)
    runtime = net.runtime if net.runtime.precision == "fp32" else CPU_RUNTIMES[DEFAULT_CPU_RUNTIME]
    if runtime is net.runtime:
        runner = configured_runner(net.spec, net.parameters, folder)
    else:
        tuning = net.tuning()
        runner = open_runner(
            runtime,
            folder,
            intra_op_threads=tuning.net_intra_op_threads,
            max_samples=tuning.max_samples_per_run,
        )
    studies = phantom_tensors(net.spec, PARITY_SEEDS)
    served = runner.run_studies(
        [study.samples for study in studies],
        [study.features for study in studies] if net.spec.feature_width else None,
    )
    error = max(
        _max_abs(output, _eager(reference, study))
        for output, study in zip(served, studies, strict=True)
    )
    if not error <= PARITY_TOLERANCE:  # NaN too
        raise ImportRefused(
            f"parity: the served version differs from the eager {framework} "
            f"network by {error:.3g} (max |diff| on phantom studies {list(PARITY_SEEDS)}), "
            f"over {PARITY_TOLERANCE:g}"
        )
    return Parity(
        reference=EAGER_REFERENCES[framework],
        served_by=_served_by(runtime, int8=net.runtime if runtime is not net.runtime else None),
        study_seeds=list(PARITY_SEEDS),
        samples=sum(len(study.samples) for study in studies),
        max_abs_diff=float(error),
        tolerance=PARITY_TOLERANCE,
        status="passed",
        ort_self_check=checked,
        runtime_deviation=deviation if net.runtime.precision != "fp32" else None,
    )


def _eager(reference: TorchReference, study: StudyTensors) -> np.ndarray:
    return reference(study.samples, study.feeds().get("features"))


def _max_abs(served: np.ndarray, eager: np.ndarray) -> float:
    if served.shape != eager.shape:
        raise ImportRefused(f"parity: served {list(served.shape)}, eager {list(eager.shape)}")
    return float(np.max(np.abs(served.astype(np.float32) - eager.astype(np.float32))))


def _served_by(runtime: CpuRuntime, int8: CpuRuntime | None = None) -> dict[str, str]:
    served = {"runtime": runtime.name, "precision": runtime.precision, "file": runtime.model_file}
    if int8 is not None:
        served["note"] = (
            f"the FP32 graph {int8.model_file} is made from; {int8.name}'s own deviation "
            "is runtime_deviation"
        )
    return served


def spec_differences(spec: TaskSpec) -> list[SpecDifference]:
    """Every spec value the served task holds that differs from the task's default."""
    default = TASKS[spec.name]
    differences = []
    for path in sorted(set(leaf_paths(spec)) | set(leaf_paths(default))):
        served, original = _leaf(spec, path), _leaf(default, path)
        if served == original:
            continue
        provenance = provenance_of(default, path)
        source = provenance.source.value if provenance else SpecSource.CHOICE.value
        differences.append(SpecDifference(path, _json(original), source, _json(served)))
    return differences


_ABSENT = "absent"  # a path one spec has and the other not (a part replaced whole)
_MISSING = object()


def _leaf(spec: TaskSpec, path: str) -> Any:
    node: Any = spec
    for part in path.split("."):
        if isinstance(node, tuple) and node and isinstance(node[0], ClinicalInput):
            node = next((item for item in node if item.name == part), _MISSING)
        else:
            node = getattr(node, part, _MISSING)
        if node is _MISSING:
            return _ABSENT
    return node


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _given(text: str) -> str:
    return text.strip() or NOT_GIVEN


def _importer() -> Importer:
    return Importer(IMPORTER, metadata.version("abdoserve"), utc_now())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One import per `_net` at a time (two would pick the same version number): a lock
    on the model folder itself, so nothing is left in it."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ImportRefused(f"another import into {folder.name} is running") from None
        yield
    finally:
        os.close(descriptor)  # releases the lock
