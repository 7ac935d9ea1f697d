"""Triton model configs for one task, rendered from its spec.

The spec is the single source of truth: a hospital override of the matrix or the
clinical inputs changes the tensor dims here, the ONNX graph and the client alike.
The committed `model_repository/*/config.pbtxt` files are these renderings for
the default specs; a contract test keeps them identical.

Tensor contract (the ensemble is the public entry point):
  <task>              DICOM (BYTES [-1]) or DICOM_PACKED (UINT8 [-1]) + DICOM_OFFSETS
                      (INT64 [-1]), CLINICAL (BYTES [1], JSON; optional where the
                      task has no clinical inputs)
                      -> SCORES (FP32 [-1, K]), STUDY (FP32 [K]), ANSWER (BYTES [1], JSON)
  <task>_preprocess   -> SAMPLES (FP32 [-1, C, M, M]), FEATURES (FP32 [F], if F > 0),
                         SAMPLE_SOURCE (INT32 [-1]), STUDY_INFO (BYTES [1], JSON)
  <task>_postprocess  SAMPLES, FEATURES, SAMPLE_SOURCE, STUDY_INFO -> SCORES, STUDY, ANSWER
                      (it calls the version of <task>_net its routing picks, via BLS)
  <task>_net          SAMPLES, FEATURES -> OUTPUT (FP32 [-1, K]), one or more versions
  <task>_explain      the ensemble's inputs + VERSION (INT32 [1]) -> EXPLANATION (BYTES [1],
                      JSON), PNG and CAPTURE (BYTES [-1], one per key image); beside the
                      ensemble, called after an answer (abdoserve.export.explain)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from abdoserve.preprocessing.clinical import ROI_KEY
from abdoserve.preprocessing.specs import RoiCrop, TaskSpec

MAX_BATCH_SIZE = 8
FP32 = mc.DataType.TYPE_FP32
INT32 = mc.DataType.TYPE_INT32
BYTES = mc.DataType.TYPE_STRING
UINT8 = mc.DataType.TYPE_UINT8
INT64 = mc.DataType.TYPE_INT64


@dataclass(frozen=True)
class Tuning:
    """Scheduling knobs an operator sets per deployment (see docs/benchmarks.md)."""

    preprocess_instances: int = 2
    net_instances: int = 2
    postprocess_instances: int = 1
    net_intra_op_threads: int = 2
    max_queue_delay_us: int = 0
    max_samples_per_run: int = 64
    # Studies queued at a task's preprocess model beyond which Triton answers UNAVAILABLE
    # (clients retry with backoff): bounds the DICOM bytes held under overload. 0: no bound.
    max_queue_size: int = 128


def model_names(task: str) -> tuple[str, str, str, str]:
    return task, f"{task}_preprocess", f"{task}_net", f"{task}_postprocess"


def explain_name(task: str) -> str:
    """The task's explanation model, beside the ensemble (not one of its steps)."""
    return f"{task}_explain"


def render_task(
    spec: TaskSpec, tuning: Tuning | None = None, provenance: Mapping[str, str] | None = None
) -> dict[str, mc.ModelConfig]:
    """All four configs of a task, by model name."""
    ensemble, preprocess, net, postprocess = model_names(spec.name)
    weights = dict(provenance or {})
    tuning = tuning or Tuning()
    return {
        ensemble: ensemble_config(spec, weights),
        preprocess: preprocess_config(spec, tuning),
        net: net_config(spec, tuning, weights),
        postprocess: postprocess_config(spec, tuning, weights),
        explain_name(spec.name): explain_config(spec, weights),
    }


def to_text(config: mc.ModelConfig) -> str:
    return str(text_format.MessageToString(config))


