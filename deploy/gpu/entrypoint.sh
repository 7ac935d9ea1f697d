#!/usr/bin/env bash
# Builds any missing TensorRT plan (plans are specific to this GPU and TensorRT
# version), then starts Triton on the mounted repository.
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
exec tritonserver --model-repository="$repository" --strict-readiness=true \
    --allow-metrics=true --allow-gpu-metrics=true "$@"
