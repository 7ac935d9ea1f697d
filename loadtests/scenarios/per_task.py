"""One user class per task, each sending only that task's studies back to back.

locust -f loadtests/scenarios/per_task.py BoneDensityUser   # one task alone
locust -f loadtests/scenarios/per_task.py                   # all five, equal users
"""

from __future__ import annotations

from typing import ClassVar

from locust import task

from abdoserve.loadtests.grpc_user import TritonGrpcUser


class SingleTaskUser(TritonGrpcUser):
    abstract = True
    task_name: ClassVar[str]

    @task
    def study(self) -> None:
        self.send(self.task_name)


class LiverMassUser(SingleTaskUser):
    task_name = "liver_mass_ct"
    payload_kinds = (task_name,)


class LiverFibrosisCtUser(SingleTaskUser):
    task_name = "liver_fibrosis_ct"
    payload_kinds = (task_name,)


class LiverFibrosisMriUser(SingleTaskUser):
    task_name = "liver_fibrosis_mri"
    payload_kinds = (task_name,)


class BoneDensityUser(SingleTaskUser):
    task_name = "bone_density_ct"
    payload_kinds = (task_name,)


class EsophagealCancerUser(SingleTaskUser):
    task_name = "esophageal_cancer_ct"
    payload_kinds = (task_name,)
