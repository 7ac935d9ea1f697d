"""Property: whatever bytes arrive, the intake ends in an answer or an IntakeError, within
a time and memory bound. Inputs are real files in every transfer syntax we decode,
mutated where decoders break (see tests/mutations.py).

ABDOSERVE_FUZZ_EXAMPLES raises the example count for a long run; CI runs a fixed,
derandomized set so that a failure reproduces.
"""

from __future__ import annotations

import functools
import os
import tracemalloc
from datetime import timedelta

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from abdoserve.export.phantom import TRANSFER_SYNTAXES, build_study
from abdoserve.export.phantom.enhanced import enhanced_multiframe
from abdoserve.preprocessing.errors import IntakeError
from abdoserve.preprocessing.study import PreparedStudy, StudyPreparer
from abdoserve.preprocessing.tasks import get_task
from tests.mutations import MUTATIONS, Mutation

EXAMPLES = int(os.environ.get("ABDOSERVE_FUZZ_EXAMPLES", "250"))
PEAK_BYTES = 256 * 1024 * 1024  # Python and numpy allocations while one study is prepared
TASK = "bone_density_ct"


@functools.cache
def seeds() -> dict[str, tuple[bytes, ...]]:
    """Three-slice studies in every transfer syntax, and as one Enhanced CT object."""
    studies = {
        name: build_study(TASK, seed=3, transfer_syntax=name, slices=3).instances
        for name in TRANSFER_SYNTAXES
    }
    studies["EnhancedCT"] = (enhanced_multiframe(studies["ExplicitVRLittleEndian"]),)
    return studies


@functools.cache
def preparer() -> StudyPreparer:
    return StudyPreparer(get_task(TASK))


def bounded_prepare(instances: tuple[bytes, ...]) -> PreparedStudy | IntakeError:
    """Prepare the study; the answer or the IntakeError, with allocations measured."""
    tracemalloc.start()
    try:
        return preparer()(instances, {})
    except IntakeError as error:
        return error
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < PEAK_BYTES, f"{peak >> 20} MiB allocated while preparing one study"


@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=timedelta(seconds=20),  # a hang, not a speed test: 1-2 ms is typical
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
@given(
    syntax=st.sampled_from(sorted(seeds())),
    mutation=st.sampled_from(MUTATIONS),
    target=st.integers(min_value=0, max_value=2),
    first=st.integers(min_value=0, max_value=1 << 24),
    second=st.integers(min_value=0, max_value=1 << 24),
)
# Crashers the fuzzing found, kept as regression cases (each was an uncaught exception):
# a Transfer Syntax UID that names no transfer syntax (ValueError from UID.is_encapsulated)
@example("ImplicitVRLittleEndian", MUTATIONS[2], 0, 64, 0)
# a deflated file's meta group with a swapped VR, then one with a lying length
@example("DeflatedExplicitVRLittleEndian", MUTATIONS[2], 0, 0, 0)
@example("DeflatedExplicitVRLittleEndian", MUTATIONS[3], 0, 0, 0)
# functional-group attributes swapped so that a sequence's tag holds a string or number
@example("EnhancedCT", MUTATIONS[4], 0, 531, 740)
@example("EnhancedCT", MUTATIONS[4], 0, 1, 1062)
def test_a_mutated_study_is_answered_or_refused_with_an_intake_error(
    syntax: str, mutation: Mutation, target: int, first: int, second: int
) -> None:
    instances = list(seeds()[syntax])
    at = target % len(instances)
    instances[at] = mutation.apply(instances[at], first, second)
    outcome = bounded_prepare(tuple(instances))
    if isinstance(outcome, IntakeError):
        assert outcome.reason and str(outcome), "a refusal must say why"
    else:
        assert outcome.samples.shape[1:] == (1, 192, 192)
        assert float(outcome.samples.min()) >= 0.0 and float(outcome.samples.max()) <= 1.0


def test_every_seed_answers_unmutated() -> None:
    for name, instances in seeds().items():
        outcome = bounded_prepare(instances)
        assert isinstance(outcome, PreparedStudy), (name, outcome)
