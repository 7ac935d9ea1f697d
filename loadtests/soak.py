"""`abdoserve soak`: mixed traffic at a constant rate for a long time, watching for leaks.

Locust runs the `soak` scenario (the hospital-day mix at `--rate` requests per
second) headless while this process samples the server every `--interval-s` from
/proc. The baseline is the first minute after `--warmup-s`, the end the last minute,
each the median of its samples (ONNX Runtime's arenas step up and down by a chunk: one
sample caught in a dip made a flat run read as +6 %). The verdict compares them: zero
failed requests, the RSS of tritonserver and of every model's stubs within
`--rss-tolerance` (5 %), and no growth in the Python backend's /dev/shm, in file
descriptors or in threads. Writes `soak.json` to --out; exit 1 on a failed verdict, 2
when locust did not finish.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from abdoserve.loadtests.cli import SCENARIOS_DIR, execute
from abdoserve.loadtests.resources import Sample, sample

EXIT_OK, EXIT_LEAK, EXIT_LOCUST = 0, 1, 2
COUNT_SLACK = 2  # fds and threads: a gRPC worker coming and going is not a leak


@dataclass(frozen=True)
class Check:
    what: str
    baseline: float
    end: float
    limit: float

    @property
    def passed(self) -> bool:
        return self.end <= self.limit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-time", default="30m", help="e.g. 30m, 1h (default %(default)s)")
    parser.add_argument("--rate", type=float, default=40.0, help="requests/s, all users together")
    parser.add_argument("--users", type=int, default=8, help="locust users (default %(default)s)")
    parser.add_argument("--host", required=True, help="the server's gRPC HOST:PORT")
    parser.add_argument("--server-pid", type=int, required=True, help="its tritonserver's pid")
    parser.add_argument("--warmup-s", type=float, default=600.0, help="before the baseline")
    parser.add_argument("--interval-s", type=float, default=5.0, help="between samples")
    parser.add_argument("--rss-tolerance", type=float, default=0.05, help="allowed RSS growth")
    parser.add_argument(
        "--shm-tolerance", type=float, default=0.0, help="allowed /dev/shm growth (default none)"
    )
    parser.add_argument("--out", type=Path, default=Path("build") / "soak", help="results folder")
    parser.add_argument(
        "--pool-size", type=int, default=3, help="phantom studies per task (default %(default)s)"
    )


def prime(args: argparse.Namespace, rounds: int = 3) -> None:
    """Every payload at the run's full concurrency, a few times: buffers and shared memory
    reach the sizes the run will need before the warm-up ends (a step up later would be
    a high-water mark, not a leak, but reads as growth)."""
    from concurrent.futures import ThreadPoolExecutor

    from abdoserve.export.phantom import TASK_NAMES
    from abdoserve.loadtests.payloads import payload_pool
    from abdoserve_client import AbdoServeClient

    payloads = [item for kind in TASK_NAMES for item in payload_pool(kind, args.pool_size)]
    with AbdoServeClient(args.host, timeout_s=120) as client:

        def send_all(_: int) -> None:
            for payload in payloads:
                client.infer(payload.model, payload.instances, payload.clinical)

        with ThreadPoolExecutor(args.users) as pool:
            for _ in range(rounds):
                list(pool.map(send_all, range(args.users)))


def run(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    prime(args)
    samples: list[Sample] = []
    done = threading.Event()
    watcher = threading.Thread(target=_watch, args=(args, samples, done), daemon=True)
    watcher.start()
    try:
        code = execute(_locust_args(args), args.out)
    finally:
        done.set()
        watcher.join()
    if code not in (0, 1):
        print(f"error: locust exited with status {code}; see {args.out / 'locust.log'}")
        return EXIT_LOCUST
    return report(args, samples, failed_requests(args.out / "stats_stats.csv"))


def _locust_args(args: argparse.Namespace) -> argparse.Namespace:
    os.environ["ABDOSERVE_SOAK_RATE"] = str(args.rate)
    os.environ["ABDOSERVE_SOAK_USERS"] = str(args.users)
    os.environ["ABDOSERVE_POOL_SIZE"] = str(args.pool_size)
    return argparse.Namespace(
        scenario=SCENARIOS_DIR / "soak.py",
        users=args.users,
        spawn_rate=float(args.users),
        run_time=args.run_time,
        host=args.host,
        deadline_s=None,
        root_cert=None,
        client_key=None,
        client_cert=None,
        tls=False,
        user_class=[],
    )


def _watch(args: argparse.Namespace, samples: list[Sample], done: threading.Event) -> None:
    started = time.monotonic()
    while not done.wait(args.interval_s):
        samples.append(sample(args.server_pid, time.monotonic() - started))
    samples.append(sample(args.server_pid, time.monotonic() - started))


def failed_requests(stats: Path) -> int:
    with stats.open() as handle:
        for row in csv.DictReader(handle):
            if row["Name"] == "Aggregated":
                return int(row["Failure Count"])
    raise ValueError(f"{stats} has no Aggregated row")


def checks(baseline: Sample, end: Sample, tolerance: float, shm_tolerance: float) -> list[Check]:
    found = [
        Check(f"RSS {group} (MiB)", value, end.rss_mib.get(group, 0.0), value * (1 + tolerance))
        for group, value in sorted(baseline.rss_mib.items())
    ]
    shm_limit = baseline.shm_mib * (1 + shm_tolerance)
    found.append(Check("/dev/shm (MiB)", baseline.shm_mib, end.shm_mib, shm_limit))
    found.append(Check("file descriptors", baseline.fds, end.fds, baseline.fds + COUNT_SLACK))
    found.append(Check("threads", baseline.threads, end.threads, baseline.threads + COUNT_SLACK))
    return found


WINDOW_S = 60.0  # the baseline's and the end's span


def window_samples(interval_s: float, available: int) -> int:
    """Samples in a minute, but at most half of those after warm-up (at least one)."""
    return max(1, min(round(WINDOW_S / interval_s), available // 2))


def median_sample(window: list[Sample]) -> Sample:
    """Each figure's median over `window` (same models in every sample)."""
    keys = window[0].rss_mib.keys()
    return Sample(
        at_s=window[0].at_s,
        rss_mib={
            key: float(statistics.median(s.rss_mib.get(key, 0.0) for s in window)) for key in keys
        },
        fds=int(statistics.median(s.fds for s in window)),
        threads=int(statistics.median(s.threads for s in window)),
        shm_mib=float(statistics.median(s.shm_mib for s in window)),
    )


