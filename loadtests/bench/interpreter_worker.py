"""One timed run of the in-process pipeline, for `bench interpreter` (run as a script).

argv: TASK REPOSITORY STUDIES. Prints one JSON line: wall and CPU ms per study, and
which libpython this process runs on.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

WARMUP = 10
POOL = 4


def main(task: str, repository: Path, studies: int) -> dict[str, object]:
    from abdoserve.export.configs import Tuning
    from abdoserve.loadtests.bench.pipelines import OnnxInProcess
    from abdoserve.loadtests.bench.serving import build_record
    from abdoserve.loadtests.bench.workload import study_pool
    from abdoserve.preprocessing.tasks import get_task
    from abdoserve.serving.answer import ModelIdentity

    spec = get_task(task)
    identity = ModelIdentity.from_parameters(task, "1", build_record(repository, task))
    onnx_path = repository / f"{task}_net" / "1" / "model.onnx"
    pipeline = OnnxInProcess(spec, study_pool(task, POOL), identity, Tuning(), onnx_path)
    for number in range(WARMUP):
        pipeline(number)
    wall, cpu = time.perf_counter(), time.process_time()
    for number in range(studies):
        pipeline(number)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "ms_per_study": 1e3 * wall / studies,
        "cpu_ms_per_study": 1e3 * cpu / studies,
        "libpython": shared_libpython(),
    }


def shared_libpython() -> str:
    """The libpython mapped into this process, or "" for a static interpreter."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        if "libpython" in line:
            return line.split()[-1]
    return ""


if __name__ == "__main__":
    task, repository, studies = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(main(task, repository, studies)))
