"""The worklist served by uvicorn on a thread of the gateway process.

TLS takes the files `abdoserve serve` takes (`--tls-cert`, `--tls-key`, and
`--tls-client-ca` for mutual TLS: only browsers or a proxy with a certificate it signed
get in). The session key lives in the spool (`worklist/session.key`, 0600), so a
restart keeps users signed in. uvicorn's access log is off: the audit log says who did
what, and a URL holds nothing but UIDs anyway.
"""

from __future__ import annotations

import logging
import os
import secrets
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from abdoserve.deploy.gateway.worklist.app import Worklist, WorklistSettings
from abdoserve.deploy.gateway.worklist.audit import AuditLog
from abdoserve.deploy.gateway.worklist.auth import Access
from abdoserve.deploy.gateway.worklist.users import load_users
from abdoserve.deploy.guard import TlsFiles

log = logging.getLogger("abdoserve.gateway")
START_WAIT_S = 30.0


@dataclass(frozen=True)
class WorklistOptions:
    """The `--web-*` and `--tls-*` options of `abdoserve gateway`."""

    host: str = "127.0.0.1"
    port: int = 8443
    users: Path | None = None
    proxy_user_header: str | None = None
    audit_log: Path | None = None  # default: SPOOL/worklist/audit.jsonl
    tls: TlsFiles | None = None


class WorklistServer:
    """Start it, stop it; `url` says where it listens."""

    def __init__(self, options: WorklistOptions, spool: Path, on_given: Callable[[], None]) -> None:
        self.options = options
        folder = spool / "worklist"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        audit = AuditLog(options.audit_log or folder / "audit.jsonl")
        users = None if options.users is None else load_users(options.users)
        access = Access(users, options.proxy_user_header, audit)
        settings = WorklistSettings(spool, access, _session_key(folder / "session.key"), on_given)
        config = uvicorn.Config(
            Worklist(settings).app(),
            host=options.host,
            port=options.port,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
        )
        _use_tls(config, options.tls)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="worklist", daemon=True)

    @property
    def url(self) -> str:
        scheme = "http" if self.options.tls is None else "https"
        return f"{scheme}://{self.options.host}:{self.options.port}/"

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + START_WAIT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the worklist could not listen on {self.options.port}")
            time.sleep(0.05)
        log.info("worklist on %s", self.url)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def _use_tls(config: uvicorn.Config, tls: TlsFiles | None) -> None:
    """Serve HTTPS from these files; with a client CA, a client certificate is required."""
    if tls is None:
        return
    config.ssl_certfile = str(tls.certificate)
    config.ssl_keyfile = str(tls.key)
    if tls.client_ca is not None:
        config.ssl_ca_certs = str(tls.client_ca)
        config.ssl_cert_reqs = ssl.CERT_REQUIRED


def _session_key(path: Path) -> str:
    """The key that signs session cookies: made once, kept 0600 beside the spool's data."""
    if not path.exists():
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))
    return path.read_text().strip()
