"""`abdoserve gateway`: a DICOM C-STORE SCP in front of the server, SRs back to PACS."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from abdoserve.deploy.gateway.worklist import WorklistOptions

from abdoserve_client.cli import add_connection_arguments, client_options

log = logging.getLogger("abdoserve.gateway")

EPILOG = """\
Studies pushed with C-STORE are spooled before each instance is acknowledged; a study
is complete when nothing of it arrived for --quiet-s. Each series is routed by the
first rule of --rules that matches it (deploy/gateway/rules.example.yaml shows the
format); unmatched series are refused and counted. Each answer becomes a DICOM
Structured Report sent to every --destination, with a JSON copy under
SPOOL/results/. Exit status: 0 stopped by a signal, 2 bad options or rules.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--rules", type=Path, required=True, help="routing rules, YAML or JSON")
    parser.add_argument(
        "--spool",
        type=Path,
        default=Path("build/gateway/spool"),
        help="folder for received instances, results and the outbox (default %(default)s)",
    )
    dicom = parser.add_argument_group("DICOM")
    dicom.add_argument("--ae-title", default="ABDOSERVE", help="our AE title (%(default)s)")
    dicom.add_argument("--host", default="127.0.0.1", help="listen address (%(default)s)")
    dicom.add_argument("--port", type=int, default=11112, help="DICOM port (%(default)s)")
    dicom.add_argument(
        "--allow-caller",
        action="append",
        default=[],
        metavar="AE",
        help="a calling AE title allowed to send (repeat; default: any)",
    )
    dicom.add_argument(
        "--max-associations",
        type=int,
        default=16,
        help="associations at once, from all callers (%(default)s)",
    )
    dicom.add_argument(
        "--max-associations-per-caller",
        type=int,
        default=4,
        help="open connections one network address may hold; more are closed at once (%(default)s)",
    )
    dicom.add_argument(
        "--destination",
        action="append",
        default=[],
        metavar="AE@HOST:PORT",
        help="where the reports go with C-STORE (repeat for several)",
    )
    dicom.add_argument(
        "--max-instance-mib",
        type=float,
        default=256.0,
        help="refuse an instance larger than this (default %(default)s: the server's limit)",
    )
    dicom.add_argument(
        "--min-free-mib",
        type=float,
        default=1024.0,
        help="refuse instances (A700: the sender retries) below this much free space in the "
        "spool (default %(default)s)",
    )
    work = parser.add_argument_group("studies")
    work.add_argument(
        "--quiet-s",
        type=float,
        default=10.0,
        help="a study is complete after this long without an instance (%(default)s)",
    )
    work.add_argument("--workers", type=int, default=2, help="studies in work at once")
    work.add_argument(
        "--give-up-after-s",
        type=float,
        default=24 * 3600.0,
        help="how long a study waits for an unreachable server before it fails (%(default)s)",
    )
    work.add_argument(
        "--keep-instances",
        action="store_true",
        help="keep answered studies' instances under SPOOL/done/ (default: removed)",
    )
    work.add_argument(
        "--sr-image-library",
        action="store_true",
        help="describe every source image again in an SR image library (TID 1600); "
        "optional, and 3-4x slower to write",
    )
    work.add_argument(
        "--no-explanation-maps",
        action="store_true",
        help="send the SR alone: no saliency maps (Secondary Captures) and no key-object "
        "selection beside it (default: sent; docs/gateway.md)",
    )
    add_worklist_arguments(parser)
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--metrics-host", default="127.0.0.1", help="(%(default)s)")
    metrics.add_argument("--metrics-port", type=int, default=8005, help="(%(default)s)")
    add_connection_arguments(parser)


