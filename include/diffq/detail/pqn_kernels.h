#pragma once
/// \file diffq/detail/pqn_kernels.h
/// Fused CPU kernels of the pseudo quantization noise (paper, Section 3.1): the training forward's
/// `noisy = w + Δ_g·u` with `Δ_g = (max w − min w)·unit_g`, and the exact backward to the bit
/// logits. They work on raw contiguous buffers, in chunks of `diffq::kNoiseChunk` elements, one
/// noise stream per chunk (chunk `c` is stream `c`), so results do not depend on the thread count.

#include <diffq/noise.h>
#include <diffq/options.h>

#include <ATen/Parallel.h>

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

// GCC keeps float clamps out of vectorized loops under its default -ftrapping-math; these kernels
// raise no floating-point exception that anyone reads, so they opt out (clang vectorizes anyway).
#if defined(__GNUC__) && !defined(__clang__)
#define DIFFQ_VECTORIZE_CLAMPS __attribute__((optimize("no-trapping-math")))
#else
#define DIFFQ_VECTORIZE_CLAMPS
#endif

/// `2^x` in float for `x` in [-126, 126] (clamped outside), relative error below 2e-7: `2^floor(x)`
/// from the exponent bits times a degree-6 Taylor polynomial of `2^f` around `f = 1/2`. Branch-free
/// so that loops over it vectorize.
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

/// Per group, the quantization unit `1/(2^b − 1)` and its derivative with respect to the logit
/// (`diffq::unit_from_logit`, bits.h), in float: `unit`, `dunit` are `[groups]`.
DIFFQ_VECTORIZE_CLAMPS inline void units_cpu(const float* logit, float* unit, float* dunit,
                                             int64_t groups, double min_bits, double max_bits,
                                             Param param) {
  const float range = static_cast<float>(max_bits - min_bits);
  const float lo_bits = static_cast<float>(min_bits);
  const float log2e = 1.44269504f;
  if (param == Param::kBits) {
    const float k = -0.69314718f * range;
    for (int64_t g = 0; g < groups; ++g) {
      // t = sigmoid(l) = 1/(1 + e) and t(1 − t) = e/(1 + e)², e = exp(−l): no cancellation.
      const float e = exp2_approx(-logit[g] * log2e);
      const float t = 1.0f / (1.0f + e);
      const float u = 1.0f / (exp2_approx(lo_bits + range * t) - 1.0f);
      unit[g] = u;
      dunit[g] = k * (u + u * u) * (e * t * t);
    }
  } else {
    const float log_min = static_cast<float>(std::log(min_noise_scale(max_bits)));
    const float log_max = static_cast<float>(std::log(max_noise_scale(min_bits)));
    const float span = log_min - log_max;
    for (int64_t g = 0; g < groups; ++g) {
      const float e = exp2_approx(-logit[g] * log2e);
      const float t = 1.0f / (1.0f + e);
      const float s = exp2_approx((log_max + span * t) * log2e);
      unit[g] = s;
      dunit[g] = s * span * (e * t * t);
    }
  }
}

/// `noisy[i] = w[i] + delta_g·u[i]` over the full groups `[g0, g1)` of compile-time size `GS`
/// (or runtime `gs` when `GS == 0`); returns how many elements equal `lo` or `hi`.
template <int GS>
inline int64_t apply_groups(const float* __restrict w, float* __restrict noisy,
                            const float* __restrict u, const float* __restrict unit, float scale,
                            int64_t gs, int64_t g0, int64_t g1, float lo, float hi) {
  const int64_t size = GS > 0 ? GS : gs;
  int32_t hits = 0;
  for (int64_t g = g0; g < g1; ++g) {
    const float d = scale * unit[g];
    const int64_t s = g * size;
    for (int64_t k = 0; k < size; ++k) {
      const float x = w[s + k];
      noisy[s + k] = x + d * u[s + k];
      hits += static_cast<int32_t>(x == lo) + static_cast<int32_t>(x == hi);
    }
  }
  return hits;
}

