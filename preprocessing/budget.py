"""What one request's instances may spend together: bytes once inflated, pixels once decoded.

The per-instance bounds stop one instance, not many. Issue 19's probe sent 96 deflated
instances of 315 KB each, each inflating a 60 MiB private element under the 64 MiB
instance bound: all were inflated and the request was answered after 34.6 s with the
preprocess stub at 5.96 GB. Compressed pixel data is the same amplification one step
later (a flat 4096 x 4096 frame is a few KB of RLE). So each request carries one running
budget, charged as its instances are read and before the memory is spent: inflated bytes
while they inflate, pixel bytes from each header before its decode. The request is refused
at the instance that crosses a limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from abdoserve.preprocessing.deflate import InflateBound
from abdoserve.preprocessing.errors import InputTooLargeError
from abdoserve.preprocessing.specs import IntakeLimits


@dataclass
class RequestBudget:
    """The running totals of one request (a fresh one per request; never shared)."""

    limits: IntakeLimits
    parsed_bytes: int = 0  # instances as parsed: a deflated one inflated, others as sent
    pixel_bytes: int = 0  # decoded pixel values so far

    def inflate_bound(self) -> InflateBound:
        """How far the next instance may inflate: its own limit, or what the request has
        left if that is less, each refused in its own words."""
        limits = self.limits
        left = limits.max_inflated_bytes_per_request - self.parsed_bytes
        if left < limits.max_bytes_per_instance:
            return InflateBound(left, self._inflated_message())
        return InflateBound(
            limits.max_bytes_per_instance,
            "the deflated dataset inflates past the limit of "
            f"{limits.max_bytes_per_instance} bytes per instance",
        )

    def spend_bytes(self, count: int, index: int) -> None:
        """Charge an instance's parsed bytes (inflated already within `inflate_bound`)."""
        self.parsed_bytes += count
        if self.parsed_bytes > self.limits.max_inflated_bytes_per_request:
            raise InputTooLargeError(self._inflated_message(), instance=index)

    def spend_pixels(self, count: int, index: int) -> None:
        """Charge an instance's decoded pixel bytes, read from its header before decoding."""
        self.pixel_bytes += count
        limit = self.limits.max_pixel_bytes_per_request
        if self.pixel_bytes > limit:
            raise InputTooLargeError(
                f"the request's images decode to more than the limit of {limit} pixel bytes "
                "per request ((0028,0010) Rows x (0028,0011) Columns x frames x "
                "(0028,0100) Bits Allocated, summed over its instances)",
                instance=index,
            )

    def _inflated_message(self) -> str:
        limit = self.limits.max_inflated_bytes_per_request
        return f"the request's instances inflate past the limit of {limit} bytes per request"
