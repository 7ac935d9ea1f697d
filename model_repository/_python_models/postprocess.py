"""<task>_postprocess: the prepared study through the network version its routing picks,
then the study-level answer.

Glue only. The version is `abdoserve.serving.routing`'s choice, called through BLS
(`abdoserve.serving.version_router`): every studies' calls of one batch are awaited
together, so that `<task>_net`'s dynamic batcher sees them at once. The answer is
`abdoserve.serving.answer.study_answer`, naming the version that ran. A companion
version (shadow, or production beside a canary) runs after, from a thread
(`abdoserve.serving.companion`). What arrived and what was answered are counted per
version for drift (`abdoserve.serving.drift_metrics`). Any client can call this model
directly, so its inputs are checked against the task spec first
(`abdoserve.serving.validation`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from abdoserve.serving import triton_adapter as glue
from abdoserve.serving import validation
from abdoserve.serving.answer import study_answer
from abdoserve.serving.companion import CompanionRunner
from abdoserve.serving.drift_metrics import DriftMetrics
from abdoserve.serving.metric_writer import MetricsOffPath, MetricWriter
from abdoserve.serving.net_versions import NetClient, NetFailed, VersionIdentities
from abdoserve.serving.routing import served_routing
from abdoserve.serving.routing_metrics import RoutingMetrics
from abdoserve.serving.version_router import VersionRouter


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        parameters, self.spec = glue.model_spec(pb_utils, args)
        net = NetClient(pb_utils, self.spec)
        net_folder = Path(args["model_repository"]).parent / net.net_model
        self.identities = VersionIdentities(self.spec.name, parameters, net_folder)
        # Metric updates are stub-to-server round trips: made after the response goes.
        self.metrics_writer = MetricWriter()
        measured = MetricsOffPath(pb_utils, self.metrics_writer)
        metrics = RoutingMetrics(measured, self.spec.name)
        self.drift = DriftMetrics(measured, self.spec.name, self.spec.output)
        self.router = VersionRouter(
            served_routing(parameters),
            net.call,
            metrics,
            CompanionRunner(self.spec.output, net.call_blocking, metrics),
        )

    async def execute(self, requests: list[Any]) -> list[Any]:
        return list(await asyncio.gather(*(self.handle(request) for request in requests)))

    async def handle(self, request: Any) -> Any:
        try:
            samples, features, sources, info = self.read(request)
            routed = await self.router.run(info.key, samples, features)
            study, answer = study_answer(
                self.spec,
                routed.output,
                sources.tolist(),
                self.identities[routed.version],
                info.roles,
            )
        except NetFailed as failed:
            return pb_utils.InferenceResponse(output_tensors=[], error=failed.triton_error)
        except Exception as error:
            return glue.error_response(pb_utils, error)
        self.drift.observe(routed.version, info.profile, study)
        self.router.compare_later(info.key, routed, samples, features, study)
        return glue.response(pb_utils, glue.answer_outputs(routed.output, study, answer))

    def read(self, request: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, validation.StudyInfo]:
        """One study's SAMPLES, FEATURES, SAMPLE_SOURCE and STUDY_INFO, checked against
        each other."""
        samples = glue.single_study(glue.require_input(pb_utils, request, "SAMPLES"), "SAMPLES")
        validation.check_samples(self.spec, samples)
        features = np.zeros(0, dtype=np.float32)
        if self.spec.feature_width:
            features = glue.single_study(
                glue.require_input(pb_utils, request, "FEATURES"), "FEATURES"
            )
            validation.check_features(self.spec, features)
        info = validation.study_info(
            self.spec,
            glue.single_study(glue.require_input(pb_utils, request, "STUDY_INFO"), "STUDY_INFO"),
        )
        sources = glue.single_study(
            glue.require_input(pb_utils, request, "SAMPLE_SOURCE"), "SAMPLE_SOURCE"
        )
        validation.check_sample_source(sources, samples.shape[0], info.instances)
        return samples, features, sources, info

    def finalize(self) -> None:
        self.router.companions.stop()
        self.metrics_writer.close()  # after the companions: they count too
