"""Mutations of real DICOM files, for fuzzing the intake (property tests, served runs).

Each mutation is a pure function of the bytes and a few integers, so a property-based
test can draw the integers and a served run can take them from a seeded generator.
They aim where decoders break: truncations, flipped bytes, swapped VRs, lying lengths,
reordered tags, codestream headers and deflate streams.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

# Value representations as they appear in explicit VR element headers.
VRS = (
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OW PN SH SL SQ SS ST TM UC UI UL UN UR US UT"
).split()
_VR_AT = re.compile(b"(?<=[\\x00-\\xff]{4})(?:" + b"|".join(VRS) + b")")
_CODESTREAM = re.compile(b"\\xff\\x4f\\xff\\x51|\\xff\\xd8\\xff")
HEADER_BYTES = 64  # of a codestream: where the size and precision live


def _vr_positions(data: bytes) -> list[int]:
    return [match.start() for match in _VR_AT.finditer(data, 0, min(len(data), 1 << 16))]


def truncate(data: bytes, cut: int) -> bytes:
    """The first `cut % len(data)` bytes."""
    return data[: cut % max(len(data), 1)]


def flip_bytes(data: bytes, positions: list[int], values: list[int]) -> bytes:
    """XOR a few bytes (positions modulo the length) with non-zero values."""
    out = bytearray(data)
    for position, value in zip(positions, values, strict=False):
        out[position % len(out)] ^= (value % 255) + 1
    return bytes(out)


def swap_vr(data: bytes, which: int, vr: int) -> bytes:
    """Replace one element's VR with another (explicit VR files)."""
    positions = _vr_positions(data)
    if not positions:
        return data
    at = positions[which % len(positions)]
    return data[:at] + VRS[vr % len(VRS)] + data[at + 2 :]


def lie_about_length(data: bytes, which: int, length: int) -> bytes:
    """Overwrite one element's 2-byte length (short VRs) with another value."""
    positions = _vr_positions(data)
    if not positions:
        return data
    at = positions[which % len(positions)] + 2
    return data[:at] + (length % 65536).to_bytes(2, "little") + data[at + 2 :]


def swap_tags(data: bytes, first: int, second: int) -> bytes:
    """Exchange the tags of two elements: attributes out of order."""
    positions = [position - 4 for position in _vr_positions(data)]
    if len(positions) < 2:
        return data
    a, b = sorted((positions[first % len(positions)], positions[second % len(positions)]))
    if b - a < 4:
        return data
    out = bytearray(data)
    out[a : a + 4], out[b : b + 4] = data[b : b + 4], data[a : a + 4]
    return bytes(out)


def corrupt_codestream(data: bytes, offset: int, value: int) -> bytes:
    """Change one byte of a compressed frame's header (JPEG 2000 SIZ, JPEG SOF)."""
    match = _CODESTREAM.search(data)
    if match is None:
        return flip_bytes(data, [offset], [value])
    at = match.start() + offset % HEADER_BYTES
    return flip_bytes(data, [at], [value])


def corrupt_tail(data: bytes, offset: int, value: int) -> bytes:
    """Change one byte in the last half: a deflate stream's body, or the pixel data."""
    half = len(data) // 2
    return flip_bytes(data, [half + offset % max(len(data) - half, 1)], [value])


@dataclass(frozen=True)
class Mutation:
    name: str
    apply: Callable[[bytes, int, int], bytes]


MUTATIONS = (
    Mutation("truncate", lambda data, a, _: truncate(data, a)),
    Mutation("flip", lambda data, a, b: flip_bytes(data, [a, a * 7 + b, b], [b, a, a ^ b])),
    Mutation("swap_vr", swap_vr),
    Mutation("lie_about_length", lie_about_length),
    Mutation("swap_tags", swap_tags),
    Mutation("corrupt_codestream", corrupt_codestream),
    Mutation("corrupt_tail", corrupt_tail),
)


def random_mutation(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One mutation with random parameters, for served runs without hypothesis."""
    mutation = rng.choice(MUTATIONS)
    return mutation.name, mutation.apply(data, rng.randrange(1 << 20), rng.randrange(1 << 20))
