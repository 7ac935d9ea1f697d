"""The `abdoserve` command line imports only the module of the command it runs.

Each case runs in a fresh interpreter, so `sys.modules` shows exactly what one
invocation loaded: `abdoserve --help` and `abdoserve infer` must never pay for torch,
ONNX, ONNX Runtime or OpenVINO (2.4 s and 360 MB before the parser became lazy).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from abdoserve.deploy.cli import COMMANDS, build_parser, selected_path

HEAVY = ("torch", "onnx", "onnxruntime", "openvino", "nncf", "matplotlib", "locust")

# Runs `abdoserve ARGS` in-process, then prints the heavy modules it imported and the
# exit status (argparse exits 0 after --help, 2 on bad words; a refused study exits 2).
PROBE = """
import json, sys
from abdoserve.deploy.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as exit:
    status = exit.code
heavy = sorted(name for name in {heavy!r} if name in sys.modules)
print(json.dumps({{"status": status, "heavy": heavy}}))
"""


def run_cli(*words: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *words],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize(
    "words",
    [("--help",), ("infer", "--help"), ("bench", "--help"), ("-v", "infer", "--help")],
    ids=["help", "infer-help", "bench-help", "verbose-infer-help"],
)
def test_help_imports_nothing_heavy(words: tuple[str, ...]) -> None:
    assert run_cli(*words) == {"status": 0, "heavy": []}


def test_infer_imports_nothing_heavy(tmp_path: Path) -> None:
    """A whole `abdoserve infer` against a closed port: it reads the study, tries, fails."""
    not_dicom = tmp_path / "1.dcm"
    not_dicom.write_bytes(b"not a DICOM file")
    outcome = run_cli("infer", "bone_density_ct", str(not_dicom), "--url", "127.0.0.1:9")
    assert outcome["heavy"] == []
    assert outcome["status"] == 1  # UNAVAILABLE after the client's retries


@pytest.mark.parametrize("path", [path for path, _, _ in COMMANDS], ids=" ".join)
def test_each_command_is_found_from_its_words(path: tuple[str, ...]) -> None:
    words = [*path, "--help"]
    assert selected_path(["-v", *words]) == path
    with pytest.raises(SystemExit) as exited:
        build_parser(words).parse_args(words)
    assert exited.value.code == 0


def test_an_unknown_command_is_refused_by_argparse() -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser(["nonsense"]).parse_args(["nonsense"])
    assert exited.value.code == 2
