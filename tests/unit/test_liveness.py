"""When the supervisor calls a tritonserver frozen: no liveness answer for a while."""

from __future__ import annotations

from abdoserve.deploy.supervisor import Liveness


def test_a_server_is_frozen_only_after_the_whole_time_without_an_answer() -> None:
    liveness = Liveness(frozen_after_s=5.0, answered_at=100.0)
    assert not liveness.frozen(False, 104.9)
    assert liveness.frozen(False, 105.1)


def test_an_answer_starts_the_time_again() -> None:
    liveness = Liveness(frozen_after_s=5.0, answered_at=100.0)
    assert not liveness.frozen(True, 104.0)
    assert not liveness.frozen(False, 108.0)
    assert liveness.frozen(False, 109.5)
