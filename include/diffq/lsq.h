#pragma once
/// \file diffq/lsq.h
/// `diffq::LSQQuantizer<M>`: Learned Step Size Quantization (Esser, McKinstry, Bablani,
/// Appuswamy, Modha, "Learned Step Size Quantization", ICLR 2020, arXiv 1902.08153), the LSQ
/// baseline of the DiffQ paper (arXiv 2104.09987, Section 5).
///
/// Each quantized tensor has a learnable step size `s` (registered on the owning module as
/// `<name><suffix>`, shape `[1]`, the parameter's dtype). With `v = w/s`, `Qn = 2^(b−1)` and
/// `Qp = 2^(b−1) − 1` (signed levels), LSQ Eq. 1–2: `w_q = round(clamp(v, −Qn, Qp))·s`.
/// Gradients (straight-through estimator, LSQ Eq. 3 and Section 2.2), `g = 1/sqrt(numel·Qp)`:
/// - `∂w_q/∂w = 1` if `−Qn < v < Qp`, else 0;
/// - `∂w_q/∂s = (round(v) − v)` if `−Qn < v < Qp`, `−Qn` if `v <= −Qn`, `Qp` if `v >= Qp`,
///   times `g`.
///
/// Checkpoint: the signed levels `round(clamp(v))` are stored as `levels = round(clamp(v)) + Qn` in
/// `[0, 2^b − 1]` with `min = −Qn·s`, `max = Qp·s`, so that `min + level·(max − min)/(2^b − 1) =
/// (level − Qn)·s` in real arithmetic. The quantizer's quantized weights (eval mode, `quantize()`,
/// training forwards) are *defined* as `diffq::dequantize_levels` of those levels, so a loaded
/// checkpoint equals them bit for bit.

#include <diffq/base_quantizer.h>
#include <diffq/bits.h>
#include <diffq/options.h>
#include <diffq/state.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/arg.h>
#include <torch/nn/pimpl.h>
#include <torch/optim.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace diffq {

/// `w/step` as `[numel]` in `w`'s dtype, by true division on every device (CUDA divides by a
/// CPU scalar as a product with its reciprocal, which could move levels against the CPU's).
inline at::Tensor lsq_scaled(const at::Tensor& w, double step) {
  return w.detach().reshape(-1) / at::scalar_tensor(step, w.options());
}

/// LSQ levels of `w` (any shape, float or double) with step `step > 0` and `bits` in [2, 15], in
/// the checkpoint's unsigned form: `round(clamp(w/step, −Qn, Qp)) + Qn`, int16 `[numel]` in
/// `[0, 2^bits − 1]` (LSQ Eq. 1, `Qn = 2^(bits−1)`, `Qp = 2^(bits−1) − 1`). `w/step` is computed
/// in `w`'s dtype; `round` is round-half-to-even.
inline at::Tensor lsq_levels(const at::Tensor& w, double step, int64_t bits) {
  const double qn = std::exp2(static_cast<double>(bits - 1));
  const double qp = qn - 1;
  auto v = lsq_scaled(w, step);
  return (at::clamp(v, -qn, qp).round() + qn).to(at::kShort);
}

/// `{min, max}` of the common checkpoint format for LSQ step `step`: `{−Qn·step, Qp·step}`,
/// computed in double (exact for a float step: `Qp` has at most 14 significant bits).
inline std::pair<double, double> lsq_min_max(double step, int64_t bits) {
  const double qn = std::exp2(static_cast<double>(bits - 1));
  return {-qn * step, (qn - 1) * step};
}

namespace detail {
/// Per-parameter state of `LSQQuantizer` (`aux` is the step size `[1]`).
struct LSQParam : QParamBase {
  double qn = 0, qp = 0;  ///< `2^(b−1)`, `2^(b−1) − 1`
  double grad_scale = 0;  ///< `1/sqrt(numel·Qp)`
  at::Tensor v;           ///< `w/s` of the current training forward, `[numel]`
};
}  // namespace detail

