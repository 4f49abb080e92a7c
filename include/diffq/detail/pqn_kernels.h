#pragma once
/// \file diffq/detail/pqn_kernels.h
/// Fused CPU kernels of the pseudo quantization noise (paper, Section 3.1): the training forward's
/// `noisy = w + Δ_g·u` with `Δ_g = (max w − min w)·unit_g`, and the exact backward to the bit
/// logits. They work on raw contiguous buffers, in chunks of `diffq::kNoiseChunk` elements, one
/// noise stream per chunk (chunk `c` is stream `c`), so results do not depend on the thread count.
/// Also the per-group pass over the bit logits (`units_cpu`, `bits_terms_cpu`) that gives the
/// noise its quantization units and the penalty its bit widths and slopes.

#include <diffq/bits.h>
#include <diffq/noise.h>
#include <diffq/options.h>

#include <ATen/Parallel.h>

#if defined(__x86_64__) || defined(_M_X64) || DIFFQ_NOISE_AVX2_DISPATCH
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

namespace diffq {
namespace detail {

/// Positions of the extreme values of a tensor (all ties), which receive the gradient that flows
/// through `max w − min w` (spread evenly over ties, as ATen's `max()`/`min()` backward does).
struct Extremes {
  std::vector<int64_t> argmax;
  std::vector<int64_t> argmin;
  void clear() {
    argmax.clear();
    argmin.clear();
  }
};

// DIFFQ_VECTORIZE_CLAMPS (bits.h): the kernels opt out of -ftrapping-math so that GCC vectorizes
// their float clamps.

/// `2^x` in float for `x` in [-126, 126] (clamped outside), relative error below 2e-7: `2^floor(x)`
/// from the exponent bits times a degree-6 Taylor polynomial of `2^f` around `f = 1/2`. Branch-free
/// so that loops over it vectorize. `x` must not be NaN (its conversion to int is undefined): the
/// callers check the logits first (`any_nan`).
DIFFQ_VECTORIZE_CLAMPS inline float exp2_approx(float x) {
  x = x < -126.0f ? -126.0f : (x > 126.0f ? 126.0f : x);
  const int32_t xi = static_cast<int32_t>(x + 127.0f) - 127;  // floor(x): x + 127 > 0
  const float g = (x - static_cast<float>(xi)) - 0.5f;        // in [-1/2, 1/2)
  const float a = g * 0.69314718f;
  const float poly =
      1.0f + a * (1.0f + a * (0.5f + a * (1.0f / 6 +
                                          a * (1.0f / 24 + a * (1.0f / 120 + a * (1.0f / 720))))));
  const int32_t bits = (xi + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return scale * (poly * 1.41421356f);
}

/// `exp2_approx` as the `Exp2` of the bit-width math (bits.h).
struct Exp2Approx {
  DIFFQ_VECTORIZE_CLAMPS DIFFQ_MATH_INLINE float operator()(float x) const {
    return exp2_approx(x);
  }
};

/// Whether `x[0, n)` holds a NaN.
DIFFQ_VECTORIZE_CLAMPS inline bool any_nan(const float* x, int64_t n) {
  int nan = 0;
  for (int64_t i = 0; i < n; ++i) nan |= x[i] != x[i];
  return nan != 0;
}

/// Groups per block of `bits_terms_cpu`: the bit widths of a block are summed in float, the
/// blocks in double.
constexpr int64_t kBitsBlock = 512;

/// Sum and maximum of the bit widths `b_g` of a tensor's groups (`Param::kBits`).
struct BitsStats {
  double sum = 0;  ///< Σ_g b_g, every group counted once
  float max = 0;   ///< max_g b_g
};

/// Groups `[0, n)` of a block (`Param::kBits`): `b`, `slope = db/dl` and, with `kUnits`, the
/// quantization unit `1/(2^b − 1)` and its derivative with respect to the logit, in float with
/// `exp2_approx` (`detail::sigmoid_terms`, `bits_and_slope`, `unit_and_slope`, bits.h). Shared by
/// `units_cpu` and `bits_terms_cpu`, so both give the same units.
template <bool kUnits>
DIFFQ_VECTORIZE_CLAMPS inline __attribute__((always_inline)) void bits_terms_block(
    const float* __restrict logit, int64_t n, const BitsParam<float>& c, float* __restrict b,
    float* __restrict slope, float* __restrict unit, float* __restrict dunit) {
  const Exp2Approx exp2;
  for (int64_t g = 0; g < n; ++g) {
    const auto st = sigmoid_terms(logit[g], exp2);
    const auto bs = bits_and_slope<Param::kBits>(st, c, exp2);
    b[g] = bs.bits;
    slope[g] = bs.dbits;
    if (kUnits) {
      const auto us = unit_and_slope<Param::kBits>(st, bs.bits, c, exp2);
      unit[g] = us.unit;
      dunit[g] = us.dunit;
    }
  }
}

/// Body of `units_cpu` (below).
DIFFQ_VECTORIZE_CLAMPS inline __attribute__((always_inline)) void units_impl(
    const float* __restrict logit, float* __restrict unit, float* __restrict dunit, int64_t groups,
    double min_bits, double max_bits, Param param) {
  const BitsParam<float> c(min_bits, max_bits);
  if (param == Param::kBits) {
    float b[kBitsBlock], slope[kBitsBlock];  // not needed here
    for (int64_t g0 = 0; g0 < groups; g0 += kBitsBlock) {
      const int64_t n = std::min(kBitsBlock, groups - g0);
      bits_terms_block<true>(logit + g0, n, c, b, slope, unit + g0, dunit + g0);
    }
  } else {
    const Exp2Approx exp2;
    for (int64_t g = 0; g < groups; ++g) {
      const auto us = unit_and_slope<Param::kNoise>(sigmoid_terms(logit[g], exp2), 0.0f, c, exp2);
      unit[g] = us.unit;
      dunit[g] = us.dunit;
    }
  }
}

/// `units_impl` compiled for the baseline and, where available, as an AVX2 clone (no FMA: the same
/// results), chosen at run time.
DIFFQ_VECTORIZE_CLAMPS inline void units_base(const float* logit, float* unit, float* dunit,
                                              int64_t groups, double min_bits, double max_bits,
                                              Param param) {
  units_impl(logit, unit, dunit, groups, min_bits, max_bits, param);
}
#if DIFFQ_NOISE_AVX2_DISPATCH
DIFFQ_VECTORIZE_CLAMPS __attribute__((target("avx2"))) inline void units_avx2(
    const float* logit, float* unit, float* dunit, int64_t groups, double min_bits, double max_bits,
    Param param) {
  units_impl(logit, unit, dunit, groups, min_bits, max_bits, param);
}
#endif

/// Per group, the quantization unit `1/(2^b − 1)` and its derivative with respect to the logit
/// (`diffq::unit_from_logit`, bits.h), in float: `unit`, `dunit` are `[groups]`.
inline void units_cpu(const float* logit, float* unit, float* dunit, int64_t groups,
                      double min_bits, double max_bits, Param param) {
#if DIFFQ_NOISE_AVX2_DISPATCH
  if (noise_cpu_has_avx2()) {
    units_avx2(logit, unit, dunit, groups, min_bits, max_bits, param);
    return;
  }
#endif
  units_base(logit, unit, dunit, groups, min_bits, max_bits, param);
}

// The element loops below exist twice: compiled for the translation unit's baseline and, on x86
// builds that are not AVX2 already, as AVX2 clones chosen at run time (as the noise generator,
// noise_kernel.h). The clones enable no FMA, so both give the same results bit for bit (a build
// with FMA enabled, e.g. -march=native, has the one path only).
#define DIFFQ_KERNEL_INLINE inline __attribute__((always_inline))
#if DIFFQ_NOISE_AVX2_DISPATCH
#define DIFFQ_KERNEL_AVX2 __attribute__((target("avx2")))
#endif

/// Body of `bits_terms_cpu`.
template <bool kUnits>
DIFFQ_VECTORIZE_CLAMPS DIFFQ_KERNEL_INLINE BitsStats bits_terms_impl(const float* logit,
                                                                     int64_t groups,
                                                                     double min_bits,
                                                                     double max_bits, float* slope,
                                                                     float* unit, float* dunit) {
  const BitsParam<float> c(min_bits, max_bits);
  const float lo_bits = c.min_bits;
  BitsStats stats;
  stats.max = lo_bits;
  float b[kBitsBlock];
  for (int64_t g0 = 0; g0 < groups; g0 += kBitsBlock) {
    const int64_t n = std::min(kBitsBlock, groups - g0);
    bits_terms_block<kUnits>(logit + g0, n, c, b, slope + g0, kUnits ? unit + g0 : nullptr,
                             kUnits ? dunit + g0 : nullptr);
    // Eight float lanes (vectorizable), combined in a fixed order.
    float sum[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    float top[8] = {lo_bits, lo_bits, lo_bits, lo_bits, lo_bits, lo_bits, lo_bits, lo_bits};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      for (int j = 0; j < 8; ++j) {
        sum[j] += b[i + j];
        top[j] = b[i + j] > top[j] ? b[i + j] : top[j];
      }
    }
    for (int j = 0; i < n; ++i, ++j) {
      sum[j] += b[i];
      top[j] = b[i] > top[j] ? b[i] : top[j];
    }
    stats.sum += static_cast<double>(((sum[0] + sum[4]) + (sum[1] + sum[5])) +
                                     ((sum[2] + sum[6]) + (sum[3] + sum[7])));
    for (int j = 0; j < 8; ++j) stats.max = top[j] > stats.max ? top[j] : stats.max;
  }
  return stats;
}

DIFFQ_VECTORIZE_CLAMPS inline BitsStats bits_terms_base(const float* logit, int64_t groups,
                                                        double min_bits, double max_bits,
                                                        float* slope, float* unit, float* dunit) {
  return unit != nullptr
             ? bits_terms_impl<true>(logit, groups, min_bits, max_bits, slope, unit, dunit)
             : bits_terms_impl<false>(logit, groups, min_bits, max_bits, slope, unit, dunit);
}
#if DIFFQ_NOISE_AVX2_DISPATCH
DIFFQ_VECTORIZE_CLAMPS DIFFQ_KERNEL_AVX2 inline BitsStats bits_terms_avx2(
    const float* logit, int64_t groups, double min_bits, double max_bits, float* slope, float* unit,
    float* dunit) {
  return unit != nullptr
             ? bits_terms_impl<true>(logit, groups, min_bits, max_bits, slope, unit, dunit)
             : bits_terms_impl<false>(logit, groups, min_bits, max_bits, slope, unit, dunit);
}
#endif

/// One pass over the bit logits `logit` (`[groups]`, `Param::kBits`, `groups` > 0) for both the
/// penalty and the noise: writes `slope[g] = db_g/dl_g` (`[groups]`) and, unless `unit` is null,
/// the quantization unit and its derivative as `units_cpu` does (`unit`, `dunit`: `[groups]`);
/// returns `Σ_g b_g` and `max_g b_g`. In float with `exp2_approx`; the sum in float over blocks
/// of `kBitsBlock` groups (eight lanes), the blocks in double. The results do not depend on
/// whether `unit` is null, nor on the SSE2 or AVX2 path.
inline BitsStats bits_terms_cpu(const float* logit, int64_t groups, double min_bits,
                                double max_bits, float* slope, float* unit, float* dunit) {
#if DIFFQ_NOISE_AVX2_DISPATCH
  if (noise_cpu_has_avx2()) {
    return bits_terms_avx2(logit, groups, min_bits, max_bits, slope, unit, dunit);
  }
#endif
  return bits_terms_base(logit, groups, min_bits, max_bits, slope, unit, dunit);
}

/// Minimum and maximum of `w[begin, end)` and whether it holds a NaN (NaN compares false, so it
/// would otherwise be skipped silently).
struct MinMax {
  float lo;
  float hi;
  bool nan;
};

/// Scalar `minmax_range`: `begin < end`.
inline MinMax minmax_range_scalar(const float* w, int64_t begin, int64_t end) {
  MinMax r{w[begin], w[begin], false};
  for (int64_t i = begin; i < end; ++i) {
    const float x = w[i];
    r.lo = x < r.lo ? x : r.lo;
    r.hi = x > r.hi ? x : r.hi;
    r.nan = r.nan || x != x;
  }
  return r;
}

/// Ends a vectorized `minmax_range`: reduces the `lanes` per-lane extremes `l`/`h` (NaN flag `nan`
/// from the vector loop) and folds in the scalar tail `[i, end)`.
inline MinMax finish_minmax(const float* l, const float* h, int lanes, bool nan, const float* w,
                            int64_t i, int64_t end) {
  MinMax r{l[0], h[0], nan};
  for (int k = 1; k < lanes; ++k) {
    r.lo = l[k] < r.lo ? l[k] : r.lo;
    r.hi = h[k] > r.hi ? h[k] : r.hi;
  }
  if (i < end) {
    const MinMax t = minmax_range_scalar(w, i, end);
    r.lo = t.lo < r.lo ? t.lo : r.lo;
    r.hi = t.hi > r.hi ? t.hi : r.hi;
    r.nan = r.nan || t.nan;
  }
  return r;
}

#if defined(__x86_64__) || defined(_M_X64)
/// SSE2 (x86-64 baseline) `minmax_range`. Compilers do not vectorize the float min/max
/// reductions by themselves (their NaN semantics differ from `minps`); for finite values the
/// results are the same, and NaN is reported separately.
inline MinMax minmax_range_base(const float* w, int64_t begin, int64_t end) {
  if (end - begin < 8) return minmax_range_scalar(w, begin, end);
  __m128 lo = _mm_loadu_ps(w + begin), hi = lo;
  __m128 nan = _mm_cmpunord_ps(lo, lo);
  int64_t i = begin + 4;
  for (; i + 4 <= end; i += 4) {
    const __m128 x = _mm_loadu_ps(w + i);
    lo = _mm_min_ps(lo, x);
    hi = _mm_max_ps(hi, x);
    nan = _mm_or_ps(nan, _mm_cmpunord_ps(x, x));
  }
  float l[4], h[4];
  _mm_storeu_ps(l, lo);
  _mm_storeu_ps(h, hi);
  return finish_minmax(l, h, 4, _mm_movemask_ps(nan) != 0, w, i, end);
}
#else
inline MinMax minmax_range_base(const float* w, int64_t begin, int64_t end) {
  return minmax_range_scalar(w, begin, end);
}
#endif

#if DIFFQ_NOISE_AVX2_DISPATCH
/// AVX2 `minmax_range`.
DIFFQ_KERNEL_AVX2 inline MinMax minmax_range_avx2(const float* w, int64_t begin, int64_t end) {
  if (end - begin < 32) return minmax_range_scalar(w, begin, end);
  __m256 lo0 = _mm256_loadu_ps(w + begin), hi0 = lo0;
  __m256 lo1 = lo0, hi1 = lo0;
  __m256 nan = _mm256_cmp_ps(lo0, lo0, _CMP_UNORD_Q);
  int64_t i = begin + 8;
  for (; i + 16 <= end; i += 16) {
    const __m256 x = _mm256_loadu_ps(w + i);
    const __m256 y = _mm256_loadu_ps(w + i + 8);
    lo0 = _mm256_min_ps(lo0, x);
    hi0 = _mm256_max_ps(hi0, x);
    lo1 = _mm256_min_ps(lo1, y);
    hi1 = _mm256_max_ps(hi1, y);
    nan = _mm256_or_ps(
        nan, _mm256_or_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q), _mm256_cmp_ps(y, y, _CMP_UNORD_Q)));
  }
  float l[8], h[8];
  _mm256_storeu_ps(l, _mm256_min_ps(lo0, lo1));
  _mm256_storeu_ps(h, _mm256_max_ps(hi0, hi1));
  return finish_minmax(l, h, 8, _mm256_movemask_ps(nan) != 0, w, i, end);
}
#endif

/// Minimum and maximum of `w[0, numel)` (`numel` > 0), and per chunk of `kNoiseChunk` elements in
/// `chunk_lo`/`chunk_hi` (`[ceil(numel / kNoiseChunk)]`), which `apply_noise_cpu` uses to find
/// the positions of the extremes without another pass. In parallel over chunks.
inline MinMax minmax_cpu(const float* w, int64_t numel, float* chunk_lo, float* chunk_hi) {
  const int64_t chunks = (numel + kNoiseChunk - 1) / kNoiseChunk;
  std::vector<uint8_t> nan(static_cast<size_t>(chunks), 0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t start = c * kNoiseChunk;
      const int64_t end = std::min(numel, start + kNoiseChunk);
      MinMax m;
#if DIFFQ_NOISE_AVX2_DISPATCH
      if (noise_cpu_has_avx2()) {
        m = minmax_range_avx2(w, start, end);
      } else {
        m = minmax_range_base(w, start, end);
      }
#else
      m = minmax_range_base(w, start, end);
#endif
      chunk_lo[c] = m.lo;
      chunk_hi[c] = m.hi;
      nan[static_cast<size_t>(c)] = m.nan ? 1 : 0;
    }
  });
  MinMax r{chunk_lo[0], chunk_hi[0], false};
  for (int64_t c = 0; c < chunks; ++c) {
    r.lo = std::min(r.lo, chunk_lo[c]);
    r.hi = std::max(r.hi, chunk_hi[c]);
    r.nan = r.nan || nan[static_cast<size_t>(c)] != 0;
  }
  return r;
}

