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
/// backward (grad mode off, parameter unused) restore the clean values right after the forward.

#include <diffq/bits.h>
#include <diffq/detail/glob.h>
#include <diffq/detail/module_access.h>
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
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace diffq {
namespace detail {

/// `M::ContainedType` for a `torch::nn::ModuleHolder` (e.g. `torch::nn::Linear`), else `M`.
template <typename M, typename = void>
struct ModuleImpl {
  using type = M;
};
template <typename M>
struct ModuleImpl<M, std::void_t<typename M::ContainedType>> {
  using type = typename M::ContainedType;
};

/// A 64-bit seed drawn from LibTorch's default CPU generator, so `torch::manual_seed` makes the
/// pseudo quantization noise reproducible.
inline uint64_t draw_seed() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return at::check_generator<at::CPUGeneratorImpl>(gen)->random64();
}

/// What a quantized parameter's data currently holds.
enum class WeightState { kClean, kNoisy, kQuantized };

/// Per-parameter state of the quantizer; shared with the gradient hook.
struct QParam : std::enable_shared_from_this<QParam> {
  std::string name;                 ///< first full dotted name
  std::vector<std::string> names;   ///< all names (several for tied parameters)
  std::shared_ptr<torch::nn::Module> owner;  ///< module the logit is registered on
  std::string logit_name;           ///< leaf name of the logit on `owner`
  at::Tensor param;                 ///< the parameter (same TensorImpl as the module's)
  at::Tensor logit;                 ///< `[num_groups]`
  int64_t numel = 0;
  int64_t group_size = 0;           ///< effective group size (> 0)
  int64_t groups = 0;
  unsigned hook = 0;
  bool hooked = false;

  WeightState state = WeightState::kClean;
  bool pending = false;  ///< a backward is expected to restore the clean values
  at::Tensor clean;      ///< the clean data while `state != kClean`
  // Pseudo quantization noise of the current sample.
  bool fast = false;     ///< CPU kernels (else ATen ops)
  at::Tensor noisy;      ///< `[numel]` buffer reused across steps
  at::Tensor noise;      ///< `u`, `[numel]` (float for the CPU kernels)
  at::Tensor unit;       ///< `[num_groups]`
  at::Tensor dunit;      ///< `[num_groups]`
  at::Tensor partial;    ///< `[num_groups]` double scratch (CPU kernels)
  double scale = 0;      ///< `max w − min w` (CPU kernels)
  at::Tensor lo, hi;     ///< 0-dim min and max (ATen path)
  Extremes extremes;
  // Eval-mode cache of the true quantized weights.
  at::Tensor quantized;
  int64_t cached_param_version = -1;
  int64_t cached_logit_version = -1;
  const void* cached_data_ptr = nullptr;
};

}  // namespace detail

/// DiffQ quantizer wrapping a model `M` (an `Impl` class held by `std::shared_ptr`, or a
/// `torch::nn::ModuleHolder` such as `torch::nn::Linear`).
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
class DiffQuantizer {
 public:
  using Impl = typename detail::ModuleImpl<ModuleType>::type;

  /// Wraps `model`. Throws on bad options (see `diffq::check_options`), on a model that already
  /// carries logits with this suffix, and on tied parameters when `detect_bound` is false.
  explicit DiffQuantizer(std::shared_ptr<Impl> model, DiffQOptions options = {})
      : model_(std::move(model)), options_(std::move(options)) {
    TORCH_CHECK(model_ != nullptr, "diffq::DiffQuantizer: model is null");
    check_options(options_);
    build();
  }

  /// Wraps the module of a `ModuleHolder` (e.g. `torch::nn::Linear`).
  template <typename Holder,
            typename = std::enable_if_t<std::is_base_of<torch::nn::ModuleHolder<Impl>,
                                                        std::decay_t<Holder>>::value>>
  explicit DiffQuantizer(const Holder& holder, DiffQOptions options = {})
      : DiffQuantizer(holder.ptr(), std::move(options)) {}

  DiffQuantizer(const DiffQuantizer&) = delete;
  DiffQuantizer& operator=(const DiffQuantizer&) = delete;
  DiffQuantizer(DiffQuantizer&&) noexcept = default;
  DiffQuantizer& operator=(DiffQuantizer&&) = delete;

