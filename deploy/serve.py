"""`abdoserve serve`: build the model repository if needed, start the embedded Triton server
under the supervisor (which reloads a model whose stub died and restarts a server that
exited), print its endpoints, and run until Ctrl-C (or SIGTERM), then shut down cleanly."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path
from types import FrameType

from abdoserve.deploy.embedded import BUILD_DIR, Ports, ServerError, ServerOptions
from abdoserve.deploy.guard import GuardError, nginx_binary
from abdoserve.deploy.supervisor import GuardLimits, Supervisor, SupervisorOptions
from abdoserve.deploy.tuning_options import add_tuning_arguments, tuning_from
from abdoserve.preprocessing.tasks import TASKS

ADMIN_KEY_VARIABLE = "ABDOSERVE_ADMIN_KEY"
ENVELOPE_BYTES = 1024 * 1024  # the request's protobuf head and CLINICAL, beyond the DICOM

DEFAULT_REPOSITORY = BUILD_DIR / "model_repository"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repository",
        type=Path,
        default=DEFAULT_REPOSITORY,
        help=f"served model repository (default {DEFAULT_REPOSITORY})",
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild the repository first")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument(
        "--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)"
    )
    parser.add_argument(
        "--supervisor-port",
        type=int,
        default=8003,
        help="the supervisor's /health/ready, /health/live and /metrics (default 8003)",
    )
    guard = parser.add_argument_group("guard (nginx in front of Triton; see docs/reliability.md)")
    guard.add_argument(
        "--guard",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto (default): on where nginx is installed, else off with a warning",
    )
    guard.add_argument(
        "--max-inflight-bytes",
        type=int,
        default=8 * 1024**3,
        help="bytes of requests in flight, counted at the largest request size "
        "(default %(default)s: 31 requests of 257 MiB)",
    )
    guard.add_argument(
        "--body-timeout-s",
        type=int,
        default=30,
        help="drop a request whose headers or body stall this long (default %(default)s)",
    )
    parser.add_argument(
        "--admin-key-file",
        type=Path,
        help=f"the admin key for the restricted model-repository API (else ${ADMIN_KEY_VARIABLE}, "
        "else a random key per launch)",
    )
    parser.add_argument(
        "--log-file",
        type=Path,
        default=BUILD_DIR / "triton.log",
        help="server log (default build/triton.log)",
    )
    add_tuning_arguments(parser.add_argument_group("tuning (see docs/benchmarks.md)"))


def run(args: argparse.Namespace) -> int:
    from abdoserve.export.repository import build_repository, is_built

    tuning = tuning_from(args)
    if args.rebuild or not is_built(args.repository, tuning=tuning):
        print(f"building the model repository at {args.repository} ...", flush=True)
        build_repository(args.repository, tuning=tuning)
    options = ServerOptions(
        repository=args.repository,
        host=args.host,
        log_file=args.log_file,
        ports=Ports(grpc=args.grpc_port, http=args.http_port, metrics=args.metrics_port),
    )
    supervision = SupervisorOptions(
        health_host=args.host,
        health_port=args.supervisor_port,
        admin_key=admin_key(args),
        guard=guard_limits(args),
    )
    supervisor = Supervisor(options, supervision)
    print("starting tritonserver (all models load before it reports ready) ...", flush=True)
    try:
        supervisor.start()
        announce(supervisor)
        stop = wait_for_signal()
    except (ServerError, OSError) as error:
        print(f"error: {error}")
        return 1
    finally:  # whatever happened: no server, stub or shm region outlives the command
        code = supervisor.stop()
    print(f"tritonserver stopped ({stop}, exit code {code})")
    return 0


def guard_limits(args: argparse.Namespace) -> GuardLimits | None:
    """The guard's limits, or None where it is off (or auto and nginx is missing)."""
    if args.guard == "off":
        return None
    try:
        nginx_binary()
    except GuardError:
        if args.guard == "on":
            raise
        print(
            "warning: nginx is not installed: no guard in front of Triton (message size, "
            "in-flight budget and stalled requests unbounded); `make install` installs it"
        )
        return None
    largest = max(spec.limits.max_bytes_per_request for spec in TASKS.values())
    return GuardLimits(
        max_body_bytes=largest + ENVELOPE_BYTES,
        max_inflight_bytes=args.max_inflight_bytes,
        body_timeout_s=args.body_timeout_s,
    )


def admin_key(args: argparse.Namespace) -> str | None:
    """From --admin-key-file, else the environment; None: the supervisor makes one."""
    if args.admin_key_file is not None:
        return str(args.admin_key_file.read_text().strip())
    return os.environ.get(ADMIN_KEY_VARIABLE) or None


def announce(supervisor: Supervisor) -> None:
    server, control = supervisor.server, supervisor.control
    assert server is not None and control is not None
    host, ports = supervisor.public_host, supervisor.public_ports
    names = sorted(
        name
        for name in control.model_names()
        if "_" not in name or not name.endswith(("_preprocess", "_net", "_postprocess"))
    )
    print(f"AbdoServe ready: {len(names)} tasks: {', '.join(names)}")
    print(
        f"  gRPC     {host}:{ports.grpc}   (abdoserve infer TASK FILES --url {host}:{ports.grpc})"
    )
    print(f"  HTTP     http://{host}:{ports.http}/v2/health/ready")
    print(f"  metrics  http://{host}:{ports.metrics}/metrics")
    if supervisor.supervision.health_port is not None:
        health = f"http://{host}:{supervisor.supervision.health_port}"
        print(f"  health   {health}/health/ready   (supervisor: {health}/metrics)")
    limits = supervisor.supervision.guard
    if limits is not None:
        print(
            f"  guard    nginx: bodies over {limits.max_body_bytes >> 20} MiB, more than "
            f"{limits.max_inflight} requests ({limits.max_inflight_bytes >> 30} GiB) in flight, "
            f"stalls of {limits.body_timeout_s} s refused"
        )
    print(f"  log      {server.options.log_file}")
    print("Ctrl-C stops the server.", flush=True)


def wait_for_signal() -> str:
    """Block until SIGINT or SIGTERM arrives; say which. The supervisor keeps the
    server running meanwhile (it restarts one that exits)."""
    stopped = threading.Event()
    reason = {"why": ""}

    def handle(number: int, _frame: FrameType | None) -> None:
        reason["why"] = signal.Signals(number).name
        stopped.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    stopped.wait()
    return reason["why"]
