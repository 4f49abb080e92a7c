#!/usr/bin/env bash
# Builds diffq's tests, examples and benchmarks with plain g++ against the LibTorch inside a
# PyTorch pip wheel (e.g. a CUDA machine with `pip install torch`, no Debian packages), then runs
# the *_CUDA tests and the whole suite. Used on the GPU machine; CI uses tests/run_tests.sh.
#   bash tests/run_with_pip_torch.sh [sources...]      (default: every test, example and bench)
# Environment: PY (python with torch, default python3); GTEST_DIR (googletest's source folder,
# default /usr/src/googletest/googletest); ZLIB_CFLAGS / ZLIB_LIBS (default: system zlib, -lz);
# OUT (folder for the logs, default /tmp/diffq_pip_torch); TORCH_DIR (folder holding include/ and
# lib/, default the wheel's) and ABI (0 or 1) override what python reports.
set -u
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OUTD=${OUT:-/tmp/diffq_pip_torch}
mkdir -p "$OUTD"
exec > >(tee "$OUTD/log.txt") 2>&1
T0=$(date +%s)
stamp() { echo "[$(($(date +%s) - T0)) s] $*"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null ||
  echo "no nvidia-smi"
g++ --version | head -1
PY=${PY:-python3}
$PY -c 'import torch;print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())'
TORCH_DIR=${TORCH_DIR:-$($PY -c 'import torch,os;print(os.path.dirname(torch.__file__))')}
ABI=${ABI:-$($PY -c 'import torch;print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')}
TORCH_INC="$TORCH_DIR/include"
TORCH_LIB="$TORCH_DIR/lib"
GTEST_DIR=${GTEST_DIR:-/usr/src/googletest/googletest}
NPROC=$(nproc)
failures=0
STD=c++17
if ! echo '#include <torch/torch.h>' | g++ -std=c++17 -D_GLIBCXX_USE_CXX11_ABI="$ABI" \
  -isystem "$TORCH_INC" -isystem "$TORCH_INC/torch/csrc/api/include" -fsyntax-only -x c++ - \
  2>"$OUTD/std17.txt"; then
  # diffq is C++17; a LibTorch that needs C++20 is reported as a failure unless ALLOW_CXX20=1.
  STD=c++20
  echo "FAILED: <torch/torch.h> does not compile as C++17; building as C++20"
  head -5 "$OUTD/std17.txt"
  [ "${ALLOW_CXX20:-0}" = 1 ] || failures=$((failures + 1))
fi
stamp "compiling with -std=$STD, C++11 ABI $ABI, $NPROC jobs"
B=/tmp/diffq_pip_torch_build
rm -rf "$B" # binaries of an earlier run must not be taken for this one's
mkdir -p "$B"
CXXFLAGS="-std=$STD -O2 -fopenmp -D_GLIBCXX_USE_CXX11_ABI=$ABI -Wall -Wextra -Iinclude ${ZLIB_CFLAGS:-}
  -I$GTEST_DIR/include -I$GTEST_DIR -isystem $TORCH_INC -isystem $TORCH_INC/torch/csrc/api/include"
# --no-as-needed: nothing references libtorch_cuda directly, yet it must load to register CUDA.
LIBS="-L$TORCH_LIB -Wl,-rpath,$TORCH_LIB -Wl,--no-as-needed -ltorch"
for l in torch_cuda c10_cuda; do [ -e "$TORCH_LIB/lib$l.so" ] && LIBS="$LIBS -l$l"; done
LIBS="$LIBS -ltorch_cpu -lc10 -Wl,--as-needed ${ZLIB_LIBS:--lz} -lpthread"
# diffq/distributed.h: c10d's Gloo backend where the wheel ships the gloo headers, and NCCL where
# it has CUDA and the nccl headers (the nvidia-nccl wheel's, or NCCL_INC).
DIST_FLAGS=""
if [ -e "$TORCH_INC/gloo/config.h" ]; then # the wheel's own gloo headers (another gloo: ABI risk)
  DIST_FLAGS="-DUSE_C10D_GLOO"
  NCCL_INC=${NCCL_INC:-$($PY -c 'import os,nvidia.nccl as n;print(os.path.join(list(n.__path__)[0],"include"))' 2>/dev/null)}
  if [ -e "$TORCH_LIB/libtorch_cuda.so" ] && [ -n "$NCCL_INC" ] && [ -e "$NCCL_INC/nccl.h" ]; then
    DIST_FLAGS="$DIST_FLAGS -DUSE_C10D_NCCL -isystem $NCCL_INC"
  fi
else
  echo "no gloo headers: diffq/distributed.h and its tests are not built"
fi
echo "distributed flags: ${DIST_FLAGS:-none}"
CXXFLAGS="$CXXFLAGS $DIST_FLAGS"
export CXXFLAGS B LIBS DIST_FLAGS
g++ $CXXFLAGS -w -c "$GTEST_DIR/src/gtest-all.cc" -o $B/gtest-all.o &
p1=$!
g++ $CXXFLAGS -w -c "$GTEST_DIR/src/gtest_main.cc" -o $B/gtest_main.o &
p2=$!
# Each pid on its own (a bare `wait` would also wait for the tee above).
wait $p1 || { echo "FAILED: gtest-all.cc"; failures=$((failures + 1)); }
wait $p2 || { echo "FAILED: gtest_main.cc"; failures=$((failures + 1)); }
if [ $# -gt 0 ]; then srcs=("$@"); else
  srcs=(tests/*_test.cpp examples/quick_start/main.cpp examples/fashion_mnist/main.cpp
    tests/bench/overhead_bench.cpp tests/bench/noise_bench.cpp tests/bench/checkpoint_bench.cpp
    tests/consumer/main.cpp)
  if [ -n "$DIST_FLAGS" ]; then
    srcs+=(tests/distributed_worker.cpp tests/bench/data_parallel_bench.cpp)
  else
    srcs=("${srcs[@]/tests\/distributed_test.cpp/}")
  fi
fi
build_one() {
  src=$1
  name=$(echo "$src" | sed 's|/|_|g; s|\.cpp$||')
  extra=""
  case $src in tests/*_test.cpp) extra="$B/gtest-all.o $B/gtest_main.o" ;; esac
  [ "$src" = tests/distributed_test.cpp ] &&
    extra="$extra -DDIFFQ_DISTRIBUTED_WORKER=\"$B/tests_distributed_worker\""
  rm -f "$B/$name"
  if g++ $CXXFLAGS "$src" $extra $LIBS -o "$B/$name" >"$B/$name.clog" 2>&1; then
    echo "BUILT $src ($(grep -c 'warning:' "$B/$name.clog") warnings)"
  else
    echo "FAILED $src"
    grep -m 20 -E 'error|required from here' "$B/$name.clog"
  fi
}
export -f build_one
printf '%s\n' "${srcs[@]}" | grep -v '^$' | xargs -P "$NPROC" -I{} bash -c 'build_one "$1"' _ {} |
  tee "$B/build_summary.txt"
failures=$((failures + $(grep -c '^FAILED' "$B/build_summary.txt")))
cat $B/*.clog >"$OUTD/compile_log.txt"
stamp "build done"
grep -h 'warning:' $B/*.clog | sort | uniq -c | sort -rn | head -20
for t in $B/tests_*_test; do
  [ -x "$t" ] || continue
  stamp "CUDA tests of $(basename $t)"
  timeout 200 "$t" --gtest_filter='*_CUDA' >"$t.cuda" 2>&1
  rc=$?
  grep -v '^\[       OK\|^\[ RUN' "$t.cuda" | tail -60
  [ $rc = 0 ] || { echo "FAILED: $(basename $t) *_CUDA exit $rc"; failures=$((failures + 1)); }
done
stamp "all tests"
ls $B/tests_*_test | xargs -P "$NPROC" -I{} bash -c \
  'OMP_NUM_THREADS=1 timeout 240 "$1" --gtest_brief=1 > "$1.run" 2>&1; rc=$?; echo "$(basename "$1") exit $rc"' \
  _ {} | tee "$B/run_summary.txt"
failures=$((failures + $(grep -c ' exit [1-9]' "$B/run_summary.txt")))
for t in $B/tests_*_test; do
  [ -f $t.run ] && echo "$(basename $t): $(grep -E 'PASSED|SKIPPED|FAILED' $t.run | tr '\n' ' ')"
done
cat $B/*.run >"$OUTD/tests_log.txt" 2>/dev/null
if [ -x $B/examples_quick_start_main ]; then
  stamp "quick start"
  timeout 120 $B/examples_quick_start_main >"$B/quick_start.txt" 2>&1 ||
    { echo "FAILED: quick start"; failures=$((failures + 1)); }
  tail -8 "$B/quick_start.txt"
fi
stamp "end: $failures failure(s)"
[ "$failures" = 0 ]
