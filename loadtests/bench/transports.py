"""The ways `abdoserve bench serving` sends a study, and the null model that prices them.

Forms, each measured side by side in one run:

- `grpc_bytes`: DICOM as BYTES, one element per instance (the original contract, and
  what a raw KServe v2 client sends);
- `served`: DICOM_PACKED (UINT8) with DICOM_OFFSETS over gRPC: what `AbdoServeClient`
  sends to a server that takes it;
- `shared_memory`: DICOM_PACKED in a slot of the sender's shared-memory region (the
  opt-in of `serve --shared-region`), only a reference over gRPC;
- `fused`, `fused_shared_memory`: `served` and `shared_memory` sent to the task's fused
  pipeline model (`--pipeline fused`), which the bench installs beside the ensemble
  as `fused_<task>`;
- `pytriton`: `served` sent to the peer, PyTriton serving the same pipeline as one
  Python callable in a process of its own (`pytriton_peer.py`).

`transport_probe` is a null Python model that reads a study out of its input as the
preprocess model does and answers its size: the same bytes over the same transport with
no work. It is installed into the bench's own repository only.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from abdoserve.export.configs import MAX_BATCH_SIZE, to_text
from abdoserve.export.locations import PYTHON_MODELS
from abdoserve.loadtests.bench.workload import Study
from abdoserve_client.protocol import OUTPUT_NAMES, clinical_json, dicom_tensors
from abdoserve_client.shared_memory import SharedMemoryRegion
from abdoserve_client.wire import SharedMemoryRef, WireTensor, bytes_tensor, encode_infer_request

PROBE = "transport_probe"
PROBE_OUTPUTS = ("BYTES_SEEN",)
GRPC_BYTES, GRPC_PACKED, SHARED_MEMORY = "grpc_bytes", "served", "shared_memory"
FUSED, FUSED_SHARED_MEMORY = "fused", "fused_shared_memory"
PYTRITON = "pytriton"  # the peer: PyTriton serving the pipeline as one callable
FORMS = (GRPC_BYTES, GRPC_PACKED, SHARED_MEMORY, FUSED, FUSED_SHARED_MEMORY, PYTRITON)
FUSED_PREFIX = "fused_"
PYTRITON_PREFIX = "pytriton_"


def transport_of(form: str) -> str:
    """How a form moves the study: grpc_bytes, served (packed gRPC) or shared_memory."""
    return {
        FUSED: GRPC_PACKED,
        FUSED_SHARED_MEMORY: SHARED_MEMORY,
        PYTRITON: GRPC_PACKED,
    }.get(form, form)


def model_of(form: str, task: str) -> str:
    """The model a form's studies go to: the ensemble, the fused pipeline beside it, or
    the PyTriton peer's."""
    if form in (FUSED, FUSED_SHARED_MEMORY):
        return FUSED_PREFIX + task
    return PYTRITON_PREFIX + task if form == PYTRITON else task


def install_fused(repository: Path, tasks: Sequence[str]) -> None:
    """Write each task's fused pipeline beside its ensemble, as `fused_<task>`."""
    from abdoserve.export.fused import fuse_task

    for task in tasks:
        if not (repository / (FUSED_PREFIX + task) / "config.pbtxt").is_file():
            fuse_task(repository, task, PYTHON_MODELS, name=FUSED_PREFIX + task)


SLOT_ALIGNMENT = 1 << 16


def install_probe(repository: Path, instances: int) -> None:
    """Write the null model into `repository` (the bench's own; loaded with the rest)."""
    folder = repository / PROBE
    (folder / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PYTHON_MODELS / "transport_probe.py", folder / "1" / "model.py")
    (folder / "config.pbtxt").write_text(to_text(probe_config(instances)))


def probe_config(instances: int) -> mc.ModelConfig:
    """The preprocess model's inputs and scheduling, one tiny output."""
    config = mc.ModelConfig(name=PROBE, backend="python", max_batch_size=MAX_BATCH_SIZE)
    config.dynamic_batching.max_queue_delay_microseconds = 0
    config.instance_group.add(kind=mc.ModelInstanceGroup.Kind.KIND_CPU, count=instances)
    for name, data_type in (
        ("DICOM", mc.DataType.TYPE_STRING),
        ("DICOM_PACKED", mc.DataType.TYPE_UINT8),
        ("DICOM_OFFSETS", mc.DataType.TYPE_INT64),
    ):
        config.input.add(
            name=name, data_type=data_type, dims=[-1], allow_ragged_batch=True, optional=True
        )
    config.input.add(name="CLINICAL", data_type=mc.DataType.TYPE_STRING, dims=[1], optional=True)
    config.output.add(name="BYTES_SEEN", data_type=mc.DataType.TYPE_INT64, dims=[1])
    return config


def has_probe(repository: Path) -> bool:
    return (repository / PROBE / "config.pbtxt").is_file()


def slot_bytes(pools: Sequence[Sequence[Study]]) -> int:
    """A slot that holds the largest study of every pool, rounded up."""
    largest = max(
        sum(len(instance) for instance in study.instances) for pool in pools for study in pool
    )
    return -(-largest // SLOT_ALIGNMENT) * SLOT_ALIGNMENT


@dataclass(frozen=True)
class Placement:
    """Where a shared-memory caller writes: its own slot of the region."""

    region: SharedMemoryRegion
    offset: int


def inline_request(model: str, study: Study, form: str, outputs: Sequence[str]) -> bytes:
    """A whole request, encoded once per study (as perf_analyzer prepares its inputs)."""
    packed = transport_of(form) != GRPC_BYTES
    return encode_infer_request(model, study_tensors(study, packed=packed), outputs)


def study_tensors(study: Study, *, packed: bool) -> list[WireTensor]:
    clinical = bytes_tensor("CLINICAL", [clinical_json(study.clinical)])
    return [*dicom_tensors(study.instances, packed=packed), clinical]


def placed_request(model: str, study: Study, where: Placement, outputs: Sequence[str]) -> bytes:
    """Write the study into the caller's slot (the sender's one copy) and encode the
    request that refers to it."""
    total = where.region.write(where.offset, study.instances)
    reference = SharedMemoryRef(where.region.name, where.offset, total)
    packed, offsets, clinical = study_tensors(study, packed=True)
    placed = WireTensor(packed.name, packed.datatype, packed.shape, shared_memory=reference)
    return encode_infer_request(model, [placed, offsets, clinical], outputs)


WITHOUT_SCORES = tuple(name for name in OUTPUT_NAMES if name != "SCORES")


def outputs_of(model: str, scores: bool = True) -> tuple[str, ...]:
    """What a request asks for: the probe's one output; else SCORES, STUDY and ANSWER, or
    without the per-image SCORES (the ANSWER holds each image's values too)."""
    if model == PROBE:
        return PROBE_OUTPUTS
    return OUTPUT_NAMES if scores else WITHOUT_SCORES