/// `noisy[i] = w[i] + (scale·unit[i / gs])·u[i]` over `[i0, i1)`, element by element.
DIFFQ_KERNEL_INLINE void apply_scalar(const float* w, float* noisy, const float* u,
                                      const float* unit, float scale, int64_t gs, int64_t i0,
                                      int64_t i1) {
  if (gs == 1) {
    for (int64_t i = i0; i < i1; ++i) noisy[i] = w[i] + (scale * unit[i]) * u[i];
    return;
  }
  for (int64_t i = i0; i < i1; ++i) noisy[i] = w[i] + (scale * unit[i / gs]) * u[i];
}

// `noisy = w + Δ_g·u` over `[start, end)` with explicit vectors for group sizes that are multiples
// of the vector width (compilers vectorize the per-group loops poorly), element by element
// otherwise and at partial groups. A multiplication then an addition, as `apply_scalar`: the
// same results bit for bit.
#if defined(__x86_64__) || defined(_M_X64)
inline void apply_range_base(const float* w, float* noisy, const float* u, const float* unit,
                             float scale, int64_t gs, int64_t start, int64_t end) {
  const int64_t g_first = (start + gs - 1) / gs;
  const int64_t g_last = end / gs;
  if (gs % 4 != 0 || g_first >= g_last)
    return apply_scalar(w, noisy, u, unit, scale, gs, start, end);
  apply_scalar(w, noisy, u, unit, scale, gs, start, g_first * gs);
  for (int64_t g = g_first; g < g_last; ++g) {
    const __m128 d = _mm_set1_ps(scale * unit[g]);
    for (int64_t i = g * gs, e = i + gs; i < e; i += 4) {
      _mm_storeu_ps(noisy + i, _mm_add_ps(_mm_loadu_ps(w + i), _mm_mul_ps(d, _mm_loadu_ps(u + i))));
    }
  }
  apply_scalar(w, noisy, u, unit, scale, gs, g_last * gs, end);
}
#else
inline void apply_range_base(const float* w, float* noisy, const float* u, const float* unit,
                             float scale, int64_t gs, int64_t start, int64_t end) {
  apply_scalar(w, noisy, u, unit, scale, gs, start, end);
}
#endif

