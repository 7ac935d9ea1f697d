"""The container images install abdoserve as any user would, and run its supervisor.

Both Dockerfiles are checked as text here (no Docker engine runs on the project's
machines): the package comes from its source with a plain, non-editable `pip install`,
so pyproject.toml stays the one place that maps the folders to `abdoserve.*`; no
folder is copied under an import name by hand and nothing is put on PYTHONPATH; the
entrypoint is the supervisor's (abdoserve.deploy.container).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "deploy" / "gpu" / "Dockerfile", ROOT / "deploy" / "k8s" / "Dockerfile.cpu"]
IMPORT_NAMES = ("preprocessing", "export", "serving", "deploy", "loadtests")


def instructions(path: Path) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.parent.name)
def test_the_package_is_installed_from_its_source_not_mapped_by_hand(dockerfile: Path) -> None:
    lines = instructions(dockerfile)
    copies = [line for line in lines if line.startswith("COPY")]
    for line in copies:
        *sources, destination = [word for word in line.split()[1:] if not word.startswith("--")]
        assert not [source for source in sources if source.endswith("/")], line
        assert not re.search(rf"abdoserve/({'|'.join(IMPORT_NAMES)})", destination), line
    assert not [line for line in lines if "PYTHONPATH" in line]
    installs = [line for line in lines if "pip install" in line and "abdoserve-src" in line]
    assert installs, "the source is pip-installed"
    assert not [line for line in installs if re.search(r"\s-e\s|--editable", line)]
    assert any(line.startswith("COPY . /tmp/abdoserve-src") for line in copies)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.parent.name)
def test_the_entrypoint_is_the_supervisor(dockerfile: Path) -> None:
    lines = instructions(dockerfile)
    [entrypoint] = [line for line in lines if line.startswith("ENTRYPOINT")]
    assert '"abdoserve-entrypoint"' in entrypoint
    script = (ROOT / "deploy" / "gpu" / "entrypoint.sh").read_text()
    assert "-m abdoserve.deploy.container" in script
    assert "nginx-light" in " ".join(lines), "the guard runs in the pod"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.parent.name)
def test_the_image_holds_the_library_that_hands_triton_its_keys(dockerfile: Path) -> None:
    """The pod's root filesystem is read-only: the library that keeps Triton's keys off
    its command line (abdoserve.deploy.triton_keys) is compiled into the image, into
    the folder the supervisor looks in, with a compiler the image installs to do so."""
    from abdoserve.deploy.triton_keys import LIBRARY_DIR_VARIABLE

    lines = instructions(dockerfile)
    [folder] = [
        line.split("=", 1)[1] for line in lines if line.startswith(f"ENV {LIBRARY_DIR_VARIABLE}=")
    ]
    assert folder.startswith("/opt/abdoserve/")
    [build] = [line for line in lines if "abdoserve.deploy.triton_keys import library" in line]
    assert build.startswith("RUN ")
    assert re.search(r"apt-get install [^&]*\bgcc\b[^&]*\blibc6-dev\b", build)
    assert lines.index(build) > lines.index(f"ENV {LIBRARY_DIR_VARIABLE}={folder}")
    assert lines.index(build) > next(i for i, line in enumerate(lines) if "pip install" in line)
