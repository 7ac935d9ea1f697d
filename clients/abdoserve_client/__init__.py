"""AbdoServe's thin gRPC client: needs only tritonclient[grpc], grpcio and numpy.

    from abdoserve_client import AbdoServeClient          # blocking
    from abdoserve_client import AsyncAbdoServeClient     # asyncio

Names are resolved on first use (PEP 562), so that `abdoserve`'s parser can
import `abdoserve_client.cli` without loading grpc.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from abdoserve_client.aio import AsyncAbdoServeClient
    from abdoserve_client.client import AbdoServeClient
    from abdoserve_client.errors import (
        AbdoServeError,
        DeadlineExceededError,
        InvalidRequestError,
        ServerUnavailableError,
    )

_EXPORTS = {
    "AbdoServeClient": "abdoserve_client.client",
    "AsyncAbdoServeClient": "abdoserve_client.aio",
    "AbdoServeError": "abdoserve_client.errors",
    "DeadlineExceededError": "abdoserve_client.errors",
    "InvalidRequestError": "abdoserve_client.errors",
    "ServerUnavailableError": "abdoserve_client.errors",
}

__all__ = [
    "AbdoServeClient",
    "AbdoServeError",
    "AsyncAbdoServeClient",
    "DeadlineExceededError",
    "InvalidRequestError",
    "ServerUnavailableError",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'clients' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