#if DIFFQ_NOISE_AVX2_DISPATCH
DIFFQ_KERNEL_AVX2 inline void apply_range_avx2(const float* w, float* noisy, const float* u,
                                               const float* unit, float scale, int64_t gs,
                                               int64_t start, int64_t end) {
  const int64_t g_first = (start + gs - 1) / gs;
  const int64_t g_last = end / gs;
  if (gs % 8 != 0 || g_first >= g_last)
    return apply_scalar(w, noisy, u, unit, scale, gs, start, end);
  apply_scalar(w, noisy, u, unit, scale, gs, start, g_first * gs);
  for (int64_t g = g_first; g < g_last; ++g) {
    const __m256 d = _mm256_set1_ps(scale * unit[g]);
    for (int64_t i = g * gs, e = i + gs; i < e; i += 8) {
      _mm256_storeu_ps(noisy + i, _mm256_add_ps(_mm256_loadu_ps(w + i),
                                                _mm256_mul_ps(d, _mm256_loadu_ps(u + i))));
    }
  }
  apply_scalar(w, noisy, u, unit, scale, gs, g_last * gs, end);
}
#endif

/// Noise of chunk `c` (elements `[start, end)`, stream `c`), then the noisy weights of that range
/// (the 256 KiB of samples are still in the L2 cache).
inline void noise_apply_chunk(const float* w, float* noisy, float* u, const float* unit,
                              float scale, int64_t gs, int64_t start, int64_t end, uint64_t seed,
                              uint64_t c, bool gaussian) {
  fill_noise_unchecked(u + start, end - start, seed, c, gaussian);
#if DIFFQ_NOISE_AVX2_DISPATCH
  if (noise_cpu_has_avx2()) return apply_range_avx2(w, noisy, u, unit, scale, gs, start, end);
#endif
  apply_range_base(w, noisy, u, unit, scale, gs, start, end);
}

