"""The gateway's web worklist: studies by state, inputs given by a person, answers shown.

See docs/gateway.md, "The web worklist".
"""

from abdoserve.deploy.gateway.worklist.server import WorklistOptions, WorklistServer

__all__ = ["WorklistOptions", "WorklistServer"]
