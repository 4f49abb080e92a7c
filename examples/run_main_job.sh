#!/usr/bin/env bash
# The README's main job: installs what is missing (dataset-fashion-mnist included), builds, then
# trains the Fashion-MNIST CNN in fp32 and with DiffQ, exports the compressed checkpoint, reloads it
# in a new process and writes the report to out/ (report.md, fashion_mnist.svg).
#   bash examples/run_main_job.sh [fashion_mnist train flags, e.g. --penalty 1,5]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/cmake/install_deps.sh" dataset-fashion-mnist
build="${DIFFQ_BUILD_DIR:-$root/build}"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DDIFFQ_BUILD_EXAMPLES=ON
cmake --build "$build" -j "$(nproc)" --target fashion_mnist
export OPENBLAS_NUM_THREADS=1  # LibTorch's own threads (--threads) do the parallel work
"$build/examples/fashion_mnist/fashion_mnist" train --out "$root/out" "$@"