/// Draws `u` (`[numel]`, stream `c` for chunk `c` of `kNoiseChunk` elements) and writes
/// `noisy = w + scale·unit_g·u`. `unit`: `[num_groups]`; `gs`: effective group size (> 0).
/// Collects the positions of `lo` and `hi` (the tensor's min and max, from `minmax_cpu`, whose
/// per-chunk extremes `chunk_lo`/`chunk_hi` say which chunks hold them) in `extremes`, sorted.
inline void apply_noise_cpu(const float* w, float* noisy, float* u, int64_t numel, int64_t gs,
                            const float* unit, double scale, uint64_t seed, Noise kind, float lo,
                            float hi, const float* chunk_lo, const float* chunk_hi,
                            Extremes& extremes) {
  extremes.clear();
  const float fscale = static_cast<float>(scale);
  const int64_t chunks = (numel + kNoiseChunk - 1) / kNoiseChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t start = c * kNoiseChunk;
      const int64_t end = std::min(numel, start + kNoiseChunk);
      noise_apply_chunk(w, noisy, u, unit, fscale, gs, start, end, seed, static_cast<uint64_t>(c),
                        kind == Noise::kGaussian);
    }
  });
  // Positions of the extremes, chunk by chunk in order (sorted, deterministic): only the chunks
  // whose own minimum or maximum is the tensor's are scanned.
  for (int64_t c = 0; c < chunks; ++c) {
    if (chunk_hi[c] != hi && chunk_lo[c] != lo) continue;
    const int64_t start = c * kNoiseChunk;
    const int64_t end = std::min(numel, start + kNoiseChunk);
    int64_t i = start;
#if defined(__x86_64__) || defined(_M_X64)
    // Four at a time; the (rare) blocks holding an extreme element by element.
    const __m128 vhi = _mm_set1_ps(hi), vlo = _mm_set1_ps(lo);
    for (; i + 4 <= end; i += 4) {
      const __m128 x = _mm_loadu_ps(w + i);
      if (_mm_movemask_ps(_mm_or_ps(_mm_cmpeq_ps(x, vhi), _mm_cmpeq_ps(x, vlo))) == 0) continue;
      for (int64_t k = i; k < i + 4; ++k) {
        if (w[k] == hi) extremes.argmax.push_back(k);
        if (w[k] == lo) extremes.argmin.push_back(k);
      }
    }
#endif
    for (; i < end; ++i) {
      if (w[i] == hi) extremes.argmax.push_back(i);
      if (w[i] == lo) extremes.argmin.push_back(i);
    }
  }
}

