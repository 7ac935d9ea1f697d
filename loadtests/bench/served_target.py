"""The server `abdoserve bench serving` measures, and what it may observe of it.

Either the bench's own server (built into its repository with the null transport
probe and each task's fused pipeline, started on free ports with a shared-memory region
it created for the `shared_memory` form, and every key known), or a running one given by
`--url`, observed as far as its options allow: its pid (server CPU), its admin key
(statistics), its shared region and shared-memory key (the `shared_memory` form), its
/metrics, and the probe and fused pipelines if its repository holds them. Its tuning is
the one asked for, or for `--url` the one its configs say.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from abdoserve.export.configs import MAX_BATCH_SIZE, Tuning, model_names, to_text
from abdoserve.export.locations import PYTHON_MODELS
from abdoserve.loadtests.bench.transports import FUSED_PREFIX, PROBE
from abdoserve_client.shared_memory import SHM_KEY_METADATA, SharedMemoryRegion

SHM_KEY_VARIABLE = "ABDOSERVE_SHM_KEY"
ADMIN_KEY_VARIABLE = "ABDOSERVE_ADMIN_KEY"


@dataclass(frozen=True)
class Target:
    """The server measured: its gRPC url and tuning; its pid where it is local (server
    CPU); the admin key's metadata where known (statistics for the breakdown); the
    sender's registered region where there is one; whether the probe is served."""

    url: str
    tuning: Tuning
    server_pid: int | None = None
    admin_headers: dict[str, str] | None = None
    region: SharedMemoryRegion | None = None
    probe: bool = False
    fused: frozenset[str] = frozenset()  # tasks whose fused pipeline is served beside
    # Triton's /metrics: the time inside each Python model's execute (None: not read)
    metrics_url: str | None = None


@dataclass(frozen=True)
class Observed:
    """What the options say about a running server (--url)."""

    server_pid: int | None = None
    admin_headers: dict[str, str] | None = None
    region_name: str | None = None
    shm_key: str | None = None
    metrics_url: str | None = None


def observer(args: argparse.Namespace) -> Observed:
    """For --url: the pid, admin headers, shared region and /metrics the options give."""
    from abdoserve.deploy.model_control import ADMIN_HEADER, GRPC_HEADER_PREFIX

    key = _key(args.admin_key_file, ADMIN_KEY_VARIABLE)
    headers = None if not key else {GRPC_HEADER_PREFIX + ADMIN_HEADER: key}
    shm_key = _key(args.shm_key_file, SHM_KEY_VARIABLE)
    return Observed(args.server_pid, headers, args.shared_region, shm_key, args.metrics_url)


def _key(path: Path | None, variable: str) -> str | None:
    """The key in `path`, else in $`variable`; None when empty or absent."""
    if path is not None:
        return path.read_text().strip() or None
    return os.environ.get(variable) or None


def describe(tuning: Tuning) -> str:
    return ", ".join(f"{key}={value}" for key, value in asdict(tuning).items())


def install_probe(repository: Path, instances: int) -> None:
    """Write the null model into `repository` (the bench's own; loaded with the rest),
    unless it is there."""
    folder = repository / PROBE
    if (folder / "config.pbtxt").is_file():
        return
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


def install_fused(repository: Path, tasks: tuple[str, ...]) -> None:
    """Write each task's fused pipeline beside its ensemble, as `fused_<task>`."""
    from abdoserve.export.fused import fuse_task

    for task in tasks:
        if not (repository / (FUSED_PREFIX + task) / "config.pbtxt").is_file():
            fuse_task(repository, task, PYTHON_MODELS, name=FUSED_PREFIX + task)