  /// Restores the clean weights and removes the gradient hooks; the logits stay registered (use
  /// `detach()` to remove them).
  ~DiffQuantizer() {
    for (auto& q : params_) {
      restore(*q);
      if (q->hooked) q->param.remove_hook(q->hook);
      q->hooked = false;
    }
  }

  /// Calls the model's forward with any arguments. Training mode: pseudo quantization noise
  /// (one sample per step, shared by several forwards before one backward). Eval mode, or after
  /// `quantize()`: true quantized weights. Throws in training mode if neither `setup_optimizer` nor
  /// `no_optimizer` was called, and on NaN/Inf weights.
  template <typename... Args>
  decltype(auto) forward(Args&&... args) {
    check_attached("forward");
    pre_forward();
    try {
      decltype(auto) out = model_->forward(std::forward<Args>(args)...);
      post_forward();
      return out;
    } catch (...) {
      restore_all();
      throw;
    }
  }

  /// Differentiable model size in MB (2^20 bytes), a 0-dim tensor on the logits' device: for each
  /// quantized tensor `Σ_g n_g·(b_g + extra_bits) + 64 + 8 + bits_bits·num_groups` bits (see
  /// `quantized_size_bits`), plus 32 bits (16 with `float16`) per element of the other parameters,
  /// divided by `8·2^20`. Tied parameters count once. Makes no host synchronisation. Source:
  /// paper Eq. 7, reference `DiffQuantizer.model_size`.
  at::Tensor penalty() const { return size_mb(false); }
  /// Alias of `penalty()`.
  at::Tensor model_size() const { return size_mb(false); }

  /// Model size in MB with the bit widths of true quantization, `clamp(round(b + extra_bits), 1,
  /// 15)`: the size of the bit-packed quantized model.
  double true_model_size() const { return size_mb(true).template item<double>(); }

  /// Adds the logits to `optimizer` as a param group of their own with learning rate `lr` and
  /// weight decay 0 (Adam, AdamW, SGD, RMSprop, Adagrad). Throws if the optimizer already holds a
  /// logit (create the optimizer before the quantizer) or is of another type.
  void setup_optimizer(torch::optim::Optimizer& optimizer, double lr = 1e-3) {
    check_attached("setup_optimizer");
    TORCH_CHECK(lr >= 0 && std::isfinite(lr),
                "diffq::DiffQuantizer::setup_optimizer: lr must be >= 0, got ", lr);
    for (const auto& group : optimizer.param_groups()) {
      for (const auto& p : group.params()) {
        for (const auto& q : params_) {
          TORCH_CHECK(!p.is_same(q->logit), "diffq::DiffQuantizer::setup_optimizer: the optimizer ",
                      "already holds the logit '", q->name, options_.suffix(),
                      "'; create the optimizer (on model->parameters()) before the quantizer");
        }
      }
    }
    auto opts = optimizer.defaults().clone();
    opts->set_lr(lr);
    if (auto* o = dynamic_cast<torch::optim::AdamOptions*>(opts.get())) {
      o->weight_decay(0);
    } else if (auto* o = dynamic_cast<torch::optim::AdamWOptions*>(opts.get())) {
      o->weight_decay(0);
    } else if (auto* o = dynamic_cast<torch::optim::SGDOptions*>(opts.get())) {
      o->weight_decay(0);
    } else if (auto* o = dynamic_cast<torch::optim::RMSpropOptions*>(opts.get())) {
      o->weight_decay(0);
    } else if (auto* o = dynamic_cast<torch::optim::AdagradOptions*>(opts.get())) {
      o->weight_decay(0);
    } else {
      TORCH_CHECK(false, "diffq::DiffQuantizer::setup_optimizer: unsupported optimizer (expected ",
                  "Adam, AdamW, SGD, RMSprop or Adagrad)");
    }
    std::vector<at::Tensor> logits;
    for (const auto& q : params_) logits.push_back(q->logit);
    if (!logits.empty()) {
      optimizer.add_param_group(torch::optim::OptimizerParamGroup(logits, std::move(opts)));
    }
    optimizer_ready_ = true;
  }

  /// Declares that the logits will not be trained (evaluation-only use): allows training forwards
  /// without `setup_optimizer`.
  void no_optimizer() { optimizer_ready_ = true; }

  /// Gives every quantized parameter its true quantized values until `unquantize()`; forwards then
  /// use them in both modes. Throws on NaN/Inf weights.
  void quantize() {
    check_attached("quantize");
    restore_all();
    for (auto& q : params_) set_quantized(*q);
    manual_quantized_ = true;
  }

