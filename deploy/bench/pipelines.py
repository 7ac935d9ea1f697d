"""The three compared pipelines, each turning a request number into one answered study.

In process, both runtimes do exactly what the served models do between gRPC and
gRPC: `StudyPreparer`, the network on every sample of the study (in chunks of
`max_samples_per_run`), then `study_answer` and its JSON. Served, the study goes
over gRPC with binary tensors, one channel per worker thread.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clients.protocol import OUTPUT_NAMES, clinical_json
from deploy.bench.workload import Call, Study
from export.configs import Tuning, model_names
from preprocessing import batching
from preprocessing.answer import ModelIdentity, study_answer
from preprocessing.specs import TaskSpec
from preprocessing.study import PreparedStudy, StudyPreparer

TORCH_THREADS = 2
SERVED_TIMEOUT_S = 300.0


class InProcess:
    """Preprocessing, a network runner and the answer, in this process, sequentially."""

    def __init__(
        self, spec: TaskSpec, pool: Sequence[Study], identity: ModelIdentity, tuning: Tuning
    ) -> None:
        self.spec = spec
        self.pool = pool
        self.identity = identity
        self.max_samples = tuning.max_samples_per_run
        self.prepare = StudyPreparer(spec)

    def network(self, samples: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, number: int) -> str:
        study = self.pool[number % len(self.pool)]
        prepared = self.prepare(study.instances, study.clinical)
        output = self.run_network(prepared)
        roles = dict(zip(prepared.roles, prepared.role_sources, strict=True))
        _, answer = study_answer(self.spec, output, prepared.sources.tolist(), self.identity, roles)
        return json.dumps(answer)  # the served answer travels as JSON too

    def run_network(self, prepared: PreparedStudy) -> np.ndarray:
        features = [prepared.features] if self.spec.feature_width else None
        batch = batching.join([prepared.samples], features)
        outputs = []
        for rows in batching.chunks(batch.samples.shape[0], self.max_samples):
            chunk_features = None if batch.features is None else batch.features[rows]
            outputs.append(self.network(batch.samples[rows], chunk_features))
        return np.concatenate(outputs, axis=0)


class OnnxInProcess(InProcess):
    """ONNX Runtime on the served `model.onnx`, with the served net's session options."""

    def __init__(
        self,
        spec: TaskSpec,
        pool: Sequence[Study],
        identity: ModelIdentity,
        tuning: Tuning,
        onnx_path: Path,
    ) -> None:
        import onnxruntime as ort

        super().__init__(spec, pool, identity, tuning)
        # As model_repository/_python_models/net.py builds them.
        options = ort.SessionOptions()
        options.intra_op_num_threads = tuning.net_intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )

    def network(self, samples: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        feeds = {"samples": samples}
        if features is not None:
            feeds["features"] = features
        output: np.ndarray = self.session.run(["output"], feeds)[0]
        return output


class TorchInProcess(InProcess):
    """PyTorch eager (the export's reference module) on `TORCH_THREADS` threads."""

    def __init__(
        self, spec: TaskSpec, pool: Sequence[Study], identity: ModelIdentity, tuning: Tuning
    ) -> None:
        import torch

        from export.reference import TorchReference

        super().__init__(spec, pool, identity, tuning)
        torch.set_num_threads(TORCH_THREADS)
        self.reference = TorchReference(spec)

    def network(self, samples: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        return self.reference(samples, features)


MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def serialized_request(task: str, study: Study) -> bytes:
    """One ModelInferRequest, as `clients` sends it (binary BYTES tensors), serialized.

    Serialized once per study, as perf_analyzer prepares its inputs: the load
    generator shares the cores with the server, and building an 8 MB protobuf cost
    it ~15 ms of CPU per request that a hospital's own machine would spend.
    """
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import serialize_byte_tensor

    request = service_pb2.ModelInferRequest(model_name=task)
    tensors = {
        "DICOM": np.array([list(study.instances)], dtype=np.object_),
        "CLINICAL": np.array([[clinical_json(study.clinical)]], dtype=np.object_),
    }
    for name, array in tensors.items():
        request.inputs.add(name=name, datatype="BYTES", shape=list(array.shape))
        request.raw_input_contents.append(serialize_byte_tensor(array).item())
    for name in OUTPUT_NAMES:
        request.outputs.add(name=name)
    serialized: bytes = request.SerializeToString()
    return serialized


class Served:
    """Makes one gRPC caller (own channel) per worker thread; requests are built once."""

    def __init__(self, url: str, task: str, pool: Sequence[Study]) -> None:
        self.url = url
        self.task = task
        self.requests = [serialized_request(task, study) for study in pool]
        self.channels: list[Any] = []
        self.lock = threading.Lock()

    def new_call(self) -> Call:
        import grpc  # type: ignore[import-untyped]  # no stubs; tritonclient's dependency
        from tritonclient.grpc import service_pb2

        channel = grpc.insecure_channel(self.url, options=UNLIMITED)
        with self.lock:
            self.channels.append(channel)
        infer = channel.unary_unary(
            MODEL_INFER, response_deserializer=service_pb2.ModelInferResponse.FromString
        )

        def call(number: int) -> object:
            request = self.requests[number % len(self.requests)]
            response = infer(request, timeout=SERVED_TIMEOUT_S)
            if {output.name for output in response.outputs} != set(OUTPUT_NAMES):
                raise RuntimeError(f"{self.task}: the response lacks {OUTPUT_NAMES}")
            return response

        return call

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
