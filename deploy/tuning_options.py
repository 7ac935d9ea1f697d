"""Command-line options for the server's tuning knobs, shared by `serve` and `bench serving`."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields, replace

from abdoserve.export.configs import Tuning

# (flag, Tuning field, help)
TUNING_OPTIONS = (
    (
        "--preprocess-instances",
        "preprocess_instances",
        "instances per task of the fused model, or of the ensemble's preprocess model",
    ),
    ("--net-instances", "net_instances", "the ensemble's network model instances per task"),
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


def replica_tuning(args: argparse.Namespace, replicas: int, cores: int | None = None) -> Tuning:
    """The tuning of one of `replicas` replicas: options given stay as given; the others
    are sized so that all replicas together fit the machine's cores (instances and
    ONNX Runtime threads at most cores / replicas each, at least 1)."""
    share = max(1, (cores or os.cpu_count() or 1) // replicas)
    sized = Tuning()
    for name in ("preprocess_instances", "net_instances", "net_intra_op_threads"):
        sized = replace(sized, **{name: min(getattr(sized, name), share)})
    given = {
        name: value for _, name, _ in TUNING_OPTIONS if (value := getattr(args, name)) is not None
    }
    return replace(sized, **given)


def repository_tag(tuning: Tuning) -> str:
    """A folder suffix naming a tuning (`pre1-net1-...`), so that builds coexist."""
    short = {"preprocess_instances": "pre", "net_instances": "net", "postprocess_instances": "post"}
    short |= {"net_intra_op_threads": "threads", "max_queue_delay_us": "delay"}
    short |= {"max_samples_per_run": "run", "max_queue_size": "queue"}
    return "-".join(f"{short[field.name]}{getattr(tuning, field.name)}" for field in fields(tuning))
