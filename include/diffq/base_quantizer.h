#pragma once
/// \file diffq/base_quantizer.h
/// `diffq::BaseQuantizer<Derived, M, Options, Param>`: the machinery shared by every quantizer of
/// diffq (DiffQ, uniform post-training quantization and QAT, LSQ), as a CRTP base.
///
/// What it does, once for all quantizers:
/// - parameter discovery: the model's parameters, recursively, that are floating point, larger
///   than `min_size_mb` of fp32 and not matched by an `exclude` glob; tied parameters (one tensor
///   under several names) are quantized once (refused unless `detect_bound`); an optional
///   learnable per-tensor auxiliary tensor (DiffQ's logits, LSQ's step sizes) is registered on the
///   owning module as `<name><suffix>`;
/// - the forward wrapper: before a training forward the derived quantizer may give a parameter a
///   substitute (`Tensor::set_data`: DiffQ's noisy weights, QAT's or LSQ's quantized weights); a
///   gradient hook registered once per parameter calls the derived backward when the parameter's
///   gradient is complete and gives the parameter back its clean values, bit for bit (a sweep at
///   the end of that backward pass restores the frozen ones and those the forward may not have
///   used); eval forwards (and `quantize()`) see the true quantized weights, cached until the
///   weights or the auxiliary tensor change or a backward reaches either; a substitute written
///   in place (a write that restoring would lose) is detected by its version counter (for writes
///   through `.data()`, see the README's "Limitations");
/// - `model_size()`/`true_model_size()` (quantized tensors as the derived quantizer counts them,
///   the others 32 bits, or 16 with `float16`, per element), `mean_bits()`;
/// - `quantized_state()`, the method-independent export of `diffq/checkpoint.h`.
///
/// The derived class provides (it may keep them private and befriend the base):
/// - `at::Tensor init_param(Param& q)`: called once per discovered parameter (common fields set);
///   returns the initial auxiliary tensor, or an undefined tensor for none;
/// - `void set_training(Param& q)`: before a training forward; either leaves `q` clean or calls
///   `detail::substitute(q, values)`;
/// - `static at::Tensor training_backward(Param& q, const at::Tensor& grad)`: from the gradient
///   hook while `q` holds a training substitute; returns the replacement weight gradient, or an
///   undefined tensor to keep `grad`;
/// - `at::Tensor quantized_weights(const Param& q, const at::Tensor& w)`: true quantized weights,
///   shape and dtype of `w`; must equal the dequantized levels of `export_levels` bit for bit;
/// - `void export_levels(const Param& q, const at::Tensor& w, QuantizedTensor& t)`: fills
///   `group_size`, `bits`, `min`, `max` and `levels` of `t` from the clean CPU weights `w`;
/// - `at::Tensor size_bits(const Param& q, bool exact)`: bits of the quantized tensor (0-dim);
/// - `double sum_bits(const Param& q, bool rounded)`: sum over elements of their bit widths.

#include <diffq/bits.h>
#include <diffq/detail/glob.h>
#include <diffq/detail/module_access.h>
#include <diffq/detail/weight_state.h>
#include <diffq/options.h>
#include <diffq/state.h>

#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/optim.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
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

/// The model argument of a quantizer's constructor: a `std::shared_ptr<Impl>` (or anything that
/// converts to one), or a `torch::nn::ModuleHolder` of `Impl` such as `torch::nn::Linear`, whose
/// module is taken. One constructor then serves both.
template <typename Impl>
struct ModelRef {
  template <
      typename Holder,
      std::enable_if_t<std::is_base_of<torch::nn::ModuleHolder<Impl>, std::decay_t<Holder>>::value,
                       int> = 0>
  ModelRef(const Holder& holder) : ptr(holder.ptr()) {}  // NOLINT: implicit by design
  template <
      typename Ptr,
      std::enable_if_t<!std::is_base_of<torch::nn::ModuleHolder<Impl>, std::decay_t<Ptr>>::value &&
                           std::is_convertible<Ptr, std::shared_ptr<Impl>>::value,
                       int> = 0>
  ModelRef(Ptr&& model) : ptr(std::forward<Ptr>(model)) {}  // NOLINT: implicit by design
  std::shared_ptr<Impl> ptr;
};

/// What the gradient hooks of one quantizer share: its parameters, so that the first hook to fire
/// in a backward pass can queue one sweep, run once the pass is done, that restores the parameters
/// the pass did not reach (substituted by a forward that did not use them, or frozen).
struct HookShared {
  std::vector<std::weak_ptr<QParamBase>> params;
  bool sweep_queued = false;
};

/// How a quantizer names itself and its auxiliary tensors, for discovery and messages.
struct QuantizerTraits {
  std::string name;              ///< prefix of messages, e.g. `"diffq::DiffQuantizer"`
  std::string suffix;            ///< suffix of the auxiliary tensors; empty: none registered
  std::string aux_kind;          ///< e.g. `"logit"`, `"step size"`
  std::string aux_label;         ///< e.g. `"DiffQ logit"`
  bool needs_optimizer = false;  ///< training forwards need `setup_optimizer`/`no_optimizer`
};

