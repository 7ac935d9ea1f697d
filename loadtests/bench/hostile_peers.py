"""The hostile peers of `abdoserve bench hostile`: senders that hold a connection open
rather than fill a request, against the guard (nginx) and the DICOM gateway.

Each case gives a `PeerRow`: what was sent, how it ended, how long the refusal (or the
end of the slow peer) took, the defending process's peak RSS rise, and how many honest
calls made meanwhile were answered. The rise is VmRSS sampled every 20 ms, highest less
first: VmHWM is the process's lifetime peak and hides any rise below it.

The hostile peers come from 127.0.0.2 and the honest callers from 127.0.0.1, so that a
per-address limit tells them apart: the targets must listen on this machine's loopback
(the memory is read from /proc anyway).
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from abdoserve.deploy.stubs import parent_of
from abdoserve.export.phantom import PhantomStudy, build_study
from abdoserve.loadtests.slow_streams import SlowStreamOptions, SlowStreams, StreamEnd
from abdoserve_client import AbdoServeClient
from abdoserve_client.errors import AbdoServeError

HOSTILE_SOURCE = "127.0.0.2"
HONEST_SOURCE = "127.0.0.1"
SAMPLE_S = 0.02  # how often memory and closed connections are looked at
MIB = 1 << 20
GRPC_DEADLINE_EXCEEDED = 4
GRPC_RESOURCE_EXHAUSTED = 8
# A slow associator closed within this time was refused at its accept, not timed out: one
# past the gateway's listen backlog (socketserver's 5) is accepted only when the kernel
# sends its SYN-ACK again, 1 s later.
AT_ONCE_S = 2.0
PROC = Path("/proc")

PEER_HEADER = (
    "| case | sent | outcome | time | defender's peak RSS rise | honest callers answered |\n"
    "|---|---|---|---|---|---|"
)


@dataclass(frozen=True)
class PeerRow:
    """One row of the peers' table."""

    case: str
    sent: str
    outcome: str
    time: str
    rss_rise_mib: float
    answered: int
    attempted: int
    honest: str  # what the honest callers made, e.g. "bone_density_ct calls"

    def markdown(self) -> str:
        kept = "yes" if self.attempted and self.answered == self.attempted else "NO"
        return (
            f"| {self.case} | {self.sent} | {self.outcome} | {self.time} "
            f"| {self.rss_rise_mib:.1f} MiB | {kept}: {self.answered}/{self.attempted} "
            f"{self.honest} |"
        )


# --- memory, from /proc -----------------------------------------------------------------


