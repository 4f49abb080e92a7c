#pragma once
/// \file diffq/quantizer.h
/// `diffq::DiffQuantizer<M>`: differentiable model compression by pseudo quantization noise
/// (Défossez, Adi, Synnaeve, TMLR 2022, arXiv 2104.09987) for any `torch::nn::Module`.
///
/// Design. LibTorch's C++ modules read their own member tensors, so a training forward cannot swap
/// a parameter for a noisy copy. Instead, before the forward each quantized parameter is given the
/// noisy values `w + Δ·u` with `Tensor::set_data` (the module still sees the same parameter); a
/// gradient hook registered once on the parameter fires when its gradient is complete (all its uses
/// in the graph are done), computes the logit gradient analytically (per group
/// `Σ g·u·scale·∂unit/∂logit`, plus the term through `max w − min w`), adds it to the logit's
/// gradient, and gives the parameter back its clean values, bit for bit. Forwards that will see no
/// backward (grad mode off, or the parameter unused by the forward) restore the clean values right
/// after the forward; a parameter that a forward may not have used (an older graph keeps it in a
/// live graph) and that its backward did not reach is restored once that backward pass is done.
/// What follows from LibTorch having no forward hooks (substitutes kept until the backward, writes
/// through `.data()` unseen, `torch::autograd::grad` not supported) is in the README's
/// "Limitations" section.

#include <diffq/base_quantizer.h>
#include <diffq/bits.h>
#include <diffq/detail/noisy_weights.h>
#include <diffq/detail/pqn_kernels.h>
#include <diffq/noise.h>
#include <diffq/options.h>
#include <diffq/state.h>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/optim.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace diffq {
namespace detail {

/// What the fused penalty needs of one quantized tensor besides its logit.
struct PenaltyTerms {
  GroupLayout layout;
  double bits_sum = 0;    ///< `Σ_g b_g`, every group counted once, without extra_bits
  double bits_max = 0;    ///< `max_g b_g`, without extra_bits
  double last_bits = 0;   ///< `b` of the last group, in double
  double last_slope = 0;  ///< `db/dl` of the last group, in double
  at::Tensor slope;       ///< `[num_groups]` float: `db_g/dl_g`
};

/// What the fused penalty needs besides the logits.
struct PenaltyLayout {
  std::vector<PenaltyTerms> tensors;  ///< one per logit
  double min_bits = 2, extra_bits = 0;
  double other_bits = 0;  ///< bits of the non-quantized parameters
};

/// `DiffQuantizer::penalty()` on CPU float32 logits as one autograd node: the model size in MB,
/// `(Σ_tensors [Σ_g n_g·(b_g + extra_bits) + 72 + bits_bits·groups] + other_bits) / (8·2^20)`
/// (`diffq::quantized_size_bits`), from per-tensor terms computed beforehand (`PenaltyTerms`);
/// backward: `d size / d l_g = n_g·db_g/dl_g / (8·2^20)` from the saved slopes. `bits_bits` is
/// not differentiated (as in the reference). First order only: the backward is not itself
/// differentiable (`create_graph` gives no second-order term; `use_reference_kernels(true)`
/// selects the ATen-op penalty, which is).
struct SizePenaltyFunction : torch::autograd::Function<SizePenaltyFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::TensorList logits,
                            const PenaltyLayout& layout) {
    TORCH_INTERNAL_ASSERT(logits.size() == layout.tensors.size());
    double total = layout.other_bits;
    std::vector<at::Tensor> slopes;
    std::vector<int64_t> group_size, last;
    std::vector<double> last_slope;
    for (const auto& t : layout.tensors) {
      const int64_t groups = t.layout.groups;
      const double sum = t.layout.element_sum(t.bits_sum, [&t] { return t.last_bits; }) +
                         layout.extra_bits * static_cast<double>(t.layout.numel);
      const double max_b = t.bits_max + layout.extra_bits;
      const double bits_bits =
          std::ceil(std::log2(std::max(1.0, 1 + std::nearbyint(max_b) - layout.min_bits)));
      total += sum + (64 + 8) + bits_bits * static_cast<double>(groups);
      slopes.push_back(t.slope);
      group_size.push_back(t.layout.group_size);
      last.push_back(t.layout.last_group_numel);
      last_slope.push_back(t.last_slope);
    }
    ctx->save_for_backward(slopes);  // released after the backward
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["last"] = last;
    ctx->saved_data["last_slope"] = last_slope;
    return at::scalar_tensor(total / kBitsPerMB, logits[0].options());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    const auto slopes = ctx->get_saved_variables();
    const auto group_size = ctx->saved_data["group_size"].toIntVector();
    const auto last = ctx->saved_data["last"].toIntVector();
    const auto last_slope = ctx->saved_data["last_slope"].toDoubleVector();
    const double g_out = grad_out[0].defined() ? grad_out[0].item<double>() / kBitsPerMB : 0.0;
    torch::autograd::variable_list grads(slopes.size() + 1);
    for (size_t k = 0; k < slopes.size(); ++k) {
      const int64_t groups = slopes[k].numel();
      at::Tensor grad = at::empty({groups}, slopes[k].options());
      const float* s = slopes[k].data_ptr<float>();
      float* d = grad.data_ptr<float>();
      const float scale = static_cast<float>(g_out * static_cast<double>(group_size[k]));
      for (int64_t g = 0; g < groups; ++g) d[g] = scale * s[g];
      // The last group counts `last` elements.
      d[groups - 1] = static_cast<float>(g_out * last_slope[k] * static_cast<double>(last[k]));
      grads[k] = grad;
    }
    return grads;  // the last entry (the layout) gets no gradient
  }
};

