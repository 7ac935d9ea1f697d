"""One study's explanation: the key images of the answer a version gave, each with a
saliency map computed on that version's PyTorch twin.

The study is prepared by the same `StudyPreparer` the preprocess model runs, so the
samples are the ones the network saw. The served version is asked again (`served`, a BLS
call of `<task>_net` at that version) and the twin must give its output (`twin.parity`);
the key images are chosen from the served output (`key_images`), the Grad-CAM maps taken
on the twin (`saliency`), brought back onto each source slice's pixel grid
(`geometry.to_source`, the inverse of the intake's resampling), drawn with their legend
(`render`) and written as Secondary Captures (`capture`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from abdoserve.export.explain import capture, render, saliency, twin
from abdoserve.export.explain.errors import VersionError
from abdoserve.export.explain.key_images import KeyImage, choose_key_images, explained_output
from abdoserve.preprocessing.arrangement import Image, arrange
from abdoserve.preprocessing.clinical import ROI_KEY
from abdoserve.preprocessing.geometry import to_source
from abdoserve.preprocessing.specs import TaskSpec
from abdoserve.preprocessing.study import PreparedStudy, StudyPreparer
from abdoserve.serving.answer import ModelIdentity, aggregate
from abdoserve_client.results import answer_number

# (version, samples, features) -> the served version's (n, K) output
Served = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Explanation:
    description: dict[str, Any]  # JSON-ready: key images by SOP Instance UID, values, method
    pngs: list[bytes]  # one per key image, in the description's order
    captures: list[bytes]  # the same pictures as DICOM Secondary Capture files


@dataclass(frozen=True, eq=False)
class _Study:
    prepared: PreparedStudy
    images: list[Image]  # the network's order: images[s] is sample s (or role s)
    served: np.ndarray  # (n, K)
    identity: ModelIdentity
    instances: Sequence[bytes]
    clinical: Mapping[str, Any]


class Explainer:
    """Explains studies for one task; the twins are loaded once per version."""

    def __init__(
        self,
        spec: TaskSpec,
        net_folder: Path,
        identities: Callable[[int], ModelIdentity],
        served: Served,
    ) -> None:
        self.spec = spec
        self.net_folder = net_folder
        self.identities = identities
        self.served = served
        self.prepare = StudyPreparer(spec)
        self._twins: dict[int, nn.Module] = {}

    def twin_of(self, version: int) -> nn.Module:
        if version not in self._twins:
            folder = self.net_folder / str(version)
            if version < 1 or not folder.is_dir():
                raise VersionError(f"{self.net_folder.name} has no version {version}")
            self._twins[version] = twin.load_twin(self.spec, folder)
        return self._twins[version]

    def __call__(
        self, instances: Sequence[bytes], clinical: Mapping[str, Any], version: int
    ) -> Explanation:
        network = self.twin_of(version)
        study = self._study(instances, clinical, version)
        prepared = study.prepared
        features = _repeated(prepared, self.spec)
        twin_values = saliency.twin_output(network, prepared.samples, features)
        checked = twin.parity(
            twin_values,
            study.served,
            study.identity.precision,
            version,
        )
        values = aggregate(self.spec.output, study.served)
        target = explained_output(self.spec, values)
        roles = dict(zip(prepared.roles, prepared.role_sources, strict=True))
        keys = choose_key_images(self.spec, study.served, prepared.sources.tolist(), roles)
        rows = sorted({key.sample for key in keys})
        maps = saliency.grad_cam(
            network,
            prepared.samples[rows],
            None if features is None else features[rows],
            target,
        )
        by_sample = {sample: maps.maps[index] for index, sample in enumerate(rows)}
        pictures = [
            self._picture(study, key, by_sample[key.sample], index=index, target=target)
            for index, key in enumerate(keys)
        ]
        twin_of = [float(twin_values[key.sample, target]) for key in keys]
        description = self._describe(
            study,
            checked,
            maps,
            values=values,
            target=target,
            pictures=pictures,
            twin_of=twin_of,
        )
        return Explanation(
            description,
            [picture.png for picture in pictures],
            [picture.capture for picture in pictures],
        )

    def _study(
        self, instances: Sequence[bytes], clinical: Mapping[str, Any], version: int
    ) -> _Study:
        prepared = self.prepare(instances, clinical)
        decoded = [self.prepare.decode(data, index) for index, data in enumerate(instances)]
        images = arrange(
            self.spec,
            [
                Image(item, number, frame)
                for item in decoded
                for number, frame in enumerate(item.frames)
            ],
        )
        served = self.served(version, prepared.samples, prepared.features)
        identity = self.identities(version)
        return _Study(prepared, images, np.asarray(served), identity, instances, clinical)

    def _picture(
        self, study: _Study, key: KeyImage, relevance: np.ndarray, *, index: int, target: int
    ) -> _Picture:
        # a role's image is images[role position]; a series' sample s is images[s]
        position = (
            self.spec.images.roles.index(key.why)
            if self.spec.images.stacking == "channels"
            else key.sample
        )
        image = study.images[position]
        frame = image.frame
        grid = self.prepare.grid_for(image, study.clinical.get(ROI_KEY))
        rows, columns = frame.pixels.shape[:2]
        on_source = to_source(relevance, grid, (int(rows), int(columns)))
        grey = render.display_slice(frame, self.spec, image.instance.inverted, key.instance)
        value = float(study.served[key.sample, target])
        lines = self._legend(study.identity, key, value, target)
        rgb, band = render.with_legend(render.overlay(grey, on_source), lines)
        header = capture.source_header(study.instances[key.instance])
        ids = capture.CaptureIds.derive(
            study.prepared.study_key, self.spec.name, int(study.identity.version), index
        )
        title = f"AbdoServe {self.spec.name} saliency" + (
            f" {render.NOT_FOR_CLINICAL_USE}" if study.identity.untrained else ""
        )
        return _Picture(
            key=key,
            uid=str(header.SOPInstanceUID),
            value=value,
            ids=ids,
            band_rows=band,
            legend=[line.text for line in lines],
            png=render.png(rgb),
            capture=capture.secondary_capture(header, rgb, ids, title),
            shape=(int(rgb.shape[0]), int(rgb.shape[1])),
            stats=_stats(on_source),
        )

    def _legend(
        self, identity: ModelIdentity, key: KeyImage, value: float, target: int
    ) -> list[render.LegendLine]:
        output = self.spec.output
        name = output.labels[target] if output.kind == "classification" else output.labels[0]
        unit = f" {output.unit}" if output.unit else ""
        lines = [
            render.LegendLine(f"{self.spec.title} ({self.spec.name})"),
            render.LegendLine(f"{name} {answer_number(value):g}{unit} ({key.why})"),
            render.LegendLine(
                f"model {identity.name} version {identity.version}, "
                f"weights {identity.weights_source}"
            ),
        ]
        if identity.untrained:
            lines.append(
                render.LegendLine(f"{render.NOT_FOR_CLINICAL_USE}: untrained weights", True)
            )
        lines.append(render.LegendLine(f"{saliency.METHOD}; {render.CAVEAT}"))
        return lines

    def _describe(
        self,
        study: _Study,
        checked: twin.Parity,
        maps: saliency.SaliencyMaps,
        *,
        values: np.ndarray,
        target: int,
        pictures: Sequence[_Picture],
        twin_of: Sequence[float],
    ) -> dict[str, Any]:
        identity = study.identity
        return {
            "task": self.spec.name,
            "model": identity.to_answer(),
            "version": identity.version,
            "method": saliency.METHOD,
            "layer": maps.layer,
            "explained_output": self.spec.output.labels[target]
            if self.spec.output.kind == "classification"
            else self.spec.output.labels[0],
            "caveat": render.CAVEAT,
            "notice": render.NOT_FOR_CLINICAL_USE if identity.untrained else None,
            "study_values": [answer_number(float(value)) for value in values],
            "twin": {"file": twin.TWIN_FILE, "precision": identity.precision, **checked.to_json()},
            "key_images": [
                {**picture.to_json(index), "twin_value": twin_value}
                for index, (picture, twin_value) in enumerate(zip(pictures, twin_of, strict=True))
            ],
        }


@dataclass(frozen=True, eq=False)
class _Picture:
    key: KeyImage
    uid: str  # the source's SOP Instance UID
    value: float
    ids: capture.CaptureIds
    band_rows: int
    legend: list[str]
    png: bytes
    capture: bytes
    shape: tuple[int, int]
    stats: dict[str, float]

    def to_json(self, index: int) -> dict[str, Any]:
        return {
            "n": index,
            "sop_instance_uid": self.uid,
            "instance": self.key.instance,
            "sample": self.key.sample,
            "why": self.key.why,
            "value": answer_number(self.value),
            "served_value": self.value,  # full precision, as SCORES carries it
            "capture_sop_instance_uid": self.ids.sop_uid,
            "capture_series_instance_uid": self.ids.series_uid,
            "rows": self.shape[0],
            "columns": self.shape[1],
            "legend_rows": self.band_rows,
            "legend": self.legend,
            "saliency": self.stats,
        }


def _stats(relevance: np.ndarray) -> dict[str, float]:
    """What a test or an auditor checks of a map: finite, spread, not constant."""
    return {
        "min": float(np.min(relevance)),
        "max": float(np.max(relevance)),
        "mean": float(np.mean(relevance)),
        "std": float(np.std(relevance)),
    }


def _repeated(prepared: PreparedStudy, spec: TaskSpec) -> np.ndarray | None:
    """The study's features, one row per sample (as `_net` repeats them)."""
    if not spec.feature_width:
        return None
    return np.repeat(prepared.features[None, :], len(prepared.samples), axis=0)
