"""User counts over time for the step-ramp and spike load shapes (pure, locust-free)."""

from __future__ import annotations

import math

DEFAULT_USERS = 10
DEFAULT_DURATION_S = 60.0


def step_users(elapsed_s: float, users: int, duration_s: float, steps: int = 4) -> int | None:
    """Users after `elapsed_s` of a ramp to `users` in `steps` equal steps; None once over."""
    if elapsed_s >= duration_s:
        return None
    step = min(int(elapsed_s * steps / duration_s) + 1, steps)
    return max(1, math.ceil(users * step / steps))


def spike_users(elapsed_s: float, users: int, duration_s: float) -> int | None:
    """A quarter of `users` for the first 40 %, all of them for the next 20 %, then a
    quarter again (does the service recover?); None once over."""
    if elapsed_s >= duration_s:
        return None
    baseline = max(1, users // 4)
    fraction = elapsed_s / duration_s
    return users if 0.4 <= fraction < 0.6 else baseline
