"""`AbdoServeClient`: the thin, typed, blocking gRPC client for AbdoServe's five tasks.

One long-lived channel per client, balanced over one or several endpoints by gRPC's
round_robin (endpoints.py); every call has a deadline (`timeout_s`) that bounds all its
attempts and backoff waits; only transient failures are retried (protocol.py).
Logs go to the `abdoserve_client` logger at DEBUG and never include DICOM content or
clinical values. For asyncio, see `abdoserve_client.aio.AsyncAbdoServeClient`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from abdoserve_client.endpoints import channel_target, describe
from abdoserve_client.errors import AbdoServeError, from_triton
from abdoserve_client.explanation import OUTPUT_NAMES as EXPLANATION_OUTPUTS
from abdoserve_client.explanation import (
    Explanation,
    explain_model,
    parse_explanation,
    version_tensor,
)
from abdoserve_client.instances import Instance, load_instances
from abdoserve_client.metrics import ClientMetrics, timed
from abdoserve_client.protocol import (
    DEFAULT_URL,
    OUTPUT_NAMES,
    Deadline,
    RetryPolicy,
    clinical_json,
    dicom_tensors,
    expect,
    fibrosis_ct_clinical,
    fibrosis_mri_clinical,
    liver_mass_clinical,
    parse_response,
    request_summary,
    task_info,
)
from abdoserve_client.results import (
    BoneDensityResult,
    EsophagealCancerResult,
    FibrosisResult,
    LiverMassResult,
    ModelInfo,
    StudyResult,
    TaskInfo,
)
from abdoserve_client.shared_memory import (
    SHM_KEY_METADATA,
    RegionSender,
    SharedMemoryRegion,
    forgotten_region,
)
from abdoserve_client.wire import (
    RawInfer,
    WireTensor,
    bytes_tensor,
    open_channel,
    triton_channel_args,
)

log = logging.getLogger("abdoserve_client")
T = TypeVar("T")


class AbdoServeClient:
    """Blocking client; use as a context manager or call `close()`.

    `url`: `"HOST:PORT"`, a gRPC target such as `"dns:///name:8001"`, or several
    endpoints, `"hostA:8001,hostB:8001"` or a sequence of `HOST:PORT` strings, balanced
    by gRPC's round_robin (see `abdoserve_client.endpoints`). `timeout_s`: the deadline
    of each call, retries and backoff waits included. TLS: `ssl=True` with
    `root_certificates` (and, for mutual TLS, `private_key` and `certificate_chain`)
    given as PEM file paths; `tls_server_name`: the name the servers' certificates carry,
    where it is not the endpoint's host. `metrics`: a
    `abdoserve_client.metrics.ClientMetrics` to record each call's latency, retries and errors.
    `shared_memory`: for a sender on the server's host, a `SharedMemoryRegion` the server
    was started to see (`--shared-region`); studies then travel through it, and `shm_key`
    (the server's `--shm-key-file`) registers it. The caller owns and closes the region.
    """

    def __init__(
        self,
        url: str | Sequence[str] = DEFAULT_URL,
        *,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.2,
        ssl: bool = False,
        root_certificates: str | None = None,
        private_key: str | None = None,
        certificate_chain: str | None = None,
        tls_server_name: str | None = None,
        metrics: ClientMetrics | None = None,
        shared_memory: SharedMemoryRegion | None = None,
        shm_key: str | None = None,
    ) -> None:
        self.url = describe(url)
        self.timeout_s = timeout_s
        self.policy = RetryPolicy(retries, backoff_s)
        self.metrics = metrics
        target = channel_target(url, ssl=ssl, tls_server_name=tls_server_name)
        self._triton: Any = grpcclient.InferenceServerClient(
            target.target,
            ssl=ssl,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            channel_args=triton_channel_args(target.options),
        )
        # Inference goes over its own channel, written in wire format (wire.py);
        # tritonclient keeps the metadata calls: readiness, configs.
        self._transport: Any = RawInfer(
            open_channel(
                target.target,
                ssl=ssl,
                root_certificates=root_certificates,
                private_key=private_key,
                certificate_chain=certificate_chain,
                options=target.options,
            )
        )
        self._tasks: dict[str, TaskInfo] = {}
        self._shm_headers: dict[str, str] = {}
        self._sender = (
            None
            if shared_memory is None
            else RegionSender(shared_memory, lambda: self._register(shared_memory, shm_key))
        )
        self._sleep: Callable[[float], None] = time.sleep  # replaced in tests
        self._clock: Callable[[], float] = time.monotonic  # replaced in tests

    def __enter__(self) -> AbdoServeClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close both channels; the client cannot be used afterwards."""
        if self._sender is not None and self._sender.registered:
            self._unregister(self._sender.region)
        self._transport.close()
        self._triton.close()

    def _deadline(self) -> Deadline:
        return Deadline(self.timeout_s, self._clock)

    def _call(
        self, what: str, action: Callable[[float], T], deadline: Deadline, task: str = ""
    ) -> T:
        """Run one RPC under the retry policy, each attempt given the time left before
        `deadline` (`action` takes it, in s); errors become `AbdoServeError`s."""
        target = f"{what} at {self.url}"
        attempt = 0
        while True:
            try:
                return action(deadline.attempt_timeout(target))
            except InferenceServerException as error:
                delay = self.policy.delay_or_raise(error, attempt, target, deadline)
            if self.metrics is not None:
                self.metrics.retried(task)
            self._sleep(delay)
            attempt += 1

    def is_ready(self) -> bool:
        """Whether the server answers and reports ready (one try, no retries); with several
        endpoints, the one round_robin picked: some server is up."""
        try:
            return bool(self._triton.is_server_ready(client_timeout=self.timeout_s))
        except InferenceServerException as error:
            log.debug("readiness probe of %s failed: %s", self.url, error.status())
            return False

    def task_info(self, task: str) -> TaskInfo:
        """The task's published description (labels, units, inputs), fetched once."""
        return self._task_info(task, self._deadline())

    def _task_info(self, task: str, deadline: Deadline) -> TaskInfo:
        if task not in self._tasks:
            config = self._call(
                "model config",
                lambda timeout: self._triton.get_model_config(task, client_timeout=timeout),
                deadline,
                task,
            )
            metadata = self._call(
                "model metadata",
                lambda timeout: self._triton.get_model_metadata(task, client_timeout=timeout),
                deadline,
                task,
            )
            self._tasks[task] = task_info(config, metadata)
        return self._tasks[task]

    def model_info(self, task: str) -> ModelInfo:
        """The served model's name, version and weights provenance for `task`."""
        return self.task_info(task).model

    def infer(
        self,
        task: str,
        instances: Sequence[Instance],
        clinical: Mapping[str, Any] | None = None,
    ) -> StudyResult:
        """One study through the task's ensemble; the typed result for its output kind.

        `timeout_s` bounds the whole call: the task description's fetch (first call only),
        every attempt and every backoff wait."""
        with timed(self.metrics, task):
            deadline = self._deadline()
            info = self._task_info(task, deadline)
            data = load_instances(instances)
            log.debug("infer %s", request_summary(task, data, clinical or {}))
            started = time.perf_counter()
            response = self._send(task, info, data, clinical, deadline)
            log.debug("%s answered in %.1f ms", task, 1e3 * (time.perf_counter() - started))
            return parse_response(info, response)

    def explain(
        self,
        task: str,
        instances: Sequence[Instance],
        result: StudyResult,
        clinical: Mapping[str, Any] | None = None,
    ) -> Explanation:
        """The explanation maps of `result`, the answer this study got: its key images
        with saliency from the version that answered (`result.model.version`), as PNG and
        DICOM Secondary Capture. Costs a second pass over the study on the server (see
        docs/benchmarks.md); the study is sent inline."""
        with timed(self.metrics, task):
            deadline = self._deadline()
            info = self._task_info(task, deadline)
            version = result.model.version
            tensors = [
                *dicom_tensors(load_instances(instances), packed=info.accepts_packed),
                bytes_tensor("CLINICAL", [clinical_json(clinical)]),
                version_tensor(version),
            ]
            model = explain_model(task)
            response = self._call(
                f"explain {task}",
                lambda timeout: self._transport.infer(model, tensors, EXPLANATION_OUTPUTS, timeout),
                deadline,
                task,
            )
            return parse_explanation(task, version, response)

    def _send(
        self,
        task: str,
        info: TaskInfo,
        data: Sequence[bytes],
        clinical: Mapping[str, Any] | None,
        deadline: Deadline,
    ) -> Any:
        """The study through the shared-memory region where there is one (registering it
        again once if the server forgot it, e.g. after a restart), else inline."""
        clinical_tensor = bytes_tensor("CLINICAL", [clinical_json(clinical)])
        if self._sender is None or not info.accepts_packed:
            tensors = [*dicom_tensors(data, packed=info.accepts_packed), clinical_tensor]
            return self._infer(task, tensors, deadline)
        for attempt in range(2):
            with self._sender.study(data) as dicom:
                try:
                    return self._infer(task, [*dicom, clinical_tensor], deadline)
                except AbdoServeError as error:
                    if attempt or not forgotten_region(error, self._sender.region):
                        raise
                    log.warning("the server forgot the shared-memory region; registering again")
                    self._sender.forget()
        raise AssertionError("unreachable")

    def _infer(self, task: str, tensors: Sequence[WireTensor], deadline: Deadline) -> Any:
        return self._call(
            f"infer {task}",
            lambda timeout: self._transport.infer(task, tensors, OUTPUT_NAMES, timeout),
            deadline,
            task,
        )

    def _register(self, region: SharedMemoryRegion, key: str | None) -> None:
        """Register `region` with the server (replacing a stale registration of its name)."""
        headers = {} if key is None else {SHM_KEY_METADATA: key}
        try:
            self._triton.unregister_system_shared_memory(region.name, headers=headers)
            self._triton.register_system_shared_memory(
                region.name, region.key, region.size, headers=headers
            )
        except InferenceServerException as error:
            raise from_triton(error) from error
        self._shm_headers = headers

    def _unregister(self, region: SharedMemoryRegion) -> None:
        try:
            self._triton.unregister_system_shared_memory(region.name, headers=self._shm_headers)
        except InferenceServerException as error:  # closing: the server may be gone
            log.debug("unregistering %s failed: %s", region.name, error.status())

    def liver_mass_ct(
        self, instances: Sequence[Instance], *, roi: Sequence[float]
    ) -> LiverMassResult:
        """Category A-E of one liver mass (Radiology 2018;286:887).

        `instances`: the non-contrast, arterial and delayed-phase images of one slice
        through the mass, in any order (the server tells the phases apart). `roi`:
        `[row_min, col_min, row_max, col_max]` of the mass, in pixels.
        """
        result = self.infer("liver_mass_ct", instances, liver_mass_clinical(roi))
        return expect(result, LiverMassResult)

    def liver_fibrosis_ct(
        self, instances: Sequence[Instance], *, age: float, sex: str
    ) -> FibrosisResult:
        """F_DLCT fibrosis score and stage F0-F4 (Eur Radiol 2018;28:4578).

        `instances`: 1-16 portal-venous-phase CT images of the liver. `age` in years,
        `sex` "M" or "F".
        """
        result = self.infer("liver_fibrosis_ct", instances, fibrosis_ct_clinical(age, sex))
        return expect(result, FibrosisResult)

    def liver_fibrosis_mri(
        self,
        instances: Sequence[Instance],
        *,
        field_strength: float | None = None,
        hbv: str,
        hcv: str,
    ) -> FibrosisResult:
        """F_DLMRI fibrosis score and stage F0-F4 (Radiology 2018;287:146).

        `instances`: gadoxetic-acid hepatobiliary-phase images at 3 levels. `hbv`, `hcv`:
        "positive" or "negative". `field_strength` in tesla; None: the server reads
        (0018,0087) Magnetic Field Strength from the images.
        """
        clinical = fibrosis_mri_clinical(field_strength, hbv, hcv)
        return expect(self.infer("liver_fibrosis_mri", instances, clinical), FibrosisResult)

    def bone_density_ct(self, instances: Sequence[Instance]) -> BoneDensityResult:
        """Lumbar BMD in g/cm² and an osteoporosis flag (Eur Radiol 2020;30:3549).

        `instances`: 1-32 unenhanced abdominal CT slices through the lumbar vertebrae.
        """
        return expect(self.infer("bone_density_ct", instances), BoneDensityResult)

    def esophageal_cancer_ct(self, instances: Sequence[Instance]) -> EsophagealCancerResult:
        """Per-image and per-patient probability of oesophageal cancer (BJR 2023).

        `instances`: 1-128 contrast-enhanced chest or abdominal CT images.
        """
        return expect(self.infer("esophageal_cancer_ct", instances), EsophagealCancerResult)
