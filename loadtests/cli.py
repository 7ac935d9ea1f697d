"""`abdoserve loadtest SCENARIO`: run a locust scenario headless, then gate it on SLOs.

Locust runs in a subprocess (it monkey-patches the process it runs in), writing
CSVs and an HTML report to --out; the SLO gate then reads `stats_stats.csv` and a
PNG of latency and throughput is drawn from `stats_stats_history.csv`. Only the
standard library is imported at module level: `abdoserve`'s parser imports this
module eagerly. Also runs as `python -m abdoserve.loadtests.cli`.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from abdoserve.loadtests.slo import EVERY_NAME, Budget

PACKAGE_DIR = Path(__file__).resolve().parent
SCENARIOS_DIR = PACKAGE_DIR / "scenarios"
LOCUST_CONF = PACKAGE_DIR / "locust.conf"
EXIT_OK, EXIT_SLO, EXIT_LOCUST = 0, 1, 2
LOCUST_FINISHED = (0, 1)  # locust exits 1 when any request failed (--exit-code-on-error)
EXIT_MARGIN_S = 60.0  # start-up, payload building and shutdown on top of --run-time
RUN_TIME = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?$")
EPILOG = (
    "SCENARIO is one of: {names}, or a locustfile path. The gate fails (exit 1) when a "
    "request name's failure ratio exceeds --max-failure-ratio or its p95/p99 exceed the "
    "budget; --p95-ms 800 (no NAME=) budgets every name. Exit 2: locust did not finish. "
    "--host, TLS and deadline also come from LOCUST_HOST, ABDOSERVE_TLS, "
    "ABDOSERVE_DEADLINE_S (see loadtests/connection.py)."
)


def scenario_names() -> list[str]:
    return sorted(path.stem for path in SCENARIOS_DIR.glob("*.py") if path.stem != "__init__")


def scenario_file(scenario: str) -> Path:
    """A scenario name from loadtests/scenarios/, or a path to a locustfile."""
    path = Path(scenario) if scenario.endswith(".py") else SCENARIOS_DIR / f"{scenario}.py"
    if not path.is_file():
        known = ", ".join(scenario_names())
        raise argparse.ArgumentTypeError(f"no scenario {scenario!r}; known: {known}")
    return path.resolve()


def run_time_s(text: str) -> int:
    """Locust's run-time syntax ('90', '30s', '5m', '1h30m') in seconds."""
    match = RUN_TIME.match(text.strip())
    if not text.strip() or match is None:
        raise argparse.ArgumentTypeError(f"run time {text!r}: use e.g. 30s, 5m, 1h30m")
    hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return 3600 * hours + 60 * minutes + seconds


def budget_item(text: str) -> tuple[str, float]:
    """'NAME=MS' -> (NAME, MS); a bare 'MS' budgets every request name."""
    name, separator, value = text.rpartition("=")
    try:
        milliseconds = float(value)
    except ValueError:
        milliseconds = -1.0
    if milliseconds <= 0 or (separator and not name):
        raise argparse.ArgumentTypeError(f"budget {text!r}: use NAME=MS or MS (positive)")
    return (name if separator else EVERY_NAME), milliseconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG.format(names=", ".join(scenario_names()))
    parser.add_argument("scenario", type=scenario_file, help="scenario name or locustfile")
    load = parser.add_argument_group("load")
    load.add_argument("--users", type=int, default=4, help="peak users (default %(default)s)")
    load.add_argument(
        "--spawn-rate", type=float, default=2.0, help="users started per s (default %(default)s)"
    )
    load.add_argument("--run-time", default="60s", help="e.g. 30s, 5m (default %(default)s)")
    load.add_argument(
        "--user-class", action="append", default=[], help="only this user class (repeatable)"
    )
    load.add_argument("--out", type=Path, help="results folder (default build/loadtest/SCENARIO)")
    target = parser.add_argument_group("target")
    target.add_argument("--host", help="gRPC HOST:PORT or grpcs://HOST:PORT (default locust.conf)")
    target.add_argument("--deadline-s", type=float, help="deadline per call (default 30)")
    target.add_argument("--tls", action="store_true", help="use a TLS channel")
    target.add_argument("--root-cert", help="PEM root certificates (with --tls)")
    target.add_argument("--client-key", help="PEM private key for mutual TLS")
    target.add_argument("--client-cert", help="PEM certificate chain for mutual TLS")
    slo = parser.add_argument_group("SLO gate")
    slo.add_argument(
        "--max-failure-ratio", type=float, default=0.0, help="per name (default %(default)s)"
    )
    for metric in ("p95", "p99"):
        slo.add_argument(
            f"--{metric}-ms",
            type=budget_item,
            action="append",
            default=[],
            metavar="[NAME=]MS",
            help=f"{metric} budget in ms for NAME (or every name); repeatable",
        )