/// Adds `tensors` to `optimizer` as a param group of their own with learning rate `lr` and weight
/// decay 0 (Adam, AdamW, SGD, RMSprop, Adagrad). `where` prefixes the messages.
inline void add_param_group_without_decay(torch::optim::Optimizer& optimizer,
                                          std::vector<at::Tensor> tensors, double lr,
                                          const std::string& where) {
  TORCH_CHECK(lr >= 0 && std::isfinite(lr), where, ": lr must be >= 0, got ", lr);
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
    TORCH_CHECK(false, where, ": unsupported optimizer (expected ",
                "Adam, AdamW, SGD, RMSprop or Adagrad)");
  }
  if (!tensors.empty()) {
    optimizer.add_param_group(torch::optim::OptimizerParamGroup(tensors, std::move(opts)));
  }
}

}  // namespace detail

/// CRTP base of the quantizers (see the file comment for what a derived class provides).
/// `ModuleType`: an `Impl` class held by `std::shared_ptr`, or a `torch::nn::ModuleHolder`;
/// `Options`: the quantizer's options, derived from `SharedOptions` (`min_size_mb`, `exclude`,
/// `float16`, `detect_bound`), with a `check_options` overload (diffq/options.h);
/// `Param`: the per-parameter state, derived from `detail::QParamBase`.
/// Not thread-safe: one forward/backward at a time.
template <typename Derived, typename ModuleType, typename Options, typename Param>
class BaseQuantizer {
 public:
  using Impl = typename detail::ModuleImpl<ModuleType>::type;

  BaseQuantizer(const BaseQuantizer&) = delete;
  BaseQuantizer& operator=(const BaseQuantizer&) = delete;
  BaseQuantizer(BaseQuantizer&&) noexcept = default;
  BaseQuantizer& operator=(BaseQuantizer&&) = delete;

  /// Restores the clean weights and removes the gradient hooks; the auxiliary tensors stay
  /// registered (use `detach()` to remove them).
  ~BaseQuantizer() {
    for (auto& q : entries_) {
      try {
        detail::restore(*q);
      } catch (...) {  // a destructor must not throw (restore converts after a Module::to)
      }
      if (q->hooked) q->param.remove_hook(q->hook);
      q->hooked = false;
      if (q->aux_hooked) q->aux.remove_hook(q->aux_hook);
      q->aux_hooked = false;
    }
  }

  /// Calls the model's forward with any arguments. Training mode: the quantizer's training
  /// substitute (if any; one per step, shared by several forwards before one backward); a
  /// training forward ends `quantize()` first, as the reference's does. Eval mode, or after
  /// `quantize()`: true quantized weights, and with `float16` the other parameters rounded
  /// through fp16 (so the forward equals that of the model a checkpoint reloads, bit for bit). An
  /// eval forward under
  /// `torch::NoGradGuard` between a training forward and its backward leaves that training
  /// forward's substitute for its backward.
  ///
  /// One backward per training forward: the first backward gives the parameters their clean values
  /// back, so a second backward through the same graph (`retain_graph`) would see the clean weights
  /// and add nothing to the auxiliary tensors' gradients; not supported.
  ///
  /// Throws:
  /// - in training mode, if the quantizer needs an optimizer and neither `setup_optimizer` nor
  ///   `no_optimizer` was called;
  /// - in a training forward with grad mode on, if a quantized parameter does not require grad
  ///   while its auxiliary tensor is trained (DiffQ's logits learn from the parameter's gradient);
  /// - in an eval forward with grad mode on while a training forward awaits its backward;
  /// - if a substituted parameter was written in place (the write would be lost), as far as its
  ///   version counter shows (not through `.data()`, as LibTorch's SGD writes);
  /// - on NaN/Inf weights, in every forward that quantizes them or adds noise to them (not in the
  ///   training forward of a post-training `UniformQuantizer`, which uses the clean weights).
  /// If it throws, the substitutes it gave are undone (a training forward awaiting its backward
  /// keeps its own).
  template <typename... Args>
  decltype(auto) forward(Args&&... args) {
    check_attached("forward");
    try {
      pre_forward();
      decltype(auto) out = model_->forward(std::forward<Args>(args)...);
      post_forward();
      return out;
    } catch (...) {
      roll_back_forward();
      throw;
    }
  }

  /// Model size in MB (2^20 bytes), a 0-dim tensor: the quantized tensors as the quantizer counts
  /// them (differentiable for DiffQ), plus 32 bits (16 with `float16`) per element of the other
  /// parameters. Tied parameters count once.
  at::Tensor model_size() const { return size_mb(false); }

  /// Model size in MB with the bit widths of true quantization (the bit-packed model's size).
  double true_model_size() const { return size_mb(true).template item<double>(); }

  /// Declares that the auxiliary tensors will not be trained (evaluation-only use): allows
  /// training forwards without `setup_optimizer`.
  void no_optimizer() { optimizer_ready_ = true; }

  /// Gives every quantized parameter its true quantized values (and with `float16` the other
  /// parameters their fp16-rounded ones: the model a checkpoint reloads) until `unquantize()` or
  /// the next training forward, which ends it. Throws on NaN/Inf weights, and while a training
  /// forward awaits its
  /// backward (quantizing would drop its noisy weights, so its backward would see the clean ones:
  /// evaluate in between with `model->eval()` under `torch::NoGradGuard` instead).
  void quantize() {
    check_attached("quantize");
    for (const auto& q : entries_) {
      TORCH_CHECK(!detail::awaiting_backward(*q), traits_.name, "::quantize: parameter '", q->name,
                  "' holds the substitute of a training forward whose backward is still to "
                  "come; call backward() first, evaluate in between with model->eval() under "
                  "torch::NoGradGuard instead, or restore_clean_weights() to drop that training "
                  "forward");
    }
    restore_all_checked("quantize");
    try {
      for (auto& q : entries_) set_quantized(*q);
    } catch (...) {
      restore_all();  // all clean again, as before the call
      throw;
    }
    manual_quantized_ = true;
  }

