#pragma once
/// \file diffq/detail/pqn_kernels.h
/// Fused CPU kernels of the pseudo quantization noise (paper, Section 3.1): the training forward's
/// `noisy = w + Δ_g·u` with `Δ_g = (max w − min w)·unit_g`, and the exact backward to the bit
/// logits. They work on raw contiguous buffers, in chunks of `kNoiseChunk` elements, one noise stream
/// per chunk, so results do not depend on the number of threads.

#include <diffq/noise.h>
#include <diffq/options.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

namespace diffq {
namespace detail {

/// Elements per noise stream: chunk `c` covers elements `[c·kNoiseChunk, (c+1)·kNoiseChunk)`.
constexpr int64_t kNoiseChunk = 16384;

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

/// Draws `u` (`[numel]`, one stream per chunk of `seed`) and writes `noisy = w + scale·unit_g·u`.
/// `unit`: `[num_groups]`; `gs`: effective group size (> 0). Collects the positions of `lo` and
/// `hi` (the tensor's min and max) in `extremes`.
template <typename scalar_t>
void apply_noise_cpu(const scalar_t* w, scalar_t* noisy, float* u, int64_t numel, int64_t gs,
                     const float* unit, double scale, uint64_t seed, Noise kind, scalar_t lo,
                     scalar_t hi, Extremes& extremes) {
  extremes.clear();
  std::mutex mutex;
  const int64_t chunks = (numel + kNoiseChunk - 1) / kNoiseChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t start = c * kNoiseChunk;
      const int64_t end = std::min(numel, start + kNoiseChunk);
      fill_noise(u + start, end - start, seed, static_cast<uint64_t>(c), kind);
      if (gs == 1) {
        for (int64_t i = start; i < end; ++i) {
          noisy[i] = w[i] + static_cast<scalar_t>(scale * unit[i]) * static_cast<scalar_t>(u[i]);
        }
      } else {
        int64_t i = start;
        while (i < end) {
          const int64_t g = i / gs;
          const int64_t e = std::min(end, (g + 1) * gs);
          const scalar_t d = static_cast<scalar_t>(scale * unit[g]);
          const scalar_t* __restrict wi = w;
          scalar_t* __restrict ni = noisy;
          const float* __restrict ui = u;
          for (int64_t j = i; j < e; ++j) ni[j] = wi[j] + d * static_cast<scalar_t>(ui[j]);
          i = e;
        }
      }
      int64_t hits = 0;
      for (int64_t i = start; i < end; ++i) hits += (w[i] == hi) | (w[i] == lo);
      if (hits != 0) {
        std::lock_guard<std::mutex> lock(mutex);
        for (int64_t i = start; i < end; ++i) {
          if (w[i] == hi) extremes.argmax.push_back(i);
          if (w[i] == lo) extremes.argmin.push_back(i);
        }
      }
    }
  });
}

/// Backward of `noisy = w + scale·unit_g·u` to the logits: for each group `G_g = Σ_{i∈g} grad_i·u_i`,
/// `logit_grad_g += G_g·scale·dunit_g`. Returns `Σ_g G_g·unit_g`, the gradient with respect to
/// `max w` (and minus the one with respect to `min w`). `partial`: scratch of `num_groups`.
template <typename scalar_t>
double noise_backward_cpu(const scalar_t* grad, const float* u, int64_t numel, int64_t gs,
                          const float* unit, const float* dunit, double scale, float* logit_grad,
                          double* partial) {
  const int64_t groups = (numel + gs - 1) / gs;
  const int64_t grain = std::max<int64_t>(1, kNoiseChunk / gs);
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t s = g * gs;
      const int64_t e = std::min(numel, s + gs);
      double acc = 0;
      for (int64_t i = s; i < e; ++i) acc += static_cast<double>(grad[i]) * u[i];
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
