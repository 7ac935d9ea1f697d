#!/usr/bin/env bash
# Builds any missing TensorRT plan (plans are specific to this GPU and TensorRT
# version), then starts Triton on the mounted repository, closed by default:
# - the admin APIs (model-repository, statistics, trace, logging, shared-memory)
#   answer only requests carrying the `abdoserve-admin-key` header; the key comes from
#   $ABDOSERVE_ADMIN_KEY_FILE (a mounted secret), else $ABDOSERVE_ADMIN_KEY, else a
#   random one per start (admin APIs then closed to everyone);
# - with $ABDOSERVE_TLS_CERT and $ABDOSERVE_TLS_KEY, gRPC speaks TLS; with
#   $ABDOSERVE_TLS_CLIENT_CA as well, mutual TLS. Triton has no TLS for HTTP: keep
#   port 8000 for the cluster's probes, or front it with TLS (docs/security.md).
# The container's /dev/shm is its own: no other user of the host sees the regions.
set -euo pipefail
repository=${MODEL_REPOSITORY:-/models}
for script in "$repository"/*_net/build_engine.sh; do
    [ -e "$script" ] || continue
    plan="$(dirname "$script")/1/model.plan"
    if [ ! -s "$plan" ]; then
        echo "building $plan"
        bash "$script"
    fi
done

if [ -n "${ABDOSERVE_ADMIN_KEY_FILE:-}" ]; then
    key=$(tr -d '[:space:]' < "$ABDOSERVE_ADMIN_KEY_FILE")
elif [ -n "${ABDOSERVE_ADMIN_KEY:-}" ]; then
    key=$ABDOSERVE_ADMIN_KEY
else
    key=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
fi
unset ABDOSERVE_ADMIN_KEY
restricted="model-repository,statistics,trace,logging,shared-memory:abdoserve-admin-key=$key"
security=(--http-restricted-api="$restricted" --grpc-restricted-protocol="$restricted")

if [ -n "${ABDOSERVE_TLS_CERT:-}" ] || [ -n "${ABDOSERVE_TLS_KEY:-}" ]; then
    : "${ABDOSERVE_TLS_CERT:?TLS needs both ABDOSERVE_TLS_CERT and ABDOSERVE_TLS_KEY}"
    : "${ABDOSERVE_TLS_KEY:?TLS needs both ABDOSERVE_TLS_CERT and ABDOSERVE_TLS_KEY}"
    security+=(--grpc-use-ssl=true --grpc-server-cert="$ABDOSERVE_TLS_CERT"
        --grpc-server-key="$ABDOSERVE_TLS_KEY")
    if [ -n "${ABDOSERVE_TLS_CLIENT_CA:-}" ]; then
        security+=(--grpc-use-ssl-mutual=true --grpc-root-cert="$ABDOSERVE_TLS_CLIENT_CA")
    fi
else
    echo "warning: gRPC without TLS: studies cross the network unencrypted" \
        "(set ABDOSERVE_TLS_CERT and ABDOSERVE_TLS_KEY; see docs/security.md)" >&2
fi

exec tritonserver --model-repository="$repository" --strict-readiness=true \
    --model-control-mode=explicit --load-model='*' \
    --allow-metrics=true --allow-gpu-metrics=true "${security[@]}" "$@"
