"""`abdoserve serve`: build the model repository if needed, start the embedded Triton server
under the supervisor (which reloads a model whose stub died and restarts a server that
exited), print its endpoints, and run until Ctrl-C (or SIGTERM), then shut down cleanly."""

from __future__ import annotations

import argparse
import ipaddress
import os
import stat
from pathlib import Path

from abdoserve.deploy.drift_watch import DriftBounds
from abdoserve.deploy.embedded import PortInUse, Ports, ServerError, ServerOptions
from abdoserve.deploy.guard import GuardError, GuardLimits, TlsFiles, nginx_binary
from abdoserve.deploy.isolation import IsolationError, ShmIsolation, private_shm_available
from abdoserve.deploy.operator_key import forget_operator_key, keep_operator_key
from abdoserve.deploy.processes import wait_for_signal
from abdoserve.deploy.rollback_watch import RollbackBounds
from abdoserve.deploy.supervisor import Supervisor, SupervisorOptions
from abdoserve.deploy.tuning_options import (
    TUNING_OPTIONS,
    add_tuning_arguments,
    replica_tuning,
    repository_tag,
)
from abdoserve.export.configs import Tuning
from abdoserve.export.fused import PIPELINES, Pipeline, default_pipeline
from abdoserve.export.locations import BUILD_DIR, DEFAULT_REPOSITORY
from abdoserve.preprocessing.tasks import TASKS
from abdoserve.serving.cpu_runtimes import CPU_RUNTIMES, DEFAULT_CPU_RUNTIME

ADMIN_KEY_VARIABLE = "ABDOSERVE_ADMIN_KEY"
SHM_KEY_VARIABLE = "ABDOSERVE_SHM_KEY"
ENVELOPE_BYTES = 1024 * 1024  # the request's protobuf head and CLINICAL, beyond the DICOM


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repository",
        type=Path,
        default=DEFAULT_REPOSITORY,
        help=f"served model repository (default {DEFAULT_REPOSITORY})",
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild the repository first")
    parser.add_argument(
        "--cpu-runtime",
        choices=tuple(CPU_RUNTIMES),
        default=DEFAULT_CPU_RUNTIME,
        help="the networks' runtime when the repository is built: onnxruntime (FP32, "
        "default), onnxruntime-int8, openvino, openvino-int8 (see `abdoserve "
        "build-repository --help`; INT8 answers carry their measured deviation); another "
        "than the default gets a folder of its own under build/",
    )
    parser.add_argument(
        "--pipeline",
        choices=PIPELINES,
        default=None,
        help="how each task runs: fused (one Python model per task, default: two "
        "Python-backend hops fewer than the ensemble, measured in docs/benchmarks.md) or "
        "ensemble (preprocess, net and postprocess models); the ensemble gets a folder of "
        "its own under build/. A --repository already built is served in its own shape "
        "unless this is given",
    )
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
    guard.add_argument(
        "--request-timeout-s",
        type=int,
        default=120,
        help="end a call not answered in this time, its body included: the longest "
        "legitimate study (default %(default)s; measured in docs/reliability.md)",
    )
    guard.add_argument(
        "--client-share",
        type=float,
        default=0.5,
        help="the largest share of the in-flight budget one client address may hold "
        "(default %(default)s)",
    )
    guard.add_argument(
        "--trusted-proxy",
        action="append",
        type=proxy_network,
        default=[],
        metavar="CIDR",
        help="a load balancer whose X-Forwarded-For names the client, so that each client "
        "keeps its own share (repeatable)",
    )
    add_security_arguments(parser)
    parser.add_argument(
        "--log-file",
        type=Path,
        default=BUILD_DIR / "triton.log",
        help="server log (default build/triton.log)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="Triton replicas behind nginx balancing gRPC and HTTP (default 1); tuning "
        "options not given are sized so that all replicas fit the cores (docs/scaling.md)",
    )
    add_tuning_arguments(parser.add_argument_group("tuning (see docs/benchmarks.md)"))
    # Unset tuning options are sized for the replica count (replica_tuning).
    parser.set_defaults(**{name: None for _, name, _ in TUNING_OPTIONS})


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    tls = parser.add_argument_group("TLS (served by the guard on every public port)")
    tls.add_argument("--tls-cert", type=Path, help="PEM certificate chain of the server")
    tls.add_argument("--tls-key", type=Path, help="PEM private key of the server")
    tls.add_argument(
        "--tls-client-ca",
        type=Path,
        help="PEM CA: mutual TLS, only clients with a certificate it signed get in",
    )
    add_rollback_arguments(parser)
    add_drift_arguments(parser)
    admin = parser.add_argument_group("admin APIs and shared memory (see docs/security.md)")
    admin.add_argument(
        "--admin-key-file",
        type=Path,
        help="the key of the restricted APIs: model-repository, statistics, trace, logging, "
        f"shared-memory (else ${ADMIN_KEY_VARIABLE}, else a random key per launch)",
    )
    admin.add_argument(
        "--shm-isolation",
        choices=("auto", "private", "host"),
        default="auto",
        help="the server's /dev/shm: private (its own tmpfs, unseen by the host), host "
        "(containers: theirs is private already), auto (default): private where "
        "possible, else host with a warning",
    )
    admin.add_argument(
        "--shm-size",
        type=int,
        help="bytes the private /dev/shm may hold (default: half the RAM, as tmpfs)",
    )
    admin.add_argument(
        "--shared-region",
        metavar="NAME",
        help="opt-in: the one /dev/shm/NAME a co-located sender created, made visible to "
        "the server for Triton's system shared-memory API; needs --shm-key-file or "
        f"${SHM_KEY_VARIABLE} (the shared-memory API's own key, for that sender)",
    )
    admin.add_argument("--shm-key-file", type=Path, help="the shared-memory API's key")


