"""ModelInfer requests written straight in protobuf wire format, sent on a raw gRPC call.

tritonclient copies every BYTES tensor twice on its way into the request (into
`raw_input_contents`, then again when the request is serialized); for a study of
a few MB that cost more client time than the server spends preprocessing it. The
request here is the small protobuf head (model, input shapes, outputs) followed by
each tensor's `raw_input_contents` field (number 7, length-delimited) written by
hand, so the DICOM bytes are copied once, by one `b"".join`. The server receives
exactly what tritonclient would have sent; a unit test parses both and compares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc  # type: ignore[import-untyped]  # no stubs; tritonclient's dependency
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
RAW_INPUT_CONTENTS = 7  # ModelInferRequest.raw_input_contents
_CONTENTS_TAG = bytes([(RAW_INPUT_CONTENTS << 3) | 2])  # field 7, wire type 2
UNLIMITED_MESSAGES = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
# An idle connection is closed by this end first: the guard (nginx) ends one idle for
# 75 s with a GOAWAY and a FIN, and a call sent as they arrive fails "Stream removed"
# (seen once under locust: a channel idle since the start, used again at 80 s).
CLIENT_IDLE = ("grpc.client_idle_timeout_ms", 30_000)
ChannelOptions = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class SharedMemoryRef:
    """Where an input's bytes already lie in a registered system shared-memory region."""

    region: str
    offset: int
    byte_size: int


@dataclass(frozen=True)
class WireTensor:
    """One input: its raw contents as pieces joined on the wire (copied once), or a
    reference to a shared-memory region that holds them (nothing travels)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    pieces: Sequence[bytes] = ()
    shared_memory: SharedMemoryRef | None = None

    @property
    def size(self) -> int:
        return sum(len(piece) for piece in self.pieces)


def bytes_tensor(name: str, elements: Sequence[bytes]) -> WireTensor:
    """A BYTES tensor [1, n] in Triton's layout: each element's 4-byte LE length, then it."""
    pieces: list[bytes] = []
    for element in elements:
        pieces += [len(element).to_bytes(4, "little"), element]
    return WireTensor(name, "BYTES", (1, len(elements)), pieces)


def encode_infer_request(task: str, tensors: Sequence[WireTensor], outputs: Sequence[str]) -> bytes:
    """A serialized ModelInferRequest of `tensors`, in the given order."""
    request = service_pb2.ModelInferRequest(model_name=task)
    contents: list[bytes] = []
    for tensor in tensors:
        entry = request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        if tensor.shared_memory is not None:
            _refer_to_region(entry, tensor.shared_memory)
            continue  # Triton counts raw contents only over the inputs that carry them
        contents += [_CONTENTS_TAG, _varint(tensor.size), *tensor.pieces]
    for name in outputs:
        request.outputs.add(name=name)
    head: bytes = request.SerializeToString()
    return b"".join([head, *contents])


def _refer_to_region(entry: Any, where: SharedMemoryRef) -> None:
    entry.parameters["shared_memory_region"].string_param = where.region
    entry.parameters["shared_memory_byte_size"].int64_param = where.byte_size
    if where.offset:
        entry.parameters["shared_memory_offset"].int64_param = where.offset


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def open_channel(
    url: str,
    *,
    ssl: bool,
    root_certificates: str | None,
    private_key: str | None,
    certificate_chain: str | None,
    options: ChannelOptions = (),
) -> Any:
    """A channel like tritonclient's (PEM files given as paths), without message size caps;
    `options`: more channel arguments (the load-balancing policy, see endpoints.py)."""
    arguments = [*UNLIMITED_MESSAGES, CLIENT_IDLE, *options]
    if not ssl:
        return grpc.insecure_channel(url, options=arguments)
    credentials = _credentials(root_certificates, private_key, certificate_chain)
    return grpc.secure_channel(url, credentials, options=arguments)


def triton_channel_args(options: ChannelOptions) -> list[tuple[str, Any]]:
    """tritonclient's own channel arguments plus `options`: given `channel_args`, it drops
    its defaults (message sizes, keepalive), so they are repeated here."""
    keepalive = grpcclient.KeepAliveOptions()
    return [
        *UNLIMITED_MESSAGES,
        CLIENT_IDLE,
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        *options,
    ]


def _credentials(*paths: str | None) -> Any:
    """TLS credentials from PEM files: root certificates, private key, certificate chain."""
    return grpc.ssl_channel_credentials(*(_read(path) for path in paths))


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as handle:
        return handle.read()


def triton_error(error: Any) -> InferenceServerException:
    """A gRPC error as tritonclient raises it, so the retry policy reads one exception type."""
    return InferenceServerException(
        msg=error.details(), status=str(error.code()), debug_details=error.debug_error_string()
    )


class RawInfer:
    """`infer` over one channel, raising tritonclient's exception type as tritonclient does."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        # No request serializer: the request is already bytes.
        self._call = channel.unary_unary(
            MODEL_INFER, response_deserializer=service_pb2.ModelInferResponse.FromString
        )

    def infer(
        self,
        task: str,
        tensors: Sequence[WireTensor],
        outputs: Sequence[str],
        timeout_s: float,
    ) -> grpcclient.InferResult:
        request = encode_infer_request(task, tensors, outputs)
        try:
            # Never wait for an endpoint to come back: fail fast (UNAVAILABLE) when none
            # is up, and let the retry policy spend the caller's deadline.
            response = self._call(request, timeout=timeout_s, wait_for_ready=False)
        except grpc.RpcError as error:
            raise triton_error(error) from error
        return grpcclient.InferResult(response)

    def close(self) -> None:
        self.channel.close()


def open_aio_channel(
    url: str,
    *,
    ssl: bool,
    root_certificates: str | None,
    private_key: str | None,
    certificate_chain: str | None,
    options: ChannelOptions = (),
) -> Any:
    """`open_channel` for asyncio: create it inside the running event loop."""
    arguments = [*UNLIMITED_MESSAGES, *options]
    if not ssl:
        return grpc.aio.insecure_channel(url, options=arguments)
    credentials = _credentials(root_certificates, private_key, certificate_chain)
    return grpc.aio.secure_channel(url, credentials, options=arguments)


class AsyncRawInfer:
    """`RawInfer` on an asyncio channel."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self._call = channel.unary_unary(
            MODEL_INFER, response_deserializer=service_pb2.ModelInferResponse.FromString
        )

    async def infer(
        self,
        task: str,
        tensors: Sequence[WireTensor],
        outputs: Sequence[str],
        timeout_s: float,
    ) -> grpcclient.InferResult:
        request = encode_infer_request(task, tensors, outputs)
        try:
            response = await self._call(request, timeout=timeout_s, wait_for_ready=False)
        except grpc.aio.AioRpcError as error:
            raise triton_error(error) from error
        return grpcclient.InferResult(response)

    async def close(self) -> None:
        await self.channel.close()
