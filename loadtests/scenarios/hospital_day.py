"""A hospital day: every task, weighted by how often a radiology department sends it.

CT is far more common than gadoxetic-acid MRI, and fibrosis and bone density ride
along with many routine abdominal CTs; a workstation pauses between studies.
"""

from __future__ import annotations

from locust import between, task

from abdoserve.loadtests.grpc_user import TritonGrpcUser

# task -> relative weight per request
WEIGHTS = {
    "liver_fibrosis_ct": 4,
    "bone_density_ct": 4,
    "esophageal_cancer_ct": 2,
    "liver_mass_ct": 2,
    "liver_fibrosis_mri": 1,
}


class HospitalDayUser(TritonGrpcUser):
    wait_time = between(0.0, 0.5)
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