def run(args: argparse.Namespace) -> int:
    prepare_repository(args)
    if args.replicas > 1:
        from abdoserve.deploy.replicas import run_replicas

        return run_replicas(args)
    print("starting tritonserver (all models load before it reports ready) ...", flush=True)
    try:
        # It refuses a port that is taken before anything starts (PortInUse).
        supervisor = Supervisor(server_options(args), supervisor_options(args))
    except (GuardError, IsolationError, PortInUse, OSError) as error:
        print(f"error: {error}")
        return 2
    warn_if_exposed(args, supervisor.supervision)
    kept = None
    try:
        supervisor.start()
        kept = keep_generated_key(args, supervisor.public_ports.grpc, supervisor.admin_key)
        announce(supervisor)
        stop = wait_for_signal()
    except (ServerError, GuardError, OSError) as error:
        print(f"error: {error}")
        return 1
    finally:  # whatever happened: no server, stub or shm region outlives the command
        code = supervisor.stop()
        if kept is not None:
            forget_operator_key(kept, supervisor.admin_key)
    print(f"tritonserver stopped ({stop}, exit code {code})")
    return 0


def keep_generated_key(args: argparse.Namespace, grpc_port: int, key: str) -> Path | None:
    """The admin key serve generated, kept for its operator (abdoserve.deploy.operator_key);
    a key the operator gave is theirs already."""
    if args.admin_key_file is not None or os.environ.get(ADMIN_KEY_VARIABLE):
        return None
    path = keep_operator_key(grpc_port, key)
    print(f"admin key for the model commands on this host: {path} (0600, removed at exit)")
    return path


def prepare_repository(args: argparse.Namespace) -> None:
    """Build the repository for the replicas' tuning and the CPU runtime unless it is
    built; a tuning or runtime other than the defaults gets a folder of its own under
    build/ unless --repository names one (which may hold some of the tasks: those it
    holds are served)."""
    from abdoserve.export.repository import build_repository, built_tasks, is_built

    tuning = replica_tuning(args, args.replicas)
    tasks = tuple(TASKS)
    named = args.repository != DEFAULT_REPOSITORY
    args.pipeline = served_pipeline(args.pipeline, args.repository if named else None)
    if named:
        tasks = built_tasks(args.repository) or tasks
    else:
        args.repository = default_repository(tuning, args.cpu_runtime, args.pipeline)
    built = {"tuning": tuning, "cpu_runtime": args.cpu_runtime, "pipeline": args.pipeline}
    if args.rebuild or not is_built(args.repository, tasks, **built):
        print(f"building the model repository at {args.repository} ...", flush=True)
        build_repository(args.repository, tasks, **built)


