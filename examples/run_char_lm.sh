#!/usr/bin/env bash
# The README's second job: installs what is missing (Debian's fortunes corpus included), builds,
# then trains the character-level Transformer LM in fp32, with DiffQ, uniform PTQ, QAT and LSQ,
# exports every checkpoint, reloads each in a new process and writes the report to out_char_lm/
# (report.md, char_lm.svg).
#   bash examples/run_char_lm.sh [char_lm train flags, e.g. --penalty 2 --seed 1]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/cmake/install_deps.sh" fortunes
build="${DIFFQ_BUILD_DIR:-$root/build}"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DDIFFQ_BUILD_EXAMPLES=ON
cmake --build "$build" -j "$(nproc)" --target char_lm
export OPENBLAS_NUM_THREADS=1  # LibTorch's own threads (--threads) do the parallel work
"$build/examples/char_lm/char_lm" train --out "$root/out_char_lm" "$@"
