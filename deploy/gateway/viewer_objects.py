"""What a viewer shows beside the SR: the explanation maps and the key images.

After an answer, the gateway asks the server for the maps of the version that answered
(`<task>_explain`, through the client), then

- writes each PNG and the server's description under the spool's results folder,
  `results/<study>/<key>.explain/<n>.png` and `explanation.json` (the worklist page shows
  them from there);
- builds a Key Object Selection document (highdicom) that names the key source images
  and the Secondary Captures made of them, every reference to an instance the PACS gets:
  the sources came from the modality, the captures go with the KOS;
- queues the captures, then the KOS, to every destination of the SR.

The SR is queued first and never waits on this: a failure here is logged (UIDs and the
error's type only), counted in `abdoserve_gateway_explanation_failures_total`, and the
request still ends answered. Off with `abdoserve gateway --no-explanation-maps`.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from abdoserve.deploy.gateway.metrics import GatewayMetrics
from abdoserve.deploy.gateway.sender import Destination
from abdoserve.deploy.gateway.spool import Spool
from abdoserve_client.explanation import DESCRIPTION_FILE, Explanation
from abdoserve_client.results import StudyResult

log = logging.getLogger("abdoserve.gateway")

# (task, instances, the answer, clinical) -> its maps, raising the client's errors
Explain = Callable[[str, Sequence[bytes], StudyResult, Mapping[str, Any]], Explanation]
KOS_SERIES_NUMBER = 9903  # after the SR (9901) and the captures (9902)
NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"
EXPLAIN_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class AnsweredRequest:
    """What the maps of one answered request need: where it goes and what it was."""

    study_uid: str
    key: str  # the routed request's key (processing.request_key)
    task: str
    files: Sequence[Path]  # the instances sent, in order
    clinical: Mapping[str, Any]
    result: StudyResult
    sources: Sequence[Dataset]  # headers of `files`, in order


class ViewerObjects:
    """Makes, keeps and queues one answered request's maps and key-object selection."""

    def __init__(
        self,
        spool: Spool,
        metrics: GatewayMetrics,
        destinations: Sequence[Destination],
        explain: Explain,
    ) -> None:
        self.spool = spool
        self.metrics = metrics
        self.destinations = tuple(destinations)
        self.explain = explain

    def send(self, answered: AnsweredRequest) -> dict[str, Any] | None:
        """Queue the captures and the KOS; their UIDs for the outcome record, or None
        where no maps could be made (logged and counted; the SR is already queued)."""
        try:
            instances = [file.read_bytes() for file in answered.files]
            explanation = self.explain(answered.task, instances, answered.result, answered.clinical)
            captures = [pydicom.dcmread(io.BytesIO(data)) for data in explanation.captures]
            kos = key_object_selection(answered, explanation, captures)
            self._keep(answered, explanation)
            self._queue(answered, [*explanation.captures, encode(kos)], [*captures, kos])
        except Exception as error:  # never lose the SR for a map: said, counted, moved on
            self.metrics.explanation_failures.labels(answered.task).inc()
            log.error(
                "study %s: %s maps not made (%s); the report went without them",
                answered.study_uid,
                answered.task,
                type(error).__name__,
            )
            return None
        self.metrics.explanations_sent.labels(answered.task).inc()
        return {
            "version": explanation.version,
            "captures": [str(item.SOPInstanceUID) for item in captures],
            "key_object_selection": str(kos.SOPInstanceUID),
        }

    def _keep(self, answered: AnsweredRequest, explanation: Explanation) -> None:
        folder = f"{answered.key}.explain"
        for number, picture in enumerate(explanation.pngs):
            self.spool.write_result(answered.study_uid, f"{folder}/{number}.png", picture)
        text = _description_text(explanation)
        self.spool.write_result(answered.study_uid, f"{folder}/{DESCRIPTION_FILE}", text)

    def _queue(
        self, answered: AnsweredRequest, encoded: Sequence[bytes], objects: Sequence[Dataset]
    ) -> None:
        meta = {"study_uid": answered.study_uid, "task": answered.task, "kind": "explanation"}
        for destination in self.destinations:
            for data, item in zip(encoded, objects, strict=True):
                self.spool.enqueue(destination.name, str(item.SOPInstanceUID), data, meta)


def key_object_selection(
    answered: AnsweredRequest, explanation: Explanation, captures: Sequence[Dataset]
) -> KeyObjectSelectionDocument:
    """The KOS: the key source images, then each one's capture ("Of Interest")."""
    by_uid = {str(item.SOPInstanceUID): item for item in answered.sources}
    keys = explanation.description["key_images"]
    images = [by_uid[str(key["sop_instance_uid"])] for key in keys]
    unique = list({str(item.SOPInstanceUID): item for item in images}.values())
    referenced = [*unique, *captures]
    untrained = f" {NOT_FOR_CLINICAL_USE}" if explanation.untrained else ""
    content = KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=referenced,
        description=(
            f"AbdoServe {answered.task} version {explanation.version}: key images and "
            f"saliency maps; a saliency map is not a localisation.{untrained}"
        ),
    )
    study_uid = str(answered.sources[0].StudyInstanceUID)
    document = KeyObjectSelectionDocument(
        evidence=referenced,
        content=content,
        series_instance_uid=_derived_uid("series", study_uid, answered.task),
        series_number=KOS_SERIES_NUMBER,
        sop_instance_uid=_derived_uid("kos", study_uid, answered.key, explanation.version),
        instance_number=1,
        manufacturer="AbdoServe",
    )
    document.SeriesDescription = f"AbdoServe {answered.task} key images{untrained}"[:64]
    return document


def _derived_uid(kind: str, *parts: str) -> str:
    # the same request explained again gives the same KOS, which a PACS treats as one
    return str(generate_uid(entropy_srcs=["\n".join(("abdoserve-gateway-kos", kind, *parts))]))


def _description_text(explanation: Explanation) -> bytes:
    return (json.dumps(explanation.description, indent=2, sort_keys=True) + "\n").encode()


def encode(document: Dataset) -> bytes:
    buffer = io.BytesIO()
    document.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def client_explain(url: str, options: Mapping[str, Any]) -> Explain:
    """`Explain` through one `AbdoServeClient` per worker thread (each holds its channels).
    Its deadline is at least `EXPLAIN_TIMEOUT_S`: the maps are a second, slower pass."""
    from abdoserve_client.client import AbdoServeClient

    local = threading.local()
    options = {**options, "timeout_s": max(EXPLAIN_TIMEOUT_S, options.get("timeout_s", 0.0))}

    def explain(
        task: str, instances: Sequence[bytes], result: StudyResult, clinical: Mapping[str, Any]
    ) -> Explanation:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = AbdoServeClient(url, **options)
        return client.explain(task, instances, result, clinical)

    return explain
