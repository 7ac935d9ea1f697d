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
        ResponseError,
        ServerUnavailableError,
        TaskNotFoundError,
    )
    from abdoserve_client.explanation import Explanation
    from abdoserve_client.model_identity import ModelIdentity
    from abdoserve_client.results import (
        BoneDensityResult,
        EsophagealCancerResult,
        FibrosisResult,
        LiverMassResult,
        ModelInfo,
        StudyResult,
        TaskInfo,
    )

_EXPORTS = {
    "AbdoServeClient": "abdoserve_client.client",
    "AsyncAbdoServeClient": "abdoserve_client.aio",
    "AbdoServeError": "abdoserve_client.errors",
    "DeadlineExceededError": "abdoserve_client.errors",
    "InvalidRequestError": "abdoserve_client.errors",
    "ServerUnavailableError": "abdoserve_client.errors",
    "ResponseError": "abdoserve_client.errors",
    "TaskNotFoundError": "abdoserve_client.errors",
    "StudyResult": "abdoserve_client.results",
    "LiverMassResult": "abdoserve_client.results",
    "FibrosisResult": "abdoserve_client.results",
    "BoneDensityResult": "abdoserve_client.results",
    "EsophagealCancerResult": "abdoserve_client.results",
    "Explanation": "abdoserve_client.explanation",
    "ModelIdentity": "abdoserve_client.model_identity",
    "ModelInfo": "abdoserve_client.results",
    "TaskInfo": "abdoserve_client.results",
}

__all__ = [
    "AbdoServeClient",
    "AbdoServeError",
    "AsyncAbdoServeClient",
    "BoneDensityResult",
    "DeadlineExceededError",
    "EsophagealCancerResult",
    "Explanation",
    "FibrosisResult",
    "InvalidRequestError",
    "LiverMassResult",
    "ModelIdentity",
    "ModelInfo",
    "ResponseError",
    "ServerUnavailableError",
    "StudyResult",
    "TaskInfo",
    "TaskNotFoundError",
]


def __getattr__(name: str) -> Any:
    """Import the module that defines `name` on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'abdoserve_client' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