def served_pipeline(asked: Pipeline | None, named: Path | None) -> Pipeline:
    """The shape `serve` runs: the one asked for; else, for a repository the user named
    and that is built, its own (serving it must not rebuild it into the other); else
    the CPU runtimes' default, fused."""
    from abdoserve.export.repository import built_pipeline

    if asked is not None:
        return asked
    found = built_pipeline(named) if named is not None else None
    return found or default_pipeline("python")


def prepared_repository(repository: Path, replicas: int) -> Path:
    """For the benches: the repository `serve --replicas N` would serve with every other
    option at its default (built if it is not), and where it is."""
    serving = argparse.Namespace(
        repository=repository,
        replicas=replicas,
        rebuild=False,
        cpu_runtime=DEFAULT_CPU_RUNTIME,
        pipeline=None,
    )
    vars(serving).update({name: None for _, name, _ in TUNING_OPTIONS})
    prepare_repository(serving)
    path: Path = serving.repository
    return path


def default_repository(tuning: Tuning, cpu_runtime: str, pipeline: Pipeline) -> Path:
    """build/model_repository for the defaults, else a folder named after what differs,
    so that builds coexist (`model_repository-pre1-...`, `model_repository-openvino`,
    `model_repository-ensemble`)."""
    parts = [repository_tag(tuning)] if tuning != Tuning() else []
    if cpu_runtime != DEFAULT_CPU_RUNTIME:
        parts.append(cpu_runtime)
    if pipeline != default_pipeline("python"):
        parts.append(pipeline)
    return BUILD_DIR / "-".join(["model_repository", *parts])


def server_options(args: argparse.Namespace) -> ServerOptions:
    options = ServerOptions(
        repository=args.repository,
        host=args.host,
        log_file=args.log_file,
        ports=Ports(grpc=args.grpc_port, http=args.http_port, metrics=args.metrics_port),
        shm=shm_isolation(args),
        shm_key=read_key(args.shm_key_file, SHM_KEY_VARIABLE),
    )
    if options.shm.shared_region is not None and options.shm_key is None:
        raise IsolationError(
            f"--shared-region needs the shared-memory key: --shm-key-file or ${SHM_KEY_VARIABLE}"
        )
    return options


def supervisor_options(args: argparse.Namespace) -> SupervisorOptions:
    return SupervisorOptions(
        health_host=args.host,
        health_port=args.supervisor_port,
        admin_key=read_key(args.admin_key_file, ADMIN_KEY_VARIABLE),
        guard=guard_limits(args),
        tls=tls_files(args),
        rollback=rollback_bounds(args),
        drift=drift_bounds(args),
    )


def add_rollback_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = RollbackBounds()
    group = parser.add_argument_group(
        "canary rollback (see docs/models.md): a canary past a bound goes to 0 %"
    )
    group.add_argument(
        "--rollback-window-s",
        type=float,
        default=defaults.window_s,
        help="the trailing window the bounds are measured over (default %(default)s)",
    )
    group.add_argument(
        "--rollback-min-studies",
        type=int,
        default=defaults.min_studies,
        help="canary studies in the window before it is judged (default %(default)s)",
    )
    group.add_argument(
        "--rollback-max-error-ratio",
        type=float,
        default=defaults.max_error_ratio,
        help="the candidate's failed calls over its calls (default %(default)s)",
    )
    group.add_argument(
        "--rollback-max-disagreement",
        type=float,
        default=defaults.max_disagreement,
        help="its class, stage or flag differing from production's (default %(default)s)",
    )
    group.add_argument(
        "--rollback-max-latency-ratio",
        type=float,
        default=defaults.max_latency_ratio,
        help="its p95 network call time over production's (default %(default)s)",
    )


def rollback_bounds(args: argparse.Namespace) -> RollbackBounds:
    return RollbackBounds(
        window_s=args.rollback_window_s,
        min_studies=args.rollback_min_studies,
        max_error_ratio=args.rollback_max_error_ratio,
        max_latency_ratio=args.rollback_max_latency_ratio,
        max_disagreement=args.rollback_max_disagreement,
    )


def add_drift_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DriftBounds()
    group = parser.add_argument_group(
        "drift (see docs/models.md): each validated version's recent studies against its "
        "acceptance cohort"
    )
    group.add_argument(
        "--drift-window-s",
        type=float,
        default=defaults.window_s,
        help="the trailing window compared (default %(default)s)",
    )
    group.add_argument(
        "--drift-min-studies",
        type=int,
        default=defaults.min_studies,
        help="studies a version answers in the window before it is compared (default %(default)s)",
    )
    group.add_argument(
        "--drift-every-s",
        type=float,
        default=defaults.every_s,
        help="how often the comparison is made (default %(default)s)",
    )


