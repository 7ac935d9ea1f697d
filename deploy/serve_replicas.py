"""`abdoserve serve --replicas N`: the launcher's command-line side (the replicas and
their balancer are abdoserve.deploy.replicas)."""

from __future__ import annotations

import argparse
import secrets

from abdoserve.deploy.embedded import Ports, ServerError
from abdoserve.deploy.guard import GuardError
from abdoserve.deploy.isolation import IsolationError
from abdoserve.deploy.replicas import ReplicaSet, ReplicaSetOptions
from abdoserve.deploy.serve import (
    ADMIN_KEY_VARIABLE,
    guard_limits,
    read_key,
    shm_isolation,
    tls_files,
    wait_for_signal,
    warn_if_exposed,
)
from abdoserve.deploy.supervisor import SupervisorOptions


def replica_set_options(args: argparse.Namespace) -> ReplicaSetOptions:
    if args.shared_region is not None:
        raise IsolationError("--shared-region shares one region with one server: not with replicas")
    limits = guard_limits(args)
    if limits is None:
        raise GuardError("replicas are balanced by nginx: it must be installed and --guard not off")
    return ReplicaSetOptions(
        replicas=args.replicas,
        repository=args.repository,
        public_host=args.host,
        public_ports=Ports(grpc=args.grpc_port, http=args.http_port, metrics=args.metrics_port),
        health_port=args.supervisor_port,
        run_dir=args.log_file.parent / "replicas",
        guard=limits,
        tls=tls_files(args),
        admin_key=read_key(args.admin_key_file, ADMIN_KEY_VARIABLE) or secrets.token_urlsafe(32),
        shm=shm_isolation(args),
    )


def run_replicas(args: argparse.Namespace) -> int:
    try:
        options = replica_set_options(args)
    except (GuardError, IsolationError, OSError) as error:
        print(f"error: {error}")
        return 2
    warn_if_exposed(args, SupervisorOptions(tls=options.tls))
    print(f"starting {options.replicas} replicas (each loads every model) ...", flush=True)
    replicas = ReplicaSet(options)
    try:
        replicas.start()
        announce(replicas)
        stop = wait_for_signal()
    except (ServerError, GuardError, OSError) as error:
        print(f"error: {error}")
        return 1
    finally:  # whatever happened: no replica, server or balancer outlives the command
        replicas.stop()
    print(f"replicas stopped ({stop}); {replicas.restarts} restarted while serving")
    return 0


def announce(replicas: ReplicaSet) -> None:
    options = replicas.options
    scheme = "http" if options.tls is None else "https"
    host = options.public_host
    print(f"AbdoServe ready: {options.replicas} replicas behind nginx (round robin)")
    print(f"  gRPC     {host}:{options.public_ports.grpc}")
    print(f"  HTTP     {scheme}://{host}:{options.public_ports.http}/v2/health/ready")
    for replica in replicas.replicas:
        index = replica.spec.index
        print(
            f"  replica {index}: metrics {scheme}://{host}:{options.public_metrics_port(index)}"
            f"/metrics, health {scheme}://{host}:{options.public_health_port(index)}"
            f"/health/ready, log {replica.spec.log_file}"
        )
    print(f"  Prometheus scrape config: {options.run_dir / 'prometheus.yml'}")
    print("Ctrl-C stops them all.", flush=True)