def ensemble_config(spec: TaskSpec, provenance: Mapping[str, str]) -> mc.ModelConfig:
    _, preprocess, _, postprocess = model_names(spec.name)
    config = mc.ModelConfig(name=spec.name, platform="ensemble", max_batch_size=MAX_BATCH_SIZE)
    config.input.extend(_public_inputs(spec))
    config.output.extend(_public_outputs(spec))
    steps = config.ensemble_scheduling.step
    prepared = ["SAMPLES", "SAMPLE_SOURCE", "STUDY_INFO"] + (
        ["FEATURES"] if spec.feature_width else []
    )
    steps.add(
        model_name=preprocess,
        model_version=-1,
        input_map={name: name for name in PUBLIC_INPUTS},
        output_map={name: name.lower() for name in prepared},
    )
    # No `_net` step: the postprocess model calls the version its routing picks.
    steps.add(
        model_name=postprocess,
        model_version=-1,
        input_map={name: name.lower() for name in prepared},
        output_map={"SCORES": "SCORES", "STUDY": "STUDY", "ANSWER": "ANSWER"},
    )
    _parameters(config, {**describe_task(spec), **provenance})
    return config


PUBLIC_INPUTS = ("DICOM", "DICOM_PACKED", "DICOM_OFFSETS", "CLINICAL")


def describe_task(spec: TaskSpec) -> dict[str, str]:
    """What a client needs to read the answer, published in the ensemble's config."""
    output = spec.output
    return {
        "task": spec.name,
        "title": spec.title,
        "paper": spec.paper,
        "output_kind": output.kind,
        "labels": json.dumps(list(output.labels)),
        "label_descriptions": json.dumps(list(output.descriptions)),
        "unit": output.unit,
        "clinical_inputs": json.dumps(clinical_input_names(spec)),
        "images": json.dumps(
            {
                "roles": list(spec.images.roles),
                "min": spec.images.min_images,
                "max": spec.images.max_images,
            }
        ),
    }


def preprocess_config(spec: TaskSpec, tuning: Tuning) -> mc.ModelConfig:
    config = _python_model(f"{spec.name}_preprocess", tuning.preprocess_instances, tuning)
    if tuning.max_queue_size:
        # The ensemble's first step: every accepted request waits here first.
        config.dynamic_batching.default_queue_policy.max_queue_size = tuning.max_queue_size
    config.input.extend(_public_inputs(spec, ragged=True))
    channels, rows, columns = spec.sample_shape
    config.output.extend(
        [
            mc.ModelOutput(name="SAMPLES", data_type=FP32, dims=[-1, channels, rows, columns]),
            mc.ModelOutput(name="SAMPLE_SOURCE", data_type=INT32, dims=[-1]),
            mc.ModelOutput(name="STUDY_INFO", data_type=BYTES, dims=[1]),
        ]
    )
    if spec.feature_width:
        config.output.append(
            mc.ModelOutput(name="FEATURES", data_type=FP32, dims=[spec.feature_width])
        )
    _parameters(config, {"task": spec.name})
    return config


def net_config(spec: TaskSpec, tuning: Tuning, provenance: Mapping[str, str]) -> mc.ModelConfig:
    config = _python_model(f"{spec.name}_net", tuning.net_instances, tuning)
    config.input.extend(net_inputs(spec))
    config.output.append(
        mc.ModelOutput(name="OUTPUT", data_type=FP32, dims=[-1, spec.output.width])
    )
    _parameters(
        config,
        {
            "task": spec.name,
            "intra_op_threads": str(tuning.net_intra_op_threads),
            "max_samples_per_run": str(tuning.max_samples_per_run),
            **provenance,
        },
    )
    return config


def net_inputs(spec: TaskSpec) -> list[mc.ModelInput]:
    """SAMPLES and, where the task has clinical inputs, FEATURES: what the preprocess
    model makes and the net eats (the postprocess passes them on)."""
    channels, rows, columns = spec.sample_shape
    inputs = [
        mc.ModelInput(
            name="SAMPLES",
            data_type=FP32,
            dims=[-1, channels, rows, columns],
            allow_ragged_batch=True,
        )
    ]
    if spec.feature_width:
        inputs.append(mc.ModelInput(name="FEATURES", data_type=FP32, dims=[spec.feature_width]))
    return inputs


