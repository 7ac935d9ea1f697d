"""A private /dev/shm for `tritonserver`: a mount namespace of its own with a fresh tmpfs.

Triton's Python backend moves every request's tensors (the DICOM bytes with their
patient attributes, the decoded pixels) through /dev/shm files that it creates mode
0644 whatever the umask, under names anyone can list. Started in its own mount
namespace with a tmpfs over /dev/shm, the server and its stubs see their regions and
nothing else on the host does; the tmpfs disappears with the last process inside,
so a crash leaves nothing behind either.

As root, `unshare --mount` suffices; an unprivileged user gets the same through a
user namespace that maps them to root inside (`--map-root-user`). Containers and
pods already have a /dev/shm of their own: there `host` is as private.

One host region may be shared in on purpose (`shared_region`): a co-located sender
creates `/dev/shm/<name>` (mode 0600, its own), and the launcher binds that one file
into the private tmpfs, where Triton's system shared-memory API can map it.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

HOST_SHM = Path("/dev/shm")
REGION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")


class IsolationError(RuntimeError):
    """The private /dev/shm cannot be made here, or a shared region is unusable."""


@dataclass(frozen=True)
class ShmIsolation:
    """How `tritonserver`'s /dev/shm is set up: private (the default) or the host's."""

    private: bool = True
    size_bytes: int | None = None  # the private tmpfs's bound; None: half the RAM (tmpfs)
    shared_region: str | None = None  # one host /dev/shm file visible inside, by name


def check_region_name(name: str) -> str:
    """A plain file name in /dev/shm: no path, no option-looking text."""
    if not REGION_NAME.fullmatch(name):
        raise IsolationError(
            "a shared region name is letters, digits, '_', '.', '-' (no '/'), at most 255"
        )
    return name


def _unshare_command() -> list[str]:
    unshare = shutil.which("unshare")
    if unshare is None:
        raise IsolationError("`unshare` (util-linux) is not installed")
    command = [unshare, "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        command.append("--map-root-user")  # a user namespace lets a user mount a tmpfs
    return command


@functools.cache
def private_shm_available() -> bool:
    """Whether this host lets us make a mount namespace with a tmpfs (a seccomp-confined
    container or a kernel without unprivileged user namespaces does not)."""
    try:
        command = [*_unshare_command(), "sh", "-c", "mount -t tmpfs abdoserve-probe /dev/shm"]
    except IsolationError:
        return False
    probe = subprocess.run(command, check=False, capture_output=True, timeout=30)
    return probe.returncode == 0


def _tmpfs_options(isolation: ShmIsolation) -> str:
    options = ["mode=0700", "nosuid", "nodev", "noexec"]
    if isolation.size_bytes is not None:
        options.append(f"size={isolation.size_bytes}")
    return ",".join(options)


def setup_script(isolation: ShmIsolation, staging: Path | None) -> str:
    """The shell run inside the new namespace before it becomes `tritonserver`.

    A shared region is first bound onto a staging file (while the host's /dev/shm is
    still visible), then the tmpfs covers /dev/shm, then the staged file is bound back
    under its own name inside the tmpfs.
    """
    steps = ["set -e"]
    region = isolation.shared_region
    if region is not None:
        assert staging is not None
        host_file = shlex.quote(str(HOST_SHM / region))
        steps.append(f"mount --bind {host_file} {shlex.quote(str(staging))}")
    steps.append(f"mount -t tmpfs -o {_tmpfs_options(isolation)} abdoserve-shm /dev/shm")
    if region is not None:
        inside = shlex.quote(str(HOST_SHM / region))
        steps.append(f": > {inside}")
        steps.append(f"mount --bind {shlex.quote(str(staging))} {inside}")
    steps.append('exec "$@"')
    return "; ".join(steps)


def prepare_staging(isolation: ShmIsolation, directory: Path) -> Path | None:
    """The (empty, host-side) file a shared region is staged on; checks the region."""
    region = isolation.shared_region
    if region is None:
        return None
    source = HOST_SHM / check_region_name(region)
    if not source.is_file():
        raise IsolationError(
            f"the shared region /dev/shm/{region} does not exist: the sender creates it first"
        )
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / f"shared-region-{region}"
    staging.touch(mode=0o600)
    return staging


def wrap(command: list[str], isolation: ShmIsolation, staging: Path | None) -> list[str]:
    """`command` started in a private mount namespace (unchanged for the host's /dev/shm)."""
    if not isolation.private:
        return command
    script = setup_script(isolation, staging)
    return [*_unshare_command(), "sh", "-c", script, "abdoserve-triton", *command]


def server_shm(pid: int) -> Path:
    """/dev/shm as the process `pid` sees it (its private tmpfs, or the host's)."""
    return Path("/proc") / str(pid) / "root" / "dev" / "shm"
