"""The hospital-day mix at a quarter of --users, a spike to all of them, then back."""

from abdoserve.loadtests.scenarios.hospital_day import HospitalDayUser
from abdoserve.loadtests.shapes import Spike

__all__ = ["HospitalDayUser", "Spike"]