def rss_mib(pid: int) -> float | None:
    """VmRSS of `pid` in MiB; None once it is gone (a zombie has no VmRSS)."""
    try:
        text = (PROC / str(pid) / "status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def children_named(pid: int, name: str) -> list[int]:
    """The processes whose parent is `pid` and whose comm is `name`, by pid."""
    found = []
    for entry in PROC.iterdir():
        if entry.name.isdigit() and parent_of(int(entry.name)) == pid:
            try:
                comm = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if comm == name:
                found.append(int(entry.name))
    return sorted(found)


def guard_master(server_pid: int) -> int | None:
    """The guard's nginx master: the nginx child of the process that started tritonserver
    `server_pid` (`abdoserve serve`'s supervisor starts both); None without a guard."""
    serve = parent_of(server_pid)
    masters = children_named(serve, "nginx") if serve is not None else []
    return masters[0] if masters else None


@dataclass
class WorkersRss:
    """The summed VmRSS of an nginx master's workers, which hold the connections; the
    workers are found again when one has gone (a reload or a restart replaces them)."""

    master: int
    workers: list[int] = field(default_factory=list)

    def __call__(self) -> float:
        values = [rss_mib(pid) for pid in self.workers]
        if not self.workers or None in values:
            self.workers = children_named(self.master, "nginx")
            values = [rss_mib(pid) for pid in self.workers]
        return sum(value for value in values if value is not None)


def process_rss(pid: int) -> Callable[[], float]:
    return lambda: rss_mib(pid) or 0.0


class PeakRss:
    """The highest of `read_mib()` every `interval_s` on a thread, less its first value.

    `start` takes the first reading, `sample` one more, `stop` a last one."""

    def __init__(self, read_mib: Callable[[], float], interval_s: float = SAMPLE_S) -> None:
        self._read = read_mib
        self.interval_s = interval_s
        self.before = self.peak = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def rise_mib(self) -> float:
        return self.peak - self.before

    def start(self) -> None:
        self.before = self.peak = self._read()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()

    def sample(self) -> None:
        self.peak = max(self.peak, self._read())

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def __enter__(self) -> PeakRss:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Whether `condition` came true within `timeout_s`, looked at every 20 ms."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(SAMPLE_S)
    return True


# --- the guard: slow gRPC streams from one address ---------------------------------------


@dataclass(frozen=True)
class GuardCase:
    host: str
    port: int  # the guard's public gRPC port
    master_pid: int  # the guard's nginx master
    task: str = "bone_density_ct"  # the honest calls'
    honest_calls: int = 5
    wait_s: float = 150.0  # at most this long for the held streams to be ended
    streams: int = 31


@dataclass(frozen=True)
class StreamsResult:
    """How the slow streams ended, and what the honest calls and the workers did."""

    case: GuardCase
    ends: tuple[StreamEnd, ...]
    still_open: int  # when the bench stopped waiting
    rss_rise_mib: float
    answered: int

    def seconds(self, grpc_status: int) -> list[float]:
        """When each stream that ended with `grpc_status` ended, after its opening."""
        return [end.seconds for end in self.ends if end.grpc_status == grpc_status]

    def row(self) -> PeerRow:
        case = self.case
        outcome, took = streams_outcome(case, self.ends, self.still_open)
        return PeerRow(
            f"{case.streams} slow gRPC streams from one address (guard)",
            f"{case.streams} ModelInfer streams from {HOSTILE_SOURCE} on one HTTP/2 "
            "connection, 1 KiB of a 1 MiB message each, then 1 byte/s",
            outcome,
            took,
            self.rss_rise_mib,
            self.answered,
            case.honest_calls,
            f"{case.task} calls from {HONEST_SOURCE}",
        )


def slow_streams(case: GuardCase) -> StreamsResult:
    """`case.streams` calls from 127.0.0.2 trickling a byte a second; meanwhile the honest
    calls from 127.0.0.1; then the wait for the guard's deadline to end the held ones."""
    options = SlowStreamOptions(case.host, case.port, case.streams, HOSTILE_SOURCE, interval_s=1.0)
    study = build_study(case.task, seed=3)
    with PeakRss(WorkersRss(case.master_pid)) as rss:
        with SlowStreams(options) as streams:
            opened = time.monotonic()
            settle(streams)
            answered = honest_calls(f"{case.host}:{case.port}", study, case.honest_calls)
            left_s = case.wait_s - (time.monotonic() - opened)
            wait_until(lambda: streams.open_streams() == 0, left_s)
        still_open = streams.open_streams()  # closed: its threads no longer change it
    return StreamsResult(case, tuple(streams.ends.values()), still_open, rss.rise_mib, answered)


def settle(streams: SlowStreams, quiet_s: float = 1.0, limit_s: float = 10.0) -> None:
    """Until no stream has ended for `quiet_s` (the guard refuses what it refuses at once),
    `limit_s` at most."""
    deadline = time.monotonic() + limit_s
    seen, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now, ended = time.monotonic(), len(streams.ends)
        if ended != seen:
            seen, since = ended, now
        elif now - since >= quiet_s:
            return
        time.sleep(SAMPLE_S)


def honest_calls(url: str, study: PhantomStudy, count: int) -> int:
    """How many of `count` calls of the study, one after another, were answered."""
    answered = 0
    with AbdoServeClient(url, timeout_s=60, retries=0) as client:
        for _ in range(count):
            try:
                client.infer(study.task, study.instances, study.clinical)
            except AbdoServeError:
                continue
            answered += 1
    return answered


def streams_outcome(case: GuardCase, ends: Sequence[StreamEnd], still_open: int) -> tuple[str, str]:
    """The outcome and time cells: the streams refused at once, and when the held ones
    were ended by the guard's call deadline."""
    refused = [end.seconds for end in ends if end.grpc_status == GRPC_RESOURCE_EXHAUSTED]
    expired = [end.seconds for end in ends if end.grpc_status == GRPC_DEADLINE_EXCEEDED]
    other = len(ends) - len(refused) - len(expired)
    outcome = (
        f"{len(refused)} refused at once (RESOURCE_EXHAUSTED); "
        f"{case.streams - len(refused)} held, {len(expired)} of them ended DEADLINE_EXCEEDED"
    )
    if other:
        outcome += f", {other} ended otherwise (reset or another status)"
    if still_open:
        outcome += f", {still_open} still open after {case.wait_s:.0f} s"
    took = f"refused in {max(refused, default=0.0) * 1000:.1f} ms"
    if expired:
        took += f"; held ones ended at {max(expired):.1f} s"
    return outcome, took


# --- DICOM bytes (PS3.8 section 9.3) ------------------------------------------------------

A_ASSOCIATE_RQ = 0x01  # PDU type
# An A-ASSOCIATE-RQ header claiming 0xFFFFFFFF bytes (4 GiB): type, reserved, length.
PDU_BOMB_HEADER = b"\x01\x00\xff\xff\xff\xff"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # the DICOM application context
VERIFICATION = "1.2.840.10008.1.1"  # C-ECHO's SOP class
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
MAX_PDU_BYTES = 16384  # what we say we can receive


def pdu_item(kind: int, value: bytes) -> bytes:
    """An item of a PDU's variable part: type, a reserved byte, 2-byte length, value."""
    return struct.pack(">BBH", kind, 0, len(value)) + value


def ae_title(title: str) -> bytes:
    """An AE title in its 16-byte field: ASCII, padded with spaces."""
    data = title.encode("ascii")
    if not 0 < len(data.strip()) <= 16:
        raise ValueError(f"AE title {title!r}: 1 to 16 ASCII characters")
    return data.ljust(16)


def associate_rq(called: str, calling: str) -> bytes:
    """A valid A-ASSOCIATE-RQ proposing Verification, so that only its pace is wrong."""
    context = (
        pdu_item(0x30, VERIFICATION.encode())  # abstract syntax
        + pdu_item(0x40, IMPLICIT_VR_LITTLE_ENDIAN.encode())  # one transfer syntax
    )
    body = (
        struct.pack(">HH", 1, 0)  # protocol version 1, reserved
        + ae_title(called)
        + ae_title(calling)
        + bytes(32)  # reserved
        + pdu_item(0x10, APPLICATION_CONTEXT.encode())
        + pdu_item(0x20, bytes([1, 0, 0, 0]) + context)  # presentation context id 1
        + pdu_item(0x50, pdu_item(0x51, struct.pack(">L", MAX_PDU_BYTES)))  # user info
    )
    return struct.pack(">BBL", A_ASSOCIATE_RQ, 0, len(body)) + body


# --- the gateway: a PDU claiming 4 GiB, eight slow associators ----------------------------


@dataclass(frozen=True)
class GatewayCase:
    host: str
    port: int
    pid: int
    calling_ae: str = "MODALITY"  # an allowed modality's, for the honest C-ECHOs
    called_ae: str = "ABDOSERVE"  # the gateway's own (its --ae-title)
    wait_s: float = 150.0  # at most this long for the gateway to close a slow peer


def quiet_pynetdicom() -> None:
    """pynetdicom logs every association at INFO: one echo every 2 s would flood stderr."""
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def echo_status(case: GatewayCase) -> int:
    """A C-ECHO's status from the allowed modality at 127.0.0.1; -1: none came back."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=case.calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 20
    association = ae.associate(
        case.host, case.port, ae_title=case.called_ae, bind_address=(HONEST_SOURCE, 0)
    )
    if not association.is_established:
        return -1
    try:
        return int(getattr(association.send_c_echo(), "Status", -1))
    finally:
        association.release()


class Echoes:
    """The honest caller: a C-ECHO every `period_s` on a thread while in the `with`."""

    def __init__(self, case: GatewayCase, period_s: float = 2.0) -> None:
        self.case = case
        self.period_s = period_s
        self.attempted = self.succeeded = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="echoes", daemon=True)

    def once(self) -> None:
        self.attempted += 1
        if echo_status(self.case) == 0x0000:
            self.succeeded += 1

    def _run(self) -> None:
        next_at = time.monotonic()
        while True:  # one echo at least, however short the case
            self.once()
            next_at += self.period_s
            if self._stop.wait(max(0.0, next_at - time.monotonic())):
                return

    def __enter__(self) -> Echoes:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()


def connect(case: GatewayCase, source: str) -> socket.socket:
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.bind((source, 0))
    client.settimeout(5)
    client.connect((case.host, case.port))
    return client


def closed_by_peer(client: socket.socket) -> bool:
    """True once the peer has closed (FIN or RST); never blocks. What it sent is dropped."""
    readable, _, _ = select.select([client], [], [], 0)
    if not readable:
        return False
    try:
        return client.recv(65536) == b""
    except OSError:
        return True


FLOOD_CHUNK = 64 * 1024


def flood(client: socket.socket, limit: int) -> int:
    """The 4 GiB header, then zeros until `limit` bytes, a failed send or the peer's close:
    the bytes the connection took (some may lie unread in the socket buffers)."""
    client.sendall(PDU_BOMB_HEADER)
    sent = len(PDU_BOMB_HEADER)
    zeros = bytes(FLOOD_CHUNK)
    while sent < limit and not closed_by_peer(client):
        try:
            sent += client.send(zeros[: limit - sent])
        except OSError:  # a reset, a broken pipe, or a 5 s stall: nobody reads
            break
    return sent


@dataclass(frozen=True)
class BombResult:
    """How far the 4 GiB PDU got, and what the honest echoes and the gateway did."""

    case: GatewayCase
    limit: int  # the most the bench would send
    sent: int  # bytes the connection took, the header's included
    closed_s: float | None  # after the header; None: still open when the bench gave up
    rss_rise_mib: float
    echoes: tuple[int, int]  # succeeded, attempted

    def row(self) -> PeerRow:
        if self.closed_s is None:
            outcome, took = f"still open after {self.case.wait_s:.0f} s", "never closed"
        else:
            outcome, took = "closed by the gateway", f"closed in {self.closed_s * 1000:.1f} ms"
        return PeerRow(
            "a DICOM PDU claiming 4 GiB (gateway)",
            f"`01 00 FF FF FF FF` from {HOSTILE_SOURCE}, then zeros up to "
            f"{self.limit / MIB:.0f} MiB",
            f"{outcome}; {self.sent:,} bytes taken (header included)",
            took,
            self.rss_rise_mib,
            *self.echoes,
            f"C-ECHOs from {HONEST_SOURCE}",
        )


def pdu_bomb(case: GatewayCase, limit: int = 1 << 30) -> BombResult:
    """An A-ASSOCIATE-RQ header claiming 4 GiB from 127.0.0.2, then zeros as fast as they
    go; C-ECHOs from the allowed modality during and after."""
    with (
        PeakRss(process_rss(case.pid)) as rss,
        Echoes(case) as echoes,
        connect(case, HOSTILE_SOURCE) as client,
    ):
        started = time.monotonic()
        sent = flood(client, limit)
        closed = wait_until(lambda: closed_by_peer(client), case.wait_s)
        seconds = time.monotonic() - started
    echoes.once()
    return BombResult(
        case,
        limit,
        sent,
        seconds if closed else None,
        rss.rise_mib,
        (echoes.succeeded, echoes.attempted),
    )


@dataclass
class Tricklers:
    """Connections from 127.0.0.2, each sending `data` a byte per `interval_s`; when the
    peer closed each, in seconds after its connect."""

    case: GatewayCase
    data: bytes
    count: int = 8
    interval_s: float = 1.0
    clients: list[socket.socket] = field(default_factory=list)
    opened: list[float] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    closed_s: list[float | None] = field(default_factory=list)

    def open(self) -> None:
        for _ in range(self.count):
            self.clients.append(connect(self.case, HOSTILE_SOURCE))
            self.opened.append(time.monotonic())
            self.sent.append(0)
            self.closed_s.append(None)

    def step(self, now: float) -> None:
        """Note each connection the peer closed; send the next byte where it is due."""
        for index, client in enumerate(self.clients):
            if self.closed_s[index] is not None:
                continue
            if closed_by_peer(client):
                self.closed_s[index] = now - self.opened[index]
            elif self._due(index, now):
                at = self.sent[index]
                try:
                    self.sent[index] += client.send(self.data[at : at + 1])
                except OSError:
                    self.closed_s[index] = now - self.opened[index]

    def _due(self, index: int, now: float) -> bool:
        sent = self.sent[index]
        return sent < len(self.data) and now >= self.opened[index] + sent * self.interval_s

    def run(self, timeout_s: float) -> None:
        """Until the peer has closed every connection, `timeout_s` at most."""
        deadline = time.monotonic() + timeout_s
        while None in self.closed_s and time.monotonic() < deadline:
            self.step(time.monotonic())
            time.sleep(SAMPLE_S)

    def close(self) -> None:
        for client in self.clients:
            client.close()


@dataclass(frozen=True)
class AssociatorsResult:
    """When the gateway closed each slow associator, and what the echoes and it did."""

    case: GatewayCase
    request_bytes: int  # the A-ASSOCIATE-RQ's length
    closed_s: tuple[float | None, ...]  # after each connect; None: still open at the end
    sent: tuple[int, ...]  # bytes of it each had sent
    rss_rise_mib: float
    echoes: tuple[int, int]  # succeeded, attempted

    def row(self) -> PeerRow:
        count = len(self.closed_s)
        whole = sum(sent == self.request_bytes for sent in self.sent)
        outcome, took = associators_outcome(self.closed_s, whole, self.case.wait_s)
        return PeerRow(
            f"{count} slow associators (gateway)",
            f"{count} connections from {HOSTILE_SOURCE}, each a valid {self.request_bytes}-byte "
            "A-ASSOCIATE-RQ at 1 byte/s",
            outcome,
            took,
            self.rss_rise_mib,
            *self.echoes,
            f"C-ECHOs from {HONEST_SOURCE}, one every 2 s",
        )


def slow_associators(case: GatewayCase, count: int = 8) -> AssociatorsResult:
    """`count` connections from 127.0.0.2 trickling a valid A-ASSOCIATE-RQ a byte a second;
    the allowed modality's C-ECHO every 2 s meanwhile."""
    request = associate_rq(case.called_ae, case.calling_ae)
    tricklers = Tricklers(case, request, count)
    with PeakRss(process_rss(case.pid)) as rss, Echoes(case) as echoes:
        try:
            tricklers.open()
            tricklers.run(case.wait_s)
        finally:
            tricklers.close()
    return AssociatorsResult(
        case,
        len(request),
        tuple(tricklers.closed_s),
        tuple(tricklers.sent),
        rss.rise_mib,
        (echoes.succeeded, echoes.attempted),
    )


def associators_outcome(
    closed_s: Sequence[float | None], whole: int, wait_s: float
) -> tuple[str, str]:
    """The outcome and time cells: the connections closed at once, those held and then
    dropped, and whether any A-ASSOCIATE-RQ arrived whole."""
    ended = [seconds for seconds in closed_s if seconds is not None]
    at_once = [seconds for seconds in ended if seconds < AT_ONCE_S]
    dropped = [seconds for seconds in ended if seconds >= AT_ONCE_S]
    outcome = f"{len(at_once)} closed at once, {len(dropped)} held then dropped"
    if len(ended) < len(closed_s):
        outcome += f", {len(closed_s) - len(ended)} still open after {wait_s:.0f} s"
    outcome += f"; {whole or 'no'} A-ASSOCIATE-RQ arrived whole"
    took = f"at once in {max(at_once):.2f} s" if at_once else "none at once"
    if dropped:
        took += f"; held ones dropped at {max(dropped):.1f} s"
    return outcome, took
