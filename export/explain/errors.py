"""Why a study gets no explanation map. The classes live with the other per-request
refusals in `abdoserve.preprocessing.errors` (one hierarchy, reasons pinned by a test);
named here for the explanation code."""

from __future__ import annotations

from abdoserve.preprocessing.errors import NoTwinError, TwinMismatchError, VersionError

__all__ = ["NoTwinError", "TwinMismatchError", "VersionError"]