  /// Gives back the clean weights after `quantize()`.
  void unquantize() {
    manual_quantized_ = false;
    restore_all();
  }

  /// Whether `quantize()` is in force.
  bool is_quantized() const { return manual_quantized_; }

  /// Restores the clean weights, removes the hooks and the logits: the model is as it was before
  /// the quantizer. The quantizer is unusable afterwards.
  void detach() {
    check_attached("detach");
    manual_quantized_ = false;
    for (auto& q : params_) {
      restore(*q);
      if (q->hooked) q->param.remove_hook(q->hook);
      q->hooked = false;
      detail::erase_parameter(*q->owner, q->logit_name);
    }
    params_.clear();
    detached_ = true;
  }

  /// The wrapped model.
  const std::shared_ptr<Impl>& model() const { return model_; }
  /// The options.
  const DiffQOptions& options() const { return options_; }

  /// Full dotted names of the quantized parameters (first name of tied ones).
  std::vector<std::string> quantized_names() const {
    std::vector<std::string> out;
    for (const auto& q : params_) out.push_back(q->name);
    return out;
  }

  /// The logit `[num_groups]` of quantized parameter `name` (any of its tied names).
  at::Tensor logit(const std::string& name) const { return find(name).logit; }

  /// The current noise sample `u` of parameter `name` (shape of the parameter; float32 on the
  /// CPU kernels, the parameter's dtype otherwise), undefined if none was drawn. For inspection and
  /// tests: a training forward sees `w + (max w − min w)·unit(b_g)·u`.
  at::Tensor noise(const std::string& name) const {
    const auto& q = find(name);
    return q.noise.defined() ? q.noise.view(q.param.sizes()) : at::Tensor();
  }

  /// Learnt bit widths `b` of parameter `name` (`[num_groups]`, no extra_bits, not rounded).
  at::Tensor bits(const std::string& name) const {
    const auto& q = find(name);
    return bits_of(q).detach();
  }

  /// Element-weighted mean bit width over quantized parameters: learnt `b` (default) or, with
  /// `rounded`, the true quantization's `clamp(round(b + extra_bits), 1, 15)`. 0 if none.
  double mean_bits(bool rounded = false) const {
    double total = 0, count = 0;
    for (const auto& q : params_) {
      total += group_sum_bits(*q, rounded);
      count += static_cast<double>(q->numel);
    }
    return count > 0 ? total / count : 0.0;
  }

  /// Mean bit width per quantized parameter (see `mean_bits`), in discovery order.
  std::vector<std::pair<std::string, double>> mean_bits_per_param(bool rounded = false) const {
    std::vector<std::pair<std::string, double>> out;
    for (const auto& q : params_) {
      out.emplace_back(q->name, group_sum_bits(*q, rounded) / static_cast<double>(q->numel));
    }
    return out;
  }

  /// The quantized state for a checkpoint (`diffq/checkpoint.h`): levels, rounded bit widths and
  /// min/max of each quantized parameter, the other parameters, all buffers, tied names, and the
  /// logits if `include_logits`. Tensors are copied to the CPU. Throws on NaN/Inf weights.
  QuantizedState quantized_state(bool include_logits = false) const {
    check_attached("quantized_state");
    QuantizedState state;
    std::unordered_map<const void*, std::string> stored;  // TensorImpl -> stored name
    for (const auto& q : params_) {
      QuantizedTensor t;
      t.name = q->name;
      t.shape = q->param.sizes().vec();
      t.dtype = q->param.scalar_type();
      t.group_size = options_.group_size();
      auto w = clean_of(*q).cpu();
      t.bits = rounded_bits(bits_of(*q), options_.extra_bits()).cpu();
      auto mm = finite_min_max(w, q->name);
      t.min = mm.first;
      t.max = mm.second;
      t.levels = quantize_levels(w, t.bits, options_.group_size(), t.min, t.max);
      state.quantized.push_back(std::move(t));
      stored[q->param.unsafeGetTensorImpl()] = q->name;
      for (std::size_t k = 1; k < q->names.size(); ++k) state.tied.push_back({q->names[k], q->name});
      if (include_logits) {
        state.logits.push_back(
            {q->name + options_.suffix(), q->logit.detach().cpu().contiguous(), false, false});
      }
    }
    for (const auto& item : model_->named_parameters(/*recurse=*/true)) {
      if (is_logit(item.value())) continue;
      const void* impl = item.value().unsafeGetTensorImpl();
      auto it = stored.find(impl);
      if (it != stored.end()) {
        if (it->second != item.key() && !is_quantized_name(item.key())) {
          state.tied.push_back({item.key(), it->second});
        }
        continue;
      }
      stored[impl] = item.key();
      state.floats.push_back({item.key(), item.value().detach().cpu().contiguous(),
                              options_.float16(), false});
    }
    for (const auto& item : model_->named_buffers(/*recurse=*/true)) {
      if (!item.value().defined()) continue;
      state.floats.push_back({item.key(), item.value().detach().cpu().contiguous(), false, true});
    }
    return state;
  }

