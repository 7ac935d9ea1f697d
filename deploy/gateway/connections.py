"""Bounds on one DICOM connection, applied beneath pynetdicom as its bytes are read.

pynetdicom 3.0 reads a PDU as `recv(6)` for the header, then `recv(length)` for
the body, appending to one bytearray until the claimed length has arrived. It
checks nothing first: a header claiming 4 GiB followed by 1 GiB of zeros took the
gateway from 312 to 2,284 MB. Its accepted sockets are blocking with no timeout,
and its network, ACSE and DIMSE timeouts apply between reads: a sender trickling
one byte every 5 s held an association slot indefinitely.

`GuardedSocket` is the accepted socket itself (a `socket.socket`, so select and
pynetdicom see nothing different). It follows PDU boundaries in the byte stream,
refuses a PDU whose header claims more than its cap before reading its body, and
gives each PDU a total time. `GuardedServer` hands out these sockets and caps the
connections one address may hold.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger("abdoserve.gateway")

HEADER_BYTES = 6  # PDU type, reserved, 4-byte big-endian length (PS3.8 9.3)
PDU_TYPES = range(0x01, 0x08)  # A-ASSOCIATE-RQ ... A-ABORT


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may send, and how slowly."""

    # An A-ASSOCIATE-RQ is a few KB (contexts, user items): 64 KiB is ample.
    first_pdu_bytes: int = 64 * 1024
    # Every later PDU: the maximum PDU length we advertise, plus its header for the
    # senders that count it.
    later_pdu_bytes: int = 16382 + HEADER_BYTES
    # From the connection's accept to its A-ASSOCIATE-RQ received whole.
    association_s: float = 10.0
    # A later PDU, from its first byte: this much, plus its length at the minimum rate.
    pdu_s: float = 10.0
    min_bytes_per_s: float = 16 * 1024
    # Between PDUs, and for each send (a peer that reads nothing): pynetdicom's network timeout.
    idle_s: float = 60.0
    # Open connections one address may hold (the association slots are shared by all).
    per_caller: int = 4


class PduReader:
    """Where a connection's byte stream stands in PDUs; pure, no socket.

    `wanted` clamps each read to the rest of the current header or body, so a
    header is always complete, and checked, before any byte of its body is read.
    """

    def __init__(self, limits: ConnectionLimits, opened_at: float) -> None:
        self.limits = limits
        self.opened_at = opened_at
        self.first = True  # the A-ASSOCIATE-RQ: a smaller cap, a deadline from the accept
        self.header = bytearray()
        self.body_left = 0
        self.deadline: float | None = None  # None: between PDUs (idle, pynetdicom's timer)

    def wanted(self, bufsize: int) -> int:
        if self.body_left:
            return min(bufsize, self.body_left)
        return min(bufsize, HEADER_BYTES - len(self.header))

    def due(self, now: float) -> float:
        """When the PDU being read must be whole; starts its clock at its first read."""
        if self.deadline is None:
            if self.first:
                self.deadline = self.opened_at + self.limits.association_s
            else:
                self.deadline = now + self.limits.pdu_s
        return self.deadline

    def take(self, data: bytes) -> str | None:
        """Account for bytes read; a reason to drop the connection, or None."""
        if self.body_left:
            self.body_left -= len(data)
            if not self.body_left:
                self._done()
            return None
        self.header += data
        if len(self.header) < HEADER_BYTES:
            return None
        kind, _, length = struct.unpack(">BBL", self.header)
        if kind not in PDU_TYPES:
            return "bad_pdu"
        cap = self.limits.first_pdu_bytes if self.first else self.limits.later_pdu_bytes
        if length > cap:
            return "pdu_too_large"
        if not self.first and self.deadline is not None:
            self.deadline += length / self.limits.min_bytes_per_s
        self.body_left = length
        if not length:
            self._done()
        return None

    def _done(self) -> None:
        self.header.clear()
        self.first = False
        self.deadline = None


class GuardedSocket(socket.socket):
    """An accepted connection whose reads are checked against `ConnectionLimits`."""

    def __init__(
        self,
        accepted: socket.socket,
        host: str,
        limits: ConnectionLimits,
        on_refused: Callable[[str], None],
    ) -> None:
        family, kind, proto = accepted.family, accepted.type, accepted.proto
        super().__init__(family, kind, proto, fileno=accepted.detach())
        self.host = host
        self.reader = PduReader(limits, time.monotonic())
        self.refused: str | None = None
        self._on_refused = on_refused
        self.settimeout(limits.idle_s)

    @property
    def is_open(self) -> bool:
        return self.refused is None and self.fileno() != -1

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self.refused is not None:
            return b""  # pynetdicom reads "connection closed" and tidies up
        now = time.monotonic()
        left = self.reader.due(now) - now
        if left <= 0:
            return self._refuse("too_slow")
        self.settimeout(left)
        try:
            data = super().recv(self.reader.wanted(bufsize), flags)
        except TimeoutError:
            return self._refuse("too_slow")
        self.settimeout(self.reader.limits.idle_s)
        reason = self.reader.take(data) if data else None
        return self._refuse(reason) if reason else data

    def _refuse(self, reason: str) -> bytes:
        """Stop reading: the peer sees the connection close now, and nothing more is kept.

        Shut down, not closed: pynetdicom still holds the descriptor and closes it
        itself once it has read the end of the stream.
        """
        self.refused = reason
        log.warning("connection from %s dropped: %s", self.host, reason)
        self._on_refused(reason)
        with contextlib.suppress(OSError):  # the peer has gone already
            self.shutdown(socket.SHUT_RDWR)
        return b""


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with guarded sockets and a cap per address."""

    # socketserver's backlog is 5: a burst of connections past it waited for the
    # kernel's 1 s SYN-ACK resend before being accepted, or refused (bench hostile).
    request_queue_size = 128

    def __init__(
        self,
        *args: Any,
        limits: ConnectionLimits,
        on_refused: Callable[[str], None],
        **kwargs: Any,
    ) -> None:
        self.limits = limits
        self.on_refused = on_refused
        self._open: list[GuardedSocket] = []  # touched only by the accepting thread
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        accepted, address = super().get_request()
        guarded = GuardedSocket(accepted, str(address[0]), self.limits, self.on_refused)
        return guarded, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """One address holds at most `per_caller` open connections; the rest are closed."""
        self._open = [s for s in self._open if s.is_open]
        host = str(client_address[0])
        if sum(1 for s in self._open if s.host == host) >= self.limits.per_caller:
            log.warning(
                "connection from %s refused: it holds %d already", host, self.limits.per_caller
            )
            self.on_refused("caller_limit")
            return False  # socketserver shuts the connection down
        if isinstance(request, GuardedSocket):
            self._open.append(request)
        return True

    def shutdown(self) -> None:
        """Stop accepting and close the port (never registered in the AE's list of servers)."""
        # AssociationServer.shutdown also removes the server from the AE's private list,
        # which only AE.start_server fills.
        socketserver.BaseServer.shutdown(self)
        self.server_close()
