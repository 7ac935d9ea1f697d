# Two commands on a fresh machine: `make serve` and `make test`.
# Both build .venv/ from Debian's python3.11 first: the Triton Python-backend
# stub links the system libpython3.11, so the environment must match it.
PYTHON ?= /usr/bin/python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve check test lint typecheck clean system-packages configs

install: $(STAMP) system-packages

# Debian's packages (root, as on CI): a real Prometheus for the metrics tests, nginx
# (nginx-light: HTTP/2 and gRPC proxying) for the guard in front of Triton, and the DICOM
# gateway's real peers: Orthanc as the PACS, dcmtk (storescu, dsrdump) as the modality
# and SR reader, dicom3tools (dciodvfy) as the IOD validator.
SYSTEM_PACKAGES := prometheus nginx-light orthanc dcmtk dicom3tools
system-packages:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && \
		(command -v nginx >/dev/null || test -x /usr/sbin/nginx) && \
		test -x /usr/sbin/Orthanc && command -v storescu >/dev/null && \
		command -v dciodvfy >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		 apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null)

# One resolve: the server depends on abdoserve-client, which comes from ./clients.
$(STAMP): pyproject.toml clients/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ./clients -e '.[dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/abdoserve serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy cannot follow the editable install's `abdoserve.*` import hook, so it checks a
# tree of links with the installed names: build/typecheck/abdoserve/<package> -> folder.
TYPECHECK_TREE := build/typecheck/abdoserve
typecheck: $(STAMP)
	rm -rf $(TYPECHECK_TREE) && mkdir -p $(TYPECHECK_TREE)
	ln -s ../../../preprocessing ../../../export ../../../deploy ../../../loadtests $(TYPECHECK_TREE)/
	ln -s ../../../model_repository/_serving $(TYPECHECK_TREE)/serving
	$(BIN)/mypy

# The one-minute loop: lint, types and the tiers that start no server and no external
# program (tests/unit, tests/contract), spread over the cores.
check: $(STAMP) lint typecheck
	$(BIN)/pytest -n auto tests/unit tests/contract

# The whole suite (CI): the fast tiers, then tests/tools (external programs, whole
# builds) over the cores, then tests/integration one at a time (each starts real servers
# on free ports, and some measure time or watch /dev/shm, which sharing the cores or the
# host's /dev/shm with another test would spoil).
test: install lint typecheck
	$(BIN)/pytest -n auto tests/unit tests/contract tests/tools
	$(BIN)/pytest tests/integration

# Re-render the committed model_repository/*/config.pbtxt from the task specs
# (the contract test compares them with a fresh rendering).
configs: $(STAMP)
	$(BIN)/abdoserve configs

clean:
	rm -rf $(VENV) build *.egg-info
