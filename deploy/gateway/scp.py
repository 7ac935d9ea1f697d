"""The C-STORE SCP: CT and MR images in, written to the spool before the acknowledgement.

An instance is acknowledged (status 0x0000) only once it is fsynced in the spool; a
write that fails answers "out of resources" so the sender keeps it and sends again.
An instance whose series no routing rule matches is refused politely: a failure
status with a comment saying why, counted, and never stored or sent anywhere.
Logs and status comments name UIDs and attribute keywords only.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pydicom
from pydicom import uid
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    Verification,
)

from abdoserve.deploy.gateway.connections import ConnectionLimits, GuardedServer
from abdoserve.deploy.gateway.metrics import GatewayMetrics
from abdoserve.deploy.gateway.spool import Spool, SpoolError

log = logging.getLogger("abdoserve.gateway")

STORAGE_CLASSES = (
    CTImageStorage,
    MRImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
)

# What the intake decodes (pydicom with pylibjpeg's openjpeg, libjpeg and rle, and
# pyjpegls); a sender offering anything else is told so at association time.
TRANSFER_SYNTAXES = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    # HTJ2K (JPEG 2000 Part 15): pylibjpeg-openjpeg 2 decodes it, as pydicom 3 routes it
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.RLELossless,
)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # the sender keeps the instance and tries again
CANNOT_UNDERSTAND = 0xC000  # not an instance we can take: the sender is told why
# The P-DATA PDU length we advertise (pynetdicom's default); a peer's PDUs are held to it.
MAXIMUM_PDU_LENGTH = 16382


class SeriesFilter(Protocol):
    """Whether any routing rule could take an instance's series."""

    def matching_rule(self, header: Dataset) -> str | None: ...


@dataclass(frozen=True)
class ScpOptions:
    """Who the gateway is on the network, and who may send to it."""

    ae_title: str = "ABDOSERVE"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_callers: Sequence[str] = ()  # empty: any calling AE title
    # Bounds the instances in flight (received to temporary files, not memory). Sixteen,
    # with at most `connections.per_caller` (4) from one address: one address that
    # trickles or floods holds a quarter of the slots, never all of them.
    max_associations: int = 16
    # The server refuses a request over 256 MiB: an instance that large can never be answered.
    max_instance_bytes: int = 256 * 1024 * 1024
    # Below this much free space in the spool, instances are refused (A700, retried).
    min_free_bytes: int = 1024 * 1024 * 1024
    network_timeout_s: float = 60.0  # between PDUs, and for one send
    # PDU sizes and times, and connections per address (connections.py).
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)


def refusal(status: int, comment: str) -> Dataset:
    """A C-STORE failure status with its comment (at most 64 characters, a LO)."""
    answer = Dataset()
    answer.Status = status
    answer.ErrorComment = comment[:64]
    return answer


