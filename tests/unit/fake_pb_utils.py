"""A fake of Triton's `pb_utils` for unit tests of the Python models (an integration test
never uses it): errors, tensors, responses, a logger that keeps its lines."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class FakeTritonError(Exception):
    INVALID_ARG = "invalid-arg"
    INTERNAL = "internal"
    UNSUPPORTED = "unsupported"

    def __init__(self, message: str, code: str = "internal") -> None:
        super().__init__(message)
        self.message, self.code = message, code


@dataclass
class FakeTensor:
    name: str
    value: np.ndarray

    def as_numpy(self) -> np.ndarray:
        return self.value


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