def report(args: argparse.Namespace, samples: list[Sample], failures: int) -> int:
    after_warmup = [item for item in samples if item.at_s >= args.warmup_s]
    if len(after_warmup) < 2:
        print("error: the run ended before two samples after warm-up")
        return EXIT_LEAK
    count = window_samples(args.interval_s, len(after_warmup))
    baseline, end = median_sample(after_warmup[:count]), median_sample(after_warmup[-count:])
    found = checks(baseline, end, args.rss_tolerance, args.shm_tolerance)
    passed = failures == 0 and all(check.passed for check in found)
    print(f"failed requests: {failures}")
    heading = "check (each a minute's median)"
    print(f"{heading:<48} {'after warm-up':>14} {'end':>10} {'limit':>10}  verdict")
    for check in found:
        verdict = "ok" if check.passed else "GREW"
        print(
            f"{check.what:<48} {check.baseline:>14.1f} {check.end:>10.1f} {check.limit:>10.1f}  "
            f"{verdict}"
        )
    document = {
        "failed_requests": failures,
        "passed": passed,
        "checks": [asdict(check) | {"passed": check.passed} for check in found],
        "samples": [asdict(item) for item in samples],
    }
    (args.out / "soak.json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"soak {'passed' if passed else 'FAILED'}; samples in {args.out / 'soak.json'}")
    return EXIT_OK if passed else EXIT_LEAK
