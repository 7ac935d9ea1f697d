"""The study a preprocess model decodes once before serving its first patient.

The repository build writes it into `<task>_preprocess/<version>/warmup/` (numbered
`.dcm` files and `clinical.json`); the model reads it at load. A hospital may put
an anonymised study of its own there instead. A study the intake refuses fails the
model load, so a broken spec or override is seen before any patient is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

WARMUP_FOLDER = "warmup"
CLINICAL_FILE = "clinical.json"


def write_warmup(
    version_folder: Path, instances: Sequence[bytes], clinical: Mapping[str, Any]
) -> Path:
    folder = version_folder / WARMUP_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for number, data in enumerate(instances):
        (folder / f"{number:04d}.dcm").write_bytes(data)
    (folder / CLINICAL_FILE).write_text(json.dumps(dict(clinical), sort_keys=True) + "\n")
    return folder


def read_warmup(version_folder: Path) -> tuple[list[bytes], dict[str, Any]] | None:
    """The warm-up study's instances (in file-name order) and clinical inputs, or None."""
    folder = version_folder / WARMUP_FOLDER
    instances = [path.read_bytes() for path in sorted(folder.glob("*.dcm"))]
    if not instances:
        return None
    clinical_path = folder / CLINICAL_FILE
    clinical = json.loads(clinical_path.read_text()) if clinical_path.is_file() else {}
    return instances, clinical
