"""Soak: the hospital-day mix at a constant total rate, for as long as it is run.

`abdoserve soak` sets ABDOSERVE_SOAK_RATE (requests per second, all users together)
and ABDOSERVE_SOAK_USERS, and watches the server's memory, file descriptors, threads
and /dev/shm meanwhile.
"""

from __future__ import annotations

import os

from locust import constant_throughput

# The module, not the class: locust runs every User class it finds in a locustfile.
from abdoserve.loadtests.scenarios import hospital_day

RATE_VARIABLE = "ABDOSERVE_SOAK_RATE"
USERS_VARIABLE = "ABDOSERVE_SOAK_USERS"
RATE_PER_USER = float(os.environ.get(RATE_VARIABLE, "40")) / int(
    os.environ.get(USERS_VARIABLE, "8")
)


class SoakUser(hospital_day.HospitalDayUser):
    """The hospital-day tasks and weights, without pauses: a fixed rate per user."""

    wait_time = constant_throughput(RATE_PER_USER)
