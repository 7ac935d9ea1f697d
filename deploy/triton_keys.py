"""Triton's API keys by file, never on a command line (issue 19).

Triton 2.51 takes its keys only as flags (`--http-restricted-api=APIS:HEADER=KEY`), and
every local user can read a process's /proc/PID/cmdline. So the command line carries a
placeholder per key (`@abdoserve-key:admin@`), the keys go to a file (mode 0600, in a
0700 folder, a fresh name per launch), and `argv_keys.c`, preloaded into tritonserver,
puts each key in place of its placeholder in Triton's argv before its main runs (the
memory /proc shows keeps the placeholder), removes the file, and takes itself out of
the environment so the Python-backend stubs never load it.

The library is compiled here on first use with the system C compiler, into the build
folder, under a name holding the source's hash (a changed source builds anew). An image
whose root filesystem is read-only builds it beforehand into `$LIBRARY_DIR_VARIABLE`.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from abdoserve.export.locations import BUILD_DIR

SOURCE = Path(__file__).with_name("argv_keys.c")
KEY_FILE_VARIABLE = "ABDOSERVE_TRITON_KEY_FILE"  # read by argv_keys.c
LIBRARY_DIR_VARIABLE = "ABDOSERVE_TRITON_KEYS_LIBRARY_DIR"  # an image's prebuilt library
PLACEHOLDER = re.compile(r"@abdoserve-key:([a-z][a-z0-9-]*)@")
# The one entry that is no secret: `--exit-on-error=<its placeholder>` is refused by Triton
# unless the library replaced it with `true`, so a server that did not load the library
# never starts with the placeholders as its keys (ld.so only warns about a bad preload).
LOADED = "loaded"
COMPILE_FLAGS = ("-shared", "-fPIC", "-O2", "-Wall", "-Wextra")
# ld.so splits LD_PRELOAD at both.
PRELOAD_SEPARATORS = (" ", ":")


class TritonKeysError(RuntimeError):
    """The preload library cannot be built or found, or a key cannot be passed."""


def placeholder(name: str) -> str:
    """What stands on the command line where the key `name` goes."""
    text = f"@abdoserve-key:{name}@"
    if not PLACEHOLDER.fullmatch(text):
        raise TritonKeysError(f"a key name is lowercase letters, digits and '-': {name!r}")
    return text


def resolve(arg: str, keys: Mapping[str, str]) -> str:
    """`arg` as Triton sees it: what argv_keys.c does before Triton's main, in Python (the
    tests compare the two)."""
    return PLACEHOLDER.sub(lambda found: keys[found.group(1)], arg)


def write_key_file(keys: Mapping[str, str], folder: Path) -> Path:
    """A fresh file of `name=value` lines, mode 0600 in a 0700 folder."""
    for name, value in keys.items():
        placeholder(name)
        if not value or "\n" in value or "\0" in value:
            raise TritonKeysError(f"the key {name!r} is empty or holds a newline or NUL")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)  # mkdir's mode is masked by the umask, and an old folder kept its own
    descriptor, name = tempfile.mkstemp(prefix="triton-keys-", dir=folder)  # 0600
    with os.fdopen(descriptor, "w") as file:
        file.write("".join(f"{key}={value}\n" for key, value in keys.items()))
    return Path(name)


def environment(base: Mapping[str, str], key_file: Path, preload: Path) -> dict[str, str]:
    """`base` with the library `preload` first in LD_PRELOAD (argv_keys.c drops the
    first entry) and the key file named."""
    env = dict(base)
    preloads = [str(preload), *([base["LD_PRELOAD"]] if base.get("LD_PRELOAD") else [])]
    env["LD_PRELOAD"] = ":".join(preloads)
    env[KEY_FILE_VARIABLE] = str(key_file)
    return env


def source_digest(source: Path = SOURCE) -> str:
    return hashlib.sha256(source.read_bytes()).hexdigest()[:16]


def library(folder: Path | None = None, source: Path = SOURCE) -> Path:
    """The preload library built from `source`: an image's, else compiled once into the
    build folder."""
    if folder is None:
        folder = Path(os.environ.get(LIBRARY_DIR_VARIABLE) or BUILD_DIR / "triton_keys")
    target = folder.absolute() / f"abdoserve_argv_keys-{source_digest(source)}.so"
    if any(separator in str(target) for separator in PRELOAD_SEPARATORS):
        raise TritonKeysError(f"LD_PRELOAD cannot name a path with ' ' or ':': {target}")
    if not target.exists():
        compile_library(source, target)
    return target


def compile_library(source: Path, target: Path) -> None:
    """`cc` into a temporary name beside `target`, then renamed: a concurrent launch
    never preloads a half-written file."""
    compiler = shutil.which("cc")
    if compiler is None:
        raise TritonKeysError(
            "no C compiler (`cc`) to build the library that passes Triton its keys: "
            "install gcc and libc6-dev (Debian, Ubuntu), or build the library where one "
            f"is and name its folder in ${LIBRARY_DIR_VARIABLE}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{secrets.token_hex(4)}.partial")
    built = subprocess.run(
        [compiler, *COMPILE_FLAGS, "-o", str(partial), str(source)],
        check=False,
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        partial.unlink(missing_ok=True)
        raise TritonKeysError(f"`cc` could not build {source}:\n{built.stderr[-2000:]}")
    partial.chmod(0o755)  # an image builds it as root and runs Triton as another user
    partial.replace(target)