  /// Gives back the clean weights after `quantize()`. Does not throw (it ends a
  /// `QuantizedGuard`): a write into the quantized weights, which is lost, gets a warning.
  void unquantize() {
    manual_quantized_ = false;
    const auto lost = overwritten_substitutes();
    restore_all();
    if (!lost.empty()) TORCH_WARN(overwritten_message("unquantize", lost));
  }

  /// Whether `quantize()` is in force.
  bool is_quantized() const { return manual_quantized_; }

  /// Suffix of the auxiliary tensors' names (`"_diffq"` for DiffQ's logits, `"_lsq"` for LSQ's
  /// step sizes); empty when the quantizer registers none.
  const std::string& aux_suffix() const { return traits_.suffix; }

  /// Gives every quantized parameter its clean data back now, ending any substitution: the noisy
  /// weights of a training forward awaiting its backward (which then adds no gradient to the
  /// auxiliary tensors), or the quantized weights an eval forward leaves in place while its graph
  /// is alive (grad mode on). Call it before writing into the parameters, e.g. loading a
  /// checkpoint (`diffq::restore_quantized` does). Throws under `quantize()` (call `unquantize()`
  /// first), and if a substitute was written in place (after restoring the clean weights: that
  /// write is lost).
  void restore_clean_weights() {
    check_attached("restore_clean_weights");
    TORCH_CHECK(!manual_quantized_, traits_.name,
                "::restore_clean_weights: the weights are quantized by quantize() or a "
                "QuantizedGuard; call unquantize() (or leave the guard) first");
    restore_all_checked("restore_clean_weights");
  }

  /// Restores the clean weights, removes the hooks and the auxiliary tensors: the model is as it
  /// was before the quantizer. The quantizer is unusable afterwards.
  void detach() {
    check_attached("detach");
    manual_quantized_ = false;
    for (auto& q : entries_) {
      detail::restore(*q);
      if (q->hooked) q->param.remove_hook(q->hook);
      q->hooked = false;
      if (q->aux_hooked) q->aux.remove_hook(q->aux_hook);
      q->aux_hooked = false;
      if (q->aux.defined()) detail::erase_parameter(*q->owner, q->aux_name);
    }
    params_.clear();
    entries_.clear();
    detached_ = true;
  }

  /// The wrapped model.
  const std::shared_ptr<Impl>& model() const { return model_; }
  /// The options.
  const Options& options() const { return options_; }

  /// Full dotted names of the quantized parameters (first name of tied ones), discovery order.
  std::vector<std::string> quantized_names() const {
    std::vector<std::string> out;
    for (const auto& q : params_) out.push_back(q->name);
    return out;
  }

  /// Element-weighted mean bit width over quantized parameters (see the derived quantizer for
  /// `rounded`). 0 if none.
  double mean_bits(bool rounded = false) const {
    double total = 0, count = 0;
    for (const auto& q : params_) {
      total += derived().sum_bits(*q, rounded);
      count += static_cast<double>(q->numel);
    }
    return count > 0 ? total / count : 0.0;
  }

  /// Mean bit width per quantized parameter (see `mean_bits`), in discovery order.
  std::vector<std::pair<std::string, double>> mean_bits_per_param(bool rounded = false) const {
    std::vector<std::pair<std::string, double>> out;
    for (const auto& q : params_) {
      out.emplace_back(q->name, derived().sum_bits(*q, rounded) / static_cast<double>(q->numel));
    }
    return out;
  }

  /// The quantized state for a checkpoint (`diffq/checkpoint.h`): levels, bit widths and min/max of
  /// each quantized parameter (dequantizing to the eval-mode weights bit for bit), the other
  /// parameters (fp16 with `float16`), all buffers, tied names, and the auxiliary tensors (stored
  /// as logits) if `include_logits`. Tensors are copied to the CPU. Throws on NaN/Inf weights,
  /// and if a substitute was written in place (the clean weights would not hold that write).
  QuantizedState quantized_state(bool include_logits = false) const {
    check_attached("quantized_state");
    const auto lost = overwritten_substitutes();
    TORCH_CHECK(lost.empty(), overwritten_message("quantized_state", lost, /*restored=*/false));
    QuantizedState state;
    std::unordered_map<const void*, std::string> stored;  // TensorImpl -> stored name
    for (const auto& q : params_) {
      QuantizedTensor t;
      t.name = q->name;
      t.shape = q->param.sizes().vec();
      t.dtype = q->param.scalar_type();
      derived().export_levels(*q, detail::clean_of(*q).cpu(), t);
      state.quantized.push_back(std::move(t));
      stored[q->param.unsafeGetTensorImpl()] = q->name;
      for (std::size_t k = 1; k < q->names.size(); ++k)
        state.tied.push_back({q->names[k], q->name});
      if (include_logits && q->aux.defined()) {
        state.logits.push_back(
            {q->name + traits_.suffix, q->aux.detach().cpu().contiguous(), false, false});
      }
    }
    for (const auto& item : model_->named_parameters(/*recurse=*/true)) {
      if (is_aux(item.value())) continue;
      const void* impl = item.value().unsafeGetTensorImpl();
      auto it = stored.find(impl);
      if (it != stored.end()) {
        if (it->second != item.key() && !is_quantized_name(item.key())) {
          state.tied.push_back({item.key(), it->second});
        }
        continue;
      }
      stored[impl] = item.key();
      state.floats.push_back(
          {item.key(), item.value().detach().cpu().contiguous(), options_.float16(), false});
    }
    for (const auto& item : model_->named_buffers(/*recurse=*/true)) {
      if (!item.value().defined()) continue;
      state.floats.push_back({item.key(), item.value().detach().cpu().contiguous(), false, true});
    }
    return state;
  }

