"""The gateway's per-connection bounds: PDU caps from the header, and each PDU's total time."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from abdoserve.deploy.gateway.connections import ConnectionLimits, GuardedSocket, PduReader

LIMITS = ConnectionLimits()


def header(kind: int, length: int) -> bytes:
    return struct.pack(">BBL", kind, 0, length)


def through_first_pdu(reader: PduReader) -> None:
    assert reader.take(header(0x01, 4)) is None
    assert reader.take(bytes(4)) is None


def test_the_first_pdu_is_refused_from_its_header_above_64_kib() -> None:
    assert PduReader(LIMITS, 0.0).take(header(0x01, 0xFFFFFFFF)) == "pdu_too_large"
    assert PduReader(LIMITS, 0.0).take(header(0x01, 64 * 1024 + 1)) == "pdu_too_large"
    assert PduReader(LIMITS, 0.0).take(header(0x01, 64 * 1024)) is None


def test_later_pdus_are_held_to_the_advertised_maximum_plus_a_header() -> None:
    reader = PduReader(LIMITS, 0.0)
    through_first_pdu(reader)
    assert reader.take(header(0x04, 16382 + 6)) is None
    reader = PduReader(LIMITS, 0.0)
    through_first_pdu(reader)
    assert reader.take(header(0x04, 16382 + 7)) == "pdu_too_large"


def test_a_header_with_no_pdu_type_is_refused() -> None:
    assert PduReader(LIMITS, 0.0).take(header(0x47, 10)) == "bad_pdu"


def test_reads_stop_at_the_header_then_at_the_body() -> None:
    reader = PduReader(LIMITS, 0.0)
    assert reader.wanted(4096) == 6
    assert reader.take(header(0x01, 3)[:2]) is None
    assert reader.wanted(4096) == 4  # the rest of the header, never a byte of the body
    assert reader.take(header(0x01, 3)[2:]) is None
    assert reader.wanted(4096) == 3
    assert reader.take(bytes(3)) is None
    assert reader.wanted(4096) == 6  # the next PDU's header


def test_the_first_pdu_is_due_from_the_accept_and_later_ones_from_their_first_byte() -> None:
    reader = PduReader(LIMITS, opened_at=100.0)
    assert reader.due(105.0) == 110.0  # 10 s from the accept, however late it starts
    through_first_pdu(reader)
    assert reader.due(200.0) == 210.0  # 10 s from its first read
    assert reader.take(header(0x04, 16 * 1024)) is None
    assert reader.due(201.0) == 211.0  # plus its length at 16 KiB/s


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, peer = socket.socketpair()
    yield ours, peer
    ours.close()
    peer.close()


def test_a_guarded_socket_refuses_a_slow_pdu_and_the_peer_sees_the_end(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = pair
    reasons: list[str] = []
    limits = ConnectionLimits(association_s=0.2)
    guarded = GuardedSocket(ours, "peer", limits, reasons.append)
    peer.sendall(header(0x01, 10) + bytes(4))  # 4 of the 10 bytes, then nothing
    assert guarded.recv(6) == header(0x01, 10)
    assert guarded.recv(10) == bytes(4)
    assert guarded.recv(6) == b""  # the rest never came within 0.2 s of the accept
    assert reasons == ["too_slow"]
    assert not guarded.is_open
    peer.settimeout(5)
    assert peer.recv(1) == b""  # shut down: the sender sees the end of the stream
    guarded.close()


def test_a_guarded_socket_never_reads_the_body_of_a_pdu_over_its_cap(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = pair
    reasons: list[str] = []
    guarded = GuardedSocket(ours, "peer", LIMITS, reasons.append)
    peer.sendall(header(0x01, 0xFFFFFFFF) + bytes(1000))
    assert guarded.recv(6) == b""
    assert guarded.recv(4096) == b""
    assert reasons == ["pdu_too_large"]
    guarded.close()