/// `Σ_{k<size} grad[k]·u[k]` with eight float lanes (vectorizable), lanes summed in double.
template <int GS>
DIFFQ_KERNEL_INLINE double dot_lanes(const float* __restrict grad, const float* __restrict u,
                                     int64_t n) {
  const int64_t size = GS > 0 ? GS : n;
  float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= size; i += 8) {
    for (int k = 0; k < 8; ++k) lane[k] += grad[i + k] * u[i + k];
  }
  float tail = 0;
  for (; i < size; ++i) tail += grad[i] * u[i];
  return static_cast<double>((lane[0] + lane[4]) + (lane[1] + lane[5])) +
         static_cast<double>((lane[2] + lane[6]) + (lane[3] + lane[7])) + tail;
}

/// `Σ grad·u` over `n` elements: float lanes over blocks of 256, blocks summed in double.
DIFFQ_KERNEL_INLINE double dot_blocks(const float* grad, const float* u, int64_t n) {
  double acc = 0;
  for (int64_t b = 0; b < n; b += 256)
    acc += dot_lanes<0>(grad + b, u + b, std::min<int64_t>(256, n - b));
  return acc;
}

/// Groups `[g0, g1)` of `noise_backward_cpu`; `Dot16`/`Dot8` compute `dot_lanes<16>`/`<8>`.
template <class Dot16, class Dot8>
DIFFQ_KERNEL_INLINE void backward_groups(const float* grad, const float* u, int64_t numel,
                                         int64_t gs, const float* unit, const float* dunit,
                                         double scale, float* logit_grad, double* partial,
                                         int64_t g0, int64_t g1, Dot16 dot16, Dot8 dot8) {
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t s = g * gs;
    const int64_t n = std::min(numel, s + gs) - s;
    double acc;
    if (n == 16) {
      acc = dot16(grad + s, u + s);
    } else if (n == 8) {
      acc = dot8(grad + s, u + s);
    } else {
      acc = dot_blocks(grad + s, u + s, n);
    }
    logit_grad[g] += static_cast<float>(acc * scale * dunit[g]);
    partial[g] = acc * unit[g];
  }
}

