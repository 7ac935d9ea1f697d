"""`abdoserve bench gateway`: from a study's last instance received to its SR stored in PACS.

Real peers, as a hospital runs it: dcmtk's storescu pushes each phantom study into the
gateway, Orthanc is the PACS, Triton answers. For each study the clock starts when
storescu's last C-STORE is acknowledged (the instance is then spooled) and stops when
Orthanc's REST API lists the SR. The gateway's own timings (outcome records) split it:
the quiet period, inference, writing the SR, and delivery to Orthanc. Side by side, in
the same run, the same studies go straight to the server through the client: what the
gateway adds beyond its quiet period is the difference.

`--maps compare` runs two gateways side by side, one sending the explanation maps and the
key-object selection beside each SR (viewer_objects.py) and one not, studies alternating
between them (each waits until the one before is wholly delivered): the ratio of their
last-instance-to-SR p50 is what the maps cost the SR.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abdoserve.deploy import gateway as gateway_package
from abdoserve.deploy.embedded import EmbeddedServer, ServerOptions, free_port, free_ports
from abdoserve.deploy.serve import prepared_repository
from abdoserve.export.locations import DEFAULT_REPOSITORY

if TYPE_CHECKING:
    from abdoserve.deploy.gateway.service import Gateway

# The example rules ship with the gateway package (a package resource, not a checkout path).
RULES = Path(str(resources.files(gateway_package) / "rules.example.yaml"))
POLL_S = 0.01
WITHOUT, WITH = "without maps", "with maps"
MAP_SIDES = {"off": (WITHOUT,), "on": (WITH,), "compare": (WITHOUT, WITH)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="bone_density_ct", help="task (bone_density_ct)")
    parser.add_argument("--studies", type=int, default=50, help="studies, one at a time (50)")
    parser.add_argument(
        "--quiet-s", type=float, default=1.0, help="the gateway's quiet period (1.0)"
    )
    parser.add_argument("--url", help="a running server's gRPC address (default: start one)")
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    parser.add_argument(
        "--maps",
        choices=tuple(MAP_SIDES),
        default="off",
        help="explanation maps beside the SR: off, on, or compare both in one run (off)",
    )


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="abdoserve-bench-gateway-") as scratch:
        folder = Path(scratch)
        sides = MAP_SIDES[args.maps]
        studies = write_studies(args.task, args.studies * len(sides), folder / "studies")
        with ExitStack() as stack:
            url = args.url or stack.enter_context(own_server(args.repository, folder))
            rows = measure(args, url, studies, folder, stack)
    for side in sides:
        print(f"{side}:\n{table([row for row in rows if row['side'] == side], args.quiet_s)}")
    if len(sides) > 1:
        print(maps_ratio(rows))
    if args.json:
        args.json.write_text(json.dumps(report(args, rows), indent=2) + "\n")
        print(f"raw numbers: {args.json}")
    return 0


def write_studies(task: str, count: int, folder: Path) -> list[list[Path]]:
    """`count` phantom studies of `task` (distinct seeds: distinct UIDs), as files."""
    from abdoserve.export.phantom.common import write_study
    from abdoserve.export.phantom.studies import build_study

    studies = []
    for seed in range(1, count + 1):
        paths = write_study(build_study(task, seed=seed), folder / f"{seed:03d}")
        studies.append([path for path in paths if path.suffix == ".dcm"])
    return studies


@contextmanager
def own_server(repository: Path, folder: Path) -> Iterator[str]:
    served = prepared_repository(repository, 1)
    options = ServerOptions(repository=served, ports=free_ports(), log_file=folder / "triton.log")
    with EmbeddedServer(options) as server:
        yield f"{options.host}:{server.ports.grpc}"


def measure(
    args: argparse.Namespace, url: str, studies: list[list[Path]], folder: Path, stack: ExitStack
) -> list[dict[str, Any]]:
    from abdoserve.deploy.gateway.routing import load_rules
    from abdoserve.deploy.gateway.scp import ScpOptions
    from abdoserve.deploy.gateway.sender import Destination
    from abdoserve.deploy.gateway.service import Gateway, GatewayOptions, client_infer
    from abdoserve.deploy.gateway.viewer_objects import client_explain
    from abdoserve.loadtests.dicom_peers import orthanc
    from abdoserve_client.client import AbdoServeClient

    pacs = stack.enter_context(orthanc(folder / "orthanc"))
    gateways = {}
    for side in MAP_SIDES[args.maps]:
        options = GatewayOptions(
            spool=folder / f"spool-{side.replace(' ', '-')}",
            scp=ScpOptions(port=free_port()),
            destinations=[Destination(pacs.aet, "127.0.0.1", pacs.dicom_port)],
            quiet_s=args.quiet_s,
            metrics_port=None,
        )
        explain = client_explain(url, {"timeout_s": 120.0}) if side == WITH else None
        infer = client_infer(url, {"timeout_s": 60.0})
        gateways[side] = stack.enter_context(Gateway(options, load_rules(RULES), infer, explain))
    client = stack.enter_context(AbdoServeClient(url, timeout_s=60.0))
    rows = []
    sides = list(gateways)
    for number, paths in enumerate(studies, start=1):
        side = sides[number % len(sides)]
        row = one_study(gateways[side], pacs, client, args.task, paths)
        rows.append({**row, "side": side})
        print(f"study {number}/{len(studies)} ({side}): {row['total_s']:.3f} s", flush=True)
    return rows


def one_study(
    gateway: Gateway, pacs: Any, client: Any, task: str, paths: Sequence[Path]
) -> dict[str, float]:
    """Push one study, wait for its SR; then the same study straight to the server."""
    import pydicom

    from abdoserve.loadtests.dicom_peers import storescu

    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    storescu(list(paths), port=gateway.options.scp.port, called_aet=gateway.options.scp.ae_title)
    acknowledged = time.time()
    while not pacs.find_instances(Modality="SR", StudyInstanceUID=study_uid):
        time.sleep(POLL_S)
    stored = time.time()
    while not gateway.idle():  # the maps, where on, finish before the next study starts
        time.sleep(POLL_S)
    settled = time.time()
    timings = outcome_timings(gateway.spool.results / study_uid)
    clinical = json.loads((paths[0].parent / "request.json").read_text())
    started = time.perf_counter()
    client.infer(task, list(paths), clinical)
    direct = time.perf_counter() - started
    return {
        "total_s": stored - acknowledged,
        "quiet_s": timings["claimed"] - timings["last_arrival"],
        "inference_s": timings["answered"] - timings["claimed"],
        "report_s": timings["queued"] - timings["answered"],
        "delivery_s": stored - timings["queued"],
        "direct_infer_s": direct,
        "settled_s": settled - acknowledged,
    }


def outcome_timings(results: Path) -> dict[str, float]:
    for path in results.glob("*.outcome.json"):
        outcome = json.loads(path.read_text())
        if outcome.get("status") == "answered":
            timings: dict[str, float] = outcome["timings"]
            return timings
    raise AssertionError(f"no answered outcome in {results}")


def quantiles(values: Sequence[float]) -> tuple[float, float]:
    """(p50, p95) in ms."""
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return 1e3 * statistics.median(ordered), 1e3 * p95


COLUMNS = (
    ("total_s", "last instance -> SR stored in Orthanc"),
    ("quiet_s", "  quiet period (configured)"),
    ("inference_s", "  inference through the client"),
    ("report_s", "  SR written, spooled, queued"),
    ("delivery_s", "  C-STORE to Orthanc, seen by its REST API"),
    ("direct_infer_s", "the same study, client straight to the server"),
)


def table(rows: list[dict[str, Any]], quiet_s: float) -> str:
    lines = [f"{'':48} {'p50 ms':>9} {'p95 ms':>9}"]
    for key, label in COLUMNS:
        p50, p95 = quantiles([row[key] for row in rows])
        lines.append(f"{label:48} {p50:9.1f} {p95:9.1f}")
    beyond = [row["total_s"] - row["quiet_s"] for row in rows]
    direct = [row["direct_infer_s"] for row in rows]
    p50, _ = quantiles(beyond)
    d50, _ = quantiles(direct)
    lines.append(
        f"beyond the quiet period ({quiet_s:g} s), the gateway takes {p50:.1f} ms at p50: "
        f"{p50 / d50:.2f}x the direct call ({d50:.1f} ms)"
    )
    return "\n".join(lines)


def maps_ratio(rows: list[dict[str, Any]]) -> str:
    """With maps against without, measured in the same run: SR latency and all delivered."""
    figures = {}
    for side in (WITHOUT, WITH):
        mine = [row for row in rows if row["side"] == side]
        figures[side] = {
            key: quantiles([row[key] for row in mine])[0] for key in ("total_s", "settled_s")
        }
    sr = figures[WITH]["total_s"] / figures[WITHOUT]["total_s"]
    settled = figures[WITH]["settled_s"] / figures[WITHOUT]["settled_s"]
    return (
        f"with maps / without, p50: last instance -> SR stored {sr:.2f}x "
        f"({figures[WITH]['total_s']:.0f} vs {figures[WITHOUT]['total_s']:.0f} ms); "
        f"-> everything delivered {settled:.2f}x "
        f"({figures[WITH]['settled_s']:.0f} vs {figures[WITHOUT]['settled_s']:.0f} ms)"
    )


def report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "task": args.task,
        "studies": args.studies,
        "quiet_s": args.quiet_s,
        "maps": args.maps,
        "quantiles_ms": {
            side: {
                key: dict(
                    zip(
                        ("p50", "p95"),
                        quantiles([r[key] for r in rows if r["side"] == side]),
                        strict=True,
                    )
                )
                for key, _ in COLUMNS
            }
            for side in MAP_SIDES[args.maps]
        },
        "rows": rows,
    }
