"""gRPC calls whose bodies arrive a byte at a time: the slow sender, as a real HTTP/2 peer.

Each call sends its HEADERS and the first bytes of a ModelInfer message that claims to be
larger, then one more byte per stream every `interval_s`, from one client address. A
server (or the guard in front of it) that counts a call from its headers on holds a slot
for as long as the trickle lasts; `SlowStreams` records when the peer ended each stream,
so that a test or `bench hostile` can tell how long the slots were held.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

import h2.config
import h2.connection
import h2.events
import h2.exceptions

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass
class StreamEnd:
    """How the peer ended one stream: a reset, or an answer's gRPC status."""

    seconds: float  # after the stream was opened
    grpc_status: int | None  # None: reset (RST_STREAM) or the connection closed


@dataclass(frozen=True)
class SlowStreamOptions:
    host: str
    port: int
    count: int = 31
    source: str = "127.0.0.1"  # the client address the streams come from
    first_bytes: int = 1024
    claimed_bytes: int = 1 << 20  # what the gRPC message prefix promises
    interval_s: float = 20.0
    path: str = MODEL_INFER


@dataclass
class SlowStreams:
    """`count` slow calls on one connection, trickled by a thread; a context manager."""

    options: SlowStreamOptions
    ends: dict[int, StreamEnd] = field(default_factory=dict)
    _opened: dict[int, float] = field(default_factory=dict)
    _sock: socket.socket | None = None
    _conn: h2.connection.H2Connection | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> SlowStreams:
        self.open()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> None:
        options = self.options
        self._sock = socket.create_connection(
            (options.host, options.port), timeout=10, source_address=(options.source, 0)
        )
        self._sock.settimeout(0.5)
        self._conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        with self._lock:
            self._conn.initiate_connection()
            for _ in range(options.count):
                self._open_stream()
            self._flush()
        self._threads = [
            threading.Thread(target=self._read, name="slow-streams-read", daemon=True),
            threading.Thread(target=self._trickle, name="slow-streams-trickle", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _open_stream(self) -> None:
        assert self._conn is not None
        options = self.options
        stream = self._conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", options.path),
            (":authority", f"{options.host}:{options.port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        self._conn.send_headers(stream, headers)
        prefix = struct.pack(">BI", 0, options.claimed_bytes)
        self._conn.send_data(stream, prefix + b"\0" * max(0, options.first_bytes - len(prefix)))
        self._opened[stream] = time.monotonic()

    def _flush(self) -> None:
        assert self._sock is not None and self._conn is not None
        data = self._conn.data_to_send()
        if data:
            self._sock.sendall(data)

    def open_streams(self) -> int:
        with self._lock:
            return len(self._opened) - len(self.ends)

    def _trickle(self) -> None:
        while not self._stop.wait(self.options.interval_s):
            with self._lock:
                assert self._conn is not None
                for stream in self._opened:
                    if stream not in self.ends:
                        self._conn.send_data(stream, b"\0")
                try:
                    self._flush()
                except OSError:
                    return

    def _read(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            with self._lock:
                if not data:
                    self._end_all()
                    return
                self._handle(data)

    def _handle(self, data: bytes) -> None:
        assert self._conn is not None
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._end_all()
            return
        for event in events:
            if isinstance(event, h2.events.StreamReset):
                self._end(event.stream_id, None)
            elif isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                status = dict(event.headers or []).get(b"grpc-status")
                if status is not None:
                    self._end(event.stream_id, int(status))
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._end_all()
        try:
            self._flush()
        except OSError:
            self._end_all()

    def _end(self, stream: int, grpc_status: int | None) -> None:
        if stream in self._opened and stream not in self.ends:
            self.ends[stream] = StreamEnd(time.monotonic() - self._opened[stream], grpc_status)

    def _end_all(self) -> None:
        for stream in self._opened:
            self._end(stream, None)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2)
        if self._sock is not None:
            self._sock.close()