  /// For tests: use the ATen-op implementation of the pseudo quantization noise on the CPU too
  /// (it is always used on other devices and dtypes).
  void use_reference_kernels(bool value) { reference_kernels_ = value; }

 private:
  using QParam = detail::QParam;
  using WeightState = detail::WeightState;

  void check_attached(const char* what) const {
    TORCH_CHECK(!detached_, "diffq::DiffQuantizer::", what, ": the quantizer was detached");
  }

  const QParam& find(const std::string& name) const {
    for (const auto& q : params_) {
      for (const auto& n : q->names) {
        if (n == name) return *q;
      }
    }
    std::string known;
    for (const auto& q : params_) known += (known.empty() ? "" : ", ") + q->name;
    TORCH_CHECK(false, "diffq::DiffQuantizer: no quantized parameter named '", name,
                "'; quantized: [", known, "]");
    return *params_.front();  // unreachable
  }

  bool is_logit(const at::Tensor& t) const {
    for (const auto& q : params_) {
      if (t.is_same(q->logit)) return true;
    }
    return false;
  }

  bool is_quantized_name(const std::string& name) const {
    for (const auto& q : params_) {
      if (std::find(q->names.begin(), q->names.end(), name) != q->names.end()) return true;
    }
    return false;
  }

  bool excluded(const std::string& full, const std::string& leaf) const {
    for (const auto& pattern : options_.exclude()) {
      if (detail::glob_match(pattern, full) || detail::glob_match(pattern, leaf)) return true;
    }
    return false;
  }

