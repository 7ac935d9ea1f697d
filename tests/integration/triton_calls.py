"""Raw gRPC calls for the integration tests (the public client has tests of its own)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

OUTPUTS = ("SCORES", "STUDY", "ANSWER")


@dataclass(frozen=True)
class Served:
    scores: np.ndarray
    study: np.ndarray
    answer: dict[str, Any]


def request_inputs(
    instances: Sequence[bytes], clinical: Mapping[str, object]
) -> list[grpcclient.InferInput]:
    dicom = grpcclient.InferInput("DICOM", [1, len(instances)], "BYTES")
    dicom.set_data_from_numpy(np.array([list(instances)], dtype=np.object_))
    clinical_input = grpcclient.InferInput("CLINICAL", [1, 1], "BYTES")
    clinical_input.set_data_from_numpy(
        np.array([[json.dumps(dict(clinical)).encode()]], dtype=np.object_)
    )
    return [dicom, clinical_input]


def infer(
    client: grpcclient.InferenceServerClient,
    task: str,
    instances: Sequence[bytes],
    clinical: Mapping[str, object],
) -> Served:
    result = client.infer(
        task,
        request_inputs(instances, clinical),
        outputs=[grpcclient.InferRequestedOutput(name) for name in OUTPUTS],
        client_timeout=120,
    )
    return Served(
        scores=result.as_numpy("SCORES")[0],
        study=result.as_numpy("STUDY")[0],
        answer=json.loads(result.as_numpy("ANSWER")[0, 0]),
    )


def decoding_stubs(found: Mapping[int, Any], task: str) -> list[int]:
    """The pids of the stubs that decode `task`'s DICOM (`found`: `stubs.stubs_of`): its
    fused model's (`serve`'s default) or, in the ensemble, its preprocess model's."""
    return [pid for pid, stub in found.items() if stub.model in (task, f"{task}_preprocess")]
