#pragma once
/// \file diffq/detail/level_kernels.h
/// Fused CPU kernel of `diffq::quantize_levels` (bits.h) for contiguous float and double tensors:
/// `levels = round((w − min)/(max − min)·(2^b − 1))` in one pass, with no temporaries. It performs
/// the very operations of the ATen expression, in the same order and precision (each exactly
/// rounded: a subtraction, a division, a multiplication, a round half to even), so it gives the
/// same levels bit for bit for values in `[min, max]`; tests/bits_test.cpp checks that against the
/// ATen expression for every bit width.

#include <diffq/detail/noise_kernel.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

// The same run-time dispatch as the noise generator (`DIFFQ_NOISE_AVX2_DISPATCH`,
// `noise_cpu_has_avx2`): an AVX2 clone on x86 builds that are not AVX2 already.

namespace diffq {
namespace detail {

/// Elements per inner block of the level kernel (the per-element level maxima live on the stack).
constexpr int64_t kLevelBlock = 1024;

/// Levels of elements `[begin, end)`: `out[i] = round(((w[i] − lo)/range)·(2^bits[g(i)] − 1))`,
/// `g(i) = i / gs`. `range = (T)(max − min)` > 0, `lo = (T)min`; bits in [1, 15]; every `w[i]`
/// in `[min, max]` (so the levels fit an int16).
template <class T>
inline __attribute__((always_inline)) void quantize_levels_range(const T* __restrict w,
                                                                 const uint8_t* __restrict bits,
                                                                 int64_t gs, T lo, T range,
                                                                 int16_t* __restrict out,
                                                                 int64_t begin, int64_t end) {
  T level_max[kLevelBlock];
  for (int64_t b0 = begin; b0 < end; b0 += kLevelBlock) {
    const int64_t n = std::min(kLevelBlock, end - b0);
    // Per-element 2^b − 1 of this block (exact: b <= 15).
    int64_t i = 0;
    int64_t g = b0 / gs;
    int64_t in_group = b0 - g * gs;
    while (i < n) {
      const int64_t len = std::min(gs - in_group, n - i);
      const T lm = static_cast<T>((int32_t{1} << bits[g]) - 1);
      for (int64_t k = 0; k < len; ++k) level_max[i + k] = lm;
      i += len;
      ++g;
      in_group = 0;
    }
    const T* __restrict x = w + b0;
    int16_t* __restrict o = out + b0;
    for (int64_t k = 0; k < n; ++k) {
      // Rounded by nearbyint (half to even, like ATen's round): no addition follows the
      // product, so no compiler can contract it into an FMA, whatever the target.
      const T y = ((x[k] - lo) / range) * level_max[k];
      o[k] = static_cast<int16_t>(static_cast<int32_t>(std::nearbyint(y)));
    }
  }
}

template <class T>
inline void quantize_levels_baseline(const T* w, const uint8_t* bits, int64_t gs, T lo, T range,
                                     int16_t* out, int64_t begin, int64_t end) {
  quantize_levels_range<T>(w, bits, gs, lo, range, out, begin, end);
}

#if DIFFQ_NOISE_AVX2_DISPATCH
/// AVX2 clone (no FMA: bit-identical to the baseline). Call only if the CPU has AVX2.
template <class T>
__attribute__((target("avx2"))) inline void quantize_levels_avx2(const T* w, const uint8_t* bits,
                                                                 int64_t gs, T lo, T range,
                                                                 int16_t* out, int64_t begin,
                                                                 int64_t end) {
  quantize_levels_range<T>(w, bits, gs, lo, range, out, begin, end);
}

#endif

/// Levels of a contiguous `[numel]` buffer with per-group bit widths `bits` (`[ceil(numel/gs)]`,
/// values in [1, 15]), `min < max` finite, every value in `[min, max]`. In parallel over element
/// ranges (any group size, including one group for the whole tensor); the result does not depend
/// on the split. No argument checks (bits.h checks).
template <class T>
inline void quantize_levels_cpu(const T* w, const uint8_t* bits, int64_t numel, int64_t gs,
                                double min, double max, int16_t* out) {
  // As ATen converts the double scalars of `(w − min) / (max − min)` to the tensor's dtype.
  const T lo = static_cast<T>(min);
  const T range = static_cast<T>(max - min);
  at::parallel_for(0, numel, int64_t{1} << 15, [&](int64_t begin, int64_t end) {
#if DIFFQ_NOISE_AVX2_DISPATCH
    if (noise_cpu_has_avx2()) {
      quantize_levels_avx2<T>(w, bits, gs, lo, range, out, begin, end);
      return;
    }
#endif
    quantize_levels_baseline<T>(w, bits, gs, lo, range, out, begin, end);
  });
}

}  // namespace detail
}  // namespace diffq