def drift_bounds(args: argparse.Namespace) -> DriftBounds:
    return DriftBounds(
        window_s=args.drift_window_s,
        min_studies=args.drift_min_studies,
        every_s=args.drift_every_s,
    )


def tls_files(args: argparse.Namespace) -> TlsFiles | None:
    return TlsFiles.from_options(args.tls_cert, args.tls_key, args.tls_client_ca)


def shm_isolation(args: argparse.Namespace) -> ShmIsolation:
    """private / host as asked; auto: private where this host allows a mount namespace."""
    private = args.shm_isolation == "private"
    if private and not private_shm_available():
        raise IsolationError(
            "this host allows no mount namespace for a private /dev/shm (run as root, enable "
            "user namespaces, or use --shm-isolation host inside a container)"
        )
    if args.shm_isolation == "auto":
        private = private_shm_available()
        if not private:
            print(
                "warning: no private /dev/shm here (no mount namespace allowed): other users "
                "of this host can read the requests' shared memory unless this is a "
                "container with a /dev/shm of its own"
            )
    return ShmIsolation(private=private, size_bytes=args.shm_size, shared_region=args.shared_region)


def warn_if_exposed(args: argparse.Namespace, supervision: SupervisorOptions) -> None:
    """Beyond loopback, without TLS, studies and answers cross the network in clear."""
    if supervision.tls is not None or is_loopback(args.host):
        return
    print(
        f"warning: listening on {args.host} without TLS: studies and answers cross the "
        "network unencrypted (use --tls-cert/--tls-key; see docs/security.md)"
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
        request_timeout_s=args.request_timeout_s,
        client_share=args.client_share,
        trusted_proxies=tuple(args.trusted_proxy),
    )


def proxy_network(text: str) -> str:
    """A CIDR (or one address) for nginx's set_real_ip_from, checked here, not by nginx."""
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not an address or network: {text!r}") from error


def read_key(path: Path | None, variable: str) -> str | None:
    """From the file, else the environment variable; None where neither is given."""
    if path is None:
        return os.environ.get(variable) or None
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"warning: {path} is readable by other users of this host (chmod 600 it)")
    key = path.read_text().strip()
    if not key:
        raise OSError(f"{path} is empty")
    return key


def announce(supervisor: Supervisor) -> None:
    server, control = supervisor.server, supervisor.control
    assert server is not None and control is not None
    host, ports = supervisor.public_host, supervisor.public_ports
    names = sorted(
        name
        for name in control.model_names()
        if "_" not in name or not name.endswith(("_preprocess", "_net", "_postprocess", "_explain"))
    )
    tls = supervisor.supervision.tls
    scheme = "http" if tls is None else "https"
    client_flags = "" if tls is None else " --tls --root-cert CA.pem"
    if tls is not None and tls.client_ca is not None:
        client_flags += " --client-cert CERT.pem --client-key KEY.pem"
    print(f"AbdoServe ready: {len(names)} tasks: {', '.join(names)}")
    print(
        f"  gRPC     {host}:{ports.grpc}   "
        f"(abdoserve infer TASK FILES --url {host}:{ports.grpc}{client_flags})"
    )
    print(f"  HTTP     {scheme}://{host}:{ports.http}/v2/health/ready")
    print(f"  metrics  {scheme}://{host}:{ports.metrics}/metrics")
    if supervisor.supervision.health_port is not None:
        health = f"{scheme}://{host}:{supervisor.supervision.health_port}"
        print(f"  health   {health}/health/ready   (supervisor: {health}/metrics)")
    limits = supervisor.supervision.guard
    if limits is not None:
        print(
            f"  guard    nginx: bodies over {limits.max_body_bytes >> 20} MiB, more than "
            f"{limits.max_inflight} requests ({limits.max_inflight_bytes >> 30} GiB) in flight "
            f"({limits.max_inflight_per_client} per client address), stalls of "
            f"{limits.body_timeout_s} s and calls past {limits.request_timeout_s} s refused"
        )
    print(f"  log      {server.options.log_file}")
    print("Ctrl-C stops the server.", flush=True)
