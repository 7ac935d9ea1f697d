"""The client reads what ran the network: runtime, precision and, for INT8, the deviation
the server's build measured (from an ANSWER, and from the ensemble's config parameters)."""

from __future__ import annotations

import json

import numpy as np

from abdoserve_client.results import ModelInfo, TaskInfo, parse_result

DEVIATION = {"reference": "PyTorch FP32", "max_abs": 0.0106, "mean_abs": 0.0037}
FIBROSIS_PARAMETERS = {
    "task": "liver_fibrosis_ct",
    "output_kind": "regression",
    "labels": json.dumps(["F_DLCT", "F0", "F1", "F2", "F3", "F4"]),
    "label_descriptions": json.dumps(["score", "0", "1", "2", "3", "4"]),
    "unit": "stage",
    "runtime": "onnxruntime-int8",
    "runtime_precision": "int8",
    "runtime_deviation": json.dumps(DEVIATION),
}


def test_an_int8_answer_names_its_runtime_and_deviation() -> None:
    info = TaskInfo.from_parameters(FIBROSIS_PARAMETERS)
    model = {
        "name": "liver_fibrosis_ct",
        "version": "1",
        "untrained": True,
        "runtime": {"name": "openvino-int8", "precision": "int8", "deviation": DEVIATION},
    }
    answer = {"model": model, "result": {"stage": "F1"}, "images": [{"instance": 0}]}
    result = parse_result(info, json.dumps(answer), np.array([[[1.2]]]), np.array([[1.2]]))
    assert result.model.runtime == "openvino-int8" and result.model.precision == "int8"
    assert result.model.quantized and result.model.deviation == DEVIATION


def test_the_config_parameters_carry_the_runtime_too() -> None:
    model = TaskInfo.from_parameters(FIBROSIS_PARAMETERS).model
    assert (model.runtime, model.precision, model.deviation) == (
        "onnxruntime-int8",
        "int8",
        DEVIATION,
    )


def test_a_server_that_names_no_runtime_still_parses() -> None:
    model = ModelInfo.from_mapping({"name": "x", "weights_untrained": "false"})
    assert (model.runtime, model.precision, model.deviation) == ("unknown", "unknown", None)
    assert not model.quantized and not model.untrained
    fp32 = ModelInfo.from_mapping({"runtime": {"name": "onnxruntime", "precision": "fp32"}})
    assert fp32.runtime == "onnxruntime" and fp32.deviation is None
    assert hash(fp32) == hash(
        ModelInfo.from_mapping({"runtime": {"name": "onnxruntime", "precision": "fp32"}})
    )
