"""The peer the fused pipeline is compared with: PyTriton serving the same pipeline as
one Python callable.

Run as its own process by `abdoserve bench serving`, so that its callables do not share
the load generator's interpreter:

    python -m abdoserve.loadtests.bench.pytriton_peer TASK NET_FOLDER GRPC HTTP METRICS

It binds `pytriton_<TASK>` with the inputs the bench sends (DICOM_PACKED, DICOM_OFFSETS,
CLINICAL) and two callables (two model instances, as our models have), each doing what
the fused model does: cut the packed study, `StudyPreparer`, the ONNX Runtime runner on
the same `model.onnx`, `study_answer`. It prints a line when ready and serves until
SIGTERM or SIGINT.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

MODEL_PREFIX = "pytriton_"
READY = "pytriton peer ready"
START_TIMEOUT_S = 180.0
INSTANCES = 2
INTRA_OP_THREADS = 2


def pipeline_callable(task: str, net_folder: Path) -> Callable[[list[Any]], list[dict[str, Any]]]:
    """One instance's callable: each request's study through the whole pipeline."""
    from abdoserve.preprocessing.study import StudyPreparer
    from abdoserve.preprocessing.tasks import get_task
    from abdoserve.serving.answer import ModelIdentity, study_answer
    from abdoserve.serving.cpu_runtimes import DEFAULT_CPU_RUNTIME, cpu_runtime, open_runner
    from abdoserve.serving.dicom_input import split_packed

    spec = get_task(task)
    prepare = StudyPreparer(spec)
    runner = open_runner(
        cpu_runtime(DEFAULT_CPU_RUNTIME),
        net_folder,
        intra_op_threads=INTRA_OP_THREADS,
        max_samples=64,
    )
    identity = ModelIdentity.from_parameters(task, "1", {})

    def answer(request: Any) -> dict[str, Any]:
        instances = split_packed(
            request["DICOM_PACKED"][0], request["DICOM_OFFSETS"][0], spec.limits
        )
        clinical = json.loads(request["CLINICAL"][0][0]) if "CLINICAL" in request else {}
        prepared = prepare(instances, clinical)
        features = [prepared.features] if spec.feature_width else None
        output = runner.run_studies([prepared.samples], features)[0]
        roles = dict(zip(prepared.roles, prepared.role_sources, strict=True))
        study, result = study_answer(spec, output, prepared.sources.tolist(), identity, roles)
        return {
            "SCORES": output[None, ...].astype(np.float32),
            "STUDY": study[None, ...],
            "ANSWER": np.array([[json.dumps(result).encode()]], dtype=np.object_),
        }

    def infer(requests: list[Any]) -> list[dict[str, Any]]:
        return [answer(request) for request in requests]

    return infer


def serve(task: str, net_folder: Path, ports: tuple[int, int, int]) -> None:
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from abdoserve.deploy import processes

    grpc, http, metrics = ports
    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=grpc,
        http_address="127.0.0.1",
        http_port=http,
        metrics_port=metrics,
    )
    inputs = [
        Tensor(name="DICOM_PACKED", dtype=np.uint8, shape=(-1,)),
        Tensor(name="DICOM_OFFSETS", dtype=np.int64, shape=(-1,)),
        Tensor(name="CLINICAL", dtype=np.bytes_, shape=(1,), optional=True),
    ]
    outputs = [
        Tensor(name="SCORES", dtype=np.float32, shape=(-1, -1)),
        Tensor(name="STUDY", dtype=np.float32, shape=(-1,)),
        Tensor(name="ANSWER", dtype=np.bytes_, shape=(1,)),
    ]
    with Triton(config=config) as triton:
        triton.bind(
            model_name=MODEL_PREFIX + task,
            infer_func=[pipeline_callable(task, net_folder) for _ in range(INSTANCES)],
            inputs=inputs,
            outputs=outputs,
            config=ModelConfig(max_batch_size=8, batcher=DynamicBatcher()),
        )
        triton.run()
        print(READY, flush=True)
        while not stopping.wait(timeout=processes.SIGNAL_POLL_S):  # see Signals.wait
            pass


# Set by SIGTERM or SIGINT, from the start: one that arrives while PyTriton starts is
# kept until it is up, then the `with` above stops it. Handlers, not a blocked signal
# mask: the mask is inherited across fork and exec, and PyTriton's own tritonserver then
# ignored the SIGINT PyTriton stops it with, and outlived us (seen after every SIGKILL of
# the bench, when no one swept our group).
stopping = threading.Event()


def main(argv: list[str]) -> int:
    task, net_folder, *ports = argv
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda _number, _frame: stopping.set())
    grpc, http, metrics = (int(port) for port in ports)
    try:
        serve(task, Path(net_folder), (grpc, http, metrics))
    finally:
        # PyTriton's server leaves its Python-backend regions in the host's /dev/shm when
        # it exits "with failure" (seen on every SIGTERM): named after our pid.
        for region in Path("/dev/shm").glob(f"pytrtion{os.getpid()}-*"):
            region.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


class PeerError(RuntimeError):
    """The PyTriton peer did not come up."""


@contextmanager
def running_peer(task: str, net_folder: Path, log_file: Path) -> Iterator[tuple[str, int]]:
    """The peer in its own process: (gRPC url, pid), stopped after. Everything it prints
    goes to `log_file` (a pipe nobody reads would fill and stall its server)."""
    from abdoserve.deploy import processes
    from abdoserve.deploy.embedded import free_ports

    ports = free_ports()
    command = [sys.executable, "-m", __name__, task, str(net_folder)]
    command += [str(port) for port in (ports.grpc, ports.http, ports.metrics)]
    url = f"127.0.0.1:{ports.grpc}"
    with log_file.open("w") as log:
        # Its own group: whatever of PyTriton's tritonserver, stubs and proxies outlives
        # it is killed with the group. SIGTERM if the bench dies: it stops its Triton.
        process = processes.start(
            command, stdout=log, stderr=subprocess.STDOUT, death_signal=signal.SIGTERM
        )
        try:
            wait_ready(process, url, MODEL_PREFIX + task, log_file)
            yield url, process.pid
        finally:
            processes.stop(process, grace_s=60)


def wait_ready(process: subprocess.Popen[bytes], url: str, model: str, log_file: Path) -> None:
    """Until the peer's model is ready; PeerError (with the log's end) if it exits or
    takes longer than `START_TIMEOUT_S`."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    deadline = time.monotonic() + START_TIMEOUT_S
    with grpcclient.InferenceServerClient(url) as client:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if client.is_model_ready(model):
                    return
            except InferenceServerException:
                pass  # not listening yet
            time.sleep(0.5)
    state = "exited" if process.poll() is not None else f"not ready in {START_TIMEOUT_S:g} s"
    tail = log_file.read_text(errors="replace").strip().splitlines()[-5:]
    raise PeerError(f"the PyTriton peer {state}; {log_file} ends:\n" + "\n".join(tail))
