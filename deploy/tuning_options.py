"""Command-line options for the server's tuning knobs, shared by `serve` and `bench serving`."""

from __future__ import annotations

import argparse
from dataclasses import replace

from abdoserve.export.configs import Tuning

# (flag, Tuning field, help)
TUNING_OPTIONS = (
    ("--preprocess-instances", "preprocess_instances", "preprocess model instances per task"),
    ("--net-instances", "net_instances", "network model instances per task"),
    ("--net-threads", "net_intra_op_threads", "ONNX Runtime intra-op threads per instance"),
    ("--queue-delay-us", "max_queue_delay_us", "dynamic batching max queue delay"),
    (
        "--max-queue-size",
        "max_queue_size",
        "queued requests per task before UNAVAILABLE (0: no limit)",
    ),
)


def add_tuning_arguments(group: argparse._ActionsContainer) -> None:
    defaults = Tuning()
    for flag, field, text in TUNING_OPTIONS:
        group.add_argument(
            flag,
            dest=field,
            type=int,
            default=getattr(defaults, field),
            help=f"{text} (default %(default)s)",
        )


def tuning_from(args: argparse.Namespace) -> Tuning:
    return replace(Tuning(), **{field: getattr(args, field) for _, field, _ in TUNING_OPTIONS})
