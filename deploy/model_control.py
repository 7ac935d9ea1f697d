"""Triton's model-repository API, behind the admin key: what the supervisor needs of it.

The server runs with explicit model control and `model-repository` restricted to
requests carrying the admin key header (`--http-restricted-api`), so only the
launcher can load or unload models.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

ADMIN_HEADER = "abdoserve-admin-key"
# The shared-memory API's own key, where one co-located sender shares a region.
SHM_HEADER = "abdoserve-shm-key"
# Behind the guard, inference needs this key, which only nginx adds: a user of the host
# who reaches Triton's loopback ports directly cannot bypass mutual TLS and the limits.
GUARD_HEADER = "abdoserve-guard-key"
# Over gRPC, Triton reads a restricted protocol's key from metadata named with this
# prefix (`triton-grpc-protocol-abdoserve-admin-key`); over HTTP, the header as is.
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
# A config parameter the served models ignore; a new value makes Triton reload the
# model (a load of an unchanged model is a no-op in 2.51, and would leave a dead
# stub in place).
GENERATION_PARAMETER = "abdoserve_generation"


class ModelControlError(RuntimeError):
    """Triton refused or failed a model-repository call."""


class ModelControlTimeout(ModelControlError):
    """Triton did not answer a model-repository call in time: it is wedged."""


class ModelControl:
    """Reload and readiness of single models on one server's HTTP endpoint."""

    def __init__(self, base_url: str, admin_key: str, timeout_s: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.admin_key = admin_key
        self.timeout_s = timeout_s

    def _request(self, path: str, body: dict[str, Any] | None = None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base_url + path,
            data=data,
            method="GET" if body is None else "POST",
            headers={ADMIN_HEADER: self.admin_key, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                content: bytes = reply.read()
                return content
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:300]
            raise ModelControlError(f"{path}: HTTP {error.code} {detail}") from error
        except TimeoutError as error:
            raise ModelControlTimeout(f"{path}: no answer in {self.timeout_s:.0f} s") from error
        except (urllib.error.URLError, OSError) as error:
            if isinstance(getattr(error, "reason", None), TimeoutError):
                raise ModelControlTimeout(f"{path}: no answer in {self.timeout_s:.0f} s") from error
            raise ModelControlError(f"{path}: {error}") from error

    def config(self, model: str) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self._request(f"/v2/models/{model}/config"))
        return loaded

    def reload(self, model: str) -> None:
        """Load a fresh copy of `model` beside the old one; Triton swaps them when it is
        ready, so requests keep being served (the old instances drain and unload)."""
        config = self.config(model)
        parameters = config.setdefault("parameters", {})
        parameters[GENERATION_PARAMETER] = {"string_value": str(time.time_ns())}
        self.load(model, config)

    def load(self, model: str, config: Mapping[str, Any]) -> None:
        """Load `model` with this config in place of its file's (swapped in as `reload`)."""
        self._request(
            f"/v2/repository/models/{model}/load",
            {"parameters": {"config": json.dumps(config)}},
        )

    def index(self) -> list[dict[str, Any]]:
        """The repository index: each model version's name, version and state."""
        found: list[dict[str, Any]] = json.loads(self._request("/v2/repository/index", {}))
        return found

    def model_names(self) -> list[str]:
        """Every model in the repository index (a restricted model-repository call)."""
        return [str(item["name"]) for item in self.index()]

    def is_ready(self, model: str) -> bool:
        try:
            self._request(f"/v2/models/{model}/ready")
        except ModelControlError:
            return False
        return True
