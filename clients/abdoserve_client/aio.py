"""`AsyncAbdoServeClient`: the asyncio twin of `AbdoServeClient` (tritonclient.grpc.aio).

Same methods (awaitable), same endpoints, deadline and retry policy, with
`asyncio.sleep` between retries. The channel is opened on first use, inside the
running event loop: a grpc.aio channel made outside it is bound to another loop and
every call then fails with "attached to a different loop" (seen with `asyncio.run`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import tritonclient.grpc.aio as aio_client
from tritonclient.utils import InferenceServerException

from abdoserve_client.endpoints import channel_target, describe
from abdoserve_client.instances import Instance, load_instances
from abdoserve_client.metrics import ClientMetrics, timed
from abdoserve_client.protocol import (
    DEFAULT_URL,
    OUTPUT_NAMES,
    Deadline,
    RetryPolicy,
    expect,
    fibrosis_ct_clinical,
    fibrosis_mri_clinical,
    liver_mass_clinical,
    parse_response,
    request_summary,
    request_tensors,
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
from abdoserve_client.wire import AsyncRawInfer, open_aio_channel, triton_channel_args

log = logging.getLogger("abdoserve_client")
T = TypeVar("T")


class AsyncAbdoServeClient:
    """Use with `async with`, or await `close()`; arguments as for `AbdoServeClient`."""

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
    ) -> None:
        self.url = describe(url)
        self.timeout_s = timeout_s
        self.policy = RetryPolicy(retries, backoff_s)
        self.metrics = metrics
        # Host names in a list are resolved here, once (see endpoints.py).
        self._target = channel_target(url, ssl=ssl, tls_server_name=tls_server_name)
        self._channel_options: dict[str, Any] = {
            "ssl": ssl,
            "root_certificates": root_certificates,
            "private_key": private_key,
            "certificate_chain": certificate_chain,
        }
        self._client: Any = None
        self._raw: Any = None  # inference in wire format (wire.py), opened on first use
        self._tasks: dict[str, TaskInfo] = {}
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep  # replaced in tests
        self._clock: Callable[[], float] = time.monotonic  # replaced in tests

    @property
    def _triton(self) -> Any:
        if self._client is None:
            self._client = aio_client.InferenceServerClient(
                self._target.target,
                channel_args=triton_channel_args(self._target.options),
                **self._channel_options,
            )
        return self._client

    @property
    def _transport(self) -> Any:
        if self._raw is None:
            channel = open_aio_channel(
                self._target.target, options=self._target.options, **self._channel_options
            )
            self._raw = AsyncRawInfer(channel)
        return self._raw

    async def __aenter__(self) -> AsyncAbdoServeClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close both channels; the client cannot be used afterwards."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()
        raw, self._raw = self._raw, None
        if raw is not None:
            await raw.close()

    def _deadline(self) -> Deadline:
        return Deadline(self.timeout_s, self._clock)

    async def _call(
        self,
        what: str,
        action: Callable[[float], Awaitable[T]],
        deadline: Deadline,
        task: str = "",
    ) -> T:
        """Run one RPC under the retry policy, each attempt given the time left before
        `deadline` (`action` takes it, in s); errors become `AbdoServeError`s."""
        target = f"{what} at {self.url}"
        attempt = 0
        while True:
            try:
                return await action(deadline.attempt_timeout(target))
            except InferenceServerException as error:
                delay = self.policy.delay_or_raise(error, attempt, target, deadline)
            if self.metrics is not None:
                self.metrics.retried(task)
            await self._sleep(delay)
            attempt += 1

    async def is_ready(self) -> bool:
        """Whether the server answers and reports ready (one try, no retries); with several
        endpoints, the one round_robin picked: some server is up."""
        try:
            return bool(await self._triton.is_server_ready(client_timeout=self.timeout_s))
        except InferenceServerException as error:
            log.debug("readiness probe of %s failed: %s", self.url, error.status())
            return False

    async def task_info(self, task: str) -> TaskInfo:
        """The task's published description (labels, units, inputs), fetched once."""
        return await self._task_info(task, self._deadline())

    async def _task_info(self, task: str, deadline: Deadline) -> TaskInfo:
        if task not in self._tasks:
            config = await self._call(
                "model config",
                lambda timeout: self._triton.get_model_config(task, client_timeout=timeout),
                deadline,
                task,
            )
            metadata = await self._call(
                "model metadata",
                lambda timeout: self._triton.get_model_metadata(task, client_timeout=timeout),
                deadline,
                task,
            )
            self._tasks[task] = task_info(config, metadata)
        return self._tasks[task]

    async def model_info(self, task: str) -> ModelInfo:
        """The served model's name, version and weights provenance for `task`."""
        return (await self.task_info(task)).model

    async def infer(
        self,
        task: str,
        instances: Sequence[Instance],
        clinical: Mapping[str, Any] | None = None,
    ) -> StudyResult:
        """One study through the task's ensemble; the typed result for its output kind;
        `timeout_s` bounds the whole call, as for `AbdoServeClient.infer`."""
        with timed(self.metrics, task):
            deadline = self._deadline()
            info = await self._task_info(task, deadline)
            data = load_instances(instances)
            tensors = request_tensors(data, clinical, packed=info.accepts_packed)
            log.debug("infer %s", request_summary(task, data, clinical or {}))
            started = time.perf_counter()
            response = await self._call(
                f"infer {task}",
                lambda timeout: self._transport.infer(task, tensors, OUTPUT_NAMES, timeout),
                deadline,
                task,
            )
            log.debug("%s answered in %.1f ms", task, 1e3 * (time.perf_counter() - started))
            return parse_response(info, response)

    async def liver_mass_ct(
        self, instances: Sequence[Instance], *, roi: Sequence[float]
    ) -> LiverMassResult:
        """Category A-E of one liver mass (Radiology 2018;286:887).

        `instances`: the non-contrast, arterial and delayed-phase images of one slice
        through the mass, in any order (the server tells the phases apart). `roi`:
        `[row_min, col_min, row_max, col_max]` of the mass, in pixels.
        """
        result = await self.infer("liver_mass_ct", instances, liver_mass_clinical(roi))
        return expect(result, LiverMassResult)

    async def liver_fibrosis_ct(
        self, instances: Sequence[Instance], *, age: float, sex: str
    ) -> FibrosisResult:
        """F_DLCT fibrosis score and stage F0-F4 (Eur Radiol 2018;28:4578).

        `instances`: 1-16 portal-venous-phase CT images of the liver. `age` in years,
        `sex` "M" or "F".
        """
        result = await self.infer("liver_fibrosis_ct", instances, fibrosis_ct_clinical(age, sex))
        return expect(result, FibrosisResult)

    async def liver_fibrosis_mri(
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
        return expect(await self.infer("liver_fibrosis_mri", instances, clinical), FibrosisResult)

    async def bone_density_ct(self, instances: Sequence[Instance]) -> BoneDensityResult:
        """Lumbar BMD in g/cm² and an osteoporosis flag (Eur Radiol 2020;30:3549).

        `instances`: 1-32 unenhanced abdominal CT slices through the lumbar vertebrae.
        """
        return expect(await self.infer("bone_density_ct", instances), BoneDensityResult)

    async def esophageal_cancer_ct(self, instances: Sequence[Instance]) -> EsophagealCancerResult:
        """Per-image and per-patient probability of oesophageal cancer (BJR 2023).

        `instances`: 1-128 contrast-enhanced chest or abdominal CT images.
        """
        result = await self.infer("esophageal_cancer_ct", instances)
        return expect(result, EsophagealCancerResult)
