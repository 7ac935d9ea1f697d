"""Each CPU runtime's model file, written from the exported FP32 `model.onnx`.

- ONNX Runtime INT8: static quantization in QDQ format, weights INT8 per output
  channel and 7-bit (`reduce_range`), activations UINT8 with MinMax ranges from the
  calibration tensors. 7-bit weights because without AVX-512 VNNI (this project's
  CPUs) ONNX Runtime multiplies UINT8 by INT8 with `vpmaddubsw`, whose 16-bit sums
  saturate on full-range weights; measured on the reference networks, 7-bit weights
  deviated less, not more (docs/benchmarks.md), and the file stays safe on any CPU.
- OpenVINO FP32: the ONNX graph read by OpenVINO and saved as IR, weights kept FP32.
- OpenVINO INT8: NNCF post-training quantization of that model, same calibration
  tensors, NNCF's defaults (which also narrow the first layer's weights against the
  same saturation).

In both INT8 files the network's last weighted layer and its output activation stay
FP32: quantizing the output would clip every answer to the range the phantom
calibration saw.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from abdoserve.export.calibration import StudyTensors
from abdoserve.serving.cpu_runtimes import CpuRuntime

FP32_MODEL = "model.onnx"
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")


def write_runtime_model(
    runtime: CpuRuntime, version_folder: Path, calibration: Sequence[StudyTensors]
) -> Path:
    """Writes `runtime.model_file` beside `model.onnx` (nothing for ONNX Runtime FP32)."""
    source = version_folder / FP32_MODEL
    target = version_folder / runtime.model_file
    if runtime.precision == "int8" and not calibration:
        raise ValueError(f"{runtime.name} needs calibration tensors")
    if runtime.engine == "onnxruntime" and runtime.precision == "int8":
        write_onnxruntime_int8(source, target, calibration)
    elif runtime.engine == "openvino" and runtime.precision == "int8":
        write_openvino_int8(source, target, calibration)
    elif runtime.engine == "openvino":
        write_openvino(source, target)
    return target


def write_onnxruntime_int8(source: Path, target: Path, calibration: Sequence[StudyTensors]) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="abdoserve-int8-") as folder:
        prepared = Path(folder) / "prepared.onnx"
        # shape inference and graph clean-up first, as onnxruntime.quantization advises
        quant_pre_process(str(source), str(prepared))
        quantize_static(
            str(prepared),
            str(target),
            _FeedReader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=head_nodes(prepared),
        )


class _FeedReader:
    """onnxruntime.quantization's CalibrationDataReader: one study's feeds per call."""

    def __init__(self, calibration: Sequence[StudyTensors]) -> None:
        self._studies = iter(calibration)

    def get_next(self) -> dict[str, object] | None:
        study = next(self._studies, None)
        return None if study is None else dict(study.feeds())


def head_nodes(path: Path) -> list[str]:
    """The last weighted node and every node after it (the output activation)."""
    import onnx

    nodes = list(onnx.load(str(path)).graph.node)
    last = max(index for index, node in enumerate(nodes) if node.op_type in WEIGHTED_OPS)
    return [node.name for node in nodes[last:]]


def write_openvino(source: Path, target: Path) -> None:
    import openvino as ov

    # read_model, not convert_model: the converter sends usage telemetry by default
    model = ov.Core().read_model(str(source))
    ov.save_model(model, str(target), compress_to_fp16=False)


def write_openvino_int8(source: Path, target: Path, calibration: Sequence[StudyTensors]) -> None:
    import openvino as ov

    nncf = _quiet_nncf()
    model = ov.Core().read_model(str(source))
    dataset = nncf.Dataset([study.feeds() for study in calibration])
    quantized = nncf.quantize(model, dataset, subset_size=len(calibration))
    ov.save_model(quantized, str(target), compress_to_fp16=False)


def _quiet_nncf() -> Any:
    """nncf without its usage telemetry (sent by default) and progress bars."""
    # NNCF_CI is NNCF's own switch for a telemetry stub; a hospital's build sends nothing.
    os.environ.setdefault("NNCF_CI", "1")
    import nncf

    nncf.set_log_level(logging.WARNING)
    return nncf
