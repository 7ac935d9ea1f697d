"""The three compared pipelines, each turning a request number into one answered study.

In process, both runtimes do exactly what the served models do between gRPC and
gRPC: `StudyPreparer`, the network on every sample of the study (in chunks of
`max_samples_per_run`), then `study_answer` and its JSON. Served, the study goes
over gRPC with binary tensors, one channel per worker thread.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from abdoserve.export.configs import Tuning, model_names
from abdoserve.loadtests.bench import transports
from abdoserve.loadtests.bench.workload import Call, Study
from abdoserve.preprocessing.specs import TaskSpec
from abdoserve.preprocessing.study import PreparedStudy, StudyPreparer
from abdoserve.serving import batching
from abdoserve.serving.answer import ModelIdentity, study_answer
from abdoserve.serving.onnx_runner import OnnxRunner
from abdoserve_client.shared_memory import SharedMemoryRegion
from abdoserve_client.wire import MODEL_INFER, open_channel

TORCH_THREADS = 2
SERVED_TIMEOUT_S = 300.0


class InProcess:
    """Preprocessing, a network runner and the answer, in this process, sequentially."""

    name = ""  # the runtime, as its rows are labelled

    def __init__(
        self, spec: TaskSpec, pool: Sequence[Study], identity: ModelIdentity, tuning: Tuning
    ) -> None:
        self.spec = spec
        self.pool = pool
        self.identity = identity
        self.max_samples = tuning.max_samples_per_run
        self.prepare = StudyPreparer(spec)

    def run_network(self, prepared: PreparedStudy) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, number: int) -> str:
        study = self.pool[number % len(self.pool)]
        prepared = self.prepare(study.instances, study.clinical)
        output = self.run_network(prepared)
        roles = dict(zip(prepared.roles, prepared.role_sources, strict=True))
        _, answer = study_answer(self.spec, output, prepared.sources.tolist(), self.identity, roles)
        return json.dumps(answer)  # the served answer travels as JSON too


class OnnxInProcess(InProcess):
    """The served `_net`'s own runner (`OnnxRunner`) on the served `model.onnx`."""

    name = "onnxruntime"

    def __init__(
        self,
        spec: TaskSpec,
        pool: Sequence[Study],
        identity: ModelIdentity,
        tuning: Tuning,
        onnx_path: Path,
    ) -> None:
        super().__init__(spec, pool, identity, tuning)
        self.runner = OnnxRunner(
            onnx_path, intra_op_threads=tuning.net_intra_op_threads, max_samples=self.max_samples
        )

    def run_network(self, prepared: PreparedStudy) -> np.ndarray:
        features = [prepared.features] if self.spec.feature_width else None
        return self.runner.run_studies([prepared.samples], features)[0]


class TorchInProcess(InProcess):
    """PyTorch eager (the export's reference module) on `TORCH_THREADS` threads."""

    name = "pytorch"

    def __init__(
        self, spec: TaskSpec, pool: Sequence[Study], identity: ModelIdentity, tuning: Tuning
    ) -> None:
        import torch

        from abdoserve.export.reference import TorchReference

        super().__init__(spec, pool, identity, tuning)
        torch.set_num_threads(TORCH_THREADS)
        self.reference = TorchReference(spec)

    def run_network(self, prepared: PreparedStudy) -> np.ndarray:
        features = [prepared.features] if self.spec.feature_width else None
        batch = batching.join([prepared.samples], features)
        outputs = []
        for rows in batching.chunks(batch.samples.shape[0], self.max_samples):
            chunk_features = None if batch.features is None else batch.features[rows]
            outputs.append(self.reference(batch.samples[rows], chunk_features))
        return np.concatenate(outputs, axis=0)


class Served:
    """Makes one gRPC caller (own channel) per worker thread, sending each study in `form`
    (`abdoserve.loadtests.bench.transports`) to `model` (the task, or the null probe).

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
        form: str = transports.GRPC_PACKED,
        *,
        model: str | None = None,
        region: SharedMemoryRegion | None = None,
        scores: bool = True,
    ) -> None:
        self.transport = transports.transport_of(form)
        if self.transport == transports.SHARED_MEMORY and region is None:
            raise ValueError(f"the {form} form needs a shared-memory region")
        self.url = url
        self.task = task
        self.model = model or transports.model_of(form, task)
        self.pool = pool
        self.form = form
        self.region = region
        self.outputs = transports.outputs_of(self.model, scores)
        started = time.perf_counter()
        self.requests = [
            transports.inline_request(self.model, study, form, self.outputs) for study in pool
        ]
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
        request = self._request_maker(slot)

        def call(number: int) -> object:
            response = infer(request(number), timeout=SERVED_TIMEOUT_S)
            if {output.name for output in response.outputs} != set(self.outputs):
                raise RuntimeError(f"{self.model}: the response lacks {self.outputs}")
            return response

        return call

    def _request_maker(self, slot: int) -> Callable[[int], bytes]:
        """Request number -> the bytes to send, for the caller that owns `slot`."""
        region = self.region
        if self.transport != transports.SHARED_MEMORY or region is None:
            return lambda number: self.requests[number % len(self.requests)]
        if slot >= region.slots:
            raise ValueError(f"{region.slots} slots in the region: fewer than the callers")
        where = transports.Placement(region, slot * region.slot_bytes)
        return lambda number: transports.placed_request(
            self.model, self.pool[number % len(self.pool)], where, self.outputs
        )

    def close(self) -> None:
        with self.lock:
            channels, self.channels = self.channels, []
        for channel in channels:
            channel.close()


def served_tuning(url: str, task: str) -> Tuning:
    """The tuning a running server's configs of `task` say it was built with."""
    import tritonclient.grpc as grpcclient

    _, preprocess, net, postprocess = model_names(task)
    with grpcclient.InferenceServerClient(url) as client:
        configs = [client.get_model_config(name).config for name in (preprocess, net, postprocess)]
    pre, net_config, post = configs
    parameters = {key: value.string_value for key, value in net_config.parameters.items()}
    default = Tuning()
    return Tuning(
        preprocess_instances=_instances(pre),
        net_instances=_instances(net_config),
        postprocess_instances=_instances(post),
        net_intra_op_threads=int(parameters.get("intra_op_threads", default.net_intra_op_threads)),
        max_queue_delay_us=int(pre.dynamic_batching.max_queue_delay_microseconds),
        max_samples_per_run=int(parameters.get("max_samples_per_run", default.max_samples_per_run)),
    )


def _instances(config: Any) -> int:
    return sum(int(group.count) for group in config.instance_group) or 1
