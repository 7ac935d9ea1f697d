"""The hospital-day mix, ramped to --users in 4 equal steps over --run-time."""

from abdoserve.loadtests.scenarios.hospital_day import HospitalDayUser
from abdoserve.loadtests.shapes import StepRamp

__all__ = ["HospitalDayUser", "StepRamp"]
