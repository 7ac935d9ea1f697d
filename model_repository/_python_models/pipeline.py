"""<task> as one Python model (the fused CPU pipeline): DICOM in, the study's answer out.

The same public contract as the ensemble (inputs DICOM or DICOM_PACKED + DICOM_OFFSETS,
CLINICAL; outputs SCORES, STUDY, ANSWER; the task's published parameters), the same
code at each step: `StudyIntake`, the CPU runtime (`open_runner`), then
`study_answer`. What it saves is the two Python-backend hops of the ensemble: the
samples and the network's output no longer cross shared memory between three stub
processes. Every queued request's study is prepared in turn, then the studies run as
one network batch per version; a request the intake refuses answers alone.

Versions: the model holds the network versions its routing needs (the `routing`
parameter, as the ensemble's postprocess model has it), opened from the numbered
folders beside its own (`abdoserve.serving.local_versions`), and routes each study as
the postprocess model does (`abdoserve.serving.version_router`): canary by the study's
key, a failing candidate's studies answered by production, a companion version run
after the answer from a thread. Every answer names the version that ran; what arrived
and what was answered are counted per version for drift.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

from abdoserve.preprocessing.study import PreparedStudy
from abdoserve.serving import triton_adapter as glue
from abdoserve.serving.answer import study_answer
from abdoserve.serving.companion import CompanionRunner
from abdoserve.serving.drift_metrics import DriftMetrics
from abdoserve.serving.intake import StudyIntake
from abdoserve.serving.local_versions import LocalNets
from abdoserve.serving.metric_writer import MetricsOffPath, MetricWriter
from abdoserve.serving.net_versions import NetFailed, VersionIdentities
from abdoserve.serving.routing import served_routing
from abdoserve.serving.routing_metrics import RoutingMetrics
from abdoserve.serving.version_router import Routed, VersionRouter


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        parameters, self.spec = glue.model_spec(pb_utils, args)
        folder = Path(args["model_repository"])
        version_folder = folder / args["model_version"]
        routing = served_routing(parameters)
        self.nets = LocalNets(
            pb_utils, self.spec, parameters, folder, routing.versions(time.time())
        )
        self.identities = VersionIdentities(self.spec.name, parameters, folder)
        # Metric updates are stub-to-server round trips: made after the response goes.
        self.metrics_writer = MetricWriter()
        measured = MetricsOffPath(pb_utils, self.metrics_writer)
        metrics = RoutingMetrics(measured, self.spec.name)
        self.router = VersionRouter(
            routing,
            self.nets.call,
            metrics,
            CompanionRunner(self.spec.output, self.nets.call_blocking, metrics),
        )
        self.intake = StudyIntake(measured, self.spec, version_folder)
        self.drift = DriftMetrics(measured, self.spec.name, self.spec.output)
        self.model_name = str(args["model_name"])

    def execute(self, requests: list[Any]) -> list[Any]:
        started = time.perf_counter()
        responses = self.respond_all(requests)
        self.intake.metrics.executed(self.model_name, time.perf_counter() - started)
        return responses

    def respond_all(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        positions, studies = [], []
        for position, request in enumerate(requests):
            try:
                prepared = self.intake(request)[1]
            except Exception as error:  # this request only
                responses[position] = glue.error_response(pb_utils, error)
                continue
            # Decoding is the long step: a client gone meanwhile gets no network run, as
            # the ensemble stops a cancelled request between its steps. (Triton drops a
            # request cancelled while queued itself; one check costs ~55 us of stub IPC.)
            if self.abandoned(request):
                responses[position] = glue.cancelled_response(pb_utils)
                continue
            positions.append(position)
            studies.append(prepared)
        if studies:
            for position, reply in zip(positions, self.answer(studies), strict=True):
                responses[position] = reply
        return responses

    def abandoned(self, request: Any) -> bool:
        """Whether the client cancelled or went away; counted, since Triton counts the
        error response of a Python model as a success."""
        if not request.is_cancelled():
            return False
        self.intake.metrics.cancelled()
        return True

    def answer(self, studies: list[PreparedStudy]) -> list[Any]:
        """Responses for the prepared studies, in order; a failed run fails its studies."""
        try:
            routed = self.router.run_batch(
                [study.study_key for study in studies],
                [study.samples for study in studies],
                [study.features for study in studies],
                self.nets.run,
            )
        except Exception as error:  # never raised out of execute
            return [self.failed(error) for _ in studies]
        return [self.respond(study, result) for study, result in zip(studies, routed, strict=True)]

    def failed(self, error: Exception) -> Any:
        """A study that failed past its intake: counted as an internal error, since Triton
        counts a Python model's error response as a success (the ensemble's own
        counters see it fail)."""
        self.intake.metrics.rejected(error)
        return glue.error_response(pb_utils, error)

    def respond(self, prepared: PreparedStudy, result: Routed | NetFailed) -> Any:
        if isinstance(result, NetFailed):
            self.intake.metrics.failed_internally()
            return pb_utils.InferenceResponse(output_tensors=[], error=result.triton_error)
        roles = dict(zip(prepared.roles, prepared.role_sources, strict=True))
        try:
            study, answer = study_answer(
                self.spec,
                result.output,
                prepared.sources.tolist(),
                self.identities[result.version],
                roles,
            )
        except Exception as error:
            return self.failed(error)
        self.drift.observe(result.version, prepared.profile, study)
        self.router.compare_later(
            prepared.study_key, result, prepared.samples, prepared.features, study
        )
        return glue.response(pb_utils, glue.answer_outputs(result.output, study, answer))

    def finalize(self) -> None:
        self.router.companions.stop()
        self.metrics_writer.close()  # after the companions: they count too
        self.intake.release()
        self.nets = None  # type: ignore[assignment]
