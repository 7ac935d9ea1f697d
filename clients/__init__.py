"""AbdoServe's thin gRPC client: needs only tritonclient[grpc], grpcio and numpy.

    from clients import AbdoServeClient          # blocking
    from clients import AsyncAbdoServeClient     # asyncio

Names are resolved on first use (PEP 562), so that `abdoserve`'s parser can
import `clients.cli` without loading grpc.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clients.aio import AsyncAbdoServeClient
    from clients.client import AbdoServeClient
    from clients.errors import (
        AbdoServeError,
        DeadlineExceededError,
        InvalidRequestError,
        ServerUnavailableError,
    )

_EXPORTS = {
    "AbdoServeClient": "clients.client",
    "AsyncAbdoServeClient": "clients.aio",
    "AbdoServeError": "clients.errors",
    "DeadlineExceededError": "clients.errors",
    "InvalidRequestError": "clients.errors",
    "ServerUnavailableError": "clients.errors",
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
