"""What runs inside Triton's Python-backend stubs besides DICOM intake.

`triton_adapter` is the one module that knows `pb_utils` (it is passed in, never
imported, so everything here runs and is tested without Triton); `metrics` puts our
families on Triton's /metrics; `batching` joins and splits ragged study batches;
`onnx_runner` is the ONNX Runtime runner of the served `_net` and the benchmarks;
`answer` turns per-sample network outputs into the study answer (postprocessing);
`warmup` reads and writes the study a preprocess model decodes before serving;
`validation` checks a composing model's inputs against the task spec (any client
can call those models directly).
The Triton entry points themselves are `model_repository/_python_models/*.py`.
"""