  void build() {
    const auto& suffix = options_.suffix();
    // Refuse a model already wrapped: a parameter name ending with the suffix.
    for (const auto& item : model_->named_parameters(true)) {
      const auto& n = item.key();
      TORCH_CHECK(n.size() < suffix.size() ||
                      n.compare(n.size() - suffix.size(), suffix.size(), suffix) != 0,
                  "diffq::DiffQuantizer: the model already carries a DiffQ logit ('", n,
                  "'); wrap a model only once, or detach() the previous quantizer");
    }
    std::unordered_map<const void*, std::shared_ptr<QParam>> by_impl;
    std::unordered_map<const void*, std::string> seen;  // every parameter, first name
    for (const auto& mod : model_->named_modules("", /*include_self=*/true)) {
      const std::string& prefix = mod.key();
      const auto& module = mod.value();
      for (const auto& item : module->named_parameters(/*recurse=*/false)) {
        const auto& p = item.value();
        if (!p.defined()) continue;
        const std::string full = prefix.empty() ? item.key() : prefix + "." + item.key();
        const void* impl = p.unsafeGetTensorImpl();
        auto tied = seen.find(impl);
        if (tied != seen.end()) {
          TORCH_CHECK(options_.detect_bound(), "diffq::DiffQuantizer: parameter '", full,
                      "' is tied to '", tied->second,
                      "'; tied parameters need detect_bound(true)");
          auto it = by_impl.find(impl);
          if (it != by_impl.end()) it->second->names.push_back(full);
          continue;
        }
        seen[impl] = full;
        const double fp32_mb = 4.0 * static_cast<double>(p.numel()) / 1048576.0;
        if (!p.is_floating_point() || fp32_mb <= options_.min_size_mb() ||
            excluded(full, item.key())) {
          continue;
        }
        TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble,
                    "diffq::DiffQuantizer: parameter '", full, "' has dtype ", p.scalar_type(),
                    "; expected float32 or float64");
        auto q = std::make_shared<QParam>();
        q->name = full;
        q->names = {full};
        q->owner = module;
        q->logit_name = item.key() + suffix;
        q->param = p;
        q->numel = p.numel();
        q->group_size = effective_group_size(q->numel, options_.group_size());
        q->groups = num_groups(q->numel, options_.group_size());
        const double init = logit_for_bits(options_.init_bits(), options_.min_bits(),
                                           options_.max_bits(), options_.param());
        auto logit = at::full({q->groups}, init, p.options());  // the parameter's dtype
        q->logit = module->register_parameter(q->logit_name, logit, /*requires_grad=*/true);
        by_impl[impl] = q;
        params_.push_back(q);
      }
    }
    for (auto& q : params_) register_hook(q);
  }

  /// Registers the gradient hook; it holds a weak reference to the parameter state.
  void register_hook(const std::shared_ptr<QParam>& q) {
    if (!q->param.requires_grad()) return;
    std::weak_ptr<QParam> weak = q;
    q->hook = q->param.register_hook([weak](const at::Tensor& grad) -> at::Tensor {
      auto q = weak.lock();
      if (!q || !q->pending) return at::Tensor();
      return DiffQuantizer::on_gradient(*q, grad);
    });
    q->hooked = true;
  }

  /// The parameter's gradient is complete: add the logit gradient, correct the weight gradient for
  /// the path through `max w − min w`, restore the clean weights.
  static at::Tensor on_gradient(QParam& q, const at::Tensor& grad) {
    at::Tensor result;
    if (q.state == WeightState::kNoisy) result = noise_backward(q, grad);
    restore(q);
    return result;
  }

  static at::Tensor noise_backward(QParam& q, const at::Tensor& grad) {
    at::NoGradGuard no_grad;
    auto& lg = q.logit.mutable_grad();
    if (!lg.defined()) lg = at::zeros_like(q.logit);
    const bool fast = q.fast && grad.device().is_cpu() && grad.is_contiguous() &&
                      grad.scalar_type() == at::kFloat && lg.is_contiguous() &&
                      lg.device().is_cpu() && lg.scalar_type() == at::kFloat;
    if (fast) {
      const double s = detail::noise_backward_cpu(
          grad.data_ptr<float>(), q.noise.data_ptr<float>(), q.numel, q.group_size,
          q.unit.data_ptr<float>(), q.dunit.data_ptr<float>(), q.scale, lg.data_ptr<float>(),
          q.partial.data_ptr<double>());
      if (s == 0 || q.scale == 0) return at::Tensor();
      // The path through max w − min w adds ±s, spread over the ties, to a few elements of the
      // weight gradient. Rather than copying the whole gradient, add it to `param.grad` once the
      // backward pass has accumulated it (an engine callback runs after every node).
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
    const int64_t padded = q.groups * q.group_size;
    if (padded != q.numel) gu = at::constant_pad_nd(gu, {0, padded - q.numel});
    auto group_sum = gu.view({q.groups, q.group_size}).sum(1);
    auto scale = (q.hi - q.lo).to(group_sum.scalar_type());
    lg.add_((group_sum * scale * q.dunit).to(lg.scalar_type()));
    auto s = (group_sum * q.unit).sum();
    auto w = q.clean.reshape(-1);
    auto at_max = (w == q.hi).to(g.scalar_type());
    auto at_min = (w == q.lo).to(g.scalar_type());
    auto corr = s * (at_max / at_max.sum() - at_min / at_min.sum());
    return grad + corr.view(grad.sizes()).to(grad.scalar_type());
  }

  /// Adds `s/n_max` to the weight gradient at the `n_max` positions of the maximum and `−s/n_min`
  /// at those of the minimum (gradient of `max w − min w`, spread over ties like ATen's).
  static void add_extremes_gradient(QParam& q, double s) {
    at::NoGradGuard no_grad;
    auto& grad = q.param.mutable_grad();
    TORCH_INTERNAL_ASSERT(grad.defined(), "diffq: weight gradient missing after backward");
    const double up = s / static_cast<double>(q.extremes.argmax.size());
    const double down = s / static_cast<double>(q.extremes.argmin.size());
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

  /// The clean values of a parameter (its data when clean, the saved handle otherwise).
  static at::Tensor clean_of(const QParam& q) {
    return q.state == WeightState::kClean ? q.param.detach() : q.clean;
  }

  /// Gives the parameter back its clean data (bit for bit).
  static void restore(QParam& q) {
    if (q.state != WeightState::kClean) {
      q.param.set_data(q.clean);
      q.clean = at::Tensor();
      q.state = WeightState::kClean;
    }
    q.pending = false;
  }

  void restore_all() {
    for (auto& q : params_) restore(*q);
  }

  at::Tensor bits_of(const QParam& q) const {
    return bits_from_logit(q.logit, options_.min_bits(), options_.max_bits(), options_.param());
  }

  double group_sum_bits(const QParam& q, bool rounded) const {
    at::NoGradGuard no_grad;
    auto b = bits_of(q).to(at::kDouble);
    if (rounded) b = rounded_bits(b, options_.extra_bits()).to(at::kDouble);
    const int64_t last = q.numel - (q.groups - 1) * q.group_size;
    auto total = b.sum() * static_cast<double>(q.group_size) -
                 b[q.groups - 1] * static_cast<double>(q.group_size - last);
    return total.template item<double>();
  }

  at::Tensor size_mb(bool exact) const {
    std::unordered_map<const void*, bool> counted;
    at::Tensor total;
    for (const auto& q : params_) {
      counted[q->param.unsafeGetTensorImpl()] = true;
      auto b = bits_of(*q);
      if (exact) {
        b = rounded_bits(b, options_.extra_bits()).to(b.scalar_type());
      } else if (options_.extra_bits() != 0) {
        b = b + options_.extra_bits();
      }
      auto t = quantized_size_bits(b, q->numel, options_.group_size(), options_.min_bits());
      total = total.defined() ? total + t : t;
    }
    double other_bits = 0;
    for (const auto& p : model_->parameters(/*recurse=*/true)) {
      const void* impl = p.unsafeGetTensorImpl();
      if (counted.count(impl) || is_logit(p)) continue;
      counted[impl] = true;
      other_bits += static_cast<double>(p.numel() * float_bits(options_.float16()));
    }
    if (!total.defined()) {
      return at::scalar_tensor(other_bits / kBitsPerMB, at::TensorOptions().dtype(at::kDouble));
    }
    return (total + other_bits) / kBitsPerMB;
  }

  /// Sets the true quantized weights (cached while the weights and logits are unchanged).
  void set_quantized(QParam& q) {
    at::NoGradGuard no_grad;
    restore(q);
    const auto w = q.param.detach();
    const bool valid = q.quantized.defined() && q.cached_param_version == q.param._version() &&
                       q.cached_logit_version == q.logit._version() &&
                       q.cached_data_ptr == w.data_ptr() &&
                       q.quantized.scalar_type() == w.scalar_type() &&
                       q.quantized.device() == w.device();
    if (!valid) {
      auto b = rounded_bits(bits_of(q), options_.extra_bits());
      q.quantized = quantize_dequantize(w, b, options_.group_size(), q.name);
      q.cached_param_version = q.param._version();
      q.cached_logit_version = q.logit._version();
      q.cached_data_ptr = w.data_ptr();
    }
    q.clean = w;
    q.param.set_data(q.quantized);
    q.state = WeightState::kQuantized;
  }

  /// Draws a new noise sample and gives the parameter `w + Δ·u`.
  void set_noisy(QParam& q) {
    at::NoGradGuard no_grad;
    restore(q);
    const auto w = q.param.detach();
    TORCH_CHECK(w.is_contiguous(), "diffq::DiffQuantizer: parameter '", q.name,
                "' is not contiguous");
    q.fast = !reference_kernels_ && w.device().is_cpu() && w.scalar_type() == at::kFloat &&
             q.logit.is_contiguous();
    const auto noise_dtype = q.fast ? at::kFloat : w.scalar_type();
    if (!q.noisy.defined() || q.noisy.numel() != q.numel ||
        q.noisy.scalar_type() != w.scalar_type() || q.noisy.device() != w.device()) {
      q.noisy = at::empty({q.numel}, w.options());
    }
    if (!q.noise.defined() || q.noise.numel() != q.numel || q.noise.scalar_type() != noise_dtype ||
        q.noise.device() != w.device()) {
      q.noise = at::empty({q.numel}, w.options().dtype(noise_dtype));
    }
    if (q.fast) {
      auto mm = at::aminmax(w);
      const double lo = std::get<0>(mm).template item<double>();
      const double hi = std::get<1>(mm).template item<double>();
      TORCH_CHECK(std::isfinite(lo) && std::isfinite(hi), "diffq::DiffQuantizer: parameter '",
                  q.name, "' holds non-finite values (min=", lo, ", max=", hi,
                  "); cannot add pseudo quantization noise to NaN or Inf weights");
      q.scale = hi - lo;
      if (!q.partial.defined() || q.partial.numel() != q.groups) {
        const auto cpu = at::TensorOptions().device(at::kCPU);
        q.partial = at::empty({q.groups}, cpu.dtype(at::kDouble));
        q.unit = at::empty({q.groups}, cpu.dtype(at::kFloat));
        q.dunit = at::empty({q.groups}, cpu.dtype(at::kFloat));
      }
      detail::units_cpu(q.logit.data_ptr<float>(), q.unit.data_ptr<float>(),
                        q.dunit.data_ptr<float>(), q.groups, options_.min_bits(),
                        options_.max_bits(), options_.param());
      detail::apply_noise_cpu(w.data_ptr<float>(), q.noisy.data_ptr<float>(),
                                     q.noise.data_ptr<float>(), q.numel, q.group_size,
                                     q.unit.data_ptr<float>(), q.scale, detail::draw_seed(),
                                     options_.noise(), static_cast<float>(lo),
                                     static_cast<float>(hi), q.extremes);
    } else {
      auto flat = w.reshape(-1);
      auto mm = at::aminmax(flat);
      q.lo = std::get<0>(mm);
      q.hi = std::get<1>(mm);
      auto uq =
          unit_from_logit(q.logit, options_.min_bits(), options_.max_bits(), options_.param());
      q.partial = at::Tensor();
      q.unit = uq.first.to(w.scalar_type());
      q.dunit = uq.second.to(w.scalar_type());
      if (options_.noise() == Noise::kGaussian) {
        q.noise.normal_(0, 0.5);
      } else {
        q.noise.uniform_(-0.5, 0.5);
      }
      auto delta = expand_groups(q.unit, q.numel, options_.group_size()) * (q.hi - q.lo);
      at::add_out(q.noisy, flat, delta * q.noise);
    }
    q.clean = w;
    q.param.set_data(q.noisy.view(w.sizes()));
    q.state = WeightState::kNoisy;
  }

  void pre_forward() {
    const bool training = model_->is_training();
    if (training && !manual_quantized_) {
      TORCH_CHECK(optimizer_ready_, "diffq::DiffQuantizer::forward: call setup_optimizer(optimizer)",
                  " (or no_optimizer()) before a training forward");
    }
    for (auto& q : params_) {
      if (manual_quantized_) {
        if (q->state != WeightState::kQuantized) set_quantized(*q);
      } else if (training) {
        // Several forwards before one backward share one noise sample.
        const bool shared = q->state == WeightState::kNoisy && q->pending &&
                            torch::autograd::impl::try_get_grad_accumulator(q->param) != nullptr;
        if (!shared) set_noisy(*q);
      } else {
        set_quantized(*q);
      }
    }
  }

  void post_forward() {
    if (manual_quantized_) return;
    const bool grad = at::GradMode::is_enabled();
    for (auto& q : params_) {
      if (q->state == WeightState::kClean) continue;
      // A backward will restore the weights only if the parameter is in a live graph.
      const bool in_graph = grad && q->hooked && q->param.requires_grad() &&
                            torch::autograd::impl::try_get_grad_accumulator(q->param) != nullptr;
      if (in_graph) {
        q->pending = true;
      } else if (!q->pending) {
        restore(*q);
      }
    }
  }

  std::shared_ptr<Impl> model_;
  DiffQOptions options_;
  std::vector<std::shared_ptr<QParam>> params_;
  bool optimizer_ready_ = false;
  bool manual_quantized_ = false;
  bool detached_ = false;
  bool reference_kernels_ = false;
};

/// RAII guard: true quantized weights (`quantize()`) for its lifetime, then `unquantize()`.
template <typename Quantizer>
class QuantizedGuard {
 public:
  explicit QuantizedGuard(Quantizer& quantizer) : quantizer_(quantizer) { quantizer_.quantize(); }
  ~QuantizedGuard() { quantizer_.unquantize(); }
  QuantizedGuard(const QuantizedGuard&) = delete;
  QuantizedGuard& operator=(const QuantizedGuard&) = delete;

 private:
  Quantizer& quantizer_;
};

}  // namespace diffq
