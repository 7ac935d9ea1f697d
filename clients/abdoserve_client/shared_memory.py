"""A co-located sender's shared-memory region: studies reach the server without a copy
through gRPC.

The opt-in for a sender on the server's own host (the DICOM gateway, a benchmark): one
named file in /dev/shm, readable by its owner only, which the server is started to see
(`abdoserve serve --shared-region NAME --shm-key-file F`). The region is cut into equal
slots; each request in flight writes its packed study into a free slot and sends only a
reference to it (region, offset, size), the offsets and CLINICAL. A study too large for
a slot, or one sent while every slot is busy, goes inline over gRPC instead: nothing
waits on the region.

The server's shared-memory API sits behind its own key (`--shm-key-file`), sent as
gRPC metadata when the client registers the region.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from abdoserve_client.errors import AbdoServeError, InvalidRequestError
from abdoserve_client.protocol import dicom_tensors, offsets_tensor
from abdoserve_client.wire import SharedMemoryRef, WireTensor

SHM_FOLDER = Path("/dev/shm")
# The metadata the server's shared-memory API is restricted to: Triton's gRPC prefix for
# restricted-protocol headers, then the header `abdoserve serve` names in its option.
SHM_KEY_METADATA = "triton-grpc-protocol-abdoserve-shm-key"


class SharedMemoryRegion:
    """A named /dev/shm file of `slots` slots of `slot_bytes` each, mapped in this process.

    `create` makes the file (mode 0600; an existing file of that name is an error, so a
    sender never writes into someone else's region); `open` maps one that exists (the
    operator created it before starting the server). Thread-safe: each `slot()` holds
    one slot until the request that uses it is answered.
    """

    def __init__(self, name: str, slot_bytes: int, handle: mmap.mmap, owned: bool) -> None:
        self.name = name
        self.slot_bytes = slot_bytes
        self.size = len(handle)
        self.slots = self.size // slot_bytes
        self._map = handle
        self._owned = owned
        self._free = list(range(self.slots))
        self._lock = threading.Lock()

    @classmethod
    def create(cls, name: str, *, slot_bytes: int, slots: int) -> SharedMemoryRegion:
        if slot_bytes < 1 or slots < 1:
            raise ValueError("slot_bytes and slots must be positive")
        descriptor = os.open(_path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(descriptor, slot_bytes * slots)
            handle = mmap.mmap(descriptor, slot_bytes * slots)
        except OSError:
            os.unlink(_path(name))
            raise
        finally:
            os.close(descriptor)
        return cls(name, slot_bytes, handle, owned=True)

    @classmethod
    def open(cls, name: str, *, slot_bytes: int) -> SharedMemoryRegion:
        descriptor = os.open(_path(name), os.O_RDWR)
        try:
            size = os.fstat(descriptor).st_size
            if size < slot_bytes:
                raise ValueError(f"the region {name} holds {size} bytes, less than one slot")
            handle = mmap.mmap(descriptor, size)
        finally:
            os.close(descriptor)
        return cls(name, slot_bytes, handle, owned=False)

    @property
    def key(self) -> str:
        """The file the server maps (Triton's `key` for a system region)."""
        return f"/{self.name}"

    @contextmanager
    def slot(self, size: int) -> Iterator[int | None]:
        """The offset of a free slot that fits `size` bytes, held for the block; None when
        the study does not fit or every slot is busy (the caller then sends inline)."""
        offset = None
        if size <= self.slot_bytes:
            with self._lock:
                if self._free:
                    offset = self._free.pop() * self.slot_bytes
        try:
            yield offset
        finally:
            if offset is not None:
                with self._lock:
                    self._free.append(offset // self.slot_bytes)

    def write(self, offset: int, pieces: Sequence[bytes]) -> int:
        """Write `pieces` back to back from `offset` (one copy); returns the bytes written."""
        position = offset
        for piece in pieces:
            self._map[position : position + len(piece)] = piece
            position += len(piece)
        return position - offset

    def read(self, offset: int, size: int) -> bytes:
        return self._map[offset : offset + size]

    def close(self) -> None:
        """Unmap; a region this object created is removed too."""
        self._map.close()
        if self._owned:
            with suppress(FileNotFoundError):
                os.unlink(_path(self.name))


def _path(name: str) -> Path:
    if not name or "/" in name or name in (".", ".."):
        raise InvalidRequestError("a shared-memory region name is a plain file name")
    return SHM_FOLDER / name


class RegionSender:
    """Places each study in a slot of `region` and describes it as request tensors;
    `register` (re)registers the region with the server, before the first study and
    after the server forgot it (a restarted server starts with no region)."""

    def __init__(self, region: SharedMemoryRegion, register: Callable[[], None]) -> None:
        self.region = region
        self._register = register
        self._registered = False
        self._lock = threading.Lock()

    @property
    def registered(self) -> bool:
        return self._registered

    def ensure_registered(self) -> None:
        with self._lock:
            if not self._registered:
                self._register()
                self._registered = True

    def forget(self) -> None:
        """The server no longer knows the region: register it again before the next use."""
        with self._lock:
            self._registered = False

    @contextmanager
    def study(self, instances: Sequence[bytes]) -> Iterator[list[WireTensor]]:
        """DICOM_PACKED in a slot (inline when none is free or it does not fit) and
        DICOM_OFFSETS inline, valid until the block ends."""
        total = sum(len(instance) for instance in instances)
        with self.region.slot(total) as offset:
            if offset is None:
                yield dicom_tensors(instances, packed=True)
                return
            self.ensure_registered()
            self.region.write(offset, instances)
            where = SharedMemoryRef(self.region.name, offset, total)
            packed = WireTensor("DICOM_PACKED", "UINT8", (1, total), shared_memory=where)
            yield [packed, offsets_tensor(instances)]


def forgotten_region(error: AbdoServeError, region: SharedMemoryRegion) -> bool:
    """Whether the server refused a request because it has no such region registered."""
    return error.code in ("NOT_FOUND", "INVALID_ARGUMENT") and region.name in error.message
