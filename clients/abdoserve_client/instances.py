"""Turning what a caller holds (bytes, file paths, study folders) into DICOM instances."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Written next to the DICOM files by `abdoserve phantom`; never sent as instances.
REQUEST_FILE = "request.json"
SIDE_FILES = frozenset({REQUEST_FILE, "truth.json"})

Instance = bytes | bytearray | memoryview | str | os.PathLike[str]


def folder_files(folder: Path) -> list[Path]:
    """Every regular file in `folder` (not recursive), sorted by name, without the
    side files and hidden files."""
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and path.name not in SIDE_FILES and not path.name.startswith(".")
    )


def load_instances(items: Iterable[Instance]) -> list[bytes]:
    """Bytes pass through; a path is read; a folder contributes every file in it."""
    loaded: list[bytes] = []
    for item in items:
        if isinstance(item, bytes):
            loaded.append(item)  # no copy: a study can be tens of MB
            continue
        if isinstance(item, bytearray | memoryview):
            loaded.append(bytes(item))
            continue
        path = Path(item)
        if path.is_dir():
            loaded.extend(file.read_bytes() for file in folder_files(path))
        else:
            loaded.append(path.read_bytes())
    return loaded


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The files a list of files and folders stands for, in order."""
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        files.extend(folder_files(path) if path.is_dir() else [path])
    return files


def folder_request(paths: Iterable[str | os.PathLike[str]]) -> dict[str, Any]:
    """Clinical inputs from the first folder among `paths` that holds a request.json."""
    for item in paths:
        candidate = Path(item) / REQUEST_FILE
        if Path(item).is_dir() and candidate.is_file():
            return read_clinical_json(candidate)
    return {}


def read_clinical_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a JSON object of clinical inputs")
    return content
