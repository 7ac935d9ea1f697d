"""Every resource a request can make the intake spend is bounded before the work, and
refused with the limit named: bombs, lying codestreams, nesting, oversized requests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from abdoserve.export.phantom import build_study
from abdoserve.loadtests import hostile
from abdoserve.preprocessing.decode import decode_instance
from abdoserve.preprocessing.errors import (
    CodestreamMismatchError,
    InputTooLargeError,
    NestingTooDeepError,
)
from abdoserve.preprocessing.nesting import load_clinical_json
from abdoserve.preprocessing.specs import IntakeLimits
from abdoserve.preprocessing.study import StudyPreparer
from abdoserve.preprocessing.tasks import get_task

LIMITS = IntakeLimits()
MIB = 1024 * 1024


def test_a_deflate_bomb_is_refused_while_inflating_with_bounded_memory(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(hostile.deflate_bomb(1024**3))
    assert bomb.stat().st_size < 2 * MIB  # 1 GiB inflated
    # A fresh process, so its peak RSS is this decode's alone.
    code = (
        "import sys; from pathlib import Path\n"
        "from abdoserve.preprocessing.decode import decode_instance\n"
        "from abdoserve.preprocessing.errors import InputTooLargeError\n"
        "from abdoserve.preprocessing.specs import IntakeLimits\n"
        f"data = Path({str(bomb)!r}).read_bytes()\n"
        "try:\n    decode_instance(data, 0, IntakeLimits())\nexcept InputTooLargeError as e:\n"
        "    print(e)\n"
        # VmHWM, not ru_maxrss: a forked child's ru_maxrss starts at its parent's peak.
        "print([int(line.split()[1]) // 1024 for line in open('/proc/self/status')"
        " if line.startswith('VmHWM')][0])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    message, peak_mib = done.stdout.strip().splitlines()
    assert message == (
        "instance 0: the deflated dataset inflates past the limit of "
        f"{LIMITS.max_bytes_per_instance} bytes per instance"
    )
    assert int(peak_mib) < 400, f"peak RSS {peak_mib} MiB while refusing a 1 GiB bomb"


def test_a_small_deflated_study_still_decodes_like_its_explicit_twin() -> None:
    deflated = build_study(
        "bone_density_ct", seed=1, transfer_syntax="DeflatedExplicitVRLittleEndian"
    )
    explicit = build_study("bone_density_ct", seed=1)
    a = decode_instance(deflated.instances[0], 0, LIMITS).frames[0].pixels
    b = decode_instance(explicit.instances[0], 0, LIMITS).frames[0].pixels
    assert (a == b).all()


@pytest.mark.parametrize(
    "lie", [hostile.j2k_size_lie, hostile.jpeg_ls_size_lie], ids=["jpeg2000", "jpeg-ls"]
)
def test_a_codestream_that_lies_about_its_size_is_refused_before_decoding(lie: object) -> None:
    data = lie()  # type: ignore[operator]
    with pytest.raises(CodestreamMismatchError) as caught:
        decode_instance(data, 3, LIMITS)
    assert str(caught.value) == (
        "instance 3: frame 0: the codestream header says 65535 x 65535 pixels, but "
        "(0028,0010) Rows x (0028,0011) Columns is 512 x 512; refused before decoding"
    )
    assert caught.value.reason == "codestream_mismatch"


@pytest.mark.parametrize("syntax", ["JPEG2000Lossless", "JPEGLSLossless"])
def test_honest_codestreams_pass_the_check(syntax: str) -> None:
    data = hostile.phantom_instance(syntax=syntax)
    assert decode_instance(data, 0, LIMITS).frames[0].pixels.shape == (512, 512)


@pytest.mark.parametrize("levels", [17, 10_000])
def test_deeply_nested_sequences_are_the_requests_fault(levels: int) -> None:
    with pytest.raises(NestingTooDeepError, match="nested deeper than the limit of 16"):
        decode_instance(hostile.deep_sequence(levels), 0, LIMITS)


def test_sequences_within_the_limit_decode() -> None:
    decoded = decode_instance(hostile.deep_sequence(8), 0, LIMITS)
    assert decoded.frames[0].pixels.shape == (512, 512)


@pytest.mark.parametrize(
    ("document", "error", "message"),
    [
        (hostile.deep_json(30_000), NestingTooDeepError, "deeper than the limit of 8"),
        (hostile.long_number(5_000), InputTooLargeError, "number of 5000 characters"),
        (b'{"age": "' + b"x" * 70_000 + b'"}', InputTooLargeError, "over the limit of 65536"),
    ],
    ids=["deep", "long-number", "large"],
)
def test_clinical_json_is_bounded_before_parsing(
    document: bytes, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        load_clinical_json(document, LIMITS)


def test_clinical_json_within_the_limits_parses() -> None:
    document = json.dumps({"age": 61, "sex": "F", "roi": [1, 2, 3, 4]}).encode()
    assert load_clinical_json(document, LIMITS) == {"age": 61, "sex": "F", "roi": [1, 2, 3, 4]}
    assert load_clinical_json(b"  ", LIMITS) == {}


def test_a_request_over_the_total_byte_limit_is_refused_before_decoding() -> None:
    study = build_study("bone_density_ct", seed=1)
    total = sum(len(item) for item in study.instances)
    overrides = {"limits.max_bytes_per_instance": 1024, "limits.max_bytes_per_request": total - 1}
    spec = get_task("bone_density_ct", overrides)
    with pytest.raises(InputTooLargeError, match=f"hold {total} bytes, over the limit of"):
        StudyPreparer(spec)(study.instances, {})
