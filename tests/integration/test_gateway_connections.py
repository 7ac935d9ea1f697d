"""Hostile connections against a real gateway process: a PDU claiming 4 GiB, and tricklers.

Issue 19: a header claiming 4 GiB followed by zeros grew the gateway by ~2 GB
before any check; eight senders trickling an A-ASSOCIATE-RQ held every association
slot, so an allowed modality was rejected 15 times out of 15. The gateway needs no
server for these: nothing here reaches the spool.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from abdoserve.deploy.embedded import free_port
from tests.integration.gateway_process import AE_TITLE, GatewayProcess, wait_until

RULES = Path(__file__).resolve().parents[2] / "deploy" / "gateway" / "rules.example.yaml"
MODALITY = "MODALITY"
ASSOCIATION_S = 10.0  # ConnectionLimits.association_s: accept to A-ASSOCIATE-RQ whole
PER_CALLER = 4  # --max-associations-per-caller's default
MIB = 1024 * 1024


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    nowhere = f"127.0.0.1:{free_port()}"  # no server: no study gets that far
    extra = ["--allow-caller", MODALITY]
    with GatewayProcess(tmp_path / "gateway", RULES, nowhere, [], extra=extra) as process:
        yield process


def rss_mb(gateway: GatewayProcess) -> float:
    assert gateway.process is not None
    for line in Path(f"/proc/{gateway.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/<pid>/status")


def echo(gateway: GatewayProcess, source: str = "127.0.0.1") -> int:
    """A C-ECHO from the allowed modality at `source`: its status, or -1 if not associated."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 20
    association = ae.associate(
        "127.0.0.1", gateway.port, ae_title=AE_TITLE, bind_address=(source, 0)
    )
    if not association.is_established:
        return -1
    try:
        return int(association.send_c_echo().Status)
    finally:
        association.release()


def item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def associate_rq(calling: str = MODALITY) -> bytes:
    """A valid A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) proposing Verification, built by hand."""
    context = item(0x30, b"1.2.840.10008.1.1") + item(0x40, b"1.2.840.10008.1.2")
    body = (
        struct.pack(">HH", 1, 0)
        + AE_TITLE.ljust(16).encode()
        + calling.ljust(16).encode()
        + bytes(32)
        + item(0x10, b"1.2.840.10008.3.1.1.1")
        + item(0x20, bytes([1, 0, 0, 0]) + context)
        + item(0x50, item(0x51, struct.pack(">L", 16384)))
    )
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def connect(gateway: GatewayProcess, source: str) -> socket.socket:
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.bind((source, 0))
    client.settimeout(5)
    client.connect(("127.0.0.1", gateway.port))
    return client


def closed_by_peer(client: socket.socket) -> bool:
    """True once the gateway has closed (FIN or RST); never blocks, consumes nothing."""
    readable, _, _ = select.select([client], [], [], 0)
    if not readable:
        return False
    try:
        return client.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def test_a_pdu_claiming_4_gib_is_refused_before_its_body_is_read(
    gateway: GatewayProcess,
) -> None:
    before = rss_mb(gateway)
    peak = before
    sent = 0
    client = connect(gateway, "127.0.0.1")
    try:
        client.sendall(b"\x01\x00\xff\xff\xff\xff")  # an A-ASSOCIATE-RQ "of 4 GiB"
        zeros = bytes(MIB)
        for _ in range(64):  # 64 MiB at most, each send bounded by the socket's 5 s
            client.sendall(zeros)
            sent += len(zeros)
            peak = max(peak, rss_mb(gateway))
    except OSError:
        pass  # reset, broken pipe, or a full window nobody reads: the gateway stopped reading
    finally:
        wait_until(lambda: closed_by_peer(client), "the gateway to close the connection", 30)
        client.close()
    peak = max(peak, rss_mb(gateway))
    # What went out fits in the loopback socket buffers (a few MiB), never the 64 MiB.
    assert sent < 16 * MIB, f"{sent / MIB:.0f} MiB were taken before the connection closed"
    assert peak - before < 50, f"RSS went from {before:.0f} to {peak:.0f} MB"
    assert gateway.metric("abdoserve_gateway_connections_refused_total", reason="pdu_too_large")
    assert echo(gateway) == 0x0000


def trickle(client: socket.socket, data: bytes, sent: list[int], stop: threading.Event) -> None:
    """One byte a second until the gateway closes the connection or `stop` is set."""
    client.settimeout(5)
    for byte in data:  # bounded by the PDU's length
        if stop.wait(1.0):
            return
        try:
            client.send(bytes([byte]))
        except OSError:
            return
        sent[0] += 1


def test_tricklers_hold_a_share_of_the_slots_and_are_dropped_after_the_total_time(
    gateway: GatewayProcess,
) -> None:
    request = associate_rq()
    # Eight from each of two addresses: four of each are held, the rest closed at once.
    clients = [connect(gateway, source) for source in ("127.0.0.1", "127.0.0.3") for _ in range(8)]
    opened = time.monotonic()
    counts = [[0] for _ in clients]
    stop = threading.Event()
    threads = [
        threading.Thread(target=trickle, args=(c, request, n, stop), daemon=True)
        for c, n in zip(clients, counts, strict=True)
    ]
    for thread in threads:
        thread.start()
    try:
        # While eight trickle into open slots, the modality (another address) is served.
        echoes = [echo(gateway, "127.0.0.2") for _ in range(3)]
        held = sum(not closed_by_peer(c) for c in clients)
        wait_until(
            lambda: all(closed_by_peer(c) for c in clients),
            f"every trickler closed within {ASSOCIATION_S} s of its accept",
            ASSOCIATION_S + 5 - (time.monotonic() - opened),
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        for client in clients:
            client.close()
    assert held == 2 * PER_CALLER, "the echoes did not run while the tricklers held slots"
    assert echoes == [0x0000] * 3
    assert all(n[0] < len(request) for n in counts), "a trickled A-ASSOCIATE-RQ arrived whole"
    refused = "abdoserve_gateway_connections_refused_total"
    assert gateway.metric(refused, reason="caller_limit") == 2 * (8 - PER_CALLER)
    assert gateway.metric(refused, reason="too_slow") == 2 * PER_CALLER
    assert echo(gateway) == 0x0000