/// Per-parameter state of the DiffQ quantizer (`aux` is the logit `[num_groups]`); shared with the
/// gradient hook.
struct QParam : QParamBase, NoisySample, std::enable_shared_from_this<QParam> {
  GroupLayout layout;
  // The penalty's terms of the logit (`Param::kBits`, CPU float32 logits), from the last pass over
  // it (`bits_terms_cpu`, run by the training forward or by `penalty()`): valid while the logit
  // keeps the data pointer and version counter value of `terms_source`, and until the training
  // backward (an optimizer step that follows may write through `.data()`, unseen).
  at::Tensor slope;         ///< `[num_groups]` float: db/dl
  BitsStats bits_stats;     ///< Σ b and max b
  at::Tensor terms_source;  ///< the logit data the terms were computed from
  int64_t terms_version = -1;
};

}  // namespace detail

/// DiffQ quantizer wrapping a model `M` (an `Impl` class held by `std::shared_ptr`, or a
/// `torch::nn::ModuleHolder` such as `torch::nn::Linear`). Built on `diffq::BaseQuantizer`
/// (`diffq/base_quantizer.h`), which provides `forward`, `quantize`/`unquantize`, `detach`,
/// `mean_bits`, `quantized_state`, `true_model_size` and the parameter discovery.
///
/// Construction finds the model's parameters recursively and, for each quantized one (more than
/// `min_size_mb` of fp32, not excluded), registers a learnable bit-width logit `[num_groups]` on
/// the owning module as `<name><suffix>`, so `model->parameters()`, `model->to()` and
/// `torch::save(model)` include it. Usage:
/// \code
///   torch::optim::Adam opt(model->parameters(), 1e-3);     // optimizer first
///   diffq::DiffQuantizer<Net> q(model, diffq::DiffQOptions().group_size(16));
///   q.setup_optimizer(opt, 1e-2);                          // logits in their own group
///   auto loss = ce(q.forward(x), y) + lambda * q.penalty();
///   loss.backward(); opt.step();
/// \endcode
/// Training forwards (`model->is_training()`) see `w + Δ·u` with `Δ = (max w − min w)/(2^b − 1)`
/// (paper, Eq. 4); eval forwards see true quantized weights (`quantize_levels`, cached until the
/// weights or logits change). Not thread-safe: one forward/backward at a time.
template <typename ModuleType>
class DiffQuantizer
    : public BaseQuantizer<DiffQuantizer<ModuleType>, ModuleType, DiffQOptions, detail::QParam> {
  using Base = BaseQuantizer<DiffQuantizer<ModuleType>, ModuleType, DiffQOptions, detail::QParam>;
  friend Base;

 public:
  using Impl = typename Base::Impl;

  /// Wraps `model` (a `std::shared_ptr<Impl>`, or a `ModuleHolder` such as `torch::nn::Linear`,
  /// whose module is taken). Throws on bad options (see `diffq::check_options`), on a model that
  /// already carries logits with this suffix, and on tied parameters when `detect_bound` is false.
  /// A model wrapped by another quantizer under another suffix is not recognised: that quantizer's
  /// tensors would be quantized like weights (exclude them, e.g. `"*_lsq"`).
  explicit DiffQuantizer(detail::ModelRef<Impl> model, DiffQOptions options = {})
      : Base(std::move(model.ptr), options, traits(options)) {
    this->build();
  }

  DiffQuantizer(DiffQuantizer&&) noexcept = default;

  /// Differentiable model size in MB (2^20 bytes), a 0-dim tensor on the logits' device: for each
  /// quantized tensor `Σ_g n_g·(b_g + extra_bits) + 64 + 8 + bits_bits·num_groups` bits (see
  /// `quantized_size_bits`), plus 32 bits (16 with `float16`) per element of the other parameters,
  /// divided by `8·2^20`. Tied parameters count once. Makes no host synchronisation. Source:
  /// paper Eq. 7, reference `DiffQuantizer.model_size`.
  /// On the CPU with float32 logits one fused autograd node computes it
  /// (`detail::SizePenaltyFunction`), equal to the ATen-op formula up to float rounding,
  /// differentiable once. With `Param::kBits` it reuses the training forward's pass over the
  /// logits (`detail::bits_terms_cpu`: bit widths in float, summed in float over blocks of 512
  /// groups, the blocks in double), so after a forward it costs no pass over them; its value does
  /// not depend on whether a forward ran first. A change of the logits is seen through their
  /// version counter and data pointer: every in-place op on a logit (an optimizer step, `copy_`,
  /// also under `NoGradGuard`) and `set_data` count; writes that bypass the counter (through
  /// `data_ptr()`, or through `.data()`, which has a counter of its own) are not seen until the
  /// next training forward, which always recomputes the terms. A backward that reaches the
  /// logits (an optimizer step may follow; LibTorch's SGD writes through `.data()`) drops the
  /// terms; a `penalty()` called between that backward and the SGD step computes them again, and
  /// the step is then unseen until the next training forward. With `Param::kNoise` the bit
  /// widths and slopes are computed in double on every call, the slopes then stored in float.
  at::Tensor penalty() const {
    if (!fused_penalty_ok()) return this->size_mb(false);
    std::vector<at::Tensor> logits;
    detail::PenaltyLayout layout;
    const auto& o = this->options_;
    layout.min_bits = o.min_bits();
    layout.extra_bits = o.extra_bits();
    layout.other_bits = this->unquantized_bits();
    for (const auto& q : this->params_) {
      logits.push_back(q->aux);
      layout.tensors.push_back(penalty_terms(*q));
    }
    return detail::SizePenaltyFunction::apply(at::TensorList(logits), layout);
  }
  /// Alias of `penalty()`.
  at::Tensor model_size() const { return penalty(); }

  /// Model size in MB with the bit widths of true quantization, `clamp(round(b + extra_bits), 1,
  /// 15)`: the size of the bit-packed quantized model.
  double true_model_size() const { return this->size_mb(true).template item<double>(); }

  /// Smallest model size in MB the logits can give (`true_model_size` with every group at
  /// `lowest_rounded_bits(min_bits, extra_bits)`, 2 bits by default, plus the tensors kept in
  /// floating point): the floor of any size budget (`diffq::SizeBudget`).
  double min_true_model_size() const {
    const auto& o = this->options_;
    const double lowest = static_cast<double>(lowest_rounded_bits(o.min_bits(), o.extra_bits()));
    double total_bits = this->unquantized_bits();
    for (const auto& q : this->params_) {
      auto b = at::full({q->layout.groups}, lowest, at::TensorOptions().dtype(at::kDouble));
      total_bits +=
          quantized_size_bits(b, q->numel, o.group_size(), o.min_bits()).template item<double>();
    }
    return total_bits / kBitsPerMB;
  }

  /// Adds the logits to `optimizer` as a param group of their own with learning rate `lr` and
  /// weight decay 0 (Adam, AdamW, SGD, RMSprop, Adagrad). Throws if the optimizer already holds a
  /// logit (create the optimizer before the quantizer) or is of another type.
  void setup_optimizer(torch::optim::Optimizer& optimizer, double lr = 1e-3) {
    this->setup_aux_optimizer(optimizer, lr);
  }

  /// The logit `[num_groups]` of quantized parameter `name` (any of its tied names).
  at::Tensor logit(const std::string& name) const { return this->find(name).aux; }

  /// The current noise sample `u` of parameter `name` (shape of the parameter; float32 on the
  /// CPU kernels, the parameter's dtype otherwise), undefined if none was drawn. For inspection and
  /// tests: a training forward sees `w + (max w − min w)·unit(b_g)·u`.
  at::Tensor noise(const std::string& name) const {
    const auto& q = this->find(name);
    return q.noise.defined() ? q.noise.view(q.param.sizes()) : at::Tensor();
  }

  /// Learnt bit widths `b` of parameter `name` (`[num_groups]`, no extra_bits, not rounded).
  at::Tensor bits(const std::string& name) const {
    const auto& q = this->find(name);
    return bits_of(q).detach();
  }

  /// Element-weighted mean bit width over quantized parameters: learnt `b` (default) or, with
  /// `rounded`, the true quantization's `clamp(round(b + extra_bits), 1, 15)`. 0 if none.
  double mean_bits(bool rounded = false) const { return Base::mean_bits(rounded); }

  /// For tests: use the ATen-op implementation of the pseudo quantization noise and of the penalty
  /// on the CPU too (it is always used on other devices and dtypes).
  void use_reference_kernels(bool value) { reference_kernels_ = value; }

  /// Data parallelism: the rank of this process, so that each rank draws its own pseudo
  /// quantization noise. On the CPU kernels every training forward draws one seed per quantized
  /// tensor from LibTorch's default CPU generator, as without a rank, and rank `r` draws its
  /// sample from `rank_noise_seed(seed, r)` (rank 0: the seed itself, so that one process trains
  /// bit for bit as without data parallelism). On the ATen path (other devices and dtypes,
  /// `use_reference_kernels`), which without a rank draws from the device's default generator,
  /// every rank then also draws one seed per tensor from the default CPU generator and samples on
  /// the weights' device from a generator of its own seeded with `rank_noise_seed(seed, r)`: the
  /// default CPU generator advances alike on every rank (a shuffle drawn from it after a
  /// forward stays the same across ranks). `diffq::DataParallel` calls it. Throws if `rank < 0`.
  void set_noise_rank(int64_t rank) {
    TORCH_CHECK(rank >= 0, "diffq::DiffQuantizer: noise rank must be >= 0, got ", rank);
    noise_source_.rank = rank;
  }
  /// The rank given to `set_noise_rank`, or -1 if none was (no data parallelism).
  int64_t noise_rank() const { return noise_source_.rank; }

 private:
  /// Whether `penalty()` may use the fused CPU node: every logit a contiguous CPU float32 tensor
  /// of `[num_groups]` elements (otherwise the ATen-op penalty runs, which refuses other lengths).
  bool fused_penalty_ok() const {
    if (reference_kernels_ || this->params_.empty()) return false;
    for (const auto& q : this->params_) {
      const auto& l = q->aux;
      if (!l.defined() || !l.device().is_cpu() || l.scalar_type() != at::kFloat ||
          !l.is_contiguous() || l.numel() != q->layout.groups) {
        return false;
      }
    }
    return true;
  }

  using QParam = detail::QParam;
  using WeightState = detail::WeightState;

  /// Throws if the (CPU float32) logit of `q` holds NaN; the fused kernels need finite logits.
  static void check_logit_not_nan(const QParam& q) {
    TORCH_CHECK(!detail::any_nan(q.aux.data_ptr<float>(), q.layout.groups),
                "diffq::DiffQuantizer: the logit of parameter '", q.name,
                "' holds NaN (did the training diverge?)");
  }

  /// Makes `q.slope` and `q.bits_stats` those of the logit's current values (`Param::kBits`, CPU
  /// float32 contiguous logit of `[num_groups]`). Without `units`, recomputes them only if the
  /// logit changed since (other version or data pointer); with `units`, always recomputes them and
  /// also writes the noise's `q.unit` and `q.dunit`. A slope still held elsewhere (by a penalty
  /// node awaiting its backward) is left alone for a new one.
  void refresh_bits_terms(QParam& q, bool units) const {
    const bool valid = q.terms_source.defined() && q.slope.defined() &&
                       q.terms_source.data_ptr() == q.aux.data_ptr() &&
                       q.terms_version == q.aux._version();
    if (valid && !units) return;
    if (!units) check_logit_not_nan(q);  // the training forward checked before the noise
    if (!q.slope.defined() || q.slope.use_count() > 1 || q.slope.numel() != q.layout.groups) {
      q.slope =
          at::empty({q.layout.groups}, at::TensorOptions().dtype(at::kFloat).device(at::kCPU));
    }
    q.bits_stats = detail::bits_terms_cpu(
        q.aux.data_ptr<float>(), q.layout.groups, this->options_.min_bits(),
        this->options_.max_bits(), q.slope.data_ptr<float>(),
        units ? q.unit.data_ptr<float>() : nullptr, units ? q.dunit.data_ptr<float>() : nullptr);
    // Holding the logit's storage keeps its address from being reused by a new storage, which
    // could otherwise match `data_ptr()` by chance; `detach()` shares the version counter.
    q.terms_source = q.aux.detach();
    q.terms_version = q.aux._version();
  }

  /// The penalty's terms of `q` (CPU float32 contiguous logit): `Param::kBits` from the pass over
  /// the logit shared with the noise (`refresh_bits_terms`), `Param::kNoise` in double.
  detail::PenaltyTerms penalty_terms(QParam& q) const {
    const auto& o = this->options_;
    const bool noise_param = o.param() == Param::kNoise;
    const float* l = q.aux.data_ptr<float>();
    const detail::BitsParam<double> c(o.min_bits(), o.max_bits());
    detail::PenaltyTerms t;
    t.layout = q.layout;
    const auto last = detail::bits_and_slope(l[q.layout.groups - 1], c, o.param());
    t.last_bits = last.bits;
    t.last_slope = last.dbits;
    if (!noise_param) {
      refresh_bits_terms(q, /*units=*/false);
      t.bits_sum = q.bits_stats.sum;
      t.bits_max = q.bits_stats.max;
      t.slope = q.slope;
      return t;
    }
    t.slope = at::empty({q.layout.groups}, q.aux.options());
    float* d = t.slope.data_ptr<float>();
    double sum = 0, max_b = -std::numeric_limits<double>::infinity();
    for (int64_t g = 0; g < q.layout.groups; ++g) {
      const auto bs = detail::bits_and_slope(l[g], c, Param::kNoise);
      sum += bs.bits;
      max_b = std::max(max_b, bs.bits);
      d[g] = static_cast<float>(bs.dbits);
    }
    t.bits_sum = sum;
    t.bits_max = max_b;
    return t;
  }

  static detail::QuantizerTraits traits(const DiffQOptions& o) {
    return {"diffq::DiffQuantizer", o.suffix(), "logit", "DiffQ logit", /*needs_optimizer=*/true};
  }

  // ---- BaseQuantizer hooks ----

  /// Group layout and the initial logit (`b == init_bits`), in the parameter's dtype.
  at::Tensor init_param(QParam& q) const {
    const auto& o = this->options_;
    q.layout = GroupLayout(q.numel, o.group_size());
    const double init = logit_for_bits(o.init_bits(), o.min_bits(), o.max_bits(), o.param());
    return at::full({q.layout.groups}, init, q.param.options());
  }

  at::Tensor quantized_weights(const QParam& q, const at::Tensor& w) const {
    auto b = rounded_bits(bits_of(q), this->options_.extra_bits(), q.name);
    return quantize_dequantize(w, b, this->options_.group_size(), q.name);
  }

  void export_levels(const QParam& q, const at::Tensor& w, QuantizedTensor& t) const {
    t.group_size = this->options_.group_size();
    t.bits = rounded_bits(bits_of(q), this->options_.extra_bits(), q.name).cpu();
    auto mm = finite_min_max(w, q.name);
    t.min = mm.first;
    t.max = mm.second;
    t.levels = quantize_levels(w, t.bits, this->options_.group_size(), t.min, t.max);
  }

  at::Tensor size_bits(const QParam& q, bool exact) const {
    const auto& o = this->options_;
    auto b = bits_of(q);
    if (exact) {
      // In double: the sum of integer bit widths times group sizes stays exact past 2^24 bits.
      b = rounded_bits(b, o.extra_bits(), q.name).to(at::kDouble);
    } else if (o.extra_bits() != 0) {
      b = b + o.extra_bits();
    }
    return quantized_size_bits(b, q.numel, o.group_size(), o.min_bits());
  }

  /// A gradient reached the logit through autograd (the penalty): an optimizer step may follow
  /// and write it through `.data()`, so `penalty()` must not reuse the terms computed before.
  static void aux_gradient_arrived(QParam& q) { q.terms_version = -1; }

  /// The parameter's gradient is complete: add the logit gradient and correct the weight gradient
  /// for the path through `max w − min w` (the base then restores the clean weights).
  static at::Tensor training_backward(QParam& q, const at::Tensor& incoming) {
    at::NoGradGuard no_grad;
    // An optimizer step may follow and write the logits through `.data()` (LibTorch's SGD),
    // unseen by their version counter: `penalty()` must not reuse this forward's terms after it.
    q.terms_version = -1;
    // A frozen logit (requires_grad false: fixed bit widths) gets no gradient, since an optimizer
    // steps every tensor whose `.grad` is defined; its share goes to a scratch tensor.
    at::Tensor scratch;
    if (!q.aux.requires_grad()) scratch = at::zeros_like(q.aux);
    auto& lg = q.aux.requires_grad() ? q.aux.mutable_grad() : scratch;
    if (!lg.defined()) lg = at::zeros_like(q.aux);
    // Sparse (Embedding) or strided (expanded, permuted) gradients: a dense contiguous copy.
    const at::Tensor grad = incoming.is_sparse() ? incoming.to_dense() : incoming;
    const bool fast = q.fast && grad.device().is_cpu() && grad.scalar_type() == at::kFloat &&
                      lg.is_contiguous() && lg.device().is_cpu() && lg.scalar_type() == at::kFloat;
    if (fast) {
      const at::Tensor dense = grad.contiguous();
      const double s = detail::noise_backward_cpu(
          dense.data_ptr<float>(), q.noise.data_ptr<float>(), q.numel, q.layout.group_size,
          q.unit.data_ptr<float>(), q.dunit.data_ptr<float>(), q.scale, lg.data_ptr<float>(),
          q.partial.data_ptr<double>());
      if (s == 0 || q.scale == 0) return at::Tensor();
      // The path through max w − min w adds ±s, spread over the ties, to a few elements of the
      // weight gradient. Rather than copying the whole gradient, add it to `param.grad` once the
      // backward pass has accumulated it (the engine's final callbacks run once the whole graph
      // is done). torch::autograd::grad() is not supported (README): it runs no hook of a leaf
      // on LibTorch 1.13, and has no `param.grad` to receive this term.
      std::weak_ptr<QParam> weak = q.shared_from_this();
      torch::autograd::Engine::get_default_engine().queue_callback([weak, s] {
        auto q = weak.lock();
        if (q) add_extremes_gradient(*q, s);
      });
      return at::Tensor();
    }
    // ATen-op path: no host synchronisation.
    auto g = grad.reshape(-1).to(q.noise.scalar_type());
    auto gu = g * q.noise;
    const int64_t padded = q.layout.groups * q.layout.group_size;
    if (padded != q.numel) gu = at::constant_pad_nd(gu, {0, padded - q.numel});
    auto group_sum = gu.view({q.layout.groups, q.layout.group_size}).sum(1);
    auto scale = (q.hi - q.lo).to(group_sum.scalar_type());
    lg.add_((group_sum * scale * q.dunit).to(lg.scalar_type()));
    auto s = (group_sum * q.unit).sum();
    auto w = q.clean.reshape(-1);
    auto at_max = (w == q.hi).to(g.scalar_type());
    auto at_min = (w == q.lo).to(g.scalar_type());
    auto corr = (s * (at_max / at_max.sum() - at_min / at_min.sum()))
                    .view(grad.sizes())
                    .to(grad.scalar_type());
    // A sparse gradient stays sparse (the hook must not change its layout).
    return incoming.is_sparse() ? incoming + corr.to_sparse(incoming.sparse_dim()) : grad + corr;
  }

  /// Adds `s/n_max` to the weight gradient at the `n_max` positions of the maximum and `−s/n_min`
  /// at those of the minimum (gradient of `max w − min w`, spread over ties like ATen's).
  static void add_extremes_gradient(QParam& q, double s) {
    at::NoGradGuard no_grad;
    auto& grad = q.param.mutable_grad();
    if (!grad.defined()) return;  // autograd::grad(): nothing was accumulated into param.grad
    const double up = s / static_cast<double>(q.extremes.argmax.size());
    const double down = s / static_cast<double>(q.extremes.argmin.size());
    if (grad.is_sparse()) {  // e.g. Embedding(sparse): add a sparse correction, stay sparse
      auto corr = at::zeros({q.numel}, grad.options().layout(at::kStrided));
      for (auto i : q.extremes.argmax) corr[i].add_(up);
      for (auto i : q.extremes.argmin) corr[i].sub_(down);
      grad = grad + corr.view(grad.sizes()).to_sparse(grad.sparse_dim());
      return;
    }
    if (grad.is_contiguous() && grad.device().is_cpu() && grad.scalar_type() == at::kFloat) {
      auto* g = grad.data_ptr<float>();
      for (auto i : q.extremes.argmax) g[i] += static_cast<float>(up);
      for (auto i : q.extremes.argmin) g[i] -= static_cast<float>(down);
      return;
    }
    auto element = [&grad](int64_t i) {  // a 0-dim view of flat element i, any strides
      std::vector<int64_t> coords(grad.dim());
      for (int64_t d = grad.dim() - 1; d >= 0; --d) {
        coords[d] = i % grad.size(d);
        i /= grad.size(d);
      }
      at::Tensor e = grad;
      for (auto c : coords) e = e.select(0, c);
      return e;
    };
    for (auto i : q.extremes.argmax) element(i).add_(up);
    for (auto i : q.extremes.argmin) element(i).sub_(down);
  }

  at::Tensor bits_of(const QParam& q) const {
    return bits_from_logit(q.aux, this->options_.min_bits(), this->options_.max_bits(),
                           this->options_.param());
  }

  double sum_bits(const QParam& q, bool rounded) const {
    at::NoGradGuard no_grad;
    auto b = bits_of(q).to(at::kDouble);
    if (rounded) b = rounded_bits(b, this->options_.extra_bits(), q.name).to(at::kDouble);
    return q.layout.element_sum(b.sum(), [&] { return b[q.layout.groups - 1]; })
        .template item<double>();
  }

  /// Draws a new noise sample and gives the parameter `w + Δ·u` (`detail/noisy_weights.h`), with
  /// `unit_g = 1/(2^b_g − 1)` from the logit.
  void set_training(QParam& q) {
    at::NoGradGuard no_grad;
    // The kernels read the weights in row-major order: a non-contiguous parameter is read from a
    // contiguous copy (its noisy substitute is contiguous; its clean tensor comes back as it was).
    const auto w = q.param.detach().contiguous();
    detail::prepare_noisy_sample(q, w, q.aux, q.layout.groups, reference_kernels_);
    noise_source_.noise = this->options_.noise();
    if (q.fast) {
      const detail::MinMax mm = detail::measure_range_cpu(q, w, "diffq::DiffQuantizer", q.name);
      check_logit_not_nan(q);
      if (this->options_.param() == Param::kBits) {
        refresh_bits_terms(q, /*units=*/true);  // the penalty reuses this pass over the logit
      } else {
        detail::units_cpu(q.aux.data_ptr<float>(), q.unit.data_ptr<float>(),
                          q.dunit.data_ptr<float>(), q.layout.groups, this->options_.min_bits(),
                          this->options_.max_bits(), this->options_.param());
      }
      detail::apply_noise_sample_cpu(q, w, q.layout.group_size, mm, noise_source_);
    } else {
      detail::measure_range_aten(q, w);
      auto uq = unit_from_logit(q.aux, this->options_.min_bits(), this->options_.max_bits(),
                                this->options_.param());
      q.unit = uq.first.to(w.scalar_type());
      q.dunit = uq.second.to(w.scalar_type());
      detail::apply_noise_sample_aten(q, w, this->options_.group_size(), noise_source_);
    }
    detail::substitute(q, q.noisy.view(w.sizes()));
  }

  bool reference_kernels_ = false;
  detail::NoiseSource noise_source_;  ///< distribution, rank and the ATen path's generator
};

}  // namespace diffq