def budget_from(args: argparse.Namespace) -> Budget:
    return Budget(args.max_failure_ratio, dict(args.p95_ms), dict(args.p99_ms))


def out_dir(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else Path("build") / "loadtest" / args.scenario.stem


def locust_command(args: argparse.Namespace, out: Path) -> list[str]:
    """The headless locust command line; unset target options stay with locust's sources."""
    command = [sys.executable, "-m", "locust", "--config", str(LOCUST_CONF)]
    command += ["-f", str(args.scenario), "--headless", "--users", str(args.users)]
    command += ["--spawn-rate", str(args.spawn_rate), "--run-time", args.run_time]
    command += ["--csv", str(out / "stats"), "--csv-full-history"]
    command += ["--html", str(out / "report.html"), "--logfile", str(out / "locust.log")]
    optional = {
        "--host": args.host,
        "--deadline-s": args.deadline_s,
        "--grpc-root-cert": args.root_cert,
        "--grpc-client-key": args.client_key,
        "--grpc-client-cert": args.client_cert,
    }
    for flag, value in optional.items():
        if value is not None:
            command += [flag, str(value)]
    if args.tls:
        command.append("--grpc-tls")
    return command + list(args.user_class)


def execute(args: argparse.Namespace, out: Path, margin_s: float = EXIT_MARGIN_S) -> int:
    """Run locust; its exit status. Raises `subprocess.TimeoutExpired` (after killing it)
    when it outlives --run-time by `margin_s`."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # the scenario files import `loadtests`, even from a checkout that is not installed
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, (str(PACKAGE_DIR.parent), env.get("PYTHONPATH")))
    )
    command = locust_command(args, out)
    timeout_s = run_time_s(args.run_time) + margin_s
    completed = subprocess.run(command, check=False, env=env, timeout=timeout_s)
    return completed.returncode


def judge(out: Path, budget: Budget, title: str = "") -> int:
    """Print the SLO verdict for a finished run in `out` and draw its plot."""
    from abdoserve.loadtests.plot import plot_history
    from abdoserve.loadtests.slo import gate

    stats = out / "stats_stats.csv"
    if not stats.is_file():
        print(f"error: no locust statistics at {stats}", file=sys.stderr)
        return EXIT_LOCUST
    verdict = gate(stats, budget)
    print(verdict.table())
    png = plot_history(out / "stats_stats_history.csv", out / "latency.png", title)
    print(f"report: {out / 'report.html'}  plot: {png}")
    return EXIT_OK if verdict.passed else EXIT_SLO


def run(args: argparse.Namespace) -> int:
    budget = budget_from(args)
    out = out_dir(args)
    try:
        code = execute(args, out)
    except subprocess.TimeoutExpired:
        print(f"error: locust ran past --run-time {args.run_time} and was killed", file=sys.stderr)
        return EXIT_LOCUST
    if code not in LOCUST_FINISHED:
        print(f"error: locust exited with status {code}; see {out / 'locust.log'}", file=sys.stderr)
        return EXIT_LOCUST
    return judge(out, budget, title=f"{args.scenario.stem}, {args.users} users")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="abdoserve loadtest", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
