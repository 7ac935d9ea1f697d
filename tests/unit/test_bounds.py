"""Every resource a request can make the intake spend is bounded before the work, and
refused with the limit named: bombs, lying codestreams, nesting, oversized requests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from abdoserve.export.phantom import build_study
from abdoserve.loadtests import hostile
from abdoserve.preprocessing import decode as decode_module
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


def printed_lines(code: str) -> list[str]:
    """What `code` prints, run in a fresh interpreter, so its peak memory is its own."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()


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
    message, peak_mib = printed_lines(code)
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


# Issue 19's probe in miniature: 16 (not 96) deflated slices of about 320 KB, each inflating
# a 60 MiB private element under the 64 MiB instance bound; 960 MiB inflated in all.
FLOOD_INSTANCES = 16
FLOOD_PRIVATE_BYTES = 60 * MIB
FLOOD_PEAK_MIB = 200  # the whole flood, kept, traced 1 GiB before the request's budget


def test_a_request_of_many_inflating_instances_is_refused_at_its_total_with_bounded_memory(
    tmp_path: Path,
) -> None:
    flood = tmp_path / "flood.json"
    flood.write_text(json.dumps([FLOOD_INSTANCES, FLOOD_PRIVATE_BYTES]))
    # A fresh process, so the traced peak is this request's alone.
    code = (
        "import json, sys, tracemalloc; from pathlib import Path\n"
        "from abdoserve.loadtests.hostile import inflation_flood\n"
        "from abdoserve.preprocessing.study import StudyPreparer\n"
        "from abdoserve.preprocessing.tasks import get_task\n"
        f"count, size = json.loads(Path({str(flood)!r}).read_text())\n"
        "instances = inflation_flood(count, size)\n"
        "prepare = StudyPreparer(get_task('esophageal_cancer_ct'))\n"
        "tracemalloc.start()\n"
        "try:\n    prepare(instances, {})\n    print('answered')\n"
        "except Exception as e:\n    print(type(e).__name__, e.reason, e, sep='|')\n"
        "print(tracemalloc.get_traced_memory()[1] // 2**20)\n"
    )
    outcome, peak_mib = printed_lines(code)
    each = len(hostile.inflation_flood(1, FLOOD_PRIVATE_BYTES)[0])
    assert each < 400_000 and FLOOD_INSTANCES * FLOOD_PRIVATE_BYTES > 3 * 2**28
    limit = LIMITS.max_inflated_bytes_per_request
    # Instances 0 to 3 inflate to 4 x 60.5 MiB = 242 MiB; instance 4 crosses 256 MiB.
    assert outcome == (
        "InputTooLargeError|input_too_large|instance 4: the request's instances inflate past "
        f"the limit of {limit} bytes per request"
    )
    assert int(peak_mib) < FLOOD_PEAK_MIB, f"traced peak {peak_mib} MiB refusing the flood"


def test_an_inflated_instance_keeps_only_its_pixels() -> None:
    """A view into the inflated dataset would keep its 60 MiB private element alive."""
    (instance,) = hostile.inflation_flood(1, FLOOD_PRIVATE_BYTES)
    owner = decode_instance(instance, 0, LIMITS).frames[0].pixels
    while isinstance(owner.base, np.ndarray):  # a frame is a view of its instance's pixels
        owner = owner.base
    assert owner.base is None, "the frame's memory belongs to the inflated dataset"
    assert owner.nbytes == 512 * 512 * 2


def test_a_deflated_study_within_the_request_limits_answers_like_its_explicit_twin() -> None:
    spec = get_task("esophageal_cancer_ct")
    deflated = build_study(
        "esophageal_cancer_ct", seed=1, transfer_syntax="DeflatedExplicitVRLittleEndian"
    )
    explicit = build_study("esophageal_cancer_ct", seed=1)
    a, b = StudyPreparer(spec)(deflated.instances, {}), StudyPreparer(spec)(explicit.instances, {})
    assert a.samples.shape == (8, 1, 192, 192)
    assert (a.samples == b.samples).all() and (a.sources == b.sources).all()


def test_a_request_just_within_its_inflated_limit_is_answered() -> None:
    """Four 60 MiB private elements (242 MiB) fit the 256 MiB request limit."""
    instances = hostile.inflation_flood(4, FLOOD_PRIVATE_BYTES)
    prepared = StudyPreparer(get_task("esophageal_cancer_ct"))(instances, {})
    assert prepared.samples.shape == (4, 1, 192, 192)


@pytest.mark.parametrize("syntax", ["JPEG2000Lossless", "RLELossless", "ExplicitVRLittleEndian"])
def test_a_request_over_its_pixel_bytes_is_refused_before_the_next_decode(
    syntax: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = build_study("bone_density_ct", seed=1, transfer_syntax=syntax)
    slice_bytes = 512 * 512 * 2
    overrides = {
        "limits.max_pixels_per_instance": 512 * 512,
        "limits.max_pixel_bytes_per_request": 4 * slice_bytes,
    }
    decoded: list[int] = []
    real = decode_module.decode_pixels

    def counting(data: bytes, parsed: decode_module.Parsed, index: int) -> object:
        decoded.append(index)
        return real(data, parsed, index)

    monkeypatch.setattr(decode_module, "decode_pixels", counting)
    with pytest.raises(InputTooLargeError) as caught:
        StudyPreparer(get_task("bone_density_ct", overrides))(study.instances, {})
    assert str(caught.value) == (
        f"instance 4: the request's images decode to more than the limit of {4 * slice_bytes} "
        "pixel bytes per request ((0028,0010) Rows x (0028,0011) Columns x frames x "
        "(0028,0100) Bits Allocated, summed over its instances)"
    )
    assert decoded == [0, 1, 2, 3]  # instance 4 was never decoded
    StudyPreparer(get_task("bone_density_ct", overrides))(study.instances[:4], {})
