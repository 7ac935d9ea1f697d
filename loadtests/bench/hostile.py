"""`abdoserve bench hostile`: send each hostile request of `abdoserve.loadtests.hostile`
to a running server and print how it ended, how long the refusal took and how much the
preprocess stubs' peak memory rose (read from /proc: the server must be local); then the
hostile peers of `abdoserve.loadtests.bench.hostile_peers`, each a row of a second table."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator

from abdoserve.deploy import stubs
from abdoserve.export.phantom import build_study
from abdoserve.loadtests.bench import hostile_peers as peers
from abdoserve.loadtests.bench.frozen_server import frozen_server
from abdoserve.loadtests.hostile import HostileRequest, catalogue, send
from abdoserve.loadtests.resources import peak_rss_mib
from abdoserve.preprocessing.tasks import TASKS

EPILOG = """\
The second table, the hostile peers (their defender's peak RSS rise is VmRSS sampled
every 20 ms; hostile peers come from 127.0.0.2, honest callers from 127.0.0.1, so the
targets must listen on this machine's loopback):

  31 slow gRPC streams from one address, against --host (the guard's public gRPC
  port): how many the guard refused at once, how many --task calls were answered
  meanwhile, and when its call deadline (serve --request-timeout-s) ended the held
  streams. The defender is the guard's nginx workers: the children of --guard-pid, by
  default of the nginx process whose parent also started --server-pid (`abdoserve
  serve` starts both).

  With --gateway: an A-ASSOCIATE-RQ header claiming 4 GiB followed by zeros, and eight
  connections trickling a valid A-ASSOCIATE-RQ at one byte a second; an allowed modality
  (--calling-ae) sends a C-ECHO every 2 s meanwhile. The defender is --gateway-pid.
"""

REQUEST_HEADER = (
    "| case | sent | outcome | time | stub peak RSS rise | stubs unchanged |\n"
    "|---|---|---|---|---|---|"
)


def host_port(text: str) -> tuple[str, int]:
    """'HOST:PORT' -> (HOST, PORT)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: use HOST:PORT")
    return host, int(port)


def ae_title(text: str) -> str:
    try:
        peers.ae_title(text)
    except (ValueError, UnicodeEncodeError) as error:
        raise argparse.ArgumentTypeError(f"AE title {text!r}: 1 to 16 ASCII characters") from error
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--host", default="127.0.0.1:8001", help="gRPC HOST:PORT")
    parser.add_argument("--server-pid", type=int, required=True, help="its tritonserver's pid")
    parser.add_argument(
        "--only", choices=("requests", "peers"), help="print only that table (default: both)"
    )
    guard = parser.add_argument_group("hostile peers: the guard")
    guard.add_argument(
        "--guard-pid",
        type=int,
        metavar="PID",
        help="the guard's nginx master (default: found beside --server-pid, see below)",
    )
    guard.add_argument(
        "--task",
        choices=tuple(TASKS),
        default="bone_density_ct",
        help="the honest calls' task (default %(default)s)",
    )
    guard.add_argument(
        "--honest-calls",
        type=int,
        default=5,
        metavar="N",
        help="made while the slow streams are held (default %(default)s)",
    )
    guard.add_argument(
        "--peer-wait-s",
        type=float,
        metavar="S",
        default=150.0,
        help="the longest wait for a slow peer to be ended, the guard's request timeout "
        "(120 s by default) included (default %(default)s)",
    )
    parser.add_argument(
        "--freeze",
        action="store_true",
        help="also SIGSTOP --server-pid: the supervisor must kill and restart it, and a call "
        "on it end at once (restarts the server; run it last)",
    )
    gateway = parser.add_argument_group("hostile peers: the DICOM gateway (with --gateway)")
    gateway.add_argument("--gateway", type=host_port, metavar="HOST:PORT", help="its DICOM port")
    gateway.add_argument(
        "--gateway-pid", type=int, metavar="PID", help="its pid (required with --gateway)"
    )
    gateway.add_argument(
        "--calling-ae",
        type=ae_title,
        default="MODALITY",
        metavar="AE",
        help="an AE title the gateway allows (its --allow-caller; default %(default)s)",
    )
    gateway.add_argument(
        "--called-ae",
        type=ae_title,
        default="ABDOSERVE",
        metavar="AE",
        help="the gateway's own AE title (its --ae-title; default %(default)s)",
    )


def measure(host: str, server_pid: int, request: HostileRequest) -> str:
    """One table row: case, request size, outcome, seconds, peak RSS rise, stubs kept."""
    watched = live_stubs(server_pid, request.task)
    before = stubs.stubs_of(server_pid)
    peaks = {pid: peak_rss_mib(pid) for pid in watched}
    started = time.perf_counter()
    refusal = send(host, request)
    seconds = time.perf_counter() - started
    rise = max(peak_rss_mib(pid) - peaks[pid] for pid in watched)
    kept = set(stubs.stubs_of(server_pid)) == set(before)
    outcome = "answered" if refusal is None else f"{refusal.code}: {_detail(refusal.message)}"
    size = sum(len(item) for item in request.instances) + len(request.clinical)
    return (
        f"| {request.name} | {size / 2**20:.2f} MiB | {outcome} | {seconds:.2f} s "
        f"| {rise:.0f} MiB | {'yes' if kept else 'NO'} |"
    )


def live_stubs(server_pid: int, task: str, timeout_s: float = 30.0) -> list[int]:
    """The live stubs that decode the task's studies (its fused model's, `serve`'s
    default, or its ensemble's preprocess model's), waiting for one while a supervisor
    reloads the model (its memory trim replaces every stub of a model whose shared
    memory grew past its line)."""
    models = (task, f"{task}_preprocess")
    deadline = time.monotonic() + timeout_s
    while True:
        found = [
            pid
            for pid, stub in stubs.stubs_of(server_pid).items()
            if stub.model in models and not stub.dead
        ]
        if found:
            return found
        if time.monotonic() > deadline:
            sys.exit(
                f"bench hostile: no live {task} stub under tritonserver {server_pid} "
                "(is its task served?)"
            )
        time.sleep(0.1)


def _detail(message: str) -> str:
    """The refusal without Triton's "in ensemble '<task>', " prefix."""
    return message.split("', ", 1)[1] if message.startswith("in ensemble '") else message


def guard_case(args: argparse.Namespace) -> peers.GuardCase:
    """The guard case's target; SystemExit when no guard is found."""
    master = args.guard_pid or peers.guard_master(args.server_pid)
    if master is None:
        sys.exit(
            f"bench hostile: no guard (nginx) beside tritonserver {args.server_pid}; "
            "give --guard-pid, or --only requests"
        )
    host, port = host_port(args.host)
    return peers.GuardCase(host, port, master, args.task, args.honest_calls, args.peer_wait_s)


def gateway_case(args: argparse.Namespace) -> peers.GatewayCase | None:
    if args.gateway is None:
        return None
    if args.gateway_pid is None:
        sys.exit("bench hostile: --gateway needs --gateway-pid")
    host, port = args.gateway
    return peers.GatewayCase(
        host, port, args.gateway_pid, args.calling_ae, args.called_ae, args.peer_wait_s
    )


def peer_rows(
    guard: peers.GuardCase, gateway: peers.GatewayCase | None, args: argparse.Namespace
) -> Iterator[str]:
    yield peers.slow_streams(guard).row().markdown()
    if gateway is not None:
        peers.quiet_pynetdicom()
        yield peers.pdu_bomb(gateway).row().markdown()
        yield peers.slow_associators(gateway).row().markdown()
    if args.freeze:  # last: it restarts the server
        study = build_study(args.task, seed=11)
        frozen = frozen_server(args.host, args.server_pid, study, args.task, args.peer_wait_s)
        yield frozen.row().markdown()


def run(args: argparse.Namespace) -> int:
    # the peers' targets are checked before any case runs
    targets = None if args.only == "requests" else (guard_case(args), gateway_case(args))
    if args.only != "peers":
        print(REQUEST_HEADER)
        for request in catalogue():
            print(measure(args.host, args.server_pid, request), flush=True)
        print()
    if targets is not None:
        print(peers.PEER_HEADER, flush=True)
        for row in peer_rows(*targets, args):
            print(row, flush=True)
    return 0
