"""Export errors: a small hierarchy under one base class.

They are raised while a model is built or exported (a hospital's checkpoint that
does not fit, an ONNX graph that disagrees with PyTorch), never per request, so
they carry no gRPC status: an export that fails must stop the deployment.
"""

from __future__ import annotations


class ExportError(Exception):
    """Base class: a network could not be built, loaded, exported or verified."""


class CheckpointError(ExportError):
    """The file is not a checkpoint this project can read."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint is readable but does not fit the task's architecture."""


class ParityError(ExportError):
    """ONNX Runtime's outputs differ from PyTorch's beyond the tolerance."""


class ReferenceInputError(ExportError, ValueError):
    """Arrays handed to the in-process reference have the wrong shape or type."""