@contextmanager
def own_server(
    repository: Path,
    tasks: tuple[str, ...],
    tuning: Tuning,
    log_file: Path,
    region_size: tuple[int, int],
) -> Iterator[Target]:
    """Our server with the probe, each task's fused pipeline beside its ensemble and a
    fresh shared region of (slots, slot bytes), stopped (and the region removed) after."""
    from abdoserve.deploy.embedded import EmbeddedServer, ServerOptions, free_ports
    from abdoserve.deploy.isolation import ShmIsolation
    from abdoserve.deploy.model_control import ADMIN_HEADER, GRPC_HEADER_PREFIX

    install_probe(repository, tuning.preprocess_instances)
    install_fused(repository, tasks)
    slots, slot_bytes = region_size
    with ExitStack() as stack:
        name = f"abdoserve-bench-{os.getpid()}"
        region = SharedMemoryRegion.create(name, slot_bytes=slot_bytes, slots=slots)
        stack.callback(region.close)
        shm_key = os.urandom(16).hex()
        options = ServerOptions(
            repository=repository,
            ports=free_ports(),
            log_file=log_file,
            shm=ShmIsolation(shared_region=name),
            shm_key=shm_key,
        )
        server = stack.enter_context(EmbeddedServer(options))
        url = f"{options.host}:{server.ports.grpc}"
        print(f"started tritonserver at {url}: {describe(tuning)}", flush=True)
        assert server.process is not None
        stack.enter_context(registered(url, region, shm_key))
        headers = {GRPC_HEADER_PREFIX + ADMIN_HEADER: options.admin_key}
        yield Target(
            url,
            tuning,
            server.process.pid,
            headers,
            region,
            probe=True,
            fused=frozenset(tasks),
            metrics_url=f"http://{options.host}:{server.ports.metrics}/metrics",
        )


@contextmanager
def running_server(
    url: str, tasks: tuple[str, ...], tuning: Tuning, observed: Observed, slot_bytes: int
) -> Iterator[Target]:
    """A running server, observed as far as the options allow."""
    print(f"benchmarking the server at {url}: {describe(tuning)}", flush=True)
    with ExitStack() as stack:
        region = None
        if observed.region_name is not None and observed.shm_key is not None:
            region = SharedMemoryRegion.open(observed.region_name, slot_bytes=slot_bytes)
            stack.callback(region.close)
            stack.enter_context(registered(url, region, observed.shm_key))
        yield Target(
            url,
            tuning,
            observed.server_pid,
            observed.admin_headers,
            region,
            probe=serves(url, PROBE),
            fused=frozenset(task for task in tasks if serves(url, FUSED_PREFIX + task)),
            metrics_url=observed.metrics_url,
        )


@contextmanager
def registered(url: str, region: SharedMemoryRegion, shm_key: str) -> Iterator[None]:
    import tritonclient.grpc as grpcclient

    headers = {SHM_KEY_METADATA: shm_key}
    with grpcclient.InferenceServerClient(url) as client:
        client.register_system_shared_memory(region.name, region.key, region.size, headers=headers)
        try:
            yield
        finally:
            client.unregister_system_shared_memory(region.name, headers=headers)


def serves(url: str, model: str) -> bool:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with grpcclient.InferenceServerClient(url) as client:
        try:
            return bool(client.is_model_ready(model))
        except InferenceServerException:
            return False


def served_tuning(url: str, task: str) -> Tuning:
    """The tuning a running server's configs of `task` say it was built with."""
    import tritonclient.grpc as grpcclient

    _, preprocess, net, postprocess = model_names(task)
    with grpcclient.InferenceServerClient(url) as client:
        served = client.get_model_config(task).config
        if served.platform != "ensemble":  # fused: one model holds the settings it has
            return fused_tuning_of(served)
        configs = [client.get_model_config(name).config for name in (preprocess, net, postprocess)]
    return tuning_of(*configs)


def fused_tuning_of(fused: Any) -> Tuning:
    """The tuning a fused model's config says: its instances are the preprocess model's
    and its runtime parameters the net's; the ensemble's other knobs keep their defaults."""
    return replace(
        tuning_of(fused, fused, fused),
        net_instances=Tuning().net_instances,
        postprocess_instances=Tuning().postprocess_instances,
    )


def tuning_of(pre: Any, net: Any, post: Any) -> Tuning:
    """The tuning three composing models' configs (preprocess, net, postprocess) say."""
    parameters = {key: value.string_value for key, value in net.parameters.items()}
    default = Tuning()
    return Tuning(
        preprocess_instances=_instances(pre),
        net_instances=_instances(net),
        postprocess_instances=_instances(post),
        net_intra_op_threads=int(parameters.get("intra_op_threads", default.net_intra_op_threads)),
        max_queue_delay_us=int(pre.dynamic_batching.max_queue_delay_microseconds),
        max_samples_per_run=int(parameters.get("max_samples_per_run", default.max_samples_per_run)),
    )


def _instances(config: Any) -> int:
    return sum(int(group.count) for group in config.instance_group) or 1
