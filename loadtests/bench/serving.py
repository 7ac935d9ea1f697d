"""`abdoserve bench serving`: the served pipeline vs the same pipeline in process.

For each task, on the same phantom studies and the same cores, in one run:
(a) our preprocessing + ONNX Runtime on the served `model.onnx`, in process and
sequential; (b) the same studies served end to end over gRPC by the embedded
Triton server at several concurrencies (threads sending back to back, one client
each); (c) our preprocessing + PyTorch eager, in process. It prints a table per
task with throughput, latency percentiles and the ratios the serving targets are
stated in, and optionally writes every raw number as JSON and a PNG.

By default it builds `build/bench_repository` with the given tuning and starts
its own server on free ports (stopped at the end, Ctrl-C included); `--url` points
(b) at a running server instead, whose tuning is then read from its configs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from abdoserve.deploy.tuning_options import add_tuning_arguments, tuning_from
from abdoserve.export.configs import Tuning
from abdoserve.export.locations import BUILD_DIR
from abdoserve.loadtests.bench.rounds import DEFAULT_ROUNDS, MIN_ROUNDS, interleaved
from abdoserve.loadtests.bench.transports import (
    FORMS,
    FUSED,
    FUSED_SHARED_MEMORY,
    GRPC_PACKED,
    PROBE,
    PYTRITON,
    SHARED_MEMORY,
    model_of,
    transport_of,
)

if TYPE_CHECKING:
    from abdoserve.loadtests.bench.breakdown import Breakdown, Probe
    from abdoserve.loadtests.bench.report import SweepPoint, TaskResult, TaskRounds
    from abdoserve.loadtests.bench.served_target import Observed, Target
    from abdoserve.loadtests.bench.workload import Measurement, Study

DEFAULT_REPOSITORY = BUILD_DIR / "bench_repository"


@dataclass(frozen=True)
class Mode:
    requests: int
    concurrency: tuple[int, ...]
    images: tuple[int, ...]
    pool: int


FULL = Mode(requests=200, concurrency=(1, 4, 16, 64), images=(1, 4, 16, 64), pool=4)
QUICK = Mode(requests=10, concurrency=(1, 4), images=(), pool=2)
QUICK_TASK = "liver_fibrosis_ct"  # clinical features and a small series: every stage runs
THREAD_WARMUP = 1  # requests per worker thread before the timed ones
SWEEP_TASK = "esophageal_cancer_ct"  # one sample per image: cost grows with the study
SWEEP_POOL = 2
PHANTOM_MAX_IMAGES = 64  # the oesophageal phantom builds at most this many slices
SWEEP_CONCURRENCY = (1, 16)
SWEEP_BASE_IMAGES = 8  # sweep points of more images get proportionally fewer requests
PEER_ATTEMPTS = 3  # starts of the PyTriton peer before its rows are skipped
IN_PROCESS, SERVED_SIDE = "in process", "served"  # the two sides of every round


@dataclass(frozen=True)
class Plan:
    """What one run measures, resolved from the options (and recorded in the JSON)."""

    tasks: tuple[str, ...]
    requests: int
    concurrency: tuple[int, ...]
    images: tuple[int, ...]
    pool: int
    url: str | None
    repository: Path
    forms: tuple[str, ...] = FORMS
    scores: bool = True  # whether served requests ask for the per-image SCORES
    rounds: int = DEFAULT_ROUNDS  # interleaved rounds of both sides per task

    @property
    def built_tasks(self) -> tuple[str, ...]:
        """The tasks whose models the repository must hold (the sweep's included)."""
        sweep = (SWEEP_TASK,) if self.images and SWEEP_TASK not in self.tasks else ()
        return self.tasks + sweep

    def sweep_requests(self, images: int) -> int:
        """About as many images per sweep point as `requests` studies of 8 images."""
        scaled = self.requests * SWEEP_BASE_IMAGES // max(images, SWEEP_BASE_IMAGES)
        return max(scaled, min(self.requests, 10))


def int_list(text: str) -> tuple[int, ...]:
    """'1,4,16' -> (1, 4, 16); 'none' -> ()."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        values = tuple(int(item) for item in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,4,16, got {text!r}") from error
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError("every value must be at least 1")
    return values


def round_count(text: str) -> int:
    try:
        rounds = int(text)
    except ValueError:
        rounds = 0
    if rounds < MIN_ROUNDS:
        raise argparse.ArgumentTypeError(f"rounds must be a whole number >= {MIN_ROUNDS}")
    return rounds


def form_list(text: str) -> tuple[str, ...]:
    forms = tuple(item.strip() for item in text.split(",") if item.strip())
    unknown = [form for form in forms if form not in FORMS]
    if unknown or not forms:
        raise argparse.ArgumentTypeError(f"forms are {', '.join(FORMS)}")
    return forms


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help="tasks (default: all five)")
    parser.add_argument(
        "--requests", type=int, help="timed requests per row (default 200; --quick 10)"
    )
    parser.add_argument(
        "--concurrency", type=int_list, help="served concurrency levels (default 1,4,16,64)"
    )
    parser.add_argument(
        "--images",
        type=int_list,
        help="images per study to sweep on esophageal_cancer_ct, at most 64; "
        "'none' skips it (default 1,4,16,64; --quick: none)",
    )
    parser.add_argument("--pool", type=int, help="distinct studies per task (default 4)")
    parser.add_argument(
        "--rounds",
        type=round_count,
        default=DEFAULT_ROUNDS,
        help="interleaved rounds per task (in process, served, in process, ...); each "
        "ratio is the median of the rounds, with their min-max (default %(default)s)",
    )
    parser.add_argument("--quick", action="store_true", help="one task, c=1,4, 10 requests")
    parser.add_argument("--url", help="benchmark a running server at HOST:PORT (gRPC)")
    parser.add_argument(
        "--server-pid",
        type=int,
        help="with --url: its tritonserver's pid, for the server's CPU per study (local only)",
    )
    parser.add_argument(
        "--metrics-url",
        help="with --url: its Triton /metrics URL, for the time inside each Python model's "
        "execute beside Triton's compute time",
    )
    parser.add_argument(
        "--admin-key-file",
        type=Path,
        help="with --url: the admin key, for the statistics behind the time breakdown "
        "(else $ABDOSERVE_ADMIN_KEY; without either, no breakdown)",
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=DEFAULT_REPOSITORY,
        help="model repository to serve and read model.onnx from; (re)built there unless "
        f"it holds these tasks built with this tuning (default {DEFAULT_REPOSITORY})",
    )
    parser.add_argument(
        "--forms",
        type=form_list,
        default=FORMS,
        help="how studies are sent, side by side: grpc_bytes (BYTES DICOM), served (packed "
        "UINT8 over gRPC, the client's default), shared_memory (packed, in a shared-memory "
        "region), fused and fused_shared_memory (the same to the task's fused pipeline, "
        "--pipeline fused), pytriton (packed gRPC to PyTriton serving the same pipeline as "
        f"one callable, started by the bench); default {','.join(FORMS)}",
    )
    parser.add_argument(
        "--without-scores",
        action="store_true",
        help="served requests ask for STUDY and ANSWER only, not the per-image SCORES "
        "(a lever: run once with and once without)",
    )
    parser.add_argument(
        "--shared-region",
        help="with --url: the server's --shared-region (created by the sender before it "
        "started), for the shared_memory form",
    )
    parser.add_argument(
        "--shm-key-file",
        type=Path,
        help="with --url: the server's shared-memory key (else $ABDOSERVE_SHM_KEY)",
    )
    parser.add_argument("--json", type=Path, help="write every raw number as JSON here")
    parser.add_argument("--plot", type=Path, help="write a PNG of the curves here")
    parser.add_argument(
        "--log-file", type=Path, default=BUILD_DIR / "bench_triton.log", help="server log"
    )
    add_tuning_arguments(parser.add_argument_group("tuning of the server this command starts"))


def make_plan(args: argparse.Namespace) -> Plan:
    from abdoserve.preprocessing.tasks import TASKS

    mode = QUICK if args.quick else FULL
    tasks = tuple(args.tasks or ((QUICK_TASK,) if args.quick else TASKS))
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    images = mode.images if args.images is None else args.images
    if any(count > PHANTOM_MAX_IMAGES for count in images):
        raise ValueError("the oesophageal phantom builds at most 64 images per study")
    return Plan(
        tasks=tasks,
        requests=args.requests or mode.requests,
        concurrency=args.concurrency or mode.concurrency,
        images=images,
        pool=args.pool or mode.pool,
        url=args.url,
        repository=args.repository,
        forms=args.forms,
        scores=not args.without_scores,
        rounds=args.rounds,
    )


def run(args: argparse.Namespace) -> int:
    from abdoserve.deploy.embedded import ServerError
    from abdoserve.loadtests.bench.served_target import observer
    from abdoserve.loadtests.bench.workload import study_pool

    try:
        plan = make_plan(args)
    except ValueError as error:
        print(f"error: {error}")
        return 2
    try:
        pools = {task: study_pool(task, plan.pool) for task in plan.tasks}
        with serving(plan, tuning_from(args), args.log_file, pools, observer(args)) as target:
            tuning = target.tuning
            results, sweep = measure_all(plan, target, pools)
    except KeyboardInterrupt:
        print("interrupted" + ("" if plan.url else "; the server it started has been stopped"))
        return 130
    except ServerError as error:
        print(f"error: {error}")
        return 1
    write_outputs(args, plan, tuning, results, sweep)
    return 0


@contextmanager
def serving(
    plan: Plan,
    tuning: Tuning,
    log_file: Path,
    pools: dict[str, list[Study]],
    observed: Observed,
) -> Iterator[Target]:
    """The server measured: a running one, or our own, stopped after."""
    from abdoserve.export.repository import build_repository, is_built
    from abdoserve.loadtests.bench.served_target import own_server, running_server, served_tuning
    from abdoserve.loadtests.bench.transports import slot_bytes

    if plan.url:
        tuning = served_tuning(plan.url, plan.tasks[0])
    # The ensemble, each task's fused model installed beside it (served_target): the forms
    # compare the two shapes, and PyTriton and in-process read the `_net` folders.
    if not is_built(plan.repository, plan.built_tasks, tuning, pipeline="ensemble"):
        print(f"building {plan.repository} for {', '.join(plan.built_tasks)} ...", flush=True)
        build_repository(plan.repository, plan.built_tasks, tuning=tuning, pipeline="ensemble")
    slot = slot_bytes(list(pools.values()))
    if plan.url:
        with running_server(plan.url, plan.tasks, tuning, observed, slot) as target:
            yield target
        return
    # Two forms go through the region: a slot for each of their callers.
    region = (2 * max(plan.concurrency), slot)
    with own_server(plan.repository, plan.tasks, tuning, log_file, region) as target:
        yield target


def measure_all(
    plan: Plan, target: Target, pools: dict[str, list[Study]]
) -> tuple[list[TaskRounds], list[SweepPoint]]:
    from abdoserve.loadtests.bench.report import format_sweep, task_blocks

    results = []
    for task in plan.tasks:
        results.append(measure_task(plan, target, task, pools[task]))
        for block in task_blocks(results[-1]):
            print(block + "\n", flush=True)
    url, tuning = target.url, target.tuning
    sweep = [measure_sweep_point(plan, url, tuning, images) for images in plan.images]
    if sweep:
        print(format_sweep(SWEEP_TASK, sweep) + "\n", flush=True)
    return results, sweep


def usable_forms(plan: Plan, target: Target, task: str) -> tuple[str, ...]:
    """The asked forms this server can take: shared memory needs a registered region,
    the fused forms the task's fused pipeline beside its ensemble."""
    usable = []
    for form in plan.forms:
        if transport_of(form) == SHARED_MEMORY and target.region is None:
            print(f"{form} skipped: no shared region (--shared-region, --shm-key-file)")
        elif form in (FUSED, FUSED_SHARED_MEMORY) and task not in target.fused:
            print(f"{form} skipped: the server has no model fused_{task}")
        else:
            usable.append(form)
    return tuple(usable)


def measure_task(plan: Plan, target: Target, task: str, pool: list[Study]) -> TaskRounds:
    """Both sides in interleaved rounds (in process, served, in process, served, ...),
    each round's ratios taken within it. The null model runs once (a transport's cost,
    not a ratio); the PyTriton peer starts once and serves every round."""
    from abdoserve.loadtests.bench.in_process import RUNTIMES, in_process_pipeline, time_in_process
    from abdoserve.loadtests.bench.report import TaskRounds

    forms = usable_forms(plan, target, task)
    probes = measure_probes(plan, target, task, pool, forms)
    pipelines = [
        in_process_pipeline(plan.repository, target.tuning, task, pool, name) for name in RUNTIMES
    ]
    local: list[Measurement] = []
    results: list[TaskResult] = []
    with ExitStack() as stack:
        peer = start_peer(stack, plan, target, task) if PYTRITON in forms else None
        for number, side in interleaved(plan.rounds, (IN_PROCESS, SERVED_SIDE)):
            print(f"{task}: round {number + 1} of {plan.rounds}, {side}", flush=True)
            if side == IN_PROCESS:
                local = [time_in_process(pipeline, plan.requests) for pipeline in pipelines]
                continue
            served, parts = served_round(plan, target, task, pool, forms=forms, peer=peer)
            results.append(task_result(task, pool, local, served, parts=parts, probes=probes))
    return TaskRounds(task, tuple(results))


def measure_probes(
    plan: Plan, target: Target, task: str, pool: list[Study], forms: tuple[str, ...]
) -> dict[str, Probe]:
    """The null model in each transport the forms use, where the server has it."""
    if not target.probe:
        return {}
    transports = dict.fromkeys(transport_of(form) for form in forms if form != PYTRITON)
    return {name: measure_probe(target, task, pool, plan.requests, name) for name in transports}


def task_result(
    task: str,
    pool: list[Study],
    local: list[Measurement],
    served: dict[str, list[Measurement]],
    *,
    parts: list[Breakdown],
    probes: dict[str, Probe],
) -> TaskResult:
    """One round: the in-process rows and each form's, the client's default first."""
    from abdoserve.loadtests.bench.report import TaskResult

    default = served.get(GRPC_PACKED) or next(iter(served.values()))
    others = {form: tuple(rows) for form, rows in served.items() if rows is not default}
    onnxruntime, torch = local
    return TaskResult(
        task, len(pool), onnxruntime, torch, tuple(default), tuple(parts), others, probes
    )


def served_round(
    plan: Plan,
    target: Target,
    task: str,
    pool: list[Study],
    *,
    forms: tuple[str, ...],
    peer: Target | None,
) -> tuple[dict[str, list[Measurement]], list[Breakdown]]:
    """The served side of one round: every form at every level (the peer's where it runs)."""
    served: dict[str, list[Measurement]] = {}
    parts: list[Breakdown] = []
    for form in forms:
        server = peer if form == PYTRITON else target
        if server is None:
            continue
        rows, form_parts = observed_levels(
            server, task, pool, plan.concurrency, plan.requests, form=form, scores=plan.scores
        )
        served[form] = rows
        parts += form_parts
    return served, parts


def observed_levels(
    target: Target,
    task: str,
    pool: list[Study],
    levels: tuple[int, ...],
    requests: int,
    *,
    form: str = GRPC_PACKED,
    scores: bool = True,
) -> tuple[list[Measurement], list[Breakdown]]:
    """Each level in `form`, with the server's statistics and CPU read around it where
    its admin key is known."""
    from abdoserve.loadtests.bench.breakdown import breakdown, snapshot
    from abdoserve.loadtests.bench.transports import Served
    from abdoserve.loadtests.bench.workload import time_concurrent

    rows, parts = [], []
    model = model_of(form, task)
    for level in levels:
        served = Served(target.url, task, pool, form, region=target.region, scores=scores)
        with closing(served):
            before = snapshot(target, task, model)
            row = time_concurrent(
                served.new_call, pool, requests, level, THREAD_WARMUP, pipeline=form
            )
            rows.append(row)
            after = snapshot(target, task, model)
        if before is not None and after is not None:
            parts.append(breakdown(task, model, before, after, row=row, encode_ms=served.encode_ms))
    return rows, parts


def start_peer(stack: ExitStack, plan: Plan, target: Target, task: str) -> Target | None:
    """PyTriton serving the same pipeline as one callable (its own process, on the same
    `model.onnx`), held open by `stack`; None when it did not start."""
    from abdoserve.loadtests.bench.pytriton_peer import PeerError, running_peer

    net_folder = plan.repository / f"{task}_net" / "1"
    for attempt in range(1, PEER_ATTEMPTS + 1):
        log_file = plan.repository.parent / f"pytriton_{task}.{attempt}.log"
        try:
            url, pid = stack.enter_context(running_peer(task, net_folder, log_file))
        except PeerError as error:
            # PyTriton 0.7's proxy model sometimes finds its handshake socket refused at
            # start-up under load; a fresh peer usually starts. It is the peer, not us:
            # the bench goes on without its rows rather than fail.
            print(f"pytriton: attempt {attempt} of {PEER_ATTEMPTS} failed: {error}", flush=True)
            continue
        return replace(target, url=url, server_pid=pid, admin_headers=None, region=None)
    print(f"pytriton skipped for {task}: the peer did not start", flush=True)
    return None


def measure_probe(target: Target, task: str, pool: list[Study], requests: int, form: str) -> Probe:
    """The null model on the same studies in the same form, one at a time: what moving
    the bytes costs (time, and server CPU where the server is local)."""
    from abdoserve.loadtests.bench.breakdown import Probe, server_cpu_seconds
    from abdoserve.loadtests.bench.transports import Served
    from abdoserve.loadtests.bench.workload import time_concurrent

    pid = target.server_pid
    served = Served(target.url, task, pool, form, model=PROBE, region=target.region)
    with closing(served):
        before = None if pid is None else server_cpu_seconds(pid)
        row = time_concurrent(served.new_call, pool, requests, 1, THREAD_WARMUP, pipeline=PROBE)
        after = None if pid is None else server_cpu_seconds(pid)
    cpu = None if before is None or after is None else 1e3 * (after - before) / row.requests
    return Probe(form, row, cpu)


def measure_sweep_point(plan: Plan, url: str, tuning: Tuning, images: int) -> SweepPoint:
    from abdoserve.loadtests.bench.in_process import in_process_pipeline, time_in_process
    from abdoserve.loadtests.bench.report import SweepPoint
    from abdoserve.loadtests.bench.workload import study_pool

    pool = study_pool(SWEEP_TASK, SWEEP_POOL, images)
    requests = plan.sweep_requests(images)
    pipeline = in_process_pipeline(plan.repository, tuning, SWEEP_TASK, pool, "onnxruntime")
    local = time_in_process(pipeline, requests)
    served = served_levels(url, SWEEP_TASK, pool, SWEEP_CONCURRENCY, requests)
    return SweepPoint(images, local, tuple(served))


def served_levels(
    url: str, task: str, pool: list[Study], levels: tuple[int, ...], requests: int
) -> list[Measurement]:
    """(b): each concurrency level with fresh clients, after each thread's warm-up."""
    from abdoserve.loadtests.bench.served_target import Target

    rows, _ = observed_levels(Target(url, Tuning()), task, pool, levels, requests)
    return rows


def write_outputs(
    args: argparse.Namespace,
    plan: Plan,
    tuning: Tuning,
    results: list[TaskRounds],
    sweep: list[SweepPoint],
) -> None:
    from abdoserve.loadtests.bench.in_process import SEQUENTIAL_WARMUP
    from abdoserve.loadtests.bench.report import document, write_plot

    if args.json:
        settings = {**asdict(plan), "repository": str(plan.repository)}
        settings.update(warmup={"sequential": SEQUENTIAL_WARMUP, "per_thread": THREAD_WARMUP})
        content = document(settings, tuning, results, sweep, SWEEP_TASK)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(content, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(args.plot, results, sweep)
        print(f"wrote {args.plot}")
