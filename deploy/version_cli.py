"""`abdoserve model list | shadow | canary | promote | rollback`: a running server's
versions (abdoserve.deploy.versions does the work).

Each command talks to the server on `--url` with the admin key: `--admin-key-file`,
else $ABDOSERVE_ADMIN_KEY, else the key `abdoserve serve` kept for the operator who
started it on this host (abdoserve.deploy.operator_key). deploy/cli.py names each
command as `abdoserve.deploy.version_cli:NAME`.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from abdoserve.preprocessing.tasks import TASKS
from abdoserve_client.cli import add_connection_arguments

ADMIN_KEY_VARIABLE = "ABDOSERVE_ADMIN_KEY"
EXIT_REFUSED = 2


@dataclass(frozen=True)
class Command:
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _server_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    parser.add_argument(
        "--admin-key-file",
        type=Path,
        help=f"the admin key (default ${ADMIN_KEY_VARIABLE}, else the key `abdoserve serve` "
        "kept for the operator who started it on this host)",
    )


def _task_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", metavar="TASK", choices=sorted(TASKS), help="the task")
    parser.add_argument("version", metavar="VERSION", type=int, help="a version of TASK's _net")


def _list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "task", metavar="TASK", nargs="?", choices=sorted(TASKS), help="one task (default all)"
    )
    _server_arguments(parser)


def _shadow_arguments(parser: argparse.ArgumentParser) -> None:
    _task_version(parser)
    parser.add_argument(
        "--percent",
        type=float,
        default=100.0,
        help="the share of studies also sent to VERSION (default %(default)s)",
    )
    _server_arguments(parser)


def _canary_arguments(parser: argparse.ArgumentParser) -> None:
    _task_version(parser)
    parser.add_argument(
        "--percent", type=float, required=True, help="the share of studies VERSION answers"
    )
    _server_arguments(parser)


def _promote_arguments(parser: argparse.ArgumentParser) -> None:
    _task_version(parser)
    parser.add_argument(
        "--rollback-window-s",
        type=float,
        default=None,
        help="how long the replaced version stays loaded for `rollback` (default 3600)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="promote a version whose validation did not pass (or that has none)",
    )
    parser.add_argument("--reason", help="why, with --force: recorded in the routing")
    _server_arguments(parser)


def _validate_arguments(parser: argparse.ArgumentParser) -> None:
    from abdoserve.deploy.model_cli import add_repository_argument

    _task_version(parser)
    parser.add_argument(
        "--studies", type=Path, required=True, help="one folder per study, named in the labels"
    )
    parser.add_argument(
        "--labels", type=Path, required=True, help="labels.csv: study, the task's label column"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where the report goes (default validation/TASK-vVERSION-UTC-TIME)",
    )
    parser.add_argument(
        "--thresholds",
        type=Path,
        help="the hospital's thresholds file (default deploy/acceptance_thresholds.json)",
    )
    add_repository_argument(parser)
    _server_arguments(parser)


def _rollback_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", metavar="TASK", choices=sorted(TASKS), help="the task")
    _server_arguments(parser)


# -- running ---------------------------------------------------------------------------------


def _control(args: argparse.Namespace) -> Any:
    import tritonclient.grpc as grpcclient

    from abdoserve.deploy.operator_key import read_operator_key
    from abdoserve.deploy.versions import VersionControl

    client = grpcclient.InferenceServerClient(
        args.url,
        ssl=args.tls,
        root_certificates=args.root_cert,
        private_key=args.client_key,
        certificate_chain=args.client_cert,
    )
    key = read_operator_key(args.admin_key_file, os.environ.get(ADMIN_KEY_VARIABLE), args.url)
    return VersionControl(client, key)


def _guarded(work: Callable[[], int]) -> int:
    from tritonclient.utils import InferenceServerException

    from abdoserve.deploy.operator_key import OperatorKeyError
    from abdoserve.deploy.versions import VersionError
    from abdoserve.serving.routing import RoutingError

    try:
        return work()
    except (VersionError, RoutingError, OperatorKeyError) as error:
        print(f"error: {error}")
        return EXIT_REFUSED
    except InferenceServerException as error:
        print(f"error: the server answered: {error.message()}")
        return EXIT_REFUSED


def _list(args: argparse.Namespace) -> int:
    def work() -> int:
        control = _control(args)
        for task in [args.task] if args.task else sorted(TASKS):
            for line in listing(control.state(task), time.time()):
                print(line)
        return 0

    return _guarded(work)


def listing(state: Any, now: float) -> list[str]:
    """`model list`'s lines for one task: each version, its state, Triton's, its card."""
    lines = [f"{state.task}"]
    routing = state.routing
    for version in state.versions():
        role = routing.state_of(version, now)
        if role in ("canary", "shadow"):
            role += f" {routing.percent:g} %"
        loaded = state.loaded.get(version, "not loaded")
        card = state.cards.get(version, "-")
        verdict = routing.verdict(version) or "-"
        lines.append(
            f"  {version:>3}  {role:<14} {loaded:<12} card {card:<12} validation {verdict}"
        )
    if routing.reason:
        lines.append(f"  last change (generation {routing.generation}): {routing.reason}")
    return lines


def _change(args: argparse.Namespace, name: str) -> int:
    from abdoserve.deploy import versions

    def transition(current: Any, now: float) -> Any:
        if name == "shadow":
            return versions.shadow(current, args.version, args.percent)
        if name == "canary":
            return versions.canary(current, args.version, args.percent)
        if name == "promote":
            window = args.rollback_window_s
            window_s = versions.ROLLBACK_WINDOW_S if window is None else window
            return versions.promote(current, args.version, now, window_s, forced=forced)
        return versions.rollback(current, now)

    forced = ""
    if name == "promote" and args.force:
        if not args.reason:
            print("error: --force needs --reason TEXT (it is recorded)")
            return EXIT_REFUSED
        forced = args.reason

    def work() -> int:
        control = _control(args)
        if name == "promote":
            versions.check_accepted(control.state(args.task), args.version, forced)
        new = control.apply(args.task, transition)
        print(f"{args.task}: {new.reason} (generation {new.generation})")
        for line in listing_of_routing(new):
            print(line)
        return 0

    return _guarded(work)


def listing_of_routing(routing: Any) -> list[str]:
    lines = [f"  serving  version {routing.production}"]
    if routing.candidate is not None:
        lines.append(f"  {routing.mode:<8} version {routing.candidate} at {routing.percent:g} %")
    if routing.previous is not None:
        closes = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(routing.previous_until))
        lines.append(f"  previous version {routing.previous}, loaded for rollback until {closes}")
    return lines


def _validate(args: argparse.Namespace) -> int:
    from abdoserve.deploy.validation import THRESHOLDS_FILE, validate
    from abdoserve.preprocessing.tasks import get_task
    from abdoserve_client.cli import client_options
    from abdoserve_client.client import AbdoServeClient

    out = args.out or Path(
        "validation",
        f"{args.task}-v{args.version}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}",
    )
    thresholds = args.thresholds or THRESHOLDS_FILE

    def work() -> int:
        control = _control(args)
        with AbdoServeClient(args.url, **client_options(args)) as client:

            def ask(study: Any) -> Any:
                return client.infer(args.task, study.instances, study.clinical).answer

            report, verdict, path = validate(
                control,
                ask,
                get_task(args.task),
                args.version,
                studies=args.studies,
                labels=args.labels,
                out=out,
                thresholds=thresholds,
            )
        print(f"{args.task} version {args.version}: {report.studies} studies; report {path}")
        for line in verdict.lines:
            print(f"  {line}")
        recorded = record_acceptance(args, report, verdict, thresholds, out)
        print(f"  {'passed' if verdict.passed else 'FAILED'}; {recorded}")
        return 0 if verdict.passed else 1

    return _guarded(work)


def record_acceptance(
    args: argparse.Namespace, report: Any, verdict: Any, thresholds: Path, out: Path
) -> str:
    """The figures into the version's card (the verdict is in the routing already), the
    cohort's drift reference beside it."""
    import shutil
    from dataclasses import replace

    from abdoserve.deploy.validation import acceptance_record
    from abdoserve.export.model_card import CARD_FILE, read_card, write_card
    from abdoserve.serving.drift_bins import REFERENCE_FILE
    from abdoserve.serving.task_models import on_disk

    models = on_disk(args.repository, args.task)
    versions = models.versions if models is not None else f"{args.task}_net"
    folder = args.repository / versions / str(args.version)
    if not folder.is_dir():
        return f"figures and drift baseline not recorded: no {folder} (run where the repository is)"
    # The cohort's profile is the version's drift baseline (abdoserve.deploy.drift_watch).
    shutil.copyfile(out / REFERENCE_FILE, folder / REFERENCE_FILE)
    if not (folder / CARD_FILE).is_file():
        return f"drift baseline in {folder / REFERENCE_FILE}; no card to hold the figures"
    record = acceptance_record(report, verdict, args.studies, args.labels, thresholds)
    write_card(replace(read_card(folder / CARD_FILE), acceptance=record), folder)
    return f"figures recorded in {folder / CARD_FILE}, drift baseline beside it"


LIST = Command(_list_arguments, _list)
VALIDATE = Command(_validate_arguments, _validate)
SHADOW = Command(_shadow_arguments, partial(_change, name="shadow"))
CANARY = Command(_canary_arguments, partial(_change, name="canary"))
PROMOTE = Command(_promote_arguments, partial(_change, name="promote"))
ROLLBACK = Command(_rollback_arguments, partial(_change, name="rollback"))