/// Draws `u` (`[numel]`, stream `c` for chunk `c` of `kNoiseChunk` elements) and writes
/// `noisy = w + scale·unit_g·u`. `unit`: `[num_groups]`; `gs`: effective group size (> 0).
/// Collects the positions of `lo` and `hi` (the tensor's min and max) in `extremes`.
inline void apply_noise_cpu(const float* w, float* noisy, float* u, int64_t numel, int64_t gs,
                            const float* unit, double scale, uint64_t seed, Noise kind, float lo,
                            float hi, Extremes& extremes) {
  extremes.clear();
  std::mutex mutex;
  const float fscale = static_cast<float>(scale);
  const int64_t chunks = (numel + kNoiseChunk - 1) / kNoiseChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t start = c * kNoiseChunk;
      const int64_t end = std::min(numel, start + kNoiseChunk);
      fill_noise(u + start, end - start, seed, static_cast<uint64_t>(c), kind);
      // Partial groups at the chunk's edges element by element, full groups in between.
      const int64_t g_first = (start + gs - 1) / gs;  // first group starting inside the chunk
      const int64_t g_last = end / gs;                // groups [g_first, g_last) are whole
      int64_t hits = 0;
      auto scalar = [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          noisy[i] = w[i] + fscale * unit[i / gs] * u[i];
          hits += (w[i] == lo) + (w[i] == hi);
        }
      };
      if (g_first >= g_last) {
        scalar(start, end);
      } else {
        scalar(start, g_first * gs);
        switch (gs) {
          case 8:
            hits += apply_groups<8>(w, noisy, u, unit, fscale, gs, g_first, g_last, lo, hi);
            break;
          case 16:
            hits += apply_groups<16>(w, noisy, u, unit, fscale, gs, g_first, g_last, lo, hi);
            break;
          case 32:
            hits += apply_groups<32>(w, noisy, u, unit, fscale, gs, g_first, g_last, lo, hi);
            break;
          case 64:
            hits += apply_groups<64>(w, noisy, u, unit, fscale, gs, g_first, g_last, lo, hi);
            break;
          default:
            hits += apply_groups<0>(w, noisy, u, unit, fscale, gs, g_first, g_last, lo, hi);
        }
        scalar(g_last * gs, end);
      }
      if (hits != 0) {
        std::lock_guard<std::mutex> lock(mutex);
        for (int64_t i = start; i < end; ++i) {
          if (w[i] == hi) extremes.argmax.push_back(i);
          if (w[i] == lo) extremes.argmin.push_back(i);
        }
      }
    }
  });
  // Chunks may finish in any order: keep the positions sorted for a deterministic gradient.
  std::sort(extremes.argmax.begin(), extremes.argmax.end());
  std::sort(extremes.argmin.begin(), extremes.argmin.end());
}

/// `Σ_{k<size} grad[k]·u[k]` with eight float lanes (vectorizable), lanes summed in double.
template <int GS>
inline double dot_lanes(const float* __restrict grad, const float* __restrict u, int64_t n) {
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
inline double dot_blocks(const float* grad, const float* u, int64_t n) {
  double acc = 0;
  for (int64_t b = 0; b < n; b += 256)
    acc += dot_lanes<0>(grad + b, u + b, std::min<int64_t>(256, n - b));
  return acc;
}

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
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t s = g * gs;
      const int64_t n = std::min(numel, s + gs) - s;
      double acc;
      if (n == 16) {
        acc = dot_lanes<16>(grad + s, u + s, 16);
      } else if (n == 8) {
        acc = dot_lanes<8>(grad + s, u + s, 8);
      } else {
        acc = dot_blocks(grad + s, u + s, n);
      }
      logit_grad[g] += static_cast<float>(acc * scale * dunit[g]);
      partial[g] = acc * unit[g];
    }
  });
  double total = 0;
  for (int64_t g = 0; g < groups; ++g) total += partial[g];
  return total;
}

}  // namespace detail
}  // namespace diffq