 protected:
  using WeightState = detail::WeightState;

  BaseQuantizer(std::shared_ptr<Impl> model, Options options, detail::QuantizerTraits traits)
      : model_(std::move(model)), options_(std::move(options)), traits_(std::move(traits)) {
    TORCH_CHECK(model_ != nullptr, traits_.name, ": model is null");
    check_options(options_, traits_.name);  // the overload of `Options` (diffq/options.h)
    // The CRTP contract (file comment), checked where `Derived` is complete.
    static_assert(std::is_base_of<detail::QParamBase, Param>::value,
                  "diffq::BaseQuantizer: Param must derive from diffq::detail::QParamBase");
    static_assert(std::is_base_of<SharedOptions<Options>, Options>::value,
                  "diffq::BaseQuantizer: Options must derive from diffq::SharedOptions<Options>");
    static_assert(std::is_base_of<BaseQuantizer, Derived>::value,
                  "diffq::BaseQuantizer: Derived must derive from BaseQuantizer<Derived, ...>");
    using Tensor = at::Tensor;
    static_assert(
        std::is_same<decltype(std::declval<const Derived&>().init_param(std::declval<Param&>())),
                     Tensor>::value,
        "diffq::BaseQuantizer: Derived::init_param(Param&) must return at::Tensor");
    static_assert(std::is_same<decltype(Derived::training_backward(std::declval<Param&>(),
                                                                   std::declval<const Tensor&>())),
                               Tensor>::value,
                  "diffq::BaseQuantizer: Derived::training_backward(Param&, const at::Tensor&) "
                  "must be static and return at::Tensor");
    static_assert(std::is_same<decltype(std::declval<const Derived&>().quantized_weights(
                                   std::declval<const Param&>(), std::declval<const Tensor&>())),
                               Tensor>::value,
                  "diffq::BaseQuantizer: Derived::quantized_weights(const Param&, const "
                  "at::Tensor&) const must return at::Tensor");
    static_assert(std::is_same<decltype(std::declval<const Derived&>().size_bits(
                                   std::declval<const Param&>(), true)),
                               Tensor>::value,
                  "diffq::BaseQuantizer: Derived::size_bits(const Param&, bool) const must return "
                  "at::Tensor");
    static_assert(std::is_same<decltype(std::declval<const Derived&>().sum_bits(
                                   std::declval<const Param&>(), true)),
                               double>::value,
                  "diffq::BaseQuantizer: Derived::sum_bits(const Param&, bool) const must return "
                  "double");
  }

  Derived& derived() { return static_cast<Derived&>(*this); }
  const Derived& derived() const { return static_cast<const Derived&>(*this); }

  void check_attached(const char* what) const {
    TORCH_CHECK(!detached_, traits_.name, "::", what, ": the quantizer was detached");
    TORCH_CHECK(model_ != nullptr, traits_.name, "::", what, ": the quantizer was moved from");
  }

  const Param& find(const std::string& name) const {
    for (const auto& q : params_) {
      for (const auto& n : q->names) {
        if (n == name) return *q;
      }
    }
    std::string known;
    for (const auto& q : params_) known += (known.empty() ? "" : ", ") + q->name;
    TORCH_CHECK(false, traits_.name, ": no quantized parameter named '", name, "'; quantized: [",
                known, "]");
    return *params_.front();  // unreachable
  }

  bool is_aux(const at::Tensor& t) const {
    for (const auto& q : params_) {
      if (q->aux.defined() && t.is_same(q->aux)) return true;
    }
    return false;
  }

  bool is_quantized_name(const std::string& name) const {
    for (const auto& q : params_) {
      if (std::find(q->names.begin(), q->names.end(), name) != q->names.end()) return true;
    }
    return false;
  }

  /// Adds the auxiliary tensors to `optimizer` as a param group (learning rate `lr`, weight decay
  /// 0). Throws if the optimizer already holds one of them, or is of an unsupported type.
  void setup_aux_optimizer(torch::optim::Optimizer& optimizer, double lr) {
    check_attached("setup_optimizer");
    const std::string where = traits_.name + "::setup_optimizer";
    TORCH_CHECK(lr >= 0 && std::isfinite(lr), where, ": lr must be >= 0, got ", lr);
    for (const auto& group : optimizer.param_groups()) {
      for (const auto& p : group.params()) {
        for (const auto& q : params_) {
          TORCH_CHECK(!q->aux.defined() || !p.is_same(q->aux), where,
                      ": the optimizer already holds the ", traits_.aux_kind, " '", q->name,
                      traits_.suffix,
                      "'; create the optimizer (on model->parameters()) before the quantizer, "
                      "and call setup_optimizer once per optimizer");
        }
      }
    }
    std::vector<at::Tensor> aux;
    for (const auto& q : params_) {
      if (q->aux.defined()) aux.push_back(q->aux);
    }
    detail::add_param_group_without_decay(optimizer, std::move(aux), lr, where);
    optimizer_ready_ = true;
    aux_trained_ = true;
  }