def add_worklist_arguments(parser: argparse.ArgumentParser) -> None:
    web = parser.add_argument_group(
        "web worklist (served when --web-port is given; docs/gateway.md)"
    )
    web.add_argument("--web-host", default="127.0.0.1", help="listen address (%(default)s)")
    web.add_argument("--web-port", type=int, help="HTTPS (or HTTP) port of the worklist")
    web.add_argument(
        "--web-users",
        type=Path,
        help="users file, NAME:argon2-hash lines (abdoserve gateway-user adds one)",
    )
    web.add_argument(
        "--web-proxy-user-header",
        metavar="NAME",
        help="trust this request header, set by a reverse proxy, as the signed-in user",
    )
    web.add_argument(
        "--web-audit-log",
        type=Path,
        help="append-only audit log (default SPOOL/worklist/audit.jsonl)",
    )
    web.add_argument("--tls-cert", type=Path, help="PEM certificate chain of the worklist")
    web.add_argument("--tls-key", type=Path, help="PEM private key of the worklist")
    web.add_argument(
        "--tls-client-ca",
        type=Path,
        help="PEM CA: mutual TLS, only browsers or a proxy with a certificate it signed get in",
    )


def worklist_options(args: argparse.Namespace) -> WorklistOptions | None:
    """The worklist's options, or None when --web-port is not given."""
    from abdoserve.deploy.gateway.worklist import WorklistOptions
    from abdoserve.deploy.guard import TlsFiles

    if args.web_port is None:
        return None
    if args.web_users is None and args.web_proxy_user_header is None:
        raise ValueError("--web-port needs --web-users or --web-proxy-user-header")
    return WorklistOptions(
        host=args.web_host,
        port=args.web_port,
        users=args.web_users,
        proxy_user_header=args.web_proxy_user_header,
        audit_log=args.web_audit_log,
        tls=TlsFiles.from_options(args.tls_cert, args.tls_key, args.tls_client_ca),
    )


def run(args: argparse.Namespace) -> int:
    from abdoserve.deploy.gateway.connections import ConnectionLimits
    from abdoserve.deploy.gateway.inference import RetryOptions
    from abdoserve.deploy.gateway.routing import RulesError, load_rules
    from abdoserve.deploy.gateway.scp import ScpOptions
    from abdoserve.deploy.gateway.sender import Destination
    from abdoserve.deploy.gateway.service import Gateway, GatewayOptions, client_infer
    from abdoserve.deploy.gateway.viewer_objects import client_explain
    from abdoserve.deploy.gateway.worklist.users import UsersError, load_users
    from abdoserve.deploy.guard import GuardError
    from abdoserve.deploy.processes import wait_for_signal

    # highdicom says at INFO which modules it copies, per report: not for an operator's log
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    try:
        rules = load_rules(args.rules)
        destinations = [Destination.parse(text) for text in args.destination]
        worklist = worklist_options(args)
        if worklist is not None and worklist.users is not None:
            load_users(worklist.users)  # a bad users file stops the start, naming its line
    except (RulesError, UsersError, GuardError, ValueError, OSError) as error:
        print(f"gateway: {error}")
        return 2
    if not destinations:
        log.warning("no --destination: reports are kept under the spool's results/ only")
    options = GatewayOptions(
        spool=args.spool,
        scp=ScpOptions(
            args.ae_title,
            args.host,
            args.port,
            tuple(args.allow_caller),
            max_instance_bytes=int(args.max_instance_mib * 1024 * 1024),
            min_free_bytes=int(args.min_free_mib * 1024 * 1024),
            max_associations=args.max_associations,
            connections=ConnectionLimits(per_caller=args.max_associations_per_caller),
        ),
        destinations=destinations,
        quiet_s=args.quiet_s,
        workers=args.workers,
        retry=RetryOptions(give_up_after_s=args.give_up_after_s),
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        keep_instances=args.keep_instances,
        image_library=args.sr_image_library,
        worklist=worklist,
    )
    explain = None if args.no_explanation_maps else client_explain(args.url, client_options(args))
    gateway = Gateway(options, rules, client_infer(args.url, client_options(args)), explain)
    gateway.start()
    print(
        f"gateway {args.ae_title} on {args.host}:{args.port}, server {args.url}, "
        f"metrics http://{args.metrics_host}:{args.metrics_port}/metrics, spool {args.spool}",
        flush=True,
    )
    if gateway.worklist is not None:
        print(f"worklist {gateway.worklist.url}", flush=True)
    try:
        why = wait_for_signal()
    finally:
        gateway.stop()
    print(f"gateway stopped ({why})", flush=True)
    return 0