class StoreHandler:
    """EVT_C_STORE: check, spool, then acknowledge."""

    def __init__(
        self,
        spool: Spool,
        rules: SeriesFilter,
        metrics: GatewayMetrics,
        *,
        max_instance_bytes: int = 256 * 1024 * 1024,
        min_free_bytes: int = 1024 * 1024 * 1024,
    ) -> None:
        self.spool = spool
        self.max_instance_bytes = max_instance_bytes
        self.min_free_bytes = min_free_bytes
        self.rules = rules
        self.metrics = metrics
        self._unmatched_series: set[str] = set()

    def __call__(self, event: Any) -> int | Dataset:
        received: Path = event.dataset_path  # chunked receive: on disk, never whole in memory
        if received.stat().st_size > self.max_instance_bytes:
            self.metrics.instances_refused.labels("too_large").inc()
            log.warning("C-STORE refused: an instance over %d bytes", self.max_instance_bytes)
            return refusal(
                CANNOT_UNDERSTAND, f"instance larger than {self.max_instance_bytes} bytes"
            )
        try:
            header = pydicom.dcmread(received, stop_before_pixels=True)
        except Exception:  # a data set pydicom cannot parse: the sender is told, we go on
            self.metrics.instances_refused.labels("unparsable").inc()
            log.warning("C-STORE refused: the data set could not be parsed")
            return refusal(CANNOT_UNDERSTAND, "data set could not be parsed")
        return self.store(header, received)

    def store(self, header: Dataset, received: Path) -> int | Dataset:
        """Spool one received instance (a DICOM file) unless it must be refused."""
        if self.rules.matching_rule(header) is None:
            return self._unmatched(header)
        if self.spool.free_bytes() < self.min_free_bytes:
            # Refused as out of resources: the sender keeps the instance and tries again
            # later, instead of the gateway acknowledging what it might not write.
            self.metrics.instances_refused.labels("disk_full").inc()
            log.error("C-STORE refused: under %d bytes free in the spool", self.min_free_bytes)
            return refusal(OUT_OF_RESOURCES, "spool disk nearly full")
        try:
            self.spool.store_file(
                header.get("StudyInstanceUID"), header.get("SOPInstanceUID"), received
            )
        except SpoolError as error:
            self.metrics.instances_refused.labels("invalid_uid").inc()
            log.warning("C-STORE refused: %s", error)
            return refusal(CANNOT_UNDERSTAND, str(error))
        except OSError as error:
            self.metrics.instances_refused.labels("spool_error").inc()
            log.error("C-STORE not spooled (%s); the sender will retry", error.strerror)
            return refusal(OUT_OF_RESOURCES, "spool write failed")
        self.metrics.instances_received.inc()
        return SUCCESS

    def _unmatched(self, header: Dataset) -> Dataset:
        self.metrics.instances_refused.labels("unmatched").inc()
        series = str(header.get("SeriesInstanceUID", ""))
        if series not in self._unmatched_series:  # one count and one line per series
            self._unmatched_series.add(series)
            self.metrics.series_unmatched.inc()
            log.info("series %s matches no routing rule; refused, not stored", series or "-")
        return refusal(CANNOT_UNDERSTAND, "no routing rule matches this series")


def build_ae(options: ScpOptions) -> AE:
    """The application entity: storage and verification contexts, timeouts, limits."""
    # Received data sets go to a temporary file as they arrive, not into memory: eight
    # associations of large Enhanced instances would otherwise hold them all in RAM.
    _config.STORE_RECV_CHUNKED_DATASET = True
    ae = AE(ae_title=options.ae_title)
    for storage in STORAGE_CLASSES:
        ae.add_supported_context(storage, list(TRANSFER_SYNTAXES))
    ae.add_supported_context(Verification)
    ae.require_calling_aet = list(options.allowed_callers)
    ae.maximum_associations = options.max_associations
    ae.maximum_pdu_size = MAXIMUM_PDU_LENGTH
    ae.network_timeout = options.network_timeout_s
    # The acceptor waits this long for the A-ASSOCIATE-RQ: the same total as the
    # guarded socket gives it, so a connection that sends nothing is gone as soon.
    ae.acse_timeout = options.connections.association_s
    ae.dimse_timeout = options.network_timeout_s
    return ae


class StorageServer:
    """The listening SCP; `start()` returns at once, `stop()` closes the port."""

    def __init__(self, options: ScpOptions, handler: StoreHandler) -> None:
        self.options = options
        self.handler = handler
        self.ae = build_ae(options)
        self._server: Any = None

    def start(self) -> None:
        handlers: list[Any] = [(evt.EVT_C_STORE, self.handler), (evt.EVT_REJECTED, _rejected)]
        refused = self.handler.metrics.connections_refused
        self._server = self.ae.make_server(
            (self.options.host, self.options.port),
            evt_handlers=handlers,
            server_class=GuardedServer,
            limits=self.options.connections,
            on_refused=lambda reason: refused.labels(reason).inc(),
        )
        # What AE.start_server(block=False) does, with our server class.
        threading.Thread(
            target=self._server.serve_forever, name="AcceptorServer", daemon=True
        ).start()
        log.info(
            "DICOM gateway %s listening on %s:%d",
            self.options.ae_title,
            self.options.host,
            self.options.port,
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def _rejected(event: Any) -> None:
    """A calling AE that is not allowed: said in the log, by AE title only."""
    requestor = event.assoc.requestor
    log.warning("association from AE %s refused", requestor.ae_title)