  /// Discovers the quantized parameters; called by the derived constructor once it is ready. On
  /// an error, the auxiliary tensors registered so far are removed: the model is left as it was.
  void build() {
    try {
      discover();
    } catch (...) {
      for (auto& q : params_) {
        if (q->aux.defined()) detail::erase_parameter(*q->owner, q->aux_name);
      }
      params_.clear();
      entries_.clear();
      throw;
    }
  }

  void discover() {
    const auto& suffix = traits_.suffix;
    // Refuse a model already wrapped: a parameter name ending with the suffix.
    if (!suffix.empty()) {
      for (const auto& item : model_->named_parameters(true)) {
        const auto& n = item.key();
        TORCH_CHECK(!detail::ends_with(n, suffix), traits_.name, ": the model already carries a ",
                    traits_.aux_label, " ('", n,
                    "'); wrap a model only once, or detach() the previous quantizer");
      }
    }
    // Every parameter tensor once, with all its names (tied parameters have several): the
    // first name gives the logit's owner and name; `exclude` applies if any name matches.
    struct Found {
      at::Tensor param;
      std::shared_ptr<torch::nn::Module> owner;  ///< module of the first name
      std::string leaf;                          ///< first name within its module
      std::vector<std::string> names;            ///< full dotted names, first one first
      bool excluded = false;
      /// Dotted name of an Embedding or EmbeddingBag with `max_norm` whose weight this is (its
      /// forward renormalises the weight in place); empty if none.
      std::string renormalised_by;
    };
    std::vector<Found> found;
    std::vector<std::shared_ptr<Param>> float16_entries;
    std::unordered_map<const void*, size_t> by_impl;
    std::vector<bool> pattern_used(options_.exclude().size(), false);
    for (const auto& mod : model_->named_modules("", /*include_self=*/true)) {
      const std::string& prefix = mod.key();
      const auto& module = mod.value();
      for (const auto& item : module->named_parameters(/*recurse=*/false)) {
        const auto& p = item.value();
        if (!p.defined()) continue;
        const std::string full = prefix.empty() ? item.key() : prefix + "." + item.key();
        const void* impl = p.unsafeGetTensorImpl();
        auto tied = by_impl.find(impl);
        if (tied == by_impl.end()) {
          tied = by_impl.emplace(impl, found.size()).first;
          found.push_back(Found{p, module, item.key(), {}, false, {}});
        } else {
          TORCH_CHECK(options_.detect_bound(), traits_.name, ": parameter '", full,
                      "' is tied to '", found[tied->second].names[0],
                      "'; tied parameters need detect_bound(true)");
        }
        Found& f = found[tied->second];
        f.names.push_back(full);
        if (item.key() == "weight" && detail::renormalises_weight(*module)) {
          f.renormalised_by = prefix.empty() ? "<root>" : prefix;
        }
        for (size_t k = 0; k < options_.exclude().size(); ++k) {
          const std::string& pattern = options_.exclude()[k];
          if (detail::glob_match(pattern, full) || detail::glob_match(pattern, item.key())) {
            f.excluded = true;
            pattern_used[k] = true;
          }
        }
      }
    }
    for (size_t k = 0; k < pattern_used.size(); ++k) {
      if (!pattern_used[k]) {
        TORCH_WARN(traits_.name, ": exclude pattern '", options_.exclude()[k],
                   "' matches no parameter (patterns match full dotted names such as "
                   "'fc1.weight' and leaf names such as 'weight')");
      }
    }
    for (auto& f : found) {
      const at::Tensor& p = f.param;
      const double fp32_mb = 4.0 * static_cast<double>(p.numel()) / 1048576.0;
      if (!p.is_floating_point() || fp32_mb <= options_.min_size_mb() || f.excluded) {
        // Rounded through fp16 in eval forwards (not a weight that the forward renormalises in
        // place: the renormalised values would be written into the rounded copy, and lost).
        if (options_.float16() && p.is_floating_point() && f.renormalised_by.empty()) {
          auto q = std::make_shared<Param>();
          q->name = f.names[0];
          q->names = f.names;
          q->param = p;
          q->numel = p.numel();
          q->float16_stored = true;
          float16_entries.push_back(q);
        }
        continue;
      }
      TORCH_CHECK(f.renormalised_by.empty(), traits_.name, ": parameter '", f.names[0],
                  "' is the weight of the Embedding '", f.renormalised_by,
                  "' with max_norm, whose forward renormalises it in place; that write would go "
                  "into the quantizer's substitute and be lost. Keep it in floating point with "
                  "exclude({\"",
                  f.names[0], "\"}), or build the Embedding without max_norm");
      TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble, traits_.name,
                  ": parameter '", f.names[0], "' has dtype ", p.scalar_type(),
                  "; expected float32 or float64");
      auto q = std::make_shared<Param>();
      q->name = f.names[0];
      q->names = f.names;
      q->owner = f.owner;
      q->aux_name = f.leaf + suffix;
      q->param = p;
      q->numel = p.numel();
      at::Tensor aux = derived().init_param(*q);
      if (aux.defined()) {
        q->aux = f.owner->register_parameter(q->aux_name, aux, /*requires_grad=*/true);
      }
      params_.push_back(q);
    }
    entries_ = params_;
    entries_.insert(entries_.end(), float16_entries.begin(), float16_entries.end());
    for (auto& q : entries_) {
      hook_shared_->params.push_back(q);
      register_hook(q);
      if (q->aux.defined()) {
        // A backward that reaches the auxiliary tensor (e.g. through the penalty alone) may be
        // followed by an optimizer step that writes it through `.data()`: drop the eval cache.
        std::weak_ptr<Param> weak = q;
        q->aux_hook = q->aux.register_hook([weak](const at::Tensor&) -> at::Tensor {
          if (auto p = weak.lock()) {
            p->eval_cache.invalidate();
            Derived::aux_gradient_arrived(*p);
          }
          return at::Tensor();
        });
        q->aux_hooked = true;
      }
    }
  }

  /// Called when autograd brings a gradient to `q`'s auxiliary tensor (an optimizer step that may
  /// write it through `.data()` follows): a derived quantizer drops what it keeps computed from the
  /// tensor's values. Default: nothing.
  static void aux_gradient_arrived(Param&) {}

  /// Registers the gradient hook (if the parameter requires grad); it holds weak references to the
  /// parameter state and to what the hooks share. The first hook to fire in a backward pass queues
  /// the sweep that restores, once the pass is done, the parameters it did not reach.
  void register_hook(const std::shared_ptr<Param>& q) {
    if (!q->param.requires_grad()) return;
    std::weak_ptr<Param> weak = q;
    std::weak_ptr<detail::HookShared> shared = hook_shared_;
    std::string name = traits_.name;
    std::string aux_kind = traits_.aux_kind;
    q->hook = q->param.register_hook([weak, shared, name,
                                      aux_kind](const at::Tensor& grad) -> at::Tensor {
      auto q = weak.lock();
      if (!q) return at::Tensor();
      // An optimizer step follows any backward that reaches the parameter and may write through
      // `.data()` (LibTorch's SGD), unseen by the version counter: the eval cache must not
      // outlive it, whether or not the forward was the quantizer's.
      q->eval_cache.invalidate();
      // A frozen auxiliary tensor gets no gradient; one left from before it was frozen (LibTorch
      // 1.13's zero_grad() zeroes gradients, it does not undefine them) is dropped, since
      // optimizers step every tensor whose `.grad` is defined (Adam's moments would move it).
      if (q->aux.defined() && !q->aux.requires_grad() && q->aux.grad().defined()) {
        q->aux.mutable_grad() = at::Tensor();
      }
      if (!q->pending) {
        // The same graph again: the accumulator the hook saw then, with no edge added since
        // (a new graph, e.g. a regularizer on the clean weights, adds one).
        const auto acc = torch::autograd::impl::try_get_grad_accumulator(q->param);
        const bool same_accumulator = acc && q->ended_accumulator.lock().get() == acc.get();
        const bool same_graph = q->ended_by_backward && same_accumulator &&
                                static_cast<int64_t>(acc.use_count()) <= q->ended_accumulator_uses;
        TORCH_CHECK(
            !same_graph, name, "::backward: a gradient reached parameter '", q->name,
            "' after an earlier backward had restored its clean weights: this "
            "backward would see them instead of the forward's substitute",
            aux_kind.empty() ? std::string() : ", and give the " + aux_kind + " no gradient",
            ". A second backward through the same forward (retain_graph), or "
            "through a second forward that shared the substitute, is not supported: add "
            "the losses and call backward() once");
        return at::Tensor();
      }
      at::Tensor result;
      const bool overwritten = detail::is_overwritten(*q);
      if (q->state == WeightState::kNoisy && !overwritten) {
        result = Derived::training_backward(*q, grad);
      }
      detail::restore(*q);
      q->ended_by_backward = true;
      {
        const auto acc = torch::autograd::impl::try_get_grad_accumulator(q->param);
        q->ended_accumulator = acc;
        q->ended_accumulator_uses = acc ? static_cast<int64_t>(acc.use_count()) : 0;
      }
      TORCH_CHECK(!overwritten, overwritten_message(name, "backward", {q->name}));
      auto s = shared.lock();
      if (s && !s->sweep_queued) {
        s->sweep_queued = true;
        torch::autograd::Engine::get_default_engine().queue_callback([shared] {
          auto s = shared.lock();
          if (!s) return;
          s->sweep_queued = false;
          // Parameters the forward may not have used, and frozen ones: their backward is
          // over. (A parameter the forward surely used stays for a later backward of that
          // forward's graph, e.g. of another of its outputs.)
          for (const auto& w : s->params) {
            auto p = w.lock();
            if (p && p->pending && (p->maybe_unused || !p->param.requires_grad())) {
              detail::restore(*p);
              p->eval_cache.invalidate();
            }
          }
        });
      }
      return result;
    });
    q->hooked = true;
  }

  void restore_all() {
    for (auto& q : entries_) detail::restore(*q);
  }

  /// Names of the parameters whose substitute was written in place.
  std::vector<std::string> overwritten_substitutes() const {
    std::vector<std::string> names;
    for (const auto& q : entries_) {
      if (detail::is_overwritten(*q)) names.push_back(q->name);
    }
    return names;
  }

  std::string overwritten_message(const char* what, const std::vector<std::string>& names,
                                  bool restored = true) const {
    return overwritten_message(traits_.name, what, names, restored);
  }

  /// The message for substitutes written in place; `restored`: the clean weights are back.
  static std::string overwritten_message(const std::string& quantizer, const char* what,
                                         const std::vector<std::string>& names,
                                         bool restored = true) {
    std::string list;
    for (const auto& n : names) list += (list.empty() ? "'" : ", '") + n + "'";
    const bool one = names.size() == 1;
    return quantizer + "::" + what + (one ? ": parameter " : ": parameters ") + list +
           (one ? " was" : " were") +
           " written in place while holding a substitute (the noisy or quantized weights of "
           "a training forward awaiting its backward, the quantized weights of an eval forward "
           "run with grad mode on, or of quantize()); " +
           (restored ? "the write is lost: the clean weights were restored"
                     : "the clean weights do not hold the write") +
           ". Run eval forwards under torch::NoGradGuard, call "
           "restore_clean_weights() before writing into the parameters (optimizer.step(), "
           "loading), and take the gradients of training forwards with backward() "
           "(torch::autograd::grad does not run the quantizer's gradient hooks)";
  }

  /// `restore_all`, then throws if a substitute had been written in place (that write is lost).
  void restore_all_checked(const char* what) {
    const auto lost = overwritten_substitutes();
    restore_all();
    TORCH_CHECK(lost.empty(), overwritten_message(what, lost));
  }

  /// Sets aside `q`'s training substitute (awaiting its backward) and gives it the true quantized
  /// weights for a no-grad eval forward (`detail::park`; `detail::unpark` puts it back).
  void park(Param& q) { detail::park(q, cached_quantized(q)); }

  /// After a forward threw: undoes the substitutes it gave, puts back what it set aside.
  void roll_back_forward() {
    for (auto& q : entries_) detail::roll_back(*q);
  }

  /// The true quantized weights of `q`'s clean values, from the cache while the weights and the
  /// auxiliary tensor are unchanged.
  const at::Tensor& cached_quantized(Param& q) {
    at::NoGradGuard no_grad;
    const auto w = detail::clean_of(q);
    const int64_t aux_version = q.aux.defined() ? q.aux._version() : 0;
    // A trainable parameter without a hook (frozen when the quantizer was built) may have had a
    // backward and an SGD step unseen: no cache for it.
    const bool valid =
        (q.hooked || !q.param.requires_grad()) && q.eval_cache.holds(q.param, w, aux_version);
    if (!valid) {
      q.eval_cache.store(q.float16_stored ? w.to(at::kHalf).to(w.scalar_type())
                                          : derived().quantized_weights(q, w),
                         q.param, w, aux_version);
    }
    return q.eval_cache.quantized;
  }

  /// Sets the true quantized weights (cached while the weights and auxiliary tensor are unchanged).
  void set_quantized(Param& q, WeightState state = WeightState::kQuantized) {
    detail::restore(q);
    detail::substitute(q, cached_quantized(q), state);
  }

  /// Bits of the parameters that are not quantized (32 or 16 per element), each tensor once.
  double unquantized_bits() const {
    std::unordered_map<const void*, bool> counted;
    for (const auto& q : params_) counted[q->param.unsafeGetTensorImpl()] = true;
    double other_bits = 0;
    for (const auto& p : model_->parameters(/*recurse=*/true)) {
      const void* impl = p.unsafeGetTensorImpl();
      if (counted.count(impl) || is_aux(p)) continue;
      counted[impl] = true;
      other_bits += static_cast<double>(p.numel() * float_bits(options_.float16()));
    }
    return other_bits;
  }

  /// `size_bits` and `sum_bits` of a quantizer with one fixed bit width for every tensor.
  static at::Tensor fixed_width_size_bits(const Param& q, int64_t bits) {
    return at::scalar_tensor(static_cast<double>(diffq::fixed_width_size_bits(q.numel, bits)),
                             at::TensorOptions().dtype(at::kDouble));
  }
  static double fixed_width_sum_bits(const Param& q, int64_t bits) {
    return static_cast<double>(bits * q.numel);
  }

  at::Tensor size_mb(bool exact) const {
    at::Tensor total;
    for (const auto& q : params_) {
      auto t = derived().size_bits(*q, exact);
      total = total.defined() ? total + t : t;
    }
    const double other_bits = unquantized_bits();
    if (!total.defined()) {
      return at::scalar_tensor(other_bits / kBitsPerMB, at::TensorOptions().dtype(at::kDouble));
    }
    return (total + other_bits) / kBitsPerMB;
  }

  void pre_forward() {
    const bool training = model_->is_training();
    const bool grad = at::GradMode::is_enabled();
    // A training forward ends `quantize()`, as the reference's training pre-forward does: it
    // trains the clean weights (a write into the quantized ones is refused, not lost).
    if (training && manual_quantized_) {
      manual_quantized_ = false;
      restore_all_checked("forward");
    }
    if (training && traits_.needs_optimizer) {
      TORCH_CHECK(optimizer_ready_, traits_.name,
                  "::forward: call setup_optimizer(optimizer) (or no_optimizer()) before a ",
                  "training forward");
    }
    for (auto& q : entries_) {
      q->touched = false;
      q->accumulator_uses = detail::accumulator_uses(*q);
    }
    if (!overwritten_substitutes().empty()) restore_all_checked("forward");  // throws
    hook_shared_->sweep_queued = false;  // a backward that failed did not run its sweep
    // A frozen parameter's pending substitute (no hook, no accumulator of its own) is shared with
    // this training forward while a hooked parameter's backward is still to come: the graph it was
    // kept for may be that backward's.
    const bool backward_to_come =
        training && !manual_quantized_ &&
        std::any_of(entries_.begin(), entries_.end(),
                    [](const std::shared_ptr<Param>& p) { return detail::awaiting_backward(*p); });
    for (auto& q : entries_) {
      // A parameter frozen when the quantizer was built and trainable now has no hook yet (the
      // hook also drops the eval cache when a backward reaches the parameter): register it, in
      // every mode (training may run through the model's own forward, evaluation through this),
      // and drop the cache, which a backward and an SGD step may have outdated unseen.
      if (!q->hooked && q->param.requires_grad()) {
        register_hook(q);
        q->eval_cache.invalidate();
      }
      if (manual_quantized_) {
        if (q->state != WeightState::kQuantized) {
          q->touched = true;
          set_quantized(*q);
        }
      } else if (training) {
        // The optimizer step that follows a training step may write through `.data()` (LibTorch's
        // SGD does), which leaves the version counters alone: the eval cache cannot trust them.
        q->eval_cache.invalidate();
        if (q->float16_stored) {  // trained in full precision
          detail::restore(*q);
          continue;
        }
        // Several forwards before one backward share one training substitute.
        if (!detail::awaiting_backward(*q) &&
            !(backward_to_come && detail::may_await_backward(*q))) {
          detail::restore(*q);
          q->touched = true;
          derived().set_training(*q);
          TORCH_CHECK(!grad || q->state == WeightState::kClean || q->param.requires_grad() ||
                          !aux_trained_ || !q->aux.defined() || !q->aux.requires_grad(),
                      traits_.name, "::forward: parameter '", q->name,
                      "' does not require grad, so its ", traits_.aux_kind,
                      " cannot learn (its gradient comes from the parameter's); set "
                      "requires_grad(true) and leave the parameter out of the optimizer to keep "
                      "it fixed, exclude it from quantization, or run the forward under "
                      "torch::NoGradGuard");
        }
      } else if (detail::awaiting_backward(*q)) {
        TORCH_CHECK(!grad, traits_.name,
                    "::forward: an eval forward with grad mode on while "
                    "parameter '",
                    q->name,
                    "' holds the substitute of a training forward whose "
                    "backward is still to come; run the eval forward under torch::NoGradGuard, "
                    "call backward() first, or restore_clean_weights() to drop that training "
                    "forward");
        park(*q);
      } else if (!grad && detail::may_await_backward(*q)) {
        park(*q);
      } else {
        q->touched = true;
        set_quantized(*q);
      }
    }
  }

  void post_forward() {
    for (auto& q : entries_) q->touched = false;
    if (manual_quantized_) return;
    const bool grad = at::GradMode::is_enabled();
    // Substituted parameters in a live graph, with a hook to end their substitute: 2 if this
    // forward surely used them (their accumulator gained edges), 1 if maybe (an older graph may
    // be what keeps the accumulator alive).
    std::vector<int> in_graph(entries_.size(), 0);
    bool surely_used = false;
    for (std::size_t i = 0; grad && i < entries_.size(); ++i) {
      const auto& q = entries_[i];
      if (q->parked.defined() || q->state == WeightState::kClean || !q->hooked ||
          !q->param.requires_grad()) {
        continue;
      }
      const int64_t uses = detail::accumulator_uses(*q);
      if (uses == 0) continue;
      in_graph[i] = uses > q->accumulator_uses ? 2 : 1;
      surely_used = surely_used || in_graph[i] == 2;
    }
    for (std::size_t i = 0; i < entries_.size(); ++i) {
      auto& q = entries_[i];
      if (q->parked.defined()) {
        detail::unpark(*q);
        continue;
      }
      if (q->state == WeightState::kClean) continue;
      // A frozen parameter has no hook: it keeps its substitute for the backward only if a hook
      // will fire in it (and queue the sweep that restores it), else it is restored now.
      const bool frozen_kept = grad && !q->param.requires_grad() && surely_used;
      if (in_graph[i] > 0 || frozen_kept) {
        q->maybe_unused = (q->pending ? q->maybe_unused : true) && in_graph[i] != 2;
        q->pending = true;
      } else if (!q->pending) {
        detail::restore(*q);
      }
    }
  }

  std::shared_ptr<Impl> model_;
  Options options_;
  detail::QuantizerTraits traits_;
  std::vector<std::shared_ptr<Param>> params_;  ///< the quantized parameters
  /// Every parameter whose data the quantizer substitutes: `params_`, then the non-quantized
  /// ones rounded through fp16 (`float16`).
  std::vector<std::shared_ptr<Param>> entries_;
  std::shared_ptr<detail::HookShared> hook_shared_ = std::make_shared<detail::HookShared>();
  bool optimizer_ready_ = false;
  bool aux_trained_ = false;  ///< `setup_optimizer` was called (not only `no_optimizer`)
  bool manual_quantized_ = false;
  bool detached_ = false;
};

/// RAII guard: true quantized weights (`quantize()`) for its lifetime, then `unquantize()`.
/// Works with every quantizer.
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
