"""`abdoserve`: one console command, one subcommand per job.

Each subcommand lives in the module that owns the job and exposes
`add_arguments(parser)` and `run(args) -> int`. Those modules import heavy
libraries (torch, onnxruntime) inside `run`, so building the parser stays cheap
and `abdoserve infer` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# (command path, module that owns the job, help), in the order a newcomer meets them.
COMMANDS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("serve",), "abdoserve.deploy.serve", "serve all models on the embedded Triton server"),
    (("infer",), "abdoserve_client.cli", "send a study to a running server and print the answer"),
    (("gateway",), "abdoserve.deploy.gateway.cli", "take studies over DICOM, send back SRs"),
    (("phantom",), "abdoserve.loadtests.phantom.cli", "write a phantom DICOM study for a task"),
    (("build-repository",), "abdoserve.export.cli", "export the networks, build the repository"),
    (("configs",), "abdoserve.export.configs_cli", "re-render the committed model configs"),
    (("bench", "preprocess"), "abdoserve.loadtests.bench.preprocess", "intake vs bare pydicom"),
    (("bench", "serving"), "abdoserve.loadtests.bench.serving", "served vs in-process"),
    (("bench", "hostile"), "abdoserve.loadtests.bench.hostile", "bombs and lies: cost to refuse"),
    (("bench", "autoscale"), "abdoserve.loadtests.bench.autoscale", "the HPA signal under a ramp"),
    (("bench", "replicas"), "abdoserve.loadtests.bench.replicas", "1 vs N replicas, and nginx"),
    (("bench", "gateway"), "abdoserve.loadtests.bench.gateway", "last instance to SR in PACS"),
    (
        ("bench", "interpreter"),
        "abdoserve.loadtests.bench.interpreter",
        "static vs shared libpython",
    ),
    (("bench", "gpu"), "abdoserve.loadtests.bench.gpu_check", "the prepared GPU check"),
    (("bench", "runtimes"), "abdoserve.loadtests.bench.runtimes", "CPU runtimes: INT8, OpenVINO"),
    (("loadtest",), "abdoserve.loadtests.cli", "run a locust scenario headless, gate it on SLOs"),
    (("soak",), "abdoserve.loadtests.soak", "hours of traffic at a fixed rate, watching for leaks"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="abdoserve", description="Abdominal radiology models served through Triton."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    for path, module_name, help_text in COMMANDS:
        target = commands
        if len(path) == 2:
            if path[0] not in groups:
                group = commands.add_parser(path[0], help=f"{path[0]} commands")
                groups[path[0]] = group.add_subparsers(
                    dest="subcommand", required=True, metavar="SUBCOMMAND"
                )
            target = groups[path[0]]
        module = importlib.import_module(module_name)
        sub = target.add_parser(path[-1], help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("openjpeg").setLevel(logging.WARNING)  # one INFO line per encoded tile
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
