#!/usr/bin/env bash
# The README's test command: installs what is missing, configures, builds and runs the whole suite.
#   bash tests/run_tests.sh            (build directory: build/)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# strace: the checkpoint test of the writer's fsync calls.
bash "$root/cmake/install_deps.sh" dataset-fashion-mnist clang libclang-rt-14-dev strace
build="${DIFFQ_BUILD_DIR:-$root/build}"
jobs="$(nproc)"
# Tests, examples and the install (for the consumer test) on, whatever an older configure of the
# same folder cached.
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DDIFFQ_BUILD_TESTS=ON \
  -DDIFFQ_BUILD_EXAMPLES=ON -DDIFFQ_INSTALL=ON
cmake --build "$build" -j "$jobs"
# LibTorch's and OpenBLAS's thread pools would oversubscribe the cores that ctest already fills.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
ctest --test-dir "$build" --output-on-failure --no-tests=error -j "$jobs"
