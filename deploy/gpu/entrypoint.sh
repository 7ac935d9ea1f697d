#!/bin/sh
# The container's entrypoint: the same supervisor as `abdoserve serve` (stub and server
# healing, memory trim, a truthful /health/ready on :8003) and the same tritonserver
# command line (abdoserve.deploy.embedded.triton_command). Everything is in Python:
# abdoserve/deploy/container.py says what it reads from the environment.
exec "${ABDOSERVE_PYTHON:-python3}" -m abdoserve.deploy.container "$@"
