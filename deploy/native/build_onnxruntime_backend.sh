#!/usr/bin/env bash
# Builds Triton's C++ ONNX Runtime backend (libtriton_onnxruntime.so, CPU only) for the
# embedded 2.51 server and installs it, with the ONNX Runtime library of this
# environment's onnxruntime wheel, in build/triton_backends/onnxruntime/.
#
#   deploy/native/build_onnxruntime_backend.sh [SOURCES]
#
# SOURCES (default build/native/src) is what deploy/native/sources.sh lays out. Needs
# cmake, ninja, g++, rapidjson-dev and patchelf (the Makefile's SYSTEM_PACKAGES).
set -euo pipefail
sources=$(realpath "${1:-build/native/src}")
venv=$(realpath .venv)
work=build/native
target=build/triton_backends/onnxruntime
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ort_library=$(ls "$site"/onnxruntime/capi/libonnxruntime.so.1.*)
wheel_libs="$site/nvidia_pytriton.libs"

# triton-common adds its googletest suite unconditionally, and googletest would be
# downloaded at configure time; the backend needs none of it.
sed -i 's/^add_subdirectory(test)$/# add_subdirectory(test)/' "$sources/common/src/CMakeLists.txt"

# The backend's CMake finds ONNX Runtime by the unversioned name; the wheel has none.
mkdir -p "$work/ortlib"
ln -sf "$ort_library" "$work/ortlib/libonnxruntime.so"

cmake -S "$sources/onnxruntime_backend" -B "$work/cmake" -G Ninja -Wno-dev \
    -DCMAKE_BUILD_TYPE=Release \
    -DTRITON_ENABLE_GPU=OFF \
    -DTRITON_ONNXRUNTIME_INCLUDE_PATHS="$sources/onnxruntime-include" \
    -DTRITON_ONNXRUNTIME_LIB_PATHS="$(realpath "$work/ortlib")" \
    -DFETCHCONTENT_FULLY_DISCONNECTED=ON \
    -DFETCHCONTENT_SOURCE_DIR_REPO-COMMON="$sources/common" \
    -DFETCHCONTENT_SOURCE_DIR_REPO-CORE="$sources/core" \
    -DFETCHCONTENT_SOURCE_DIR_REPO-BACKEND="$sources/backend" >/dev/null
cmake --build "$work/cmake" --target triton-onnxruntime-backend

mkdir -p "$target"
cp "$work/cmake/libtriton_onnxruntime.so" "$target/"
# The backend asks for libonnxruntime.so.1 next to itself (its RUNPATH is $ORIGIN).
cp "$ort_library" "$target/libonnxruntime.so.1"
# It was linked against core's stub libtritonserver.so; the wheel's server carries the
# library under auditwheel's hashed name, as its own Python backend names it.
server_library=$(cd "$wheel_libs" && ls libtritonserver-*.so)
patchelf --replace-needed libtritonserver.so "$server_library" "$target/libtriton_onnxruntime.so"
echo "installed $target (ONNX Runtime $(basename "$ort_library"), server $server_library)"
