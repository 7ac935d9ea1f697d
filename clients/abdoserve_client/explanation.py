"""An answer's explanation maps, as the `<task>_explain` model returns them.

The server computes them beside the answer, for the version the answer names
(docs/architecture.md, "Explanation maps"): per key image a PNG and a DICOM Secondary
Capture (bytes, never parsed here: the client has no DICOM library), and one JSON
description of the key images, values, method and the twin's parity figure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from abdoserve_client.errors import ResponseError
from abdoserve_client.wire import WireTensor

OUTPUT_NAMES = ("EXPLANATION", "PNG", "CAPTURE")
DESCRIPTION_FILE = "explanation.json"


def explain_model(task: str) -> str:
    return f"{task}_explain"


@dataclass(frozen=True, eq=False)
class Explanation:
    """`description`: the server's JSON (its `key_images[n]` describes `pngs[n]` and
    `captures[n]`); `version`: the network version the maps were computed for."""

    task: str
    version: str
    description: Mapping[str, Any] = field(repr=False)
    pngs: tuple[bytes, ...] = field(repr=False)
    captures: tuple[bytes, ...] = field(repr=False)

    @property
    def untrained(self) -> bool:
        return bool(self.description.get("notice"))

    def write(self, folder: Path) -> list[Path]:
        """`<n>.png`, `<n>.dcm` per key image and `explanation.json` into `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for number, (picture, capture) in enumerate(zip(self.pngs, self.captures, strict=True)):
            for suffix, data in ((".png", picture), (".dcm", capture)):
                path = folder / f"{number}{suffix}"
                path.write_bytes(data)
                written.append(path)
        path = folder / DESCRIPTION_FILE
        path.write_text(json.dumps(self.description, indent=2, sort_keys=True) + "\n")
        return [*written, path]


def version_tensor(version: str) -> WireTensor:
    """VERSION INT32 [1, 1]: the `<task>_net` version whose answer is explained."""
    try:
        number = int(version)
    except ValueError as error:
        raise ResponseError(f"the answer names no version number ({version!r})") from error
    return WireTensor("VERSION", "INT32", (1, 1), [np.array([number], "<i4").tobytes()])


def parse_explanation(task: str, version: str, response: Any) -> Explanation:
    arrays = {name: response.as_numpy(name) for name in OUTPUT_NAMES}
    missing = [name for name, array in arrays.items() if array is None]
    if missing:
        raise ResponseError(f"the explanation lacks {', '.join(missing)}")
    text = _elements(arrays["EXPLANATION"])
    if len(text) != 1:
        raise ResponseError(f"EXPLANATION holds {len(text)} elements; expected 1")
    description = json.loads(text[0])
    pngs, captures = _elements(arrays["PNG"]), _elements(arrays["CAPTURE"])
    keys = description.get("key_images", [])
    if not len(pngs) == len(captures) == len(keys):
        raise ResponseError(
            f"{len(keys)} key images described, {len(pngs)} PNG and {len(captures)} DICOM sent"
        )
    return Explanation(task, version, description, tuple(pngs), tuple(captures))


def _elements(array: np.ndarray) -> Sequence[bytes]:
    return [item if isinstance(item, bytes) else bytes(item) for item in array.reshape(-1)]
