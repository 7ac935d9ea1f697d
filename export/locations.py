"""Where the build writes, and where it finds the files it copies.

Nothing here is relative to a checkout: an installed `abdoserve` builds and serves from
any working directory. Builds go to `./build` (or `$ABDOSERVE_BUILD_DIR`); the Triton
entry points are package resources of `abdoserve.serving.python_models`.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from abdoserve.serving import python_models

BUILD_DIR = Path(os.environ.get("ABDOSERVE_BUILD_DIR", "build")).absolute()
DEFAULT_REPOSITORY = BUILD_DIR / "model_repository"
# A regular package on the file system, so `files()` is a plain Path.
PYTHON_MODELS = Path(str(resources.files(python_models)))
