#pragma once
/// \file diffq/uniform.h
/// `diffq::UniformQuantizer<M>`: the uniform-quantization baselines of the DiffQ paper
/// (Défossez, Adi, Synnaeve, arXiv 2104.09987, Section 5 "Baselines"): post-training quantization
/// (PTQ) with a fixed bit width and a per-tensor min/max, and quantization-aware training (QAT)
/// with the straight-through estimator (Bengio, Léonard, Courville, arXiv 1308.3432).
///
/// Quantization is that of DiffQ with one group per tensor (paper Eq. 1):
/// `w_q = min + round((w − min)/(max − min)·(2^b − 1))·(max − min)/(2^b − 1)`, computed by
/// `diffq::quantize_levels`/`diffq::dequantize_levels`, so a checkpoint written by
/// `diffq::save_quantized` loads back the eval-mode weights bit for bit.

#include <diffq/base_quantizer.h>
#include <diffq/bits.h>
#include <diffq/options.h>
#include <diffq/state.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/arg.h>
#include <torch/nn/pimpl.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace diffq {

namespace detail {
/// Per-parameter state of `UniformQuantizer` (no auxiliary tensor).
struct UniformParam : QParamBase {};
}  // namespace detail

/// Uniform quantizer with a fixed bit width `b` and a per-tensor min/max, wrapping a model `M` (an
/// `Impl` class held by `std::shared_ptr`, or a `torch::nn::ModuleHolder`). Shares the machinery
/// of `diffq::BaseQuantizer`: `forward`, `quantize()`/`unquantize()`, `detach()`,
/// `quantized_state()` (for `diffq::save_quantized`), `model_size()`, `true_model_size()`,
/// `mean_bits()`.
///
/// - PTQ (`qat(false)`, default): wrap a trained model, then evaluate (`model->eval()` and
///   `forward`, or `quantize()`) and export; training forwards are untouched.
/// - QAT (`qat(true)`): training forwards see `w_q` (set with `Tensor::set_data` before the
///   forward); the gradient hook gives the parameter back its clean values and leaves the
///   gradient unchanged, `∂L/∂w := ∂L/∂w_q` (straight-through estimator). No optimizer setup is
///   needed (there is nothing extra to learn).
///
/// Model size (MB, 2^20 bytes): `b·numel + 64` bits per quantized tensor (levels, min and max),
/// plus 32 bits (16 with `float16`) per element of the other parameters; `true_model_size()` is
/// the same number.
template <typename ModuleType>
class UniformQuantizer : public BaseQuantizer<UniformQuantizer<ModuleType>, ModuleType,
                                              UniformOptions, detail::UniformParam> {
  using Base =
      BaseQuantizer<UniformQuantizer<ModuleType>, ModuleType, UniformOptions, detail::UniformParam>;
  friend Base;

 public:
  using Impl = typename Base::Impl;

  /// Wraps `model` (a `std::shared_ptr<Impl>`, or a `ModuleHolder` such as `torch::nn::Linear`,
  /// whose module is taken). Throws on bad options (see `check_options(const UniformOptions&)`), on
  /// tied parameters when `detect_bound` is false, and on quantized parameters that are neither
  /// float32 nor float64.
  explicit UniformQuantizer(detail::ModelRef<Impl> model, UniformOptions options = {})
      : Base(std::move(model.ptr), options,
             {"diffq::UniformQuantizer", "", "", "", /*needs_optimizer=*/false}) {
    this->build();
  }

  UniformQuantizer(UniformQuantizer&&) noexcept = default;

  /// The bit width (as `options().bits()`).
  int64_t bits() const { return this->options_.bits(); }

 private:
  using Param = detail::UniformParam;

  at::Tensor bits_tensor() const {
    return at::full({1}, this->options_.bits(), at::TensorOptions().dtype(at::kByte));
  }

  at::Tensor init_param(Param&) const { return at::Tensor(); }

  /// QAT: the quantized weights (straight-through in the backward); PTQ: clean.
  void set_training(Param& q) {
    if (!this->options_.qat()) return;
    this->set_quantized(q, detail::WeightState::kNoisy);
  }

  /// Straight-through estimator: the gradient with respect to the clean weights is the gradient
  /// with respect to the quantized ones.
  static at::Tensor training_backward(Param&, const at::Tensor&) { return at::Tensor(); }

  at::Tensor quantized_weights(const Param& q, const at::Tensor& w) const {
    return quantize_dequantize(w, bits_tensor().to(w.device()), 0, q.name);
  }

  void export_levels(const Param& q, const at::Tensor& w, QuantizedTensor& t) const {
    t.group_size = 0;
    t.bits = bits_tensor();
    auto mm = finite_min_max(w, q.name);
    t.min = mm.first;
    t.max = mm.second;
    t.levels = quantize_levels(w, t.bits, 0, t.min, t.max);
  }

  at::Tensor size_bits(const Param& q, bool) const {
    return this->fixed_width_size_bits(q, bits());
  }
  double sum_bits(const Param& q, bool) const { return this->fixed_width_sum_bits(q, bits()); }
};

}  // namespace diffq
