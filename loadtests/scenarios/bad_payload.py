"""Requests the server must refuse: not DICOM at all, and a truncated instance.

Every call is expected to fail with INVALID_ARGUMENT; the failures table names the
code. Run it alongside good traffic to check that refusals stay cheap and isolated:

    locust -f loadtests/scenarios/bad_payload.py,loadtests/scenarios/hospital_day.py
"""

from __future__ import annotations

from locust import task

from abdoserve.loadtests.grpc_user import TritonGrpcUser


class BadPayloadUser(TritonGrpcUser):
    payload_kinds = ("not_dicom", "truncated")

    @task
    def not_dicom(self) -> None:
        self.send("not_dicom")

    @task
    def truncated(self) -> None:
        self.send("truncated")
