"""`abdoserve bench hostile`: send each hostile request of `abdoserve.loadtests.hostile`
to a running server and print how it ended, how long the refusal took and how much the
preprocess stubs' peak memory rose (read from /proc: the server must be local)."""

from __future__ import annotations

import argparse
import time

from abdoserve.deploy import stubs
from abdoserve.loadtests.hostile import HostileRequest, catalogue, send
from abdoserve.loadtests.resources import peak_rss_mib


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1:8001", help="gRPC HOST:PORT")
    parser.add_argument("--server-pid", type=int, required=True, help="its tritonserver's pid")


def measure(host: str, server_pid: int, request: HostileRequest) -> str:
    """One table row: case, request size, outcome, seconds, peak RSS rise, stubs kept."""
    before = stubs.stubs_of(server_pid)
    model = f"{request.task}_preprocess"
    watched = [pid for pid, stub in before.items() if stub.model == model]
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


def _detail(message: str) -> str:
    """The refusal without Triton's "in ensemble '<task>', " prefix."""
    return message.split("', ", 1)[1] if message.startswith("in ensemble '") else message


def run(args: argparse.Namespace) -> int:
    print("| case | sent | outcome | time | stub peak RSS rise | stubs unchanged |")
    print("|---|---|---|---|---|---|")
    for request in catalogue():
        print(measure(args.host, args.server_pid, request), flush=True)
    return 0
