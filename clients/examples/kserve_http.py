#!/usr/bin/env python3
"""Send one DICOM study to AbdoServe over plain KServe v2 HTTP, standard library only.

    python kserve_http.py --url http://127.0.0.1:8000 bone_density_ct study/*.dcm
    python kserve_http.py liver_fibrosis_ct study/ --clinical '{"age": 61, "sex": "F"}'

This is what a client in any language does, written out: one POST to
`/v2/models/<task>/infer` using Triton's binary-data extension. The body is a JSON
header (its length in the `Inference-Header-Content-Length` HTTP header) followed
by each input tensor's raw bytes, in the order the header lists them. A BYTES
tensor's raw bytes are its elements, each prefixed by its length as a 4-byte
little-endian integer. The response has the same layout: a JSON header, then
each output asked for as binary, in the order of the header's `outputs`.

Only DICOM is sent unless --clinical is given: bone_density_ct and
esophageal_cancer_ct take no clinical inputs, and the others refuse a request
without CLINICAL (HTTP 400). Prints the ANSWER JSON; exit status 0 answered,
2 refused as invalid (HTTP 400), 1 any other error.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HEADER_LENGTH = "Inference-Header-Content-Length"
OUTPUTS = ("ANSWER", "STUDY")
SIDE_FILES = frozenset({"request.json", "truth.json"})  # written beside phantom studies
EXIT_OK, EXIT_ERROR, EXIT_INVALID = 0, 1, 2

Outputs = dict[str, bytes | list[Any]]


def bytes_tensor(elements: Sequence[bytes]) -> bytes:
    """A BYTES tensor's raw contents: each element as a 4-byte LE length, then its bytes."""
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


def bytes_elements(raw: bytes) -> list[bytes]:
    """The elements of a BYTES tensor's raw contents (the inverse of `bytes_tensor`)."""
    elements, offset = [], 0
    while offset < len(raw):
        (size,) = struct.unpack_from("<I", raw, offset)
        elements.append(raw[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return elements


def float32_values(raw: bytes) -> list[float]:
    """An FP32 tensor's raw contents (little-endian) as Python floats, row-major."""
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def encode_request(
    instances: Sequence[bytes], clinical: Mapping[str, Any] | None, outputs: Sequence[str]
) -> tuple[bytes, int]:
    """(request body, JSON header length): DICOM [1, n], CLINICAL [1, 1] only if given."""
    tensors = [("DICOM", list(instances))]
    if clinical is not None:
        tensors.append(("CLINICAL", [json.dumps(dict(clinical)).encode()]))
    blobs = [bytes_tensor(elements) for _, elements in tensors]
    header = {
        "inputs": [
            {
                "name": name,
                "shape": [1, len(elements)],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(blob)},
            }
            for (name, elements), blob in zip(tensors, blobs, strict=True)
        ],
        "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in outputs],
    }
    head = json.dumps(header).encode()
    return b"".join([head, *blobs]), len(head)


def decode_response(body: bytes, header_length: int) -> Outputs:
    """Each output's raw bytes (binary) or its JSON `data` list, by name."""
    header = json.loads(body[:header_length])
    offset = header_length
    outputs: Outputs = {}
    for output in header.get("outputs", []):
        size = output.get("parameters", {}).get("binary_data_size")
        if size is None:
            outputs[output["name"]] = list(output.get("data", []))
            continue
        outputs[output["name"]] = body[offset : offset + size]
        offset += size
    return outputs


def infer(
    url: str,
    task: str,
    instances: Sequence[bytes],
    clinical: Mapping[str, Any] | None = None,
    timeout: float = 30,
    *,
    outputs: Sequence[str] = OUTPUTS,
) -> Outputs:
    """POST one study; raises `urllib.error.HTTPError` when the server refuses it."""
    body, header_length = encode_request(instances, clinical, outputs)
    request = urllib.request.Request(
        f"{url.rstrip('/')}/v2/models/{urllib.parse.quote(task)}/infer",
        data=body,
        method="POST",
        headers={HEADER_LENGTH: str(header_length), "Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        reply: bytes = response.read()
        length = int(response.headers.get(HEADER_LENGTH) or len(reply))
    return decode_response(reply, length)


def answer_json(outputs: Outputs) -> dict[str, Any]:
    """The ANSWER output (one BYTES element holding a JSON object) as a dict."""
    raw = outputs["ANSWER"]
    element = bytes_elements(raw)[0] if isinstance(raw, bytes) else str(raw[0]).encode()
    answer: dict[str, Any] = json.loads(element)
    return answer


def server_error(error: urllib.error.HTTPError) -> dict[str, Any]:
    """The server's error body (`{"error": "..."}`), or the raw text wrapped the same way."""
    text = error.read().decode(errors="replace")
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    return document if isinstance(document, dict) else {"error": text}


def study_files(paths: Sequence[Path]) -> list[Path]:
    """Files as given; a folder contributes its files sorted by name (no side files)."""
    files: list[Path] = []
    for path in paths:
        if not path.is_dir():
            files.append(path)
            continue
        files.extend(
            item
            for item in sorted(path.iterdir())
            if item.is_file() and item.name not in SIDE_FILES and not item.name.startswith(".")
        )
    return files


def json_object(text: str) -> dict[str, Any]:
    """--clinical: a JSON object, else argparse's usage error."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Send one DICOM study to AbdoServe over KServe v2 HTTP."
    )
    parser.add_argument("task", help="e.g. bone_density_ct")
    parser.add_argument("paths", nargs="+", type=Path, help="DICOM files or study folders")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="default %(default)s")
    parser.add_argument("--clinical", type=json_object, help="CLINICAL as a JSON object")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    try:
        instances = [path.read_bytes() for path in study_files(args.paths)]
    except OSError as error:
        print(f"cannot read the study: {error}", file=sys.stderr)
        return EXIT_INVALID
    try:
        outputs = infer(args.url, args.task, instances, args.clinical, args.timeout)
    except urllib.error.HTTPError as error:
        print(json.dumps(server_error(error)), file=sys.stderr)
        return EXIT_INVALID if error.code == 400 else EXIT_ERROR
    except (urllib.error.URLError, OSError) as error:
        print(f"cannot reach {args.url}: {error}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(answer_json(outputs), indent=2))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
