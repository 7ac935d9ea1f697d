"""The admin key `abdoserve serve` keeps for the operator who started it, so that the model
commands on the same host need no extra step.

Where serve generated its admin key (no --admin-key-file, no $ABDOSERVE_ADMIN_KEY), it
writes the key to `~/.abdoserve/admin-key-<gRPC port>`: a 0700 directory and a 0600
file of the user who started it, removed when serve stops. Another user of the host
cannot read it; root can, as root can read the server's memory. A remote operator
gives the key (`--admin-key-file`).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from urllib.parse import urlsplit

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class OperatorKeyError(RuntimeError):
    """No admin key to be found, or one that is not safe to use."""


def key_directory() -> Path:
    return Path.home() / ".abdoserve"


def operator_key_path(grpc_port: int, directory: Path | None = None) -> Path:
    return (directory or key_directory()) / f"admin-key-{grpc_port}"


def keep_operator_key(grpc_port: int, key: str, directory: Path | None = None) -> Path:
    """Write the key where the model commands look for it: 0600, in a 0700 directory."""
    path = operator_key_path(grpc_port, directory)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    staging = path.with_name(path.name + ".partial")
    staging.unlink(missing_ok=True)
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(key + "\n")
    staging.replace(path)
    return path


def forget_operator_key(path: Path, key: str) -> None:
    """Remove the file if it still holds this key (another serve may have taken the port
    since, and written its own)."""
    with contextlib.suppress(OSError):
        if path.read_text().strip() == key:
            path.unlink()


def read_operator_key(given: Path | None, from_environment: str | None, url: str) -> str:
    """The admin key: the file given, else the environment's, else the one a serve on this
    host kept for the url's port."""
    if given is not None:
        return _read(given, "--admin-key-file")
    if from_environment:
        return from_environment
    host, port = _host_port(url)
    if host in LOCAL_HOSTS and port is not None:
        path = operator_key_path(port)
        if path.is_file():
            return _read(path, "the key serve kept")
    raise OperatorKeyError(
        f"no admin key for {url}: give --admin-key-file or $ABDOSERVE_ADMIN_KEY (a serve "
        "started on this host with its generated key keeps one in ~/.abdoserve for its "
        "own user)"
    )


def _read(path: Path, what: str) -> str:
    try:
        mode = path.stat().st_mode
        key = path.read_text().strip()
    except OSError as error:
        raise OperatorKeyError(f"{what} {path} cannot be read: {error.strerror}") from error
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise OperatorKeyError(f"{what} {path} is readable by other users: chmod 600 it")
    if not key:
        raise OperatorKeyError(f"{what} {path} is empty")
    return key


def _host_port(url: str) -> tuple[str, int | None]:
    parts = urlsplit(url if "//" in url else "//" + url)
    try:
        return parts.hostname or "", parts.port
    except ValueError:
        return parts.hostname or "", None
