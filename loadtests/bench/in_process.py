"""The in-process side `abdoserve bench serving` compares the served one with: (a) ONNX
Runtime on the served `model.onnx` and (c) PyTorch eager, each turning a request number
into one answered study, and their timing (sequential, after a short warm-up).

Both runtimes do exactly what the served models do between gRPC and gRPC:
`StudyPreparer`, the network on every sample of the study (in chunks of
`max_samples_per_run`), then `study_answer` and its JSON. The served side is
`transports.Served`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from abdoserve.export.configs import Tuning
from abdoserve.loadtests.bench.workload import Measurement, Study, time_sequential
from abdoserve.preprocessing.specs import TaskSpec
from abdoserve.preprocessing.study import PreparedStudy, StudyPreparer
from abdoserve.serving import batching
from abdoserve.serving.answer import ModelIdentity, study_answer
from abdoserve.serving.onnx_runner import OnnxRunner

TORCH_THREADS = 2
SEQUENTIAL_WARMUP = 3  # requests before the timed ones
RUNTIMES = ("onnxruntime", "pytorch")  # the in-process side, in this order


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


def in_process_pipeline(
    repository: Path, tuning: Tuning, task: str, pool: Sequence[Study], runtime: str
) -> InProcess:
    """Our preprocessing, `runtime` (onnxruntime on the served `model.onnx` in
    `repository`, or pytorch) and the answer, as one callable."""
    from abdoserve.preprocessing.tasks import get_task

    spec = get_task(task)
    identity = ModelIdentity.from_parameters(task, "1", build_record(repository, task))
    if runtime == "onnxruntime":
        onnx_path = repository / f"{task}_net" / "1" / "model.onnx"
        return OnnxInProcess(spec, pool, identity, tuning, onnx_path)
    return TorchInProcess(spec, pool, identity, tuning)


def build_record(repository: Path, task: str) -> dict[str, str]:
    """The weights' provenance the build wrote, as the served models read it."""
    from abdoserve.export.repository import BUILD_RECORD

    record = json.loads((repository / BUILD_RECORD).read_text())[task]
    return {key: str(value) for key, value in record.items() if isinstance(value, str)}


def time_in_process(pipeline: InProcess, requests: int) -> Measurement:
    """(a) or (c): this process, sequential, after a short warm-up."""
    warmup = min(SEQUENTIAL_WARMUP, requests)
    return time_sequential(pipeline.name, pipeline, pipeline.pool, requests, warmup)
