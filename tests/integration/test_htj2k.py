"""An HTJ2K study answers through `abdoserve infer` and the real server exactly as the
same study uncompressed does: the lossless syntaxes, and .203 carrying a reversible
codestream (it takes either)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydicom import uid

from abdoserve.export.phantom import PhantomStudy, build_study, write_study
from tests.htj2k import SYNTAXES, htj2k_study

TASK = "liver_fibrosis_ct"  # clinical inputs travel in request.json beside the files
ABDOSERVE = Path(sys.executable).with_name("abdoserve")  # the console command


def infer(study: PhantomStudy, folder: Path, grpc_url: str) -> dict[str, Any]:
    """`abdoserve infer TASK FILES... --json` on the study written to `folder`."""
    files = [str(path) for path in write_study(study, folder) if path.suffix == ".dcm"]
    command = [str(ABDOSERVE), "infer", TASK, *files, "--url", grpc_url, "--json"]
    command += ["--clinical-json", str(folder / "request.json")]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


@pytest.fixture(scope="module")
def plain() -> PhantomStudy:
    return build_study(TASK, seed=6)


@pytest.fixture(scope="module")
def plain_answer(
    plain: PhantomStudy, grpc_url: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    return infer(plain, tmp_path_factory.mktemp("plain"), grpc_url)


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda syntax: syntax[-3:])
def test_an_htj2k_study_answers_as_the_uncompressed_one(
    syntax: uid.UID,
    plain: PhantomStudy,
    plain_answer: dict[str, Any],
    grpc_url: str,
    tmp_path: Path,
) -> None:
    coded = infer(htj2k_study(plain, syntax), tmp_path, grpc_url)
    assert coded["answer"]["result"] == plain_answer["answer"]["result"]
    assert coded["study_values"] == plain_answer["study_values"]
    assert coded["image_values"] == plain_answer["image_values"]
    assert len(coded["image_values"]) == len(plain.instances)
    assert coded["answer"]["model"] == plain_answer["answer"]["model"]
