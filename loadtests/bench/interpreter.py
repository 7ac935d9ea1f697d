"""`abdoserve bench interpreter`: the same in-process pipeline under two CPython builds.

Triton's Python-backend stub embeds the shared `libpython3.11.so`. Debian's
`/usr/bin/python3.11`, which runs every in-process figure, links the interpreter
statically. A shared libpython is compiled as position-independent code, and calls
between its own functions can go through the PLT. So the same Python code can run
slower inside the stub for that reason alone, before any Triton overhead.

This bench measures that directly. A ten-line C host (`Py_BytesMain`) is compiled
against the system's `libpython3.11.so`. The in-process pipeline (the served `_net`'s
own ONNX Runtime runner, intake and answer, as `bench serving` runs it) is timed
under the host and under the static interpreter. Runs alternate, on the same studies
and the same repository, and the ratio is printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from abdoserve.deploy.serve import prepared_repository
from abdoserve.export.locations import DEFAULT_REPOSITORY

HOST_SOURCE = """\
#include <Python.h>
/* CPython's own main, linked against the shared libpython (as the Triton stub is). */
int main(int argc, char **argv) { return Py_BytesMain(argc, argv); }
"""
WORKER = "abdoserve.loadtests.bench.interpreter_worker"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="bone_density_ct", help="task (bone_density_ct)")
    parser.add_argument("--studies", type=int, default=60, help="timed studies per run (60)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating run pairs (3)")
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--json", type=Path, help="write the raw numbers here")


def run(args: argparse.Namespace) -> int:
    repository = prepared_repository(args.repository, 1)
    with tempfile.TemporaryDirectory(prefix="abdoserve-interp-") as scratch:
        host = compile_host(Path(scratch))
        interpreters = {
            "static (python3.11)": [sys.executable],
            "shared (libpython3.11.so)": [host],
        }
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in interpreters}
        for round_number in range(args.rounds):
            for name, command in interpreters.items():
                measured = run_worker(command, args.task, repository, args.studies)
                results[name].append(measured)
                print(
                    f"round {round_number + 1} {name}: {measured['ms_per_study']:.2f} ms/study",
                    flush=True,
                )
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"task": args.task, "runs": results}, indent=2) + "\n")
        print(f"raw numbers: {args.json}")
    return 0


def compile_host(folder: Path) -> str:
    """The C host, linked against the libpython the stub uses; its path."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise SystemExit("bench interpreter: needs a C compiler (gcc)")
    source = folder / "host.c"
    source.write_text(HOST_SOURCE)
    binary = folder / "python-shared"
    include = sysconfig.get_path("include")
    libdir = str(sysconfig.get_config_var("LIBDIR"))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    command = [
        compiler,
        "-O2",
        f"-I{include}",
        str(source),
        "-o",
        str(binary),
        f"-L{libdir}",
        f"-lpython{version}",
        "-lm",
        "-ldl",
    ]
    subprocess.run(command, check=True)
    linked = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True)
    if f"libpython{version}.so" not in linked.stdout:
        raise SystemExit("bench interpreter: the host did not link the shared libpython")
    return str(binary)


def run_worker(command: list[str], task: str, repository: Path, studies: int) -> dict[str, Any]:
    """One timed run in a fresh process; the worker adds this environment's site-packages
    itself, so both interpreters import exactly the same files."""
    site = sysconfig.get_path("purelib")
    bootstrap = (
        "import site, runpy, sys; "
        f"site.addsitedir({site!r}); "
        f"runpy.run_module({WORKER!r}, run_name='__main__')"
    )
    done = subprocess.run(
        [*command, "-c", bootstrap, task, str(repository), str(studies)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = [f"{'interpreter':28} {'ms/study (median of runs)':>27} {'CPU ms/study':>13}"]
    medians = {}
    for name, runs in results.items():
        wall = statistics.median(run["ms_per_study"] for run in runs)
        cpu = statistics.median(run["cpu_ms_per_study"] for run in runs)
        medians[name] = wall
        lines.append(f"{name:28} {wall:27.2f} {cpu:13.2f}")
    static, shared = medians.values()
    lines.append(f"shared / static: {shared / static:.3f}")
    return "\n".join(lines)
