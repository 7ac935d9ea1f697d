"""The ways `abdoserve bench serving` sends a study: the forms, their requests, the callers.

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
no work (`served_target.py` installs it into the bench's own repository).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from abdoserve.loadtests.bench.pytriton_peer import MODEL_PREFIX as PYTRITON_PREFIX
from abdoserve.loadtests.bench.workload import Call, Study
from abdoserve_client.protocol import OUTPUT_NAMES, clinical_json, dicom_tensors
from abdoserve_client.shared_memory import SharedMemoryRegion
from abdoserve_client.wire import (
    MODEL_INFER,
    SharedMemoryRef,
    WireTensor,
    bytes_tensor,
    encode_infer_request,
    open_channel,
)

PROBE = "transport_probe"
PROBE_OUTPUTS = ("BYTES_SEEN",)
GRPC_BYTES, GRPC_PACKED, SHARED_MEMORY = "grpc_bytes", "served", "shared_memory"
FUSED, FUSED_SHARED_MEMORY = "fused", "fused_shared_memory"
PYTRITON = "pytriton"  # the peer: PyTriton serving the pipeline as one callable
FORMS = (GRPC_BYTES, GRPC_PACKED, SHARED_MEMORY, FUSED, FUSED_SHARED_MEMORY, PYTRITON)
FUSED_PREFIX = "fused_"
WITHOUT_SCORES = tuple(name for name in OUTPUT_NAMES if name != "SCORES")
SLOT_ALIGNMENT = 1 << 16
SERVED_TIMEOUT_S = 300.0


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


def outputs_of(model: str, scores: bool = True) -> tuple[str, ...]:
    """What a request asks for: the probe's one output; else SCORES, STUDY and ANSWER, or
    without the per-image SCORES (the ANSWER holds each image's values too)."""
    if model == PROBE:
        return PROBE_OUTPUTS
    return OUTPUT_NAMES if scores else WITHOUT_SCORES


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


def study_tensors(study: Study, *, packed: bool) -> list[WireTensor]:
    clinical = bytes_tensor("CLINICAL", [clinical_json(study.clinical)])
    return [*dicom_tensors(study.instances, packed=packed), clinical]


def inline_request(model: str, study: Study, form: str, outputs: Sequence[str]) -> bytes:
    """A whole request, encoded once per study (as perf_analyzer prepares its inputs)."""
    packed = transport_of(form) != GRPC_BYTES
    return encode_infer_request(model, study_tensors(study, packed=packed), outputs)


def placed_request(model: str, study: Study, where: Placement, outputs: Sequence[str]) -> bytes:
    """Write the study into the caller's slot (the sender's one copy) and encode the
    request that refers to it."""
    total = where.region.write(where.offset, study.instances)
    reference = SharedMemoryRef(where.region.name, where.offset, total)
    packed, offsets, clinical = study_tensors(study, packed=True)
    placed = WireTensor(packed.name, packed.datatype, packed.shape, shared_memory=reference)
    return encode_infer_request(model, [placed, offsets, clinical], outputs)


class Served:
    """Makes one gRPC caller (own channel) per worker thread, sending each study in `form`
    to `model` (the form's, or the null probe); `close` closes their channels.

    Inline requests are encoded once per study here, as perf_analyzer prepares its
    inputs: the load generator shares the cores with the server, whose cost is what is
    measured. Through shared memory each caller owns one slot of `region` and writes
    every study into it before sending, the copy a real sender makes.
    """

    def __init__(
        self,
        url: str,
        task: str,
        pool: Sequence[Study],
        form: str = GRPC_PACKED,
        *,
        model: str | None = None,
        region: SharedMemoryRegion | None = None,
        scores: bool = True,
    ) -> None:
        self.transport = transport_of(form)
        if self.transport == SHARED_MEMORY and region is None:
            raise ValueError(f"the {form} form needs a shared-memory region")
        self.url = url
        self.model = model or model_of(form, task)
        self.pool = pool
        self.region = region
        self.outputs = outputs_of(self.model, scores)
        started = time.perf_counter()
        self.requests = [inline_request(self.model, study, form, self.outputs) for study in pool]
        # The client's encode time per study (done once here, as perf_analyzer does).
        self.encode_ms = 1e3 * (time.perf_counter() - started) / max(len(pool), 1)
        self.channels: list[Any] = []
        self.lock = threading.Lock()

    def new_call(self) -> Call:
        from tritonclient.grpc import service_pb2

        channel = open_channel(
            self.url, ssl=False, root_certificates=None, private_key=None, certificate_chain=None
        )
        with self.lock:
            slot = len(self.channels)
            self.channels.append(channel)
        infer = channel.unary_unary(
            MODEL_INFER, response_deserializer=service_pb2.ModelInferResponse.FromString
        )
        request = self.request_maker(slot)

        def call(number: int) -> object:
            response = infer(request(number), timeout=SERVED_TIMEOUT_S)
            if {output.name for output in response.outputs} != set(self.outputs):
                raise RuntimeError(f"{self.model}: the response lacks {self.outputs}")
            return response

        return call

    def request_maker(self, slot: int) -> Callable[[int], bytes]:
        """Request number -> the bytes to send, for the caller that owns `slot`."""
        region = self.region
        if self.transport != SHARED_MEMORY or region is None:
            return lambda number: self.requests[number % len(self.requests)]
        if slot >= region.slots:
            raise ValueError(f"{region.slots} slots in the region: fewer than the callers")
        where = Placement(region, slot * region.slot_bytes)
        return lambda number: placed_request(
            self.model, self.pool[number % len(self.pool)], where, self.outputs
        )

    def close(self) -> None:
        with self.lock:
            channels, self.channels = self.channels, []
        for channel in channels:
            channel.close()
