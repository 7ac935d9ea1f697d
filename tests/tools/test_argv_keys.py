"""deploy/argv_keys.c, compiled with the system `cc` and preloaded into a stand-in for
tritonserver: a shell run under that name (`tritonserver -c SCRIPT ...`), which prints
the arguments it was given, its own /proc/PID/cmdline and its environment. The library
must hand the program its keys, show /proc only placeholders, leave its children
nothing, and refuse to start the program when a key is missing (issue 19)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from abdoserve.deploy.triton_keys import (
    COMPILE_FLAGS,
    KEY_FILE_VARIABLE,
    SOURCE,
    environment,
    library,
    placeholder,
    resolve,
    write_key_file,
)

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc)")

KEYS = {"admin": "Adm1n-k3y_x", "inference": "gu@rd=k:ey", "loaded": "true"}
ARGS = [
    "--plain=1",
    f"--http-restricted-api=model-repository:abdoserve-admin-key={placeholder('admin')}",
    f"--grpc-restricted-protocol=inference:abdoserve-guard-key={placeholder('inference')}",
    f"--exit-on-error={placeholder('loaded')}",
    f"--two={placeholder('admin')}+{placeholder('inference')}",
]
# $@ one per line, then this process's /proc/PID/cmdline, then what a child inherits.
SCRIPT = 'printf "%s\\n" "$@"; echo ---; tr "\\0" "\\n" < /proc/$$/cmdline; echo ---; env'
OTHER_LIBRARY = "libm.so.6"  # another preload, found by ld.so by name


@dataclass(frozen=True)
class Run:
    code: int
    args: list[str]
    cmdline: list[str]
    env: dict[str, str]
    stderr: str


@pytest.fixture(scope="module")
def preload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return library(tmp_path_factory.mktemp("library"))


def run(folder: Path, preload: Path, key_file: Path | None, name: str = "tritonserver") -> Run:
    program = folder / name
    if not program.exists():
        program.symlink_to(shutil.which("sh") or "/bin/sh")
    base = {"PATH": "/usr/bin:/bin", "LD_PRELOAD": OTHER_LIBRARY}
    env = environment(base, key_file or Path(), preload)
    if key_file is None:
        del env[KEY_FILE_VARIABLE]
    done = subprocess.run(
        [str(program), "-c", SCRIPT, name, *ARGS],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    args, cmdline, env_text = ([*done.stdout.split("---\n"), "", ""])[:3]
    variables = dict(line.split("=", 1) for line in env_text.splitlines() if "=" in line)
    return Run(done.returncode, args.splitlines(), cmdline.splitlines(), variables, done.stderr)


def test_the_library_compiles_without_a_warning(tmp_path: Path) -> None:
    built = subprocess.run(
        ["cc", *COMPILE_FLAGS, "-Werror", "-o", str(tmp_path / "a.so"), str(SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    assert built.stderr == ""


def test_tritonserver_gets_the_keys_and_proc_shows_only_placeholders(
    preload: Path, tmp_path: Path
) -> None:
    key_file = write_key_file(KEYS, tmp_path / "keys")
    done = run(tmp_path, preload, key_file)
    assert done.code == 0, done.stderr
    assert done.args == [resolve(arg, KEYS) for arg in ARGS]  # the C and Python agree
    assert "--exit-on-error=true" in done.args
    assert done.cmdline[-len(ARGS) :] == ARGS
    for key in ("Adm1n-k3y_x", "gu@rd=k:ey"):
        assert not [line for line in done.cmdline if key in line]
    # Its children: no library, no file name; the other preload stays.
    assert done.env.get("LD_PRELOAD") == OTHER_LIBRARY
    assert KEY_FILE_VARIABLE not in done.env
    assert not key_file.exists(), "read once, then removed"


def test_only_the_library_is_dropped_from_ld_preload(preload: Path, tmp_path: Path) -> None:
    key_file = write_key_file(KEYS, tmp_path / "keys")
    program = tmp_path / "tritonserver"
    program.symlink_to(shutil.which("sh") or "/bin/sh")
    env = environment({"PATH": "/usr/bin:/bin"}, key_file, preload)
    done = subprocess.run(
        [str(program), "-c", "env", "tritonserver"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "LD_PRELOAD" not in done.stdout
    assert KEY_FILE_VARIABLE not in done.stdout


def test_another_program_is_left_alone(preload: Path, tmp_path: Path) -> None:
    """unshare and sh, the launcher's wrappers, pass the file and the library on."""
    key_file = write_key_file(KEYS, tmp_path / "keys")
    done = run(tmp_path, preload, key_file, name="sh")
    assert done.code == 0, done.stderr
    assert done.args == ARGS
    assert done.env[KEY_FILE_VARIABLE] == str(key_file)
    assert done.env["LD_PRELOAD"].startswith(str(preload))
    assert key_file.exists()


@pytest.mark.parametrize("problem", ["no variable", "no file", "readable", "missing key"])
def test_a_missing_key_stops_tritonserver_before_it_starts(
    preload: Path, tmp_path: Path, problem: str
) -> None:
    keys = {
        name: value
        for name, value in KEYS.items()
        if problem != "missing key" or name != "inference"
    }
    key_file = write_key_file(keys, tmp_path / "keys")
    if problem == "no file":
        key_file.unlink()
    if problem == "readable":
        key_file.chmod(0o644)
    done = run(tmp_path, preload, None if problem == "no variable" else key_file)
    assert done.code == 2
    assert done.args == []
    assert done.stderr.startswith("abdoserve argv_keys: ")
    assert "Adm1n" not in done.stderr and "gu@rd" not in done.stderr
    if problem == "missing key":
        assert placeholder("inference") in done.stderr


def test_a_changed_source_is_built_anew(tmp_path: Path) -> None:
    source = tmp_path / "argv_keys.c"
    source.write_text(SOURCE.read_text())
    first = library(tmp_path / "cache", source)
    assert library(tmp_path / "cache", source) == first
    source.write_text(SOURCE.read_text() + "/* changed */\n")
    second = library(tmp_path / "cache", source)
    assert second != first and second.exists()
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == sorted(
        [first.name, second.name]
    ), "no partial file is left behind"
