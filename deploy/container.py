"""The container's entrypoint: `abdoserve serve`'s supervisor in a pod.

    python -m abdoserve.deploy.container [serve options] [-- extra tritonserver flags]

The pod heals as the host does: the supervisor reloads a model whose stub died or
stopped, restarts a tritonserver that exited, trims the stubs' shared memory, and answers
a truthful `/health/ready` on port 8003 (503 while a model is degraded; Triton's own
readiness stays green then, docs/architecture.md section 5). Where nginx is in the image
the guard bounds message size, requests in flight and stalled senders in the pod, and
terminates TLS; without it Triton serves gRPC TLS itself and the bounds belong to the
cluster's edge. The tritonserver command line is the host's (`embedded.triton_command`).

What differs from the host, from the image's environment:
- MODEL_REPOSITORY (else /models): built by the init container, never here;
- the binary is `tritonserver` on PATH (the NGC image's, or the wheel's linked there),
  its backends ABDOSERVE_BACKEND_DIRECTORY (else the wheel's);
- ABDOSERVE_ADMIN_KEY_FILE (a mounted secret), else ABDOSERVE_ADMIN_KEY, else a random
  key; ABDOSERVE_TLS_CERT / _KEY / _CLIENT_CA for TLS;
- listens on 0.0.0.0; /dev/shm is the container's own (no mount namespace needed);
- a missing TensorRT plan is built first (plans are specific to the GPU).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from abdoserve.deploy import processes
from abdoserve.deploy.embedded import GrpcTls, ServerError, ServerOptions
from abdoserve.deploy.guard import GuardError, nginx_binary
from abdoserve.deploy.isolation import IsolationError
from abdoserve.deploy.serve import (
    ADMIN_KEY_VARIABLE,
    add_arguments,
    announce,
    server_options,
    supervisor_options,
)
from abdoserve.deploy.supervisor import Supervisor

BACKENDS_VARIABLE = "ABDOSERVE_BACKEND_DIRECTORY"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abdoserve-entrypoint", description=__doc__)
    add_arguments(parser)
    parser.add_argument("--tritonserver", type=Path, help="the binary (default: on PATH)")
    parser.add_argument("--backend-directory", type=Path, help=f"default ${BACKENDS_VARIABLE}")
    parser.add_argument("--gpu-metrics", action="store_true", help="Triton's GPU metrics")
    env = os.environ.get
    tls = {name: env(f"ABDOSERVE_TLS_{name.upper()}") for name in ("cert", "key", "client_ca")}
    parser.set_defaults(
        repository=Path(env("MODEL_REPOSITORY", "/models")),
        host="0.0.0.0",
        shm_isolation="host",  # the container's /dev/shm is its own
        log_file=Path(env("ABDOSERVE_LOG_DIR", "/tmp/abdoserve")) / "triton.log",
        admin_key_file=Path(env("ABDOSERVE_ADMIN_KEY_FILE") or "") or None,
        **{f"tls_{name}": Path(value) if value else None for name, value in tls.items()},
    )
    return parser


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our options, and the tritonserver flags after `--` (or unknown to us)."""
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    args, unknown = parser().parse_known_args(argv)
    if args.admin_key_file == Path():
        args.admin_key_file = None
    return args, [*unknown, *extra]


def build_missing_plans(repository: Path) -> None:
    """TensorRT plans are specific to the GPU and TensorRT version: built on first start."""
    for script in sorted(repository.glob("*_net/build_engine.sh")):
        plan = script.parent / "1" / "model.plan"
        if plan.exists() and plan.stat().st_size > 0:
            continue
        print(f"building {plan}", flush=True)
        code = processes.start(["bash", str(script)]).wait()
        if code != 0:
            raise ServerError(f"{script} failed with exit code {code}")


def container_options(args: argparse.Namespace, extra: list[str]) -> ServerOptions:
    binary = args.tritonserver or shutil.which("tritonserver")
    backends = args.backend_directory or os.environ.get(BACKENDS_VARIABLE)
    return replace(
        server_options(args),
        binary=None if binary is None else Path(binary),
        backends=None if backends is None else Path(backends),
        gpu_metrics=args.gpu_metrics,
        extra_args=tuple(extra),
    )


def with_tls_fallback(args: argparse.Namespace, options: ServerOptions) -> ServerOptions:
    """Without nginx, Triton serves gRPC TLS itself (and the bounds are the edge's)."""
    try:
        nginx_binary()
        return options
    except GuardError:
        pass
    print(
        "warning: nginx is not in this image: no guard (message size, in-flight budget, "
        "stalled requests are the cluster edge's to bound)",
        flush=True,
    )
    args.guard = "off"
    if args.tls_cert is None:
        return options
    tls = GrpcTls(args.tls_cert, args.tls_key, args.tls_client_ca)
    args.tls_cert = args.tls_key = args.tls_client_ca = None
    return replace(options, grpc_tls=tls)


def start(args: argparse.Namespace, extra: list[str]) -> Supervisor:
    options = with_tls_fallback(args, container_options(args, extra))
    # The probes' port stays plain and outside the guard (kubelets have no client cert).
    supervision = replace(supervisor_options(args), health_behind_guard=False)
    os.environ.pop(ADMIN_KEY_VARIABLE, None)  # the server and its stubs never see it
    if supervision.tls is None and options.grpc_tls is None:
        print(
            "warning: gRPC without TLS: studies cross the network unencrypted "
            "(set ABDOSERVE_TLS_CERT and ABDOSERVE_TLS_KEY; see docs/security.md)",
            file=sys.stderr,
            flush=True,
        )
    return Supervisor(options, supervision)


def main(argv: list[str]) -> int:
    args, extra = parse(argv)
    # As `abdoserve serve` does (deploy/cli.py): the supervisor's reloads reach the log.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        build_missing_plans(args.repository)
        supervisor = start(args, extra)
    except (ServerError, GuardError, IsolationError, OSError) as error:
        print(f"error: {error}", flush=True)
        return 2
    try:
        supervisor.start()
        announce(supervisor)
        why = processes.wait_for_signal()
    except (ServerError, GuardError, OSError) as error:  # as `serve`: a message, no traceback
        print(f"error: {error}", flush=True)
        return 1
    finally:
        code = supervisor.stop()
    print(f"tritonserver stopped ({why}, exit code {code})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
