#!/usr/bin/env bash
# Lays out the sources of Triton's ONNX Runtime backend for the embedded 2.51 server,
# from local git mirrors (nothing here reaches the network; CMake's FetchContent could
# not either). Triton 2.51 is the r24.10 branch of the four triton-inference-server
# repositories. ONNX Runtime's wheel ships no headers: onnxruntime_c_api.h of ORT 1.19
# (API 19, the ORT that 24.10 shipped) comes from yalue/onnxruntime_go, which vendors
# the header verbatim; the C API is backward compatible, so it works with the wheel's
# newer library.
#
#   deploy/native/sources.sh MIRRORS [OUT]
#
# MIRRORS holds bare repositories named OWNER+NAME/repo (as the search tool's fetch
# writes them); OUT defaults to build/native/src. Prints the commit of each.
set -euo pipefail
mirrors=${1:?usage: sources.sh MIRRORS [OUT]}
out=${2:-build/native/src}
TRITON_BRANCH=r24.10
ORT_HEADER_COMMIT=9abc5ad  # onnxruntime_go "Upgrade to onnxruntime 1.19.0"

rm -rf "$out"
mkdir -p "$out/onnxruntime-include"
for name in common core backend onnxruntime_backend; do
    git_dir="$mirrors/triton-inference-server+$name/repo"
    mkdir -p "$out/$name"
    git --git-dir="$git_dir" archive "$TRITON_BRANCH" | tar -x -C "$out/$name"
    echo "$name $TRITON_BRANCH $(git --git-dir="$git_dir" rev-parse "$TRITON_BRANCH")"
done
header_git="$mirrors/yalue+onnxruntime_go/repo"
git --git-dir="$header_git" show "$ORT_HEADER_COMMIT:onnxruntime_c_api.h" \
    > "$out/onnxruntime-include/onnxruntime_c_api.h"
echo "onnxruntime_c_api.h $(git --git-dir="$header_git" rev-parse "$ORT_HEADER_COMMIT")" \
    "($(grep -m1 '^#define ORT_API_VERSION' "$out/onnxruntime-include/onnxruntime_c_api.h"))"