/// LSQ quantizer wrapping a model `M` (an `Impl` class held by `std::shared_ptr`, or a
/// `torch::nn::ModuleHolder`): a fixed bit width and a learnt step size per tensor, on the
/// machinery of `diffq::BaseQuantizer` (forwards, `quantize()`, export, sizes). Usage:
/// \code
///   torch::optim::Adam opt(model->parameters(), 1e-3);   // optimizer first
///   diffq::LSQQuantizer<Net> q(model, diffq::LSQOptions().bits(4));
///   q.setup_optimizer(opt, 1e-3);                        // step sizes in their own group
///   auto loss = ce(q.forward(x), y); loss.backward(); opt.step();
/// \endcode
/// Training forwards see `w_q` (set with `Tensor::set_data`); the gradient hook replaces the weight
/// gradient by the STE gradient and adds the step-size gradient (see the file comment). The step
/// is initialised to `2·mean|w|/sqrt(Qp)` (LSQ Section 2.1; 1 for an all-zero tensor, or one
/// whose step would round to 0 in its dtype).
/// Model size (MB, 2^20 bytes): `b·numel + 64` bits per quantized tensor, plus 32 bits (16 with
/// `float16`) per element of the other parameters; the step sizes are not counted.
template <typename ModuleType>
class LSQQuantizer
    : public BaseQuantizer<LSQQuantizer<ModuleType>, ModuleType, LSQOptions, detail::LSQParam> {
  using Base = BaseQuantizer<LSQQuantizer<ModuleType>, ModuleType, LSQOptions, detail::LSQParam>;
  friend Base;

 public:
  using Impl = typename Base::Impl;

  /// Wraps `model` (a `std::shared_ptr<Impl>`, or a `ModuleHolder` such as `torch::nn::Linear`,
  /// whose module is taken). Throws on bad options (see `check_options(const LSQOptions&)`), on a
  /// model that already carries step sizes with this suffix, on tied parameters when `detect_bound`
  /// is false, and on NaN/Inf weights (step initialisation).
  explicit LSQQuantizer(detail::ModelRef<Impl> model, LSQOptions options = {})
      : Base(std::move(model.ptr), options,
             {"diffq::LSQQuantizer", options.suffix(), "step size", "LSQ step size",
              /*needs_optimizer=*/true}) {
    this->build();
  }

  LSQQuantizer(LSQQuantizer&&) noexcept = default;

  /// Adds the step sizes to `optimizer` as a param group of their own with learning rate `lr` and
  /// weight decay 0 (Adam, AdamW, SGD, RMSprop, Adagrad). Throws if the optimizer already holds a
  /// step size (create the optimizer before the quantizer) or is of another type.
  void setup_optimizer(torch::optim::Optimizer& optimizer, double lr = 1e-3) {
    this->setup_aux_optimizer(optimizer, lr);
  }

  /// The step size `[1]` of quantized parameter `name` (any of its tied names).
  at::Tensor step(const std::string& name) const { return this->find(name).aux; }

  /// The bit width (as `options().bits()`).
  int64_t bits() const { return this->options_.bits(); }

 private:
  using Param = detail::LSQParam;

  at::Tensor bits_tensor() const {
    return at::full({1}, this->options_.bits(), at::TensorOptions().dtype(at::kByte));
  }

  /// `Qn`, `Qp`, the gradient scale and the initial step `2·mean|w|/sqrt(Qp)`.
  at::Tensor init_param(Param& q) const {
    const int64_t b = this->options_.bits();
    q.qn = std::exp2(static_cast<double>(b - 1));
    q.qp = q.qn - 1;
    q.grad_scale = 1.0 / std::sqrt(static_cast<double>(q.numel) * q.qp);
    at::NoGradGuard no_grad;
    // Summed in double: a float sum of large finite weights would overflow.
    const double mean_abs = q.param.detach().abs().mean(at::kDouble).template item<double>();
    TORCH_CHECK(std::isfinite(mean_abs), "diffq::LSQQuantizer: parameter '", q.name,
                "' holds non-finite values; cannot initialise its step size");
    double init = 2.0 * mean_abs / std::sqrt(q.qp);
    // All-zero weights, or weights so small that the step rounds to 0 in float: step 1 (every
    // level is then 0, within a denormal of the weights).
    const bool positive =
        q.param.scalar_type() == at::kFloat ? static_cast<float>(init) > 0 : init > 0;
    if (!positive) init = 1.0;
    check_range(q, init);
    return at::full({1}, init, q.param.options());
  }

  /// Throws unless the quantization range `(2^b − 1)·step` (checkpoint `max − min`) is finite in
  /// the parameter's dtype, as dequantization and the checkpoint reader need.
  static void check_range(const Param& q, double s) {
    const double range = (q.qn + q.qp) * s;
    const bool fits = q.param.scalar_type() == at::kFloat
                          ? range <= static_cast<double>(std::numeric_limits<float>::max())
                          : std::isfinite(range);
    TORCH_CHECK(fits, "diffq::LSQQuantizer: the step size of '", q.name, "' is ", s,
                ": its range (2^bits - 1)*step = ", range, " overflows ", q.param.scalar_type(),
                "; cannot quantize with it");
  }

  /// The current step as a double; throws unless it is > 0 and finite, and its range
  /// `(2^b − 1)·step` fits the parameter's dtype.
  static double step_of(const Param& q) {
    const double s = q.aux.detach().template item<double>();
    TORCH_CHECK(s > 0 && std::isfinite(s), "diffq::LSQQuantizer: the step size of '", q.name,
                "' must be > 0 and finite, got ", s);
    check_range(q, s);
    return s;
  }

  static void check_finite(const at::Tensor& w, const std::string& name) {
    finite_min_max(w, name);  // throws on NaN/Inf
  }

  at::Tensor quantized_weights(const Param& q, const at::Tensor& w) const {
    check_finite(w, q.name);
    const double s = step_of(q);
    const int64_t b = this->options_.bits();
    auto mm = lsq_min_max(s, b);
    auto levels = lsq_levels(w, s, b);
    return dequantize_levels(levels, bits_tensor().to(w.device()), 0, mm.first, mm.second,
                             w.scalar_type())
        .view(w.sizes());
  }

  /// Training forward: `w_q` (as in eval mode), keeping `v = w/s` for the backward.
  void set_training(Param& q) {
    at::NoGradGuard no_grad;
    const auto w = q.param.detach();
    const auto wq = this->cached_quantized(q);
    q.v = lsq_scaled(w, step_of(q));
    detail::substitute(q, wq);
  }

  /// STE gradients of LSQ Eq. 3: the weight gradient is masked to `−Qn < v < Qp`, and the
  /// step-size gradient `g·Σ grad·∂w_q/∂s` is added to the step's `.grad`.
  static at::Tensor training_backward(Param& q, const at::Tensor& grad) {
    at::NoGradGuard no_grad;
    auto g = grad.reshape(-1);
    const auto& v = q.v;
    auto below = v <= -q.qn;
    auto above = v >= q.qp;
    auto inside = at::logical_not(at::logical_or(below, above));
    auto dstep = at::where(inside, v.round() - v,
                           at::where(below, at::full_like(v, -q.qn), at::full_like(v, q.qp)));
    // A frozen step (requires_grad false) gets no gradient: an optimizer steps every tensor
    // whose `.grad` is defined.
    if (q.aux.requires_grad()) {
      auto gs = (g * dstep.to(g.scalar_type())).sum() * q.grad_scale;
      auto& sg = q.aux.mutable_grad();
      if (!sg.defined()) sg = at::zeros_like(q.aux);
      sg.add_(gs.to(sg.scalar_type()).reshape(sg.sizes()));
    }
    q.v = at::Tensor();
    return (g * inside.to(g.scalar_type())).view(grad.sizes());
  }

  void export_levels(const Param& q, const at::Tensor& w, QuantizedTensor& t) const {
    check_finite(w, q.name);
    const double s = step_of(q);
    const int64_t b = this->options_.bits();
    t.group_size = 0;
    t.bits = bits_tensor();
    auto mm = lsq_min_max(s, b);
    t.min = mm.first;
    t.max = mm.second;
    t.levels = lsq_levels(w, s, b);
  }

  at::Tensor size_bits(const Param& q, bool) const {
    return this->fixed_width_size_bits(q, bits());
  }
  double sum_bits(const Param& q, bool) const { return this->fixed_width_sum_bits(q, bits()); }
};

}  // namespace diffq
