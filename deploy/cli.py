"""`abdoserve`: one console command, one subcommand per job.

Each subcommand lives in the module that owns the job and exposes
`add_arguments(parser)` and `run(args) -> int`. Only the module of the command being
run is imported (tests/unit/test_cli.py pins it): `abdoserve --help` lists the others
by their help text, so it and `abdoserve infer` never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from abdoserve.deploy.processes import interrupt_on_sigterm

# (command path, module that owns the job, help), in the order a newcomer meets them.
COMMANDS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("serve",), "abdoserve.deploy.serve", "serve all models on the embedded Triton server"),
    (("infer",), "abdoserve_client.cli", "send a study to a running server and print the answer"),
    (("gateway",), "abdoserve.deploy.gateway.cli", "take studies over DICOM, send back SRs"),
    (
        ("gateway-user",),
        "abdoserve.deploy.gateway.worklist.users",
        "add a user of the gateway's web worklist, or set their password",
    ),
    (("phantom",), "abdoserve.export.phantom.cli", "write a phantom DICOM study for a task"),
    (("build-repository",), "abdoserve.export.cli", "export the networks, build the repository"),
    (("configs",), "abdoserve.export.configs_cli", "re-render the committed model configs"),
    (
        ("model", "import"),
        "abdoserve.deploy.model_cli",
        "write a hospital's network as a new version of a task's _net (not served yet)",
    ),
    (
        ("model", "validate"),
        "abdoserve.deploy.version_cli:VALIDATE",
        "the papers' metrics of a version on local labelled studies, through the server",
    ),
    (
        ("model", "list"),
        "abdoserve.deploy.version_cli:LIST",
        "a running server's versions of each task: serving, canary, shadow, retired",
    ),
    (
        ("model", "shadow"),
        "abdoserve.deploy.version_cli:SHADOW",
        "run a version beside production on live studies; compared, never answering",
    ),
    (
        ("model", "canary"),
        "abdoserve.deploy.version_cli:CANARY",
        "let a version answer a share of studies (the same studies each time)",
    ),
    (
        ("model", "promote"),
        "abdoserve.deploy.version_cli:PROMOTE",
        "make a version the one that answers; the replaced one stays loaded for rollback",
    ),
    (
        ("model", "rollback"),
        "abdoserve.deploy.version_cli:ROLLBACK",
        "end a shadow or canary, or undo the last promote",
    ),
    (("bench", "preprocess"), "abdoserve.loadtests.bench.preprocess", "intake vs bare pydicom"),
    (("bench", "serving"), "abdoserve.loadtests.bench.serving", "served vs in-process"),
    (("bench", "hostile"), "abdoserve.loadtests.bench.hostile", "bombs and lies: cost to refuse"),
    (
        ("bench", "versions"),
        "abdoserve.loadtests.bench.versions",
        "versions side by side: routing, shadow and canary against production only",
    ),
    (
        ("bench", "replicas"),
        "abdoserve.loadtests.bench.replicas",
        "1 vs N replicas, and nginx; --autoscale: the HPA signal under a ramp",
    ),
    (("bench", "gateway"), "abdoserve.loadtests.bench.gateway", "last instance to SR in PACS"),
    (("bench", "explain"), "abdoserve.loadtests.bench.explain", "infer vs infer --explain"),
    (("bench", "gpu"), "abdoserve.loadtests.bench.gpu_check", "the prepared GPU check"),
    (("bench", "runtimes"), "abdoserve.loadtests.bench.runtimes", "CPU runtimes: INT8, OpenVINO"),
    (("loadtest",), "abdoserve.loadtests.cli", "run a locust scenario headless, gate it on SLOs"),
    (("soak",), "abdoserve.loadtests.soak", "hours of traffic at a fixed rate, watching for leaks"),
)


def selected_path(argv: Sequence[str]) -> tuple[str, ...]:
    """The command path that argv names ('bench', 'serving'), read before any import.

    The top-level options (-v, -h) take no value, so the first words that are not
    options name the command, and the word after a group names its subcommand.
    """
    words = [word for word in argv if not word.startswith("-")]
    groups = {path[0] for path, _, _ in COMMANDS if len(path) == 2}
    return tuple(words[:2]) if words and words[0] in groups else tuple(words[:1])


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The whole parser, where only the command argv names imports its module.

    Every other command is listed with its help text alone, so `abdoserve --help` and
    `abdoserve infer` never import torch, onnx or the benchmarks.
    """
    parser = argparse.ArgumentParser(
        prog="abdoserve", description="Abdominal radiology models served through Triton."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    chosen = selected_path(argv)
    for path, module_name, help_text in COMMANDS:
        target = commands
        if len(path) == 2:
            if path[0] not in groups:
                group = commands.add_parser(path[0], help=f"{path[0]} commands")
                groups[path[0]] = group.add_subparsers(
                    dest="subcommand", required=True, metavar="SUBCOMMAND"
                )
            target = groups[path[0]]
        sub = target.add_parser(path[-1], help=help_text, description=help_text)
        if path == chosen:
            # "module" exposes add_arguments and run; "module:NAME", an object that does.
            module_path, _, attribute = module_name.partition(":")
            module = importlib.import_module(module_path)
            command = getattr(module, attribute) if attribute else module
            command.add_arguments(sub)
            sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(words).parse_args(words)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("openjpeg").setLevel(logging.WARNING)  # one INFO line per encoded tile
    # SIGTERM (kill, systemd, a pod) takes Ctrl-C's clean path: children stopped, shared
    # memory unlinked. Before, `bench serving` died at once and left its servers running.
    interrupt_on_sigterm()
    try:
        result: int = args.run(args)
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    raise SystemExit(main())