/// The final reduction of `dot_lanes` from `t[k] = lane[k] + lane[k + 4]`.
DIFFQ_KERNEL_INLINE double reduce_lane_pairs(const float t[4]) {
  return static_cast<double>(t[0] + t[1]) + static_cast<double>(t[2] + t[3]);
}

// `dot_lanes<16>` and `<8>` with explicit vectors: lane k of the eight is an xmm/ymm lane, the
// same additions in the same order, so the same results bit for bit.
#if defined(__x86_64__) || defined(_M_X64)
inline void backward_groups_base(const float* grad, const float* u, int64_t numel, int64_t gs,
                                 const float* unit, const float* dunit, double scale,
                                 float* logit_grad, double* partial, int64_t g0, int64_t g1) {
  auto dot16 = [](const float* a, const float* b) {
    const __m128 lo = _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(a), _mm_loadu_ps(b)),
                                 _mm_mul_ps(_mm_loadu_ps(a + 8), _mm_loadu_ps(b + 8)));
    const __m128 hi = _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(a + 4), _mm_loadu_ps(b + 4)),
                                 _mm_mul_ps(_mm_loadu_ps(a + 12), _mm_loadu_ps(b + 12)));
    float t[4];
    _mm_storeu_ps(t, _mm_add_ps(lo, hi));
    return reduce_lane_pairs(t);
  };
  auto dot8 = [](const float* a, const float* b) {
    float t[4];
    _mm_storeu_ps(t, _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(a), _mm_loadu_ps(b)),
                                _mm_mul_ps(_mm_loadu_ps(a + 4), _mm_loadu_ps(b + 4))));
    return reduce_lane_pairs(t);
  };
  backward_groups(grad, u, numel, gs, unit, dunit, scale, logit_grad, partial, g0, g1, dot16, dot8);
}
#else
inline void backward_groups_base(const float* grad, const float* u, int64_t numel, int64_t gs,
                                 const float* unit, const float* dunit, double scale,
                                 float* logit_grad, double* partial, int64_t g0, int64_t g1) {
  backward_groups(
      grad, u, numel, gs, unit, dunit, scale, logit_grad, partial, g0, g1,
      [](const float* a, const float* b) { return dot_lanes<16>(a, b, 16); },
      [](const float* a, const float* b) { return dot_lanes<8>(a, b, 8); });
}
#endif
#if DIFFQ_NOISE_AVX2_DISPATCH
// Functors rather than lambdas: a lambda does not inherit its enclosing function's target.
struct Dot16Avx2 {
  DIFFQ_KERNEL_AVX2 inline double operator()(const float* a, const float* b) const {
    const __m256 s = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b)),
                                   _mm256_mul_ps(_mm256_loadu_ps(a + 8), _mm256_loadu_ps(b + 8)));
    float t[4];
    _mm_storeu_ps(t, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
    return reduce_lane_pairs(t);
  }
};
struct Dot8Avx2 {
  DIFFQ_KERNEL_AVX2 inline double operator()(const float* a, const float* b) const {
    const __m256 s = _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b));
    float t[4];
    _mm_storeu_ps(t, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
    return reduce_lane_pairs(t);
  }
};
DIFFQ_KERNEL_AVX2 inline void backward_groups_avx2(const float* grad, const float* u, int64_t numel,
                                                   int64_t gs, const float* unit,
                                                   const float* dunit, double scale,
                                                   float* logit_grad, double* partial, int64_t g0,
                                                   int64_t g1) {
  backward_groups(grad, u, numel, gs, unit, dunit, scale, logit_grad, partial, g0, g1, Dot16Avx2{},
                  Dot8Avx2{});
}
#endif

/// Backward of `noisy = w + scale·unit_g·u` to the logits: for each group `G_g = Σ_{i∈g}
/// grad_i·u_i`, `logit_grad_g += G_g·scale·dunit_g`. Returns `Σ_g G_g·unit_g`, the gradient with
/// respect to `max w` (and minus the one with respect to `min w`). `partial`: scratch of
/// `num_groups`.
inline double noise_backward_cpu(const float* grad, const float* u, int64_t numel, int64_t gs,
                                 const float* unit, const float* dunit, double scale,
                                 float* logit_grad, double* partial) {
  const int64_t groups = (numel + gs - 1) / gs;
  const int64_t grain = std::max<int64_t>(1, kNoiseChunk / gs);
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
#if DIFFQ_NOISE_AVX2_DISPATCH
    if (noise_cpu_has_avx2()) {
      backward_groups_avx2(grad, u, numel, gs, unit, dunit, scale, logit_grad, partial, g0, g1);
      return;
    }
#endif
    backward_groups_base(grad, u, numel, gs, unit, dunit, scale, logit_grad, partial, g0, g1);
  });
  double total = 0;
  for (int64_t g = 0; g < groups; ++g) total += partial[g];
  return total;
}

}  // namespace detail
}  // namespace diffq
