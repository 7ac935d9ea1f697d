"""Triton's keys stay off its command line (issue 19): the command holds placeholders
that stand for exactly the keys of the options, the key file is private, and the
preload library is built once per source. Nothing is compiled here (tests/tools does)."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from abdoserve.deploy import triton_keys
from abdoserve.deploy.embedded import ServerOptions, triton_command, triton_key_values
from abdoserve.deploy.triton_keys import (
    LIBRARY_DIR_VARIABLE,
    PLACEHOLDER,
    TritonKeysError,
    environment,
    library,
    placeholder,
    resolve,
    write_key_file,
)

ADMIN, SHM, INFERENCE = "admin-K3Y", "shm-K3Y", "inference-K3Y"
OPTIONS = ServerOptions(
    Path("/r"),
    admin_key=ADMIN,
    shm_key=SHM,
    inference_key=INFERENCE,
    binary=Path("/opt/tritonserver/bin/tritonserver"),
    backends=Path("/opt/tritonserver/backends"),
)


def test_the_command_line_holds_placeholders_and_no_key() -> None:
    command = triton_command(OPTIONS)
    assert not [arg for arg in command if any(k in arg for k in (ADMIN, SHM, INFERENCE))]
    assert any(placeholder("admin") in arg for arg in command)


def test_the_placeholders_stand_for_the_options_keys() -> None:
    keys = triton_key_values(OPTIONS)
    seen = {name for arg in triton_command(OPTIONS) for name in PLACEHOLDER.findall(arg)}
    assert seen == set(keys), "each placeholder has a key, each key a placeholder"
    resolved = [resolve(arg, keys) for arg in triton_command(OPTIONS)]
    admin = "model-repository,statistics,trace,logging"
    for flag in ("--http-restricted-api", "--grpc-restricted-protocol"):
        assert f"{flag}={admin}:abdoserve-admin-key={ADMIN}" in resolved
        assert f"{flag}=shared-memory:abdoserve-shm-key={SHM}" in resolved
        assert f"{flag}=inference:abdoserve-guard-key={INFERENCE}" in resolved
    assert "--exit-on-error=true" in resolved


def test_without_the_library_triton_would_be_given_no_valid_exit_on_error() -> None:
    """Unsubstituted, `--exit-on-error` is no boolean: Triton refuses to start, rather
    than serve with the placeholders as its keys."""
    command = triton_command(ServerOptions(Path("/r"), binary=Path("t"), backends=Path("b")))
    [flag] = [arg for arg in command if arg.startswith("--exit-on-error=")]
    assert flag.split("=", 1)[1] not in ("true", "false", "1", "0", "on", "off")


def test_resolve_replaces_each_placeholder_once() -> None:
    keys = {"admin": "a@abdoserve-key:x@", "x": "never"}
    assert resolve(f"={placeholder('admin')}:{placeholder('admin')}", keys) == (
        "=a@abdoserve-key:x@:a@abdoserve-key:x@"
    )


def test_a_key_name_is_plain() -> None:
    with pytest.raises(TritonKeysError):
        placeholder("Admin@")


def test_the_key_file_is_private_and_fresh(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o755)
    first = write_key_file({"admin": ADMIN, "loaded": "true"}, folder)
    second = write_key_file({"admin": ADMIN}, folder)
    assert first != second
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    assert first.read_text() == f"admin={ADMIN}\nloaded=true\n"


@pytest.mark.parametrize("value", ["", "two\nlines", "nul\0"])
def test_a_key_the_file_cannot_hold_is_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(TritonKeysError):
        write_key_file({"admin": value}, tmp_path)


def test_the_library_comes_first_in_ld_preload(tmp_path: Path) -> None:
    env = environment({"LD_PRELOAD": "libjemalloc.so"}, tmp_path / "k", tmp_path / "lib.so")
    assert env["LD_PRELOAD"] == f"{tmp_path / 'lib.so'}:libjemalloc.so"
    assert env[triton_keys.KEY_FILE_VARIABLE] == str(tmp_path / "k")
    assert environment({}, tmp_path / "k", tmp_path / "lib.so")["LD_PRELOAD"] == str(
        tmp_path / "lib.so"
    )


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every library "compiled" (an empty file written in the compiler's place)."""
    built: list[Path] = []

    def fake(source: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"")
        built.append(target)

    monkeypatch.setattr(triton_keys, "compile_library", fake)
    return built


def test_the_library_is_built_once_per_source(tmp_path: Path, compiled: list[Path]) -> None:
    source = tmp_path / "argv_keys.c"
    source.write_text("int a;\n")
    first = library(tmp_path / "cache", source)
    assert library(tmp_path / "cache", source) == first
    assert compiled == [first]
    source.write_text("int b;\n")
    second = library(tmp_path / "cache", source)
    assert second != first
    assert compiled == [first, second]


def test_an_images_prebuilt_library_is_used(
    tmp_path: Path, compiled: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LIBRARY_DIR_VARIABLE, str(tmp_path / "image"))
    found = library()
    assert found.parent == tmp_path / "image"
    assert library() == found
    assert compiled == [found]


def test_a_path_ld_preload_would_split_is_refused(tmp_path: Path, compiled: list[Path]) -> None:
    with pytest.raises(TritonKeysError, match="LD_PRELOAD"):
        library(tmp_path / "a folder")
    assert compiled == []


def test_without_a_compiler_the_error_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(TritonKeysError, match="install gcc"):
        triton_keys.compile_library(triton_keys.SOURCE, tmp_path / "lib.so")
    assert not (tmp_path / "lib.so").exists()
