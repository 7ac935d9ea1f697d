"""`abdoserve-client infer TASK PATHS...`: send one study to a running AbdoServe server.

The same command is `abdoserve infer` where the server is installed. Only the
standard library is imported here: the `abdoserve` parser imports this module
eagerly, and the client (tritonclient, numpy) loads inside `run`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_INVALID = 0, 1, 2
EPILOG = (
    "Clinical inputs come from --clinical-json FILE, else from a request.json in a study "
    "folder (as `abdoserve phantom` writes), and flags override single inputs. "
    "Exit status: 0 answered, 2 invalid request (the server's INVALID_ARGUMENT, or "
    "unreadable local input), 1 any other error."
)
# flag destination -> clinical input name on the server
CLINICAL_FLAGS = {
    "age": "age",
    "sex": "sex",
    "field_strength": "field_strength",
    "hbv": "hbv",
    "hcv": "hcv",
    "roi": "roi",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("task", help="task name, e.g. liver_mass_ct or bone_density_ct")
    parser.add_argument(
        "paths", nargs="+", type=Path, help="DICOM files or study folders (all files inside)"
    )
    clinical = parser.add_argument_group("clinical inputs")
    clinical.add_argument("--age", type=float, help="age in years (liver_fibrosis_ct)")
    clinical.add_argument("--sex", help="M or F (liver_fibrosis_ct)")
    clinical.add_argument("--field-strength", type=float, help="tesla (liver_fibrosis_mri)")
    clinical.add_argument("--hbv", help="negative or positive (liver_fibrosis_mri)")
    clinical.add_argument("--hcv", help="negative or positive (liver_fibrosis_mri)")
    clinical.add_argument(
        "--roi", nargs=4, type=float, metavar=("R0", "C0", "R1", "C1"), help="mass ROI in pixels"
    )
    clinical.add_argument("--clinical-json", type=Path, help="JSON object of clinical inputs")
    add_connection_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")
    parser.add_argument(
        "--explain",
        type=Path,
        metavar="DIR",
        help="also write the answer's explanation maps into DIR: <n>.png and <n>.dcm "
        "(DICOM Secondary Capture) per key image, and explanation.json",
    )


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's address, deadline, retries and TLS: shared by every command that calls it."""
    call = parser.add_argument_group("connection")
    call.add_argument(
        "--url",
        default="127.0.0.1:8001",
        help="gRPC HOST:PORT (default %(default)s); several endpoints as HOST:PORT,HOST:PORT "
        "or a DNS name with several addresses as dns:///NAME:PORT, balanced round robin, "
        "a retry going to another endpoint",
    )
    call.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="deadline of the whole call in s, retries included (default %(default)s)",
    )
    call.add_argument(
        "--retries", type=int, default=3, help="retries while UNAVAILABLE (default %(default)s)"
    )
    call.add_argument("--tls", action="store_true", help="use a TLS channel")
    call.add_argument("--root-cert", help="PEM root certificates (with --tls)")
    call.add_argument("--client-key", help="PEM private key for mutual TLS")
    call.add_argument("--client-cert", help="PEM certificate chain for mutual TLS")
    call.add_argument(
        "--tls-server-name",
        help="the name on the servers' certificates, where it is not the --url host "
        "(needed for a --url list of different hosts with --tls)",
    )


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """`AbdoServeClient` keywords from `add_connection_arguments`' options (all but the url)."""
    return {
        "timeout_s": args.timeout,
        "retries": args.retries,
        "ssl": args.tls,
        "root_certificates": args.root_cert,
        "private_key": args.client_key,
        "certificate_chain": args.client_cert,
        "tls_server_name": args.tls_server_name,
    }


def clinical_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """--clinical-json, else a folder's request.json; then flags override single inputs."""
    from abdoserve_client.instances import folder_request, read_clinical_json

    if args.clinical_json is not None:
        clinical = read_clinical_json(args.clinical_json)
    else:
        clinical = folder_request(args.paths)
    for flag, name in CLINICAL_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            clinical[name] = _plain(value)
    return clinical


def _plain(value: Any) -> Any:
    """Whole numbers as ints (ages, ROI pixels) so the JSON reads as a person wrote it."""
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def run(args: argparse.Namespace) -> int:
    from abdoserve_client.errors import AbdoServeError, InvalidRequestError

    try:
        return _infer(args)
    except InvalidRequestError as error:
        print(f"infer: invalid request: {error.message}", file=sys.stderr)
        return EXIT_INVALID
    except AbdoServeError as error:
        print(f"infer: {error}", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, ValueError) as error:
        print(f"infer: cannot read the request: {error}", file=sys.stderr)
        return EXIT_INVALID


def _infer(args: argparse.Namespace) -> int:
    from abdoserve_client.client import AbdoServeClient
    from abdoserve_client.display import as_json, as_text
    from abdoserve_client.instances import expand_paths, load_instances

    clinical = clinical_inputs(args)
    files = expand_paths(args.paths)
    instances = load_instances(files)  # unreadable input fails before any connection
    with AbdoServeClient(args.url, **client_options(args)) as client:
        result = client.infer(args.task, instances, clinical)
        info = client.task_info(args.task)
        explanation = (
            None if args.explain is None else client.explain(args.task, instances, result, clinical)
        )
    if explanation is not None:
        written = explanation.write(args.explain)
        print(
            f"explanation of version {explanation.version}: {len(written)} files in {args.explain}",
            file=sys.stderr,
        )
    if args.json:
        print(as_json(result))
    else:
        print(as_text(result, info, [file.name for file in files]))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """`abdoserve-client`: the hospital's command, installed with the client alone."""
    parser = argparse.ArgumentParser(
        prog="abdoserve-client", description="Send DICOM studies to an AbdoServe server."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    infer = commands.add_parser(
        "infer", help="send one study and print the answer", description=__doc__
    )
    add_arguments(infer)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
