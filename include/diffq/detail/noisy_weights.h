#pragma once
/// \file diffq/detail/noisy_weights.h
/// Drawing the noisy weights of a training forward, `w + Δ_g·u` with `Δ_g = (max w − min w) ·
/// unit_g` (paper, Eq. 4; DiffQ: `unit_g = 1/(2^b_g − 1)`), for any quantizer that trains with
/// pseudo quantization noise: it supplies the per-group `unit` (`[num_groups]`), these functions
/// measure the range, draw `u` (`N(0, 1)/2` or `U[−½, ½)`, `diffq/noise.h`) and write the noisy
/// weights into a buffer reused across steps. Two paths: the fused CPU kernels
/// (`pqn_kernels.h`, float32 CPU tensors) and ATen operations (any device and dtype).

#include <diffq/bits.h>
#include <diffq/detail/pqn_kernels.h>
#include <diffq/noise.h>
#include <diffq/options.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>

namespace diffq {
namespace detail {

/// A 64-bit seed drawn from LibTorch's default CPU generator, so `torch::manual_seed` makes the
/// pseudo quantization noise reproducible.
inline uint64_t draw_seed() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return at::check_generator<at::CPUGeneratorImpl>(gen)->random64();
}

/// One tensor's noise sample and its buffers, reused across steps.
struct NoisySample {
  bool fast = false;        ///< CPU kernels (else ATen ops)
  at::Tensor noisy;         ///< `[numel]`: `w + Δ·u`
  at::Tensor noise;         ///< `u`, `[numel]` (float for the CPU kernels)
  at::Tensor unit;          ///< `[num_groups]`: `Δ_g / (max w − min w)`
  at::Tensor dunit;         ///< `[num_groups]`: its derivative (by the quantizer's parameter)
  at::Tensor partial;       ///< `[num_groups]` double scratch (CPU kernels)
  double scale = 0;         ///< `max w − min w` (CPU kernels)
  at::Tensor lo, hi;        ///< 0-dim min and max
  at::Tensor chunk_minmax;  ///< `[2, chunks]` per-chunk min and max of the weights (CPU kernels)
  Extremes extremes;        ///< where the min and max are (CPU kernels), for the backward
};

/// Where a noise sample comes from: the distribution and, once a rank is set (data
/// parallelism), the rank whose stream is drawn (`rank_noise_seed`) and the ATen path's generator.
struct NoiseSource {
  Noise noise = Noise::kGaussian;
  int64_t rank = -1;
  at::Generator rank_generator;  ///< the ATen path's generator once a rank is set
};

/// Chooses the path for weights `w` (contiguous) whose per-group tensor is `aux` (`groups`
/// elements: the CPU kernels need it float32, contiguous, on the CPU) and sizes the buffers.
inline void prepare_noisy_sample(NoisySample& s, const at::Tensor& w, const at::Tensor& aux,
                                 int64_t groups, bool reference_kernels) {
  const int64_t numel = w.numel();
  s.fast = !reference_kernels && w.device().is_cpu() && w.scalar_type() == at::kFloat &&
           aux.is_contiguous() && aux.scalar_type() == at::kFloat && aux.device().is_cpu() &&
           aux.numel() == groups;
  const auto noise_dtype = s.fast ? at::kFloat : w.scalar_type();
  if (!s.noisy.defined() || s.noisy.numel() != numel || s.noisy.scalar_type() != w.scalar_type() ||
      s.noisy.device() != w.device()) {
    s.noisy = at::empty({numel}, w.options());
  }
  if (!s.noise.defined() || s.noise.numel() != numel || s.noise.scalar_type() != noise_dtype ||
      s.noise.device() != w.device()) {
    s.noise = at::empty({numel}, w.options().dtype(noise_dtype));
  }
  if (s.fast) {
    const int64_t chunks = (numel + kNoiseChunk - 1) / kNoiseChunk;
    if (!s.partial.defined() || s.partial.numel() != groups) {
      const auto cpu = at::TensorOptions().device(at::kCPU);
      s.partial = at::empty({groups}, cpu.dtype(at::kDouble));
      s.unit = at::empty({groups}, cpu.dtype(at::kFloat));
      s.dunit = at::empty({groups}, cpu.dtype(at::kFloat));
      s.chunk_minmax = at::empty({2, chunks}, cpu.dtype(at::kFloat));
    }
  } else {
    s.partial = at::Tensor();
  }
}

/// CPU kernels: min and max of `w` (also per chunk, for the noise pass); throws, naming the
/// parameter `name` after `who`, on NaN or infinite weights.
inline MinMax measure_range_cpu(NoisySample& s, const at::Tensor& w, const std::string& who,
                                const std::string& name) {
  const int64_t chunks = s.chunk_minmax.size(1);
  float* chunk_lo = s.chunk_minmax.data_ptr<float>();
  const MinMax mm = minmax_cpu(w.data_ptr<float>(), w.numel(), chunk_lo, chunk_lo + chunks);
  const double lo = mm.lo, hi = mm.hi;
  TORCH_CHECK(!mm.nan && std::isfinite(lo) && std::isfinite(hi), who, ": parameter '", name,
              "' holds non-finite values (min=", lo, ", max=", hi, mm.nan ? ", and NaN" : "",
              "); cannot add pseudo quantization noise to NaN or Inf weights");
  s.scale = hi - lo;
  s.lo = at::scalar_tensor(mm.lo, w.options());
  s.hi = at::scalar_tensor(mm.hi, w.options());
  return mm;
}

/// CPU kernels: draws `u` and writes `s.noisy = w + scale·unit[g]·u` (`s.unit` filled by the
/// quantizer, `mm` from `measure_range_cpu`).
inline void apply_noise_sample_cpu(NoisySample& s, const at::Tensor& w, int64_t group_size,
                                   const MinMax& mm, const NoiseSource& source) {
  const int64_t chunks = s.chunk_minmax.size(1);
  float* chunk_lo = s.chunk_minmax.data_ptr<float>();
  apply_noise_cpu(w.data_ptr<float>(), s.noisy.data_ptr<float>(), s.noise.data_ptr<float>(),
                  w.numel(), group_size, s.unit.data_ptr<float>(), s.scale,
                  rank_noise_seed(draw_seed(), std::max<int64_t>(source.rank, 0)), source.noise,
                  mm.lo, mm.hi, chunk_lo, chunk_lo + chunks, s.extremes);
}

/// ATen path: min and max of `w` (0-dim, in `s.lo` and `s.hi`).
inline void measure_range_aten(NoisySample& s, const at::Tensor& w) {
  auto mm = at::aminmax(w.reshape(-1));
  s.lo = std::get<0>(mm);
  s.hi = std::get<1>(mm);
}

/// ATen path: draws `u` (from the rank's stream once a rank is set) and writes
/// `s.noisy = w + (hi − lo)·unit[g]·u` (`s.unit` in `w`'s dtype, filled by the quantizer).
inline void apply_noise_sample_aten(NoisySample& s, const at::Tensor& w, int64_t group_size,
                                    NoiseSource& source) {
  c10::optional<at::Generator> gen;
  if (source.rank >= 0) {
    const uint64_t seed = rank_noise_seed(draw_seed(), source.rank);
    if (!source.rank_generator.defined() || source.rank_generator.device() != w.device()) {
      source.rank_generator = at::globalContext().defaultGenerator(w.device()).clone();
    }
    {
      std::lock_guard<std::mutex> lock(source.rank_generator.mutex());
      source.rank_generator.set_current_seed(seed);
    }
    gen = source.rank_generator;
  }
  if (source.noise == Noise::kGaussian) {
    s.noise.normal_(0, 0.5, gen);
  } else {
    s.noise.uniform_(-0.5, 0.5, gen);
  }
  auto delta = expand_groups(s.unit, w.numel(), group_size) * (s.hi - s.lo);
  at::add_out(s.noisy, w.reshape(-1), delta * s.noise);
}

}  // namespace detail
}  // namespace diffq
