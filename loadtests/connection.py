"""Where the load goes: the gRPC endpoint, TLS and the per-call deadline.

Locust's `--host` (or `LOCUST_HOST`, or `host` in locust.conf) names the endpoint as
`HOST:PORT`, `grpc://HOST:PORT` or `grpcs://HOST:PORT` (TLS). TLS, certificates,
deadline and payload pool size come from the options that `abdoserve.loadtests.grpc_user`
adds to locust's parser, each also settable through the environment variable
below, so the same locustfiles point at a remote endpoint unchanged.
Locust-free on purpose: importing locust monkey-patches the whole process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_HOST = "127.0.0.1:8001"
DEFAULT_DEADLINE_S = 30.0
DEFAULT_POOL_SIZE = 3
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})

# option destination (as locust parses it) -> environment variable
ENVIRONMENT = {
    "deadline_s": "ABDOSERVE_DEADLINE_S",
    "grpc_tls": "ABDOSERVE_TLS",
    "grpc_root_cert": "ABDOSERVE_ROOT_CERT",
    "grpc_client_key": "ABDOSERVE_CLIENT_KEY",
    "grpc_client_cert": "ABDOSERVE_CLIENT_CERT",
    "pool_size": "ABDOSERVE_POOL_SIZE",
}


@dataclass(frozen=True)
class Connection:
    """One gRPC endpoint as a load-test user reaches it."""

    url: str
    tls: bool = False
    root_cert: str | None = None
    client_key: str | None = None
    client_cert: str | None = None
    deadline_s: float = DEFAULT_DEADLINE_S
    pool_size: int = DEFAULT_POOL_SIZE

    def __post_init__(self) -> None:
        if self.deadline_s <= 0 or self.pool_size < 1:
            raise ValueError("deadline_s must be positive and pool_size at least 1")


def split_host(host: str) -> tuple[str, bool]:
    """'grpcs://h:p' -> ('h:p', True); 'grpc://h:p' and 'h:p' -> ('h:p', False)."""
    scheme, separator, rest = host.strip().partition("://")
    if not separator:
        return scheme.rstrip("/"), False
    if scheme not in ("grpc", "grpcs"):
        raise ValueError(f"host {host!r}: use HOST:PORT, grpc://HOST:PORT or grpcs://HOST:PORT")
    return rest.rstrip("/"), scheme == "grpcs"


def options_from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """The options as locust would parse them, for runs without locust's parser."""
    values: dict[str, Any] = {name: environ.get(variable) for name, variable in ENVIRONMENT.items()}
    values["grpc_tls"] = (values["grpc_tls"] or "").lower() in TRUE_WORDS
    return values


def connection(host: str | None, options: Mapping[str, Any]) -> Connection:
    """The connection for locust's host and the AbdoServe options (missing ones: defaults)."""
    url, scheme_tls = split_host(host or DEFAULT_HOST)
    deadline = options.get("deadline_s")
    pool_size = options.get("pool_size")
    return Connection(
        url=url,
        tls=scheme_tls or bool(options.get("grpc_tls")),
        root_cert=options.get("grpc_root_cert") or None,
        client_key=options.get("grpc_client_key") or None,
        client_cert=options.get("grpc_client_cert") or None,
        deadline_s=float(deadline) if deadline not in (None, "") else DEFAULT_DEADLINE_S,
        pool_size=int(pool_size) if pool_size not in (None, "") else DEFAULT_POOL_SIZE,
    )
