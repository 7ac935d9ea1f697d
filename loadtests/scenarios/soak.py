"""Soak: the hospital-day mix at a constant total rate, for as long as it is run.

`abdoserve soak` sets ABDOSERVE_SOAK_RATE (requests per second, all users together)
and watches the server's memory, file descriptors, threads and /dev/shm meanwhile.
"""

from __future__ import annotations

import os

from locust import constant_throughput, task

from abdoserve.loadtests.grpc_user import TritonGrpcUser
from abdoserve.loadtests.scenarios.hospital_day import WEIGHTS

RATE_VARIABLE = "ABDOSERVE_SOAK_RATE"
USERS_VARIABLE = "ABDOSERVE_SOAK_USERS"
RATE_PER_USER = float(os.environ.get(RATE_VARIABLE, "40")) / int(
    os.environ.get(USERS_VARIABLE, "8")
)


class SoakUser(TritonGrpcUser):
    wait_time = constant_throughput(RATE_PER_USER)
    payload_kinds = tuple(WEIGHTS)

    @task(WEIGHTS["liver_fibrosis_ct"])
    def liver_fibrosis_ct(self) -> None:
        self.send("liver_fibrosis_ct")

    @task(WEIGHTS["bone_density_ct"])
    def bone_density_ct(self) -> None:
        self.send("bone_density_ct")

    @task(WEIGHTS["esophageal_cancer_ct"])
    def esophageal_cancer_ct(self) -> None:
        self.send("esophageal_cancer_ct")

    @task(WEIGHTS["liver_mass_ct"])
    def liver_mass_ct(self) -> None:
        self.send("liver_mass_ct")

    @task(WEIGHTS["liver_fibrosis_mri"])
    def liver_fibrosis_mri(self) -> None:
        self.send("liver_fibrosis_mri")
