# Two commands on a fresh machine: `make serve` and `make test`.
# Both build .venv/ from Debian's python3.11 first: the Triton Python-backend
# stub links the system libpython3.11, so the environment must match it.
PYTHON ?= /usr/bin/python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test lint typecheck unit clean system-packages configs

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

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy cannot follow the editable install's `abdoserve.*` import hook, so it checks a
# tree of links with the installed names: build/typecheck/abdoserve/<package> -> folder.
TYPECHECK_TREE := build/typecheck/abdoserve
typecheck: install
	rm -rf $(TYPECHECK_TREE) && mkdir -p $(TYPECHECK_TREE)
	ln -s ../../../preprocessing ../../../export ../../../deploy ../../../loadtests $(TYPECHECK_TREE)/
	ln -s ../../../model_repository/_serving $(TYPECHECK_TREE)/serving
	$(BIN)/mypy

test: install lint typecheck
	$(BIN)/pytest

# Re-render the committed model_repository/*/config.pbtxt from the task specs
# (the contract test compares them with a fresh rendering).
configs: $(STAMP)
	$(BIN)/abdoserve configs

clean:
	rm -rf $(VENV) build *.egg-info
