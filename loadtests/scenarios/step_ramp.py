"""The hospital-day mix, ramped to --users in 4 equal steps over --run-time."""

from loadtests.scenarios.hospital_day import HospitalDayUser
from loadtests.shapes import StepRamp

__all__ = ["HospitalDayUser", "StepRamp"]