def postprocess_config(
    spec: TaskSpec, tuning: Tuning, provenance: Mapping[str, str]
) -> mc.ModelConfig:
    config = _python_model(f"{spec.name}_postprocess", tuning.postprocess_instances, tuning)
    config.input.extend(net_inputs(spec))
    config.input.extend(
        [
            mc.ModelInput(
                name="SAMPLE_SOURCE", data_type=INT32, dims=[-1], allow_ragged_batch=True
            ),
            mc.ModelInput(name="STUDY_INFO", data_type=BYTES, dims=[1]),
        ]
    )
    config.output.extend(_public_outputs(spec))
    _parameters(config, {"task": spec.name, "model_version": "1", **provenance})
    return config


def explain_config(spec: TaskSpec, provenance: Mapping[str, str]) -> mc.ModelConfig:
    """The maps of an answer: one instance (it holds a PyTorch twin per version), no
    batching delay; the versions' identities as the postprocess model names them."""
    config = _python_model(explain_name(spec.name), 1, Tuning())
    config.input.extend(_public_inputs(spec, ragged=True))
    config.input.append(mc.ModelInput(name="VERSION", data_type=INT32, dims=[1]))
    config.output.extend(
        [
            mc.ModelOutput(name="EXPLANATION", data_type=BYTES, dims=[1]),
            mc.ModelOutput(name="PNG", data_type=BYTES, dims=[-1]),
            mc.ModelOutput(name="CAPTURE", data_type=BYTES, dims=[-1]),
        ]
    )
    _parameters(config, {"task": spec.name, "model_version": "1", **provenance})
    return config


def clinical_input_names(spec: TaskSpec) -> list[str]:
    """The keys the task reads from CLINICAL (the ROI counts as one)."""
    roi = [ROI_KEY] if isinstance(spec.geometry, RoiCrop) else []
    return [item.name for item in spec.clinical_inputs] + roi


def _public_inputs(spec: TaskSpec, ragged: bool = False) -> list[mc.ModelInput]:
    # Every input is optional to Triton. The study comes in one of two forms (the intake
    # requires exactly one). CLINICAL too: with optional inputs beside it, Triton 2.51's
    # ensemble no longer refuses a request that lacks a required one (it answers "unexpected
    # deadlock"), so the intake refuses a missing CLINICAL by name where the task reads
    # clinical inputs; where it reads none, absent means {} (a raw KServe v2 client need
    # not send an empty CLINICAL).
    # The two forms: DICOM, one BYTES element per instance, or every instance back to
    # back in one UINT8 tensor with their INT64 start offsets, which moves as one block
    # (and can sit in a client's shared-memory region).
    return [
        mc.ModelInput(
            name="DICOM", data_type=BYTES, dims=[-1], allow_ragged_batch=ragged, optional=True
        ),
        mc.ModelInput(
            name="DICOM_PACKED",
            data_type=UINT8,
            dims=[-1],
            allow_ragged_batch=ragged,
            optional=True,
        ),
        mc.ModelInput(
            name="DICOM_OFFSETS",
            data_type=INT64,
            dims=[-1],
            allow_ragged_batch=ragged,
            optional=True,
        ),
        mc.ModelInput(name="CLINICAL", data_type=BYTES, dims=[1], optional=True),
    ]


def _public_outputs(spec: TaskSpec) -> list[mc.ModelOutput]:
    width = spec.output.width
    return [
        mc.ModelOutput(name="SCORES", data_type=FP32, dims=[-1, width]),
        mc.ModelOutput(name="STUDY", data_type=FP32, dims=[width]),
        mc.ModelOutput(name="ANSWER", data_type=BYTES, dims=[1]),
    ]


def _python_model(name: str, instances: int, tuning: Tuning) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=MAX_BATCH_SIZE)
    config.dynamic_batching.max_queue_delay_microseconds = tuning.max_queue_delay_us
    config.instance_group.add(kind=mc.ModelInstanceGroup.Kind.KIND_CPU, count=instances)
    return config


def _parameters(config: mc.ModelConfig, values: Mapping[str, str]) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = value
