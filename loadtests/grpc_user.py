"""The abstract locust user that load-tests AbdoServe over gRPC.

Each user holds one `AbdoServeClient` (the hospital's client, retries off so that
every failure shows). gRPC calls block in C. We do NOT call
`grpc.experimental.gevent.init_gevent()`: with it, locust never exited after
--run-time. Instead each blocking `infer` runs in gevent's pool of real OS
threads (`threadpool.apply`), which yields the greenlet while it waits.
Every call is reported through `events.request`; failures carry the gRPC code.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from typing import Any, ClassVar

import gevent  # type: ignore[import-untyped]
from locust import User, constant, events
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from locust.stats import CSV_STATS_INTERVAL_SEC

from abdoserve.loadtests.connection import (
    DEFAULT_DEADLINE_S,
    DEFAULT_HOST,
    DEFAULT_POOL_SIZE,
    ENVIRONMENT,
    Connection,
    connection,
    options_from_environment,
)
from abdoserve.loadtests.grpc_call import timed_infer
from abdoserve.loadtests.payloads import Payload, payload_pool
from abdoserve_client import AbdoServeClient
from abdoserve_client.errors import AbdoServeError

log = logging.getLogger("abdoserve.loadtests")
MIN_THREADS = 10  # gevent's default pool size


def listen(hook: Any, listener: Callable[..., None]) -> None:
    """`hook.add_listener(listener)`; locust's `EventHook.add_listener` is untyped."""
    hook.add_listener(listener)


def add_options(parser: LocustArgumentParser) -> None:
    group = parser.add_argument_group("AbdoServe gRPC")
    group.add_argument(
        "--deadline-s",
        type=float,
        default=DEFAULT_DEADLINE_S,
        env_var=ENVIRONMENT["deadline_s"],
        help="deadline per inference call in seconds",
    )
    group.add_argument(
        "--grpc-tls", action="store_true", env_var=ENVIRONMENT["grpc_tls"], help="TLS channel"
    )
    group.add_argument(
        "--grpc-root-cert", env_var=ENVIRONMENT["grpc_root_cert"], help="PEM root certificates"
    )
    group.add_argument(
        "--grpc-client-key", env_var=ENVIRONMENT["grpc_client_key"], help="PEM key for mutual TLS"
    )
    group.add_argument(
        "--grpc-client-cert",
        env_var=ENVIRONMENT["grpc_client_cert"],
        help="PEM certificate chain for mutual TLS",
    )
    group.add_argument(
        "--pool-size",
        type=int,
        default=DEFAULT_POOL_SIZE,
        env_var=ENVIRONMENT["pool_size"],
        help="phantom studies per task, built once per process",
    )


def user_connection(environment: Environment, host: str | None) -> Connection:
    """locust's parsed options when locust parsed them, else the environment variables."""
    options = environment.parsed_options
    values = vars(options) if options is not None else options_from_environment(os.environ)
    return connection(host, values)


def prepare_payloads(environment: Environment, **_: Any) -> None:
    """Build every pool the scenario's users need before the first user spawns."""
    size = user_connection(environment, environment.host).pool_size
    for user_class in environment.user_classes:
        for kind in getattr(user_class, "payload_kinds", ()):
            payload_pool(kind, size)


def settle_csv_on_quit(environment: Environment, **_: Any) -> None:
    """Locust writes its CSVs once a second and exits without a last write, so the
    files would miss the final second; one more tick after the users stopped fixes it."""
    options = environment.parsed_options
    if options is None or not getattr(options, "csv_prefix", None):
        return

    def settle(**_: Any) -> None:
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)

    listen(environment.events.quit, settle)


class TritonGrpcUser(User):
    """One gRPC channel per user; subclasses add `@task`s that call `self.send(kind)`."""

    abstract = True
    host = DEFAULT_HOST
    wait_time = constant(0)
    payload_kinds: ClassVar[
        tuple[str, ...]
    ] = ()  # what this user sends (abdoserve.loadtests.payloads)

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self._client: Any = None
        self._pools: dict[str, tuple[Payload, ...]] = {}
        self._rng = random.Random()

    def on_start(self) -> None:
        self.connection = user_connection(self.environment, self.host)
        target = self.connection
        self._pools = {kind: payload_pool(kind, target.pool_size) for kind in self.payload_kinds}
        self._client = AbdoServeClient(
            target.url,
            timeout_s=target.deadline_s,
            retries=0,  # a load test counts failures; it does not hide them
            ssl=target.tls,
            root_certificates=target.root_cert,
            private_key=target.client_key,
            certificate_chain=target.client_cert,
        )
        self._grow_threadpool()
        # Each task's description is fetched once, before the timed calls.
        models = sorted({payload.model for pool in self._pools.values() for payload in pool})
        pool = gevent.get_hub().threadpool
        for model in models:
            try:
                pool.apply(self._client.task_info, (model,))
            except AbdoServeError as error:  # the first call fetches it, and reports why
                log.warning("no description of %s yet: %s", model, error)

    def on_stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def send(self, kind: str) -> None:
        """One request of `kind`, a payload drawn from its pool."""
        self.call(self._rng.choice(self._pools[kind]))

    def call(self, payload: Payload) -> None:
        """Run the blocking call in an OS thread and report it to locust."""
        pool = gevent.get_hub().threadpool
        outcome = pool.apply(timed_infer, (self._client, payload))
        self.environment.events.request.fire(
            request_type="grpc",
            name=payload.name,
            response_time=outcome.response_time_ms,
            response_length=outcome.response_length,
            exception=outcome.error,
            context={"model": payload.model, "request_bytes": payload.size_bytes},
        )

    def _grow_threadpool(self) -> None:
        """One OS thread per running user, so no call waits for a thread (latency would
        then include time queued inside the load generator)."""
        runner = self.environment.runner
        wanted = max(MIN_THREADS, (runner.user_count if runner else 0) + 1)
        pool = gevent.get_hub().threadpool
        if pool.maxsize < wanted:
            pool.maxsize = wanted
            log.debug("gevent threadpool grown to %d threads", wanted)


listen(events.init_command_line_parser, add_options)
listen(events.test_start, prepare_payloads)
listen(events.init, settle_csv_on_quit)
