"""<task>_explain: the saliency maps of an answer, for the version that gave it.

Glue only: the work is `abdoserve.export.explain.Explainer`. It takes the ensemble's own
inputs (the DICOM in either form, CLINICAL) plus VERSION, the `<task>_net` version the
answer names; it asks that version again through BLS (`abdoserve.serving.net_versions`),
or in a fused build runs it in its own process (`abdoserve.serving.local_versions`), and
checks the PyTorch twin against it. Out: EXPLANATION (JSON), and per key image a
PNG and a DICOM Secondary Capture. Not part of the ensemble: an answer costs nothing more
unless its maps are asked for (docs/architecture.md, "Explanation maps").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from abdoserve.serving import dicom_input
from abdoserve.serving import triton_adapter as glue
from abdoserve.serving.intake import read_clinical
from abdoserve.serving.local_versions import LocalNets
from abdoserve.serving.net_versions import NetClient, NetFailed, VersionIdentities
from abdoserve.serving.task_models import VERSIONS_MODEL_PARAMETER


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        parameters, self.spec = glue.model_spec(pb_utils, args)
        repository = Path(args["model_repository"]).parent
        fused = parameters.get(VERSIONS_MODEL_PARAMETER)
        if fused:  # a fused build: the version runs here, as the fused model runs it
            self.folder = repository / fused
            local = LocalNets(pb_utils, self.spec, parameters, self.folder, (), open_on_demand=True)
            self.served = local.call_blocking
        else:
            net = NetClient(pb_utils, self.spec)
            self.folder = repository / net.net_model
            self.served = net.call_blocking
        self.identities = VersionIdentities(self.spec.name, parameters, self.folder)
        self.explainer: Any = None

    def explain(self) -> Any:
        """torch and captum are imported with the first request, not with every server
        (five stubs' worth of memory and start-up for maps nobody may ask for)."""
        if self.explainer is None:
            from abdoserve.export.explain import Explainer

            self.explainer = Explainer(
                self.spec, self.folder, self.identities.__getitem__, self.served
            )
        return self.explainer

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self.handle(request) for request in requests]

    def handle(self, request: Any) -> Any:
        try:
            explain = self.explain()
            from abdoserve.export.explain import read_version

            version = read_version(glue.require_input(pb_utils, request, "VERSION"))
            instances = dicom_input.read_instances(pb_utils, request, self.spec.limits)
            explanation = explain(instances, read_clinical(pb_utils, request, self.spec), version)
        except NetFailed as failed:
            return pb_utils.InferenceResponse(output_tensors=[], error=failed.triton_error)
        except Exception as error:  # every failure answers this request only
            return glue.error_response(pb_utils, error)
        return glue.response(
            pb_utils,
            {
                "EXPLANATION": glue.json_tensor(explanation.description),
                "PNG": np.array([explanation.pngs], dtype=np.object_),
                "CAPTURE": np.array([explanation.captures], dtype=np.object_),
            },
        )
