# Two commands on a fresh machine: `make serve` and `make test`.
# Both build .venv/ from Debian's python3.11 first: the Triton Python-backend
# stub links the system libpython3.11, so the environment must match it.
PYTHON ?= /usr/bin/python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install relink serve check test lint typecheck clean system-packages configs

install: $(STAMP) system-packages

# Debian's packages (root, as on CI): a real Prometheus for the metrics tests, nginx
# (nginx-light: HTTP/2 and gRPC proxying) for the guard in front of Triton, and the DICOM
# gateway's real peers: Orthanc as the PACS, dcmtk (storescu, dsrdump) as the modality
# and SR reader, dicom3tools (dciodvfy) as the IOD validator; chromium and its driver for
# the worklist's browser tests.
SYSTEM_PACKAGES := prometheus nginx-light orthanc dcmtk dicom3tools chromium chromium-driver
system-packages:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && \
		(command -v nginx >/dev/null || test -x /usr/sbin/nginx) && \
		test -x /usr/sbin/Orthanc && command -v storescu >/dev/null && \
		command -v dciodvfy >/dev/null && command -v chromium >/dev/null && \
		command -v chromedriver >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		 apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null)

# One resolve: the server depends on abdoserve-client, which comes from ./clients.
# setuptools' strict editable mode links every file the wheel would hold into
# build/__editable__.*/, laid out under the installed names that pyproject.toml's
# package-dir table gives (the one place that maps folders to `abdoserve.*`), and puts
# that folder on sys.path with a plain .pth line: Python, mypy and an editor all
# resolve `abdoserve.*` through it, with no import hook.
EDITABLE := --config-settings editable_mode=strict
$(STAMP): pyproject.toml clients/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(EDITABLE) -e ./clients -e '.[dev]'
	$(LINKED_FILES) > $(VENV)/.linked
	touch $(STAMP)

# A strict editable install links files, not folders: a file added or removed since
# the last link needs the links made again (a few seconds; skipped when nothing moved).
LINKED_FILES := find . \( -path ./.venv -o -path ./build -o -path ./.git -o -path ./tests \
	-o -name __pycache__ -o -name '.*_cache' \) -prune -o -type f -print | sort
relink: $(STAMP)
	@$(LINKED_FILES) > $(VENV)/.linked.new
	@cmp -s $(VENV)/.linked.new $(VENV)/.linked || { \
		$(BIN)/python -m pip install --quiet --no-deps $(EDITABLE) -e ./clients -e . && \
		echo "relinked the editable install"; }
	@mv $(VENV)/.linked.new $(VENV)/.linked

serve: relink
	$(BIN)/abdoserve serve

# ruff, then the import rules (pyproject.toml's import-linter contracts).
lint: relink
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

# mypy reads `abdoserve.*` from the editable install's link tree (each package ships a
# py.typed); the packages to check are the top-level ones pyproject.toml lists.
MYPY_PACKAGES = $(shell $(BIN)/python -c 'import tomllib; \
	names = tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["packages"]; \
	print(" ".join("-p " + n for n in names if n.count(".") == 1))')
typecheck: relink
	$(BIN)/mypy $(MYPY_PACKAGES) -p abdoserve_client
	$(BIN)/mypy clients/examples

# The one-minute loop: lint, types and the tiers that start no server and no external
# program (tests/unit, tests/contract), spread over the cores.
check: relink lint typecheck
	$(BIN)/pytest -n auto tests/unit tests/contract

# The whole suite (CI): the fast tiers, then tests/tools (external programs, whole
# builds) over the cores, then tests/integration one at a time (each starts real servers
# on free ports, and some measure time or watch /dev/shm, which sharing the cores or the
# host's /dev/shm with another test would spoil).
test: install relink lint typecheck
	$(BIN)/pytest -n auto tests/unit tests/contract tests/tools
	$(BIN)/pytest tests/integration

# Re-render the committed model_repository/*/config.pbtxt from the task specs
# (the contract test compares them with a fresh rendering).
configs: $(STAMP)
	$(BIN)/abdoserve configs

clean:
	rm -rf $(VENV) build *.egg-info
