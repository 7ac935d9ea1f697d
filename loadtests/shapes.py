"""Load shapes that scale with locust's --users, --spawn-rate and --run-time."""

from __future__ import annotations

import time

from locust import LoadTestShape

from abdoserve.loadtests.profiles import DEFAULT_DURATION_S, DEFAULT_USERS, spike_users, step_users


class _ScaledShape(LoadTestShape):
    """Reads the common options instead of ignoring them (locust's `use_common_options`)."""

    abstract = True
    use_common_options = True

    def _options(self) -> tuple[int, float, float]:
        """(users, spawn rate, duration in s) from the command line, else defaults."""
        options = self.runner.environment.parsed_options if self.runner else None
        users = getattr(options, "num_users", None) or DEFAULT_USERS
        spawn_rate = getattr(options, "spawn_rate", None) or float(users)
        duration = getattr(options, "run_time", None) or DEFAULT_DURATION_S
        return int(users), float(spawn_rate), float(duration)

    def _elapsed_s(self) -> float:
        """`get_run_time()`, which locust leaves untyped."""
        return time.perf_counter() - float(self.start_time)


class StepRamp(_ScaledShape):
    """--users reached in 4 equal steps over --run-time: where does latency bend?"""

    def tick(self) -> tuple[int, float] | None:
        users, spawn_rate, duration = self._options()
        count = step_users(self._elapsed_s(), users, duration)
        return None if count is None else (count, spawn_rate)


class Spike(_ScaledShape):
    """A quarter of --users, a sudden jump to all of them, then back: does it recover?"""

    def tick(self) -> tuple[int, float] | None:
        users, _, duration = self._options()
        count = spike_users(self._elapsed_s(), users, duration)
        return None if count is None else (count, float(users))  # spawn all in ~1 s
