"""Request payloads, prepared once per process before any timed call.

A payload kind is a task name (a pool of phantom studies of realistic size:
512x512 slices, the slice counts the papers describe) or one of `BAD_KINDS`
(requests the server must refuse with INVALID_ARGUMENT). Inputs are serialised
here, once; the timed call goes through `AbdoServeClient.infer`, the path a
hospital's code takes (its request encoder is `abdoserve_client.wire`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from abdoserve.export.phantom import TASK_NAMES, build_study

BAD_PAYLOAD_PREFIX = "bad_payload/"


@dataclass(frozen=True)
class Payload:
    """One request: the name locust reports it under, the model it goes to, its inputs."""

    name: str
    model: str
    instances: tuple[bytes, ...]
    clinical: Mapping[str, Any]
    size_bytes: int


def study_payload(task: str, seed: int) -> Payload:
    study = build_study(task, seed=seed)
    return _payload(task, task, study.instances, study.clinical)


def not_dicom(seed: int) -> Payload:
    """Bytes that are no DICOM file at all (a JPEG-looking header, then text)."""
    junk = b"\xff\xd8\xff\xe0" + f"not a DICOM file, seed {seed}\n".encode() * 256
    return _payload(f"{BAD_PAYLOAD_PREFIX}not_dicom", "bone_density_ct", (junk,), {})


def truncated(seed: int) -> Payload:
    """A real study whose first instance stops halfway through its pixel data."""
    study = build_study("liver_fibrosis_ct", seed=seed)
    first, *rest = study.instances
    instances = (first[: len(first) // 2], *rest)
    return _payload(
        f"{BAD_PAYLOAD_PREFIX}truncated", "liver_fibrosis_ct", instances, study.clinical
    )


BAD_KINDS: dict[str, Callable[[int], Payload]] = {"not_dicom": not_dicom, "truncated": truncated}
KINDS = (*TASK_NAMES, *BAD_KINDS)


@functools.cache
def payload_pool(kind: str, size: int) -> tuple[Payload, ...]:
    """`size` payloads of `kind` (seeds 1..size), built on first use and then shared."""
    if size < 1:
        raise ValueError("a payload pool holds at least one payload")
    if kind in BAD_KINDS:
        return tuple(BAD_KINDS[kind](seed) for seed in range(1, size + 1))
    if kind not in TASK_NAMES:
        raise ValueError(f"unknown payload kind {kind!r}; known: {', '.join(KINDS)}")
    return tuple(study_payload(kind, seed) for seed in range(1, size + 1))


def _payload(
    name: str, model: str, instances: Sequence[bytes], clinical: dict[str, object]
) -> Payload:
    size = sum(len(item) for item in instances)
    return Payload(name, model, tuple(instances), MappingProxyType(dict(clinical)), size)
