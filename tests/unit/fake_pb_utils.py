"""A fake of Triton's `pb_utils` for unit tests of the Python models (an integration test
never uses it): errors, tensors, responses, a logger that keeps its lines."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


class FakeTritonError(Exception):
    INVALID_ARG = "invalid-arg"
    INTERNAL = "internal"
    UNSUPPORTED = "unsupported"
    UNAVAILABLE = "unavailable"
    CANCELLED = "cancelled"

    def __init__(self, message: str, code: str = "internal") -> None:
        super().__init__(message)
        self.message, self.code = message, code


@dataclass
class FakeTensor:
    name: str
    value: np.ndarray

    def as_numpy(self) -> np.ndarray:
        return self.value


class FakeRequest(dict[str, FakeTensor]):
    """A request's input tensors by name, and whether its client has gone."""

    cancelled = False

    def is_cancelled(self) -> bool:
        return self.cancelled


@dataclass
class FakeResponse:
    output_tensors: list[FakeTensor]
    error: FakeTritonError | None = None


@dataclass
class FakeLogger:
    lines: list[tuple[str, str]] = field(default_factory=list)

    def log_error(self, message: str) -> None:
        self.lines.append(("error", message))

    def log_warn(self, message: str) -> None:
        self.lines.append(("warn", message))

    def log_info(self, message: str) -> None:
        self.lines.append(("info", message))


class FakePbUtils:
    TritonError = FakeTritonError
    Tensor = FakeTensor
    InferenceResponse = FakeResponse

    def __init__(self) -> None:
        self.Logger = FakeLogger()

    @staticmethod
    def get_input_tensor_by_name(request: dict[str, FakeTensor], name: str) -> FakeTensor | None:
        return request.get(name)

    @staticmethod
    def get_output_tensor_by_name(reply: FakeBlsReply, name: str) -> FakeTensor | None:
        value = reply.outputs.get(name)
        return None if value is None else FakeTensor(name, value)


@dataclass
class FakeBlsReply:
    """What a BLS `exec` returns: an output, or an error."""

    outputs: dict[str, np.ndarray]
    failure: FakeTritonError | None = None

    def has_error(self) -> bool:
        return self.failure is not None

    def error(self) -> FakeTritonError | None:
        return self.failure


NetVersion = Callable[[np.ndarray], np.ndarray]


@dataclass
class FakeBls:
    """The `<task>_net` versions a model calls through BLS: each version a function of the
    SAMPLES tensor (batch axis first) to its OUTPUT, or absent (Triton's 'unavailable')."""

    versions: dict[int, NetVersion] = field(default_factory=dict)
    calls: list[tuple[str, int]] = field(default_factory=list)

    def reply(self, model: str, version: int, inputs: list[FakeTensor]) -> FakeBlsReply:
        self.calls.append((model, version))
        net = self.versions.get(version)
        if net is None:
            message = f"Request for unknown model: '{model}' version {version} is not at ready"
            return FakeBlsReply({}, FakeTritonError(message, FakeTritonError.UNAVAILABLE))
        samples = next(tensor.value for tensor in inputs if tensor.name == "SAMPLES")
        try:
            return FakeBlsReply({"OUTPUT": net(samples)})
        except RuntimeError as error:
            return FakeBlsReply({}, FakeTritonError(str(error), FakeTritonError.INTERNAL))


@dataclass
class FakeInferenceRequest:
    bls: FakeBls
    model_name: str
    model_version: int
    requested_output_names: list[str]
    inputs: list[FakeTensor]

    def exec(self) -> FakeBlsReply:
        return self.bls.reply(self.model_name, self.model_version, self.inputs)

    async def async_exec(self) -> FakeBlsReply:
        return self.exec()
