#pragma once
/// \file diffq/detail/weight_state.h
/// What a quantized parameter's data holds, as a state machine: each parameter is `kClean`,
/// `kNoisy` (a training substitute) or `kQuantized` (the true quantized weights), and only the
/// named transitions below change it:
///
///     kClean --substitute(kNoisy)-----> kNoisy      a training forward (noise, QAT, LSQ)
///     kClean --substitute(kQuantized)-> kQuantized  an eval forward, quantize()
///     kNoisy --park-------------------> kQuantized  a no-grad eval forward before the backward
///     kQuantized --unpark-------------> kNoisy      after it
///     any --restore-------------------> kClean      the gradient hook, the end of quantize(), ...
///     any --roll_back-----------------> as before   a forward that threw
///
/// and one eval cache (`EvalCache`) with a single `invalidate()`. `BaseQuantizer`
/// (`diffq/base_quantizer.h`) decides when each transition runs.

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace diffq {
namespace detail {

/// The true quantized weights of a parameter's clean values, valid while the parameter's version
/// counter, its data pointer and the auxiliary tensor's version counter are those it was computed
/// from (writes through `.data()`, unseen by the counters, call `invalidate()`).
struct EvalCache {
  at::Tensor quantized;
  int64_t param_version = -1;
  int64_t aux_version = -1;
  const void* data_ptr = nullptr;

  /// Drops the cache: the next eval forward recomputes it.
  void invalidate() { param_version = -1; }
  /// Whether it holds the quantized weights of clean values `w` of `param` (of this version).
  bool holds(const at::Tensor& param, const at::Tensor& w, int64_t aux_version_now) const {
    return quantized.defined() && param_version == param._version() &&
           aux_version == aux_version_now && data_ptr == w.data_ptr() &&
           quantized.scalar_type() == w.scalar_type() && quantized.device() == w.device();
  }
  void store(at::Tensor values, const at::Tensor& param, const at::Tensor& w,
             int64_t aux_version_now) {
    quantized = std::move(values);
    param_version = param._version();
    aux_version = aux_version_now;
    data_ptr = w.data_ptr();
  }
};

/// What a quantized parameter's data currently holds.
enum class WeightState {
  kClean,      ///< the clean weights
  kNoisy,      ///< a training substitute (DiffQ's noisy weights, QAT/LSQ quantized weights)
  kQuantized,  ///< the true quantized weights (eval mode, `quantize()`)
};

/// Per-parameter state shared by every quantizer; quantizers derive their own state from it.
struct QParamBase {
  std::string name;                ///< first full dotted name
  std::vector<std::string> names;  ///< all names (several for tied parameters)
  /// Not quantized but stored as fp16 (`float16` option): eval forwards and `quantize()` give it
  /// its fp16-rounded values, as the checkpoint reloads them; training forwards leave it clean.
  bool float16_stored = false;
  std::shared_ptr<torch::nn::Module> owner;  ///< module the auxiliary tensor is registered on
  std::string aux_name;                      ///< leaf name of the auxiliary tensor on `owner`
  at::Tensor param;                          ///< the parameter (same TensorImpl as the module's)
  at::Tensor aux;  ///< learnable auxiliary tensor (DiffQ logit, LSQ step), may be undefined
  int64_t numel = 0;
  unsigned hook = 0;
  bool hooked = false;
  unsigned aux_hook = 0;  ///< gradient hook of `aux` (invalidates the eval cache)
  bool aux_hooked = false;

  WeightState state = WeightState::kClean;
  bool pending = false;  ///< a backward is expected to restore the clean values
  at::Tensor clean;      ///< the clean data while `state != kClean`
  /// `param._version()` when the substitute was given: a different value at `restore` means the
  /// substitute was written in place (e.g. `optimizer.step()`), a write that restoring loses.
  int64_t substitute_version = 0;
  /// A training substitute awaiting its backward, set aside while a no-grad eval forward runs.
  at::Tensor parked;
  bool touched = false;  ///< the current forward gave a new substitute (undone if it throws)
  /// Use count of the gradient accumulator before the forward (0: none): a forward that uses the
  /// parameter adds graph edges to it, so a count that did not grow means "maybe unused".
  int64_t accumulator_uses = 0;
  /// Pending although the forward may not have used it (an older graph keeps the accumulator
  /// alive): the sweep at the end of the next backward pass restores it if the pass did not.
  bool maybe_unused = false;
  /// The accumulator and its use count when the hook ended the substitute: a later gradient
  /// through that same accumulator with no new edge comes from the same graph.
  std::weak_ptr<torch::autograd::Node> ended_accumulator;
  int64_t ended_accumulator_uses = 0;
  /// The last substitute was ended by the gradient hook: a later gradient of the same substitute
  /// (a second backward through its graph) finds the clean weights.
  bool ended_by_backward = false;
  EvalCache eval_cache;  ///< the true quantized weights of the clean values
};

/// The clean values of a parameter (its data when clean, the saved handle otherwise).
inline at::Tensor clean_of(const QParamBase& q) {
  return q.state == WeightState::kClean ? q.param.detach() : q.clean;
}

/// Whether the parameter's substitute was written in place since it was given (its version
/// counter moved). Writes through `.data()` or `data_ptr()` do not move it, and LibTorch's SGD
/// writes through `.data()`: those go unseen.
inline bool is_overwritten(const QParamBase& q) {
  return q.state != WeightState::kClean && q.param._version() != q.substitute_version;
}

/// Use count of the parameter's gradient accumulator, 0 if no graph holds one.
inline int64_t accumulator_uses(const QParamBase& q) {
  const auto acc = torch::autograd::impl::try_get_grad_accumulator(q.param);
  return acc ? static_cast<int64_t>(acc.use_count()) : 0;
}

/// Transition kClean → `state`: gives the parameter `values` (same shape, dtype and device) until
/// the backward or `restore`.
inline void substitute(QParamBase& q, const at::Tensor& values,
                       WeightState state = WeightState::kNoisy) {
  TORCH_INTERNAL_ASSERT(q.state == WeightState::kClean);
  q.clean = q.param.detach();
  q.param.set_data(values);
  q.state = state;
  q.substitute_version = q.param._version();
  q.ended_by_backward = false;
}

/// Transition any → kClean: gives the parameter back its clean data (bit for bit). If
/// `Module::to` changed the substitute's dtype or device meanwhile, the clean data is converted
/// the same way.
inline void restore(QParamBase& q) {
  if (q.state != WeightState::kClean) {
    at::Tensor clean = q.clean;
    if (q.param.scalar_type() != clean.scalar_type() || q.param.device() != clean.device()) {
      clean = clean.to(q.param.device(), q.param.scalar_type());
    }
    q.param.set_data(clean);
    q.clean = at::Tensor();
    q.parked = at::Tensor();
    q.state = WeightState::kClean;
  }
  q.pending = false;
  q.maybe_unused = false;
}

/// Transition kNoisy → kQuantized: sets aside the training substitute (awaiting its backward)
/// and gives the parameter `quantized` for a no-grad eval forward.
inline void park(QParamBase& q, const at::Tensor& quantized) {
  TORCH_INTERNAL_ASSERT(q.state == WeightState::kNoisy);
  q.parked = q.param.detach();
  q.param.set_data(quantized);
  q.state = WeightState::kQuantized;
}

/// Transition kQuantized → kNoisy: puts back the parked training substitute.
inline void unpark(QParamBase& q) {
  q.param.set_data(q.parked);
  q.parked = at::Tensor();
  q.state = WeightState::kNoisy;
}

/// After a forward threw: undoes the substitute it gave, or puts back what it set aside.
inline void roll_back(QParamBase& q) {
  if (q.parked.defined()) {
    unpark(q);
  } else if (q.touched) {
    restore(q);
  }
  q.touched = false;
}

/// Whether `q` holds a training substitute whose backward is still to come: a grad-mode forward
/// left it pending, and the parameter is in a live graph.
inline bool awaiting_backward(const QParamBase& q) {
  return q.state == WeightState::kNoisy && q.pending && q.param.requires_grad() &&
         torch::autograd::impl::try_get_grad_accumulator(q.param) != nullptr;
}

/// `awaiting_backward`, or a frozen parameter's pending training substitute (no hook or graph
/// tells whether its backward is still to come).
inline bool may_await_backward(const QParamBase& q) {
  return awaiting_backward(q) ||
         (q.state == WeightState::kNoisy && q.pending && !q.param.requires_grad());
}

}  // namespace detail
}  // namespace diffq
