#pragma once
/// \file diffq/budget.h
/// Training DiffQ to a model-size budget without tuning the penalty weight λ: the task loss is
/// minimised subject to `true_model_size() <= target_mb`, with λ a Lagrange multiplier that
/// `diffq::SizeBudget` adjusts by dual ascent during training, and `diffq::lower_bits_to_fit`
/// (called by `SizeBudget::finalize`) guaranteeing the budget on the exported model.
///
/// \code
///   torch::optim::Adam opt(model->parameters(), 1e-3);
///   diffq::DiffQuantizer<Net> q(model, diffq::DiffQOptions().group_size(16));
///   q.setup_optimizer(opt, 1e-2);
///   diffq::SizeBudget budget(q, /*target_mb=*/0.13);
///   for (...) {
///     opt.zero_grad();
///     auto loss = ce(q.forward(x), y) + budget.loss_term();
///     loss.backward();
///     opt.step();
///     budget.step();
///   }
///   auto report = budget.finalize();  // now q.true_model_size() <= 0.13
///   diffq::save_quantized(q, "model.dq");
/// \endcode
///
/// The constrained problem `min_θ L(θ) s.t. size(θ)/T − 1 <= 0` has the Lagrangian
/// `L(θ) + λ·(size(θ)/T − 1)`; its θ-gradient is that of `L + λ·penalty()/T`. Dividing by the
/// target T makes λ dimensionless (the relative size), so one update rate serves every model and
/// budget. `step()` ascends the dual in log space, `λ ← λ·exp(lr·c)`, with c the relative
/// violation `(true_model_size − T)/T` clipped to `±max_violation`: λ stays positive, rises while
/// the model is over the budget and falls while it is under, and a factor of overshoot in λ takes
/// as long to undo as to build up.
///
/// Pure dual ascent overshoots here: the bit widths follow λ with a lag (their logits move by
/// about the optimizer's learning rate per step whatever λ is), so by the time the size reaches
/// the budget, λ has kept rising for hundreds of steps and drives the size well under it. The
/// loss term therefore adds a proportional factor, as in the PID Lagrangian of Stooke, Achiam and
/// Abbeel (ICML 2020, arXiv 2007.03964), here in log space: `loss_term() = λ·exp(proportional·c)·
/// penalty()/T`, c from the last measurement. Over the budget by more than `max_violation` the
/// weight is `exp(proportional·max_violation)` times λ (e^2 by default), so the size falls early
/// at a small λ; as the size nears the budget the factor falls to 1, and under it to as little as
/// e^−2, before λ itself has had time to fall. On the Fashion-MNIST CNN (3 epochs) training ends
/// within 2 % of budgets from 0.115 to 0.25 MB with the defaults, where pure dual ascent
/// (`proportional(0)`, λ from 1e-3, `max_violation(0.2)`) took a 0.13 MB budget down to 0.115 MB
/// (docs/fashion_mnist.md). `finalize()` then makes the model fit. Measuring the true size reads
/// the bit widths back to the host, so it happens every `measure_every` steps only (k = 10 by
/// default: one synchronisation per 10 steps).

#include <diffq/bits.h>
#include <diffq/options.h>
#include <diffq/quantizer.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/arg.h>
#include <torch/serialize/archive.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <queue>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace diffq {

/// Options of `diffq::SizeBudget`, chainable: `SizeBudgetOptions().lr(0.5).measure_every(5)`.
struct SizeBudgetOptions {
  /// Rate of the multiplier's update, per measurement: `log λ += lr·c` (c the clipped relative
  /// violation; `budget_lambda_update`). Must be > 0 and finite.
  TORCH_ARG(double, lr) = 0.5;
  /// Gain of the proportional factor of the loss term, `exp(proportional·c)`
  /// (`budget_penalty_weight`); 0: pure dual ascent. Must be >= 0 and finite.
  TORCH_ARG(double, proportional) = 20;
  /// λ at the first step (dimensionless: `loss_term = λ·exp(proportional·c)·penalty()/
  /// target_mb`). Small, so that a large budget is not overshot at the start, when the task loss
  /// barely depends on the bit widths. Must be in `[min_lambda, max_lambda]`.
  TORCH_ARG(double, initial_lambda) = 1e-3;
  /// Bounds of λ. Must satisfy `0 < min_lambda <= max_lambda`, both finite.
  TORCH_ARG(double, min_lambda) = 1e-6;
  TORCH_ARG(double, max_lambda) = 1e3;
  /// The relative violation is clipped to `[−max_violation, max_violation]` before the update and
  /// the proportional factor, so that a model far over the budget (at the start, every group at
  /// `init_bits`) does not raise λ much faster than a model under it can lower it. Must be > 0 and
  /// finite.
  TORCH_ARG(double, max_violation) = 0.1;
  /// Steps (calls of `step()`) during which nothing is measured; the first measurement comes at
  /// step `warmup_steps + measure_every`, and λ stays `initial_lambda` until then. Must be >= 0.
  TORCH_ARG(int64_t, warmup_steps) = 0;
  /// The true model size is measured, and λ updated, every `measure_every` steps after the
  /// warm-up (k; one host synchronisation each). Must be >= 1.
  TORCH_ARG(int64_t, measure_every) = 10;
};

/// One measurement of `SizeBudget`: after `step` calls of `step()`, the true model size (MB) and
/// its relative violation `(size − target)/target` (unclipped), the multiplier λ after the update
/// and the weight of `penalty()` in the loss from then on (`SizeBudget::penalty_weight()`, per MB).
struct SizeBudgetRecord {
  int64_t step = 0;
  double size_mb = 0;
  double violation = 0;
  double lambda = 0;
  double penalty_weight = 0;
};

/// A group whose bit width `lower_bits_to_fit` lowered: tensor `name` (first name of tied ones),
/// group index, and the true-quantization bit widths before and after.
struct LoweredGroup {
  std::string name;
  int64_t group = 0;
  int64_t bits_before = 0;
  int64_t bits_after = 0;
};

/// What `lower_bits_to_fit` did: the true model sizes (MB) before and after, the target, and the
/// groups it lowered (in discovery order of the tensors, then group index; empty when the model
/// already fitted).
struct FitReport {
  double target_mb = 0;
  double size_before_mb = 0;
  double size_after_mb = 0;
  std::vector<LoweredGroup> lowered;
};

namespace detail {

/// Throws unless `target_mb` is finite, > 0 and at least `quantizer.min_true_model_size()` (the
/// message gives that floor).
template <typename Quantizer>
void check_size_budget(const Quantizer& quantizer, double target_mb, const std::string& where) {
  TORCH_CHECK(std::isfinite(target_mb) && target_mb > 0, where,
              ": target_mb must be finite and > 0, got ", target_mb);
  const double floor_mb = quantizer.min_true_model_size();
  TORCH_CHECK(target_mb >= floor_mb, where, ": target_mb must be >= ", floor_mb,
              " MB, the smallest size the model can have (every group at ",
              lowest_rounded_bits(quantizer.options().min_bits(), quantizer.options().extra_bits()),
              " bits, plus the tensors kept in floating point), got ", target_mb, " MB");
}

}  // namespace detail

/// The relative violation of a budget, `(size_mb − target_mb)/target_mb` (pure).
inline double relative_violation(double size_mb, double target_mb) {
  return (size_mb - target_mb) / target_mb;
}

/// `relative_violation(size_mb, target_mb)` clipped to `[−max_violation, max_violation]` (pure).
inline double clipped_violation(double size_mb, double target_mb, const SizeBudgetOptions& o) {
  const double v = relative_violation(size_mb, target_mb);
  return std::min(std::max(v, -o.max_violation()), o.max_violation());
}

/// The multiplier's update rule of `SizeBudget::step` (pure), dual ascent in log space:
/// `clamp(λ·exp(lr·c), min_lambda, max_lambda)`, `c = clipped_violation(size_mb, target_mb)`.
/// λ rises while the size is over the target, falls while under.
inline double budget_lambda_update(double lambda, double size_mb, double target_mb,
                                   const SizeBudgetOptions& o) {
  const double c = clipped_violation(size_mb, target_mb, o);
  return std::min(std::max(lambda * std::exp(o.lr() * c), o.min_lambda()), o.max_lambda());
}

/// The weight of `penalty()` (MB) in `SizeBudget::loss_term` (pure), per MB: multiplier λ times
/// the proportional factor `exp(proportional·c)` (c the clipped violation of the last
/// measurement; 0 before the first), divided by the target:
/// `λ·exp(proportional·c)/target_mb`.
inline double budget_penalty_weight(double lambda, double clipped_violation, double target_mb,
                                    const SizeBudgetOptions& o) {
  return lambda * std::exp(o.proportional() * clipped_violation) / target_mb;
}

/// Lowers bit widths of `quantizer` until `true_model_size() <= target_mb`, by this rule: while
/// the model is over the target, the group whose learnt bit width `b + extra_bits` lies closest
/// above its rounding-down boundary `r − ½` (`r` its true-quantization bit width: the group that
/// training left closest to rounding down) loses one bit, its logit set to the middle of the
/// bit widths that round to `r − 1` (`bits_interval_of_rounded`); ties go to the earlier tensor
/// (discovery order), then the lower group index. A lowered group competes again with its new
/// distance. Groups at `lowest_rounded_bits` are not lowered. The saving of one bit is counted as
/// the group's element count (the bits that store the bit widths, which can only shrink, are not
/// counted), so the model fits when the rule stops (at the latest with every group at the
/// floor). The logits are written in place (under
/// `NoGradGuard`; their version counters move, so the quantizer's eval cache and penalty terms
/// follow); evaluation, `quantized_state` and `save_quantized` then use the new bit widths.
/// Nothing changes when the model already fits. Throws if `target_mb` is not finite or below
/// `quantizer.min_true_model_size()` (naming it), and on NaN logits.
template <typename ModuleType>
FitReport lower_bits_to_fit(DiffQuantizer<ModuleType>& quantizer, double target_mb) {
  const std::string where = "diffq::lower_bits_to_fit";
  detail::check_size_budget(quantizer, target_mb, where);
  FitReport report;
  report.target_mb = target_mb;
  report.size_before_mb = quantizer.true_model_size();
  report.size_after_mb = report.size_before_mb;
  if (report.size_before_mb <= target_mb) return report;

  const auto& o = quantizer.options();
  const int64_t lowest = lowest_rounded_bits(o.min_bits(), o.extra_bits());
  const auto names = quantizer.quantized_names();
  const auto params = quantizer.model()->named_parameters(/*recurse=*/true);
  struct Groups {
    std::vector<double> bits;       // learnt b per group (double copies of the float values)
    std::vector<int64_t> rounded;   // true-quantization bit widths, updated as groups lower
    std::vector<int64_t> original;  // before
    std::vector<int64_t> counts;    // elements per group
  };
  std::vector<Groups> tensors(names.size());
  // (distance above the rounding-down boundary, tensor, group): smallest first.
  using Entry = std::tuple<double, std::size_t, int64_t>;
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  for (std::size_t t = 0; t < names.size(); ++t) {
    // Rounded as true quantization rounds them (in the logits' dtype), on the host.
    const at::Tensor native = quantizer.bits(names[t]).detach().cpu();
    const at::Tensor b = native.to(at::kDouble).contiguous();
    const at::Tensor r = rounded_bits(native, o.extra_bits(), names[t]).to(at::kLong).contiguous();
    const int64_t groups = b.numel();
    const GroupLayout layout(params[names[t]].numel(), o.group_size());
    TORCH_INTERNAL_ASSERT(layout.groups == groups);
    auto& T = tensors[t];
    T.bits.assign(b.data_ptr<double>(), b.data_ptr<double>() + groups);
    T.rounded.assign(r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + groups);
    T.original = T.rounded;
    T.counts.assign(groups, layout.group_size);
    if (groups > 0) T.counts[groups - 1] = layout.last_group_numel;
    for (int64_t g = 0; g < groups; ++g) {
      if (T.rounded[g] > lowest) {
        heap.emplace(T.bits[g] + o.extra_bits() - (T.rounded[g] - 0.5), t, g);
      }
    }
  }
  double excess_bits = (report.size_before_mb - target_mb) * kBitsPerMB;
  // The heap empties only at the floor, which fits (the target is at least the floor).
  while (excess_bits > 0 && !heap.empty()) {
    const auto top = heap.top();
    heap.pop();
    auto& T = tensors[std::get<1>(top)];
    const int64_t g = std::get<2>(top);
    const int64_t r = --T.rounded[g];
    const auto interval = bits_interval_of_rounded(r, o.min_bits(), o.max_bits(), o.extra_bits());
    TORCH_INTERNAL_ASSERT(interval.first < interval.second);
    T.bits[g] = 0.5 * (interval.first + interval.second);
    excess_bits -= static_cast<double>(T.counts[g]);
    if (r > lowest) heap.emplace(T.bits[g] + o.extra_bits() - (r - 0.5), std::get<1>(top), g);
  }
  at::NoGradGuard no_grad;
  for (std::size_t t = 0; t < names.size(); ++t) {
    auto& T = tensors[t];
    std::vector<int64_t> changed;
    for (int64_t g = 0; g < static_cast<int64_t>(T.rounded.size()); ++g) {
      if (T.rounded[g] != T.original[g]) changed.push_back(g);
    }
    if (changed.empty()) continue;
    at::Tensor logit = quantizer.logit(names[t]);
    at::Tensor values = logit.detach().cpu().to(at::kDouble).contiguous();
    for (int64_t g : changed) {
      values.data_ptr<double>()[g] =
          logit_for_bits(T.bits[g], o.min_bits(), o.max_bits(), o.param());
      report.lowered.push_back({names[t], g, T.original[g], T.rounded[g]});
    }
    logit.copy_(values.to(logit.options()));
    // The quantizer's own bit widths (from the stored logits) round as the rule planned.
    const at::Tensor check =
        rounded_bits(quantizer.bits(names[t]), o.extra_bits(), names[t]).to(at::kLong);
    const at::Tensor planned = at::tensor(T.rounded, at::TensorOptions().dtype(at::kLong));
    TORCH_INTERNAL_ASSERT(at::equal(check.cpu(), planned), where, ": the new logits of '", names[t],
                          "' do not round to the planned bit widths");
  }
  report.size_after_mb = quantizer.true_model_size();
  TORCH_INTERNAL_ASSERT(report.size_after_mb <= target_mb, where, ": ", report.size_after_mb,
                        " MB after lowering, over the target ", target_mb, " MB");
  return report;
}

/// Size-budget controller of a `DiffQuantizer`: λ by dual ascent (see the file comment). It keeps
/// a reference to the quantizer, which must outlive it. Not thread-safe.
template <typename ModuleType>
class SizeBudget {
 public:
  /// Throws if `target_mb` is not finite or <= 0, if it is below the smallest size the model can
  /// have (`quantizer.min_true_model_size()`, given in the message), and on bad options (each its
  /// own message).
  SizeBudget(DiffQuantizer<ModuleType>& quantizer, double target_mb, SizeBudgetOptions options = {})
      : quantizer_(&quantizer), target_mb_(target_mb), options_(std::move(options)) {
    const std::string where = "diffq::SizeBudget";
    const auto& o = options_;
    TORCH_CHECK(std::isfinite(o.lr()) && o.lr() > 0, where, ": lr must be finite and > 0, got ",
                o.lr());
    TORCH_CHECK(std::isfinite(o.proportional()) && o.proportional() >= 0, where,
                ": proportional must be finite and >= 0, got ", o.proportional());
    TORCH_CHECK(std::isfinite(o.min_lambda()) && o.min_lambda() > 0, where,
                ": min_lambda must be finite and > 0, got ", o.min_lambda());
    TORCH_CHECK(std::isfinite(o.max_lambda()) && o.max_lambda() >= o.min_lambda(), where,
                ": max_lambda must be finite and >= min_lambda (", o.min_lambda(), "), got ",
                o.max_lambda());
    TORCH_CHECK(o.initial_lambda() >= o.min_lambda() && o.initial_lambda() <= o.max_lambda(), where,
                ": initial_lambda must be in [min_lambda, max_lambda] = [", o.min_lambda(), ", ",
                o.max_lambda(), "], got ", o.initial_lambda());
    TORCH_CHECK(std::isfinite(o.max_violation()) && o.max_violation() > 0, where,
                ": max_violation must be finite and > 0, got ", o.max_violation());
    TORCH_CHECK(o.warmup_steps() >= 0, where, ": warmup_steps must be >= 0, got ",
                o.warmup_steps());
    TORCH_CHECK(o.measure_every() >= 1, where, ": measure_every must be >= 1, got ",
                o.measure_every());
    detail::check_size_budget(quantizer, target_mb, where);
    lambda_ = o.initial_lambda();
  }

  /// The term to add to the task loss, a 0-dim tensor: `penalty_weight()·penalty()`, i.e.
  /// `λ·exp(proportional·c)·penalty()/target_mb` (see the file comment; differentiable in the
  /// logits, no host synchronisation).
  at::Tensor loss_term() const { return quantizer_->penalty() * penalty_weight(); }

  /// The weight of `penalty()` (per MB) in `loss_term()` now: `budget_penalty_weight(λ, c,
  /// target_mb)`, c the clipped violation of the last measurement (0 before the first). It is
  /// comparable to the λ of a fixed-penalty training (`loss + λ·penalty()`).
  double penalty_weight() const {
    const double c =
        history_.empty() ? 0.0 : clipped_violation(history_.back().size_mb, target_mb_, options_);
    return budget_penalty_weight(lambda_, c, target_mb_, options_);
  }

  /// Call once after each optimizer step. After `warmup_steps` calls, every `measure_every`-th
  /// call measures `true_model_size()` (one host synchronisation), updates λ by
  /// `budget_lambda_update` and appends a record to `history()`.
  void step() {
    ++step_;
    const int64_t since = step_ - options_.warmup_steps();
    if (since <= 0 || since % options_.measure_every() != 0) return;
    const double size = quantizer_->true_model_size();
    lambda_ = budget_lambda_update(lambda_, size, target_mb_, options_);
    history_.push_back({step_, size, relative_violation(size, target_mb_), lambda_, 0.0});
    history_.back().penalty_weight = penalty_weight();
  }

  /// Makes the model fit the budget (`lower_bits_to_fit(quantizer, target_mb)`) and reports what
  /// changed. Call it after training, before evaluating and exporting.
  FitReport finalize() { return lower_bits_to_fit(*quantizer_, target_mb_); }

  /// The current multiplier λ (dimensionless, > 0).
  double lambda() const { return lambda_; }
  /// The budget in MB (2^20 bytes).
  double target_mb() const { return target_mb_; }
  /// Calls of `step()` so far.
  int64_t steps() const { return step_; }
  /// Every measurement so far, oldest first.
  const std::vector<SizeBudgetRecord>& history() const { return history_; }
  /// The options.
  const SizeBudgetOptions& options() const { return options_; }

  /// Writes the controller's state (target, λ, step count, history) to `archive`, e.g. next to the
  /// optimizer's: `torch::serialize::OutputArchive a; budget.save(a); a.save_to(path)`.
  void save(torch::serialize::OutputArchive& archive) const {
    const auto d = at::TensorOptions().dtype(at::kDouble);
    archive.write("diffq_budget_target_mb", at::scalar_tensor(target_mb_, d));
    archive.write("diffq_budget_lambda", at::scalar_tensor(lambda_, d));
    archive.write("diffq_budget_step",
                  at::scalar_tensor(step_, at::TensorOptions().dtype(at::kLong)));
    auto h = at::empty({static_cast<int64_t>(history_.size()), 5}, d);
    for (std::size_t i = 0; i < history_.size(); ++i) {
      const auto& r = history_[i];
      double* row = h.data_ptr<double>() + 5 * i;
      row[0] = static_cast<double>(r.step);
      row[1] = r.size_mb;
      row[2] = r.violation;
      row[3] = r.lambda;
      row[4] = r.penalty_weight;
    }
    archive.write("diffq_budget_history", h);
  }

  /// Restores a state written by `save`, so that training resumed from the same model and
  /// optimizer state follows the same λ trajectory. Throws, changing nothing, if an entry is
  /// missing or malformed (wrong dtype or shape; λ outside this controller's bounds; a history row
  /// with a non-finite value or a step out of order), or if the state was saved for another target
  /// (naming both).
  void load(torch::serialize::InputArchive& archive) {
    const std::string where = "diffq::SizeBudget::load";
    auto read = [&](const char* key) -> at::Tensor {
      at::Tensor t;
      TORCH_CHECK(archive.try_read(key, t), where, ": the archive has no '", key,
                  "' (not a SizeBudget state)");
      return t;
    };
    const at::Tensor target = read("diffq_budget_target_mb").cpu();
    const at::Tensor lambda = read("diffq_budget_lambda").cpu();
    const at::Tensor step = read("diffq_budget_step").cpu();
    const at::Tensor h = read("diffq_budget_history").cpu();
    auto scalar = [&](const at::Tensor& t, at::ScalarType dtype, const char* name) {
      TORCH_CHECK(t.numel() == 1 && t.scalar_type() == dtype, where, ": '", name, "' must be one ",
                  dtype, " value, got ", t.numel(), " ", t.scalar_type(), " value(s)");
    };
    scalar(target, at::kDouble, "diffq_budget_target_mb");
    scalar(lambda, at::kDouble, "diffq_budget_lambda");
    scalar(step, at::kLong, "diffq_budget_step");
    TORCH_CHECK(h.dim() == 2 && h.size(1) == 5 && h.scalar_type() == at::kDouble, where,
                ": 'diffq_budget_history' must be a [n, 5] Double tensor, got ", h.sizes(), " ",
                h.scalar_type());
    const double saved_target = target.item<double>();
    TORCH_CHECK(saved_target == target_mb_, where, ": target_mb must be ", target_mb_,
                " MB (this controller's), got ", saved_target, " MB (the saved state's)");
    const auto& o = options_;
    auto in_bounds = [&](double l) {
      return std::isfinite(l) && l >= o.min_lambda() && l <= o.max_lambda();
    };
    const double l = lambda.item<double>();
    TORCH_CHECK(in_bounds(l), where, ": lambda must be in [min_lambda, max_lambda] = [",
                o.min_lambda(), ", ", o.max_lambda(), "], got ", l);
    const int64_t s = step.item<int64_t>();
    TORCH_CHECK(s >= 0, where, ": step must be >= 0, got ", s);
    std::vector<SizeBudgetRecord> history;
    const at::Tensor hc = h.contiguous();
    double previous_step = 0;
    for (int64_t i = 0; i < hc.size(0); ++i) {
      const double* row = hc.data_ptr<double>() + 5 * i;
      // Steps strictly increasing integers in [1, step]; the values finite, sizes and λ in range.
      TORCH_CHECK(std::isfinite(row[0]) && row[0] == std::floor(row[0]) && row[0] > previous_step &&
                      row[0] <= static_cast<double>(s),
                  where, ": history row ", i, ": step must be an integer in (", previous_step, ", ",
                  s, "], got ", row[0]);
      TORCH_CHECK(std::isfinite(row[1]) && row[1] > 0 && std::isfinite(row[2]) &&
                      in_bounds(row[3]) && std::isfinite(row[4]) && row[4] > 0,
                  where, ": history row ", i,
                  ": expected a finite size > 0, violation, λ in [min_lambda, max_lambda] and "
                  "penalty weight > 0, got ",
                  row[1], ", ", row[2], ", ", row[3], ", ", row[4]);
      previous_step = row[0];
      history.push_back({static_cast<int64_t>(row[0]), row[1], row[2], row[3], row[4]});
    }
    lambda_ = l;
    step_ = s;
    history_ = std::move(history);
  }

 private:
  DiffQuantizer<ModuleType>* quantizer_;
  double target_mb_;
  SizeBudgetOptions options_;
  double lambda_ = 0;
  int64_t step_ = 0;
  std::vector<SizeBudgetRecord> history_;
};

}  // namespace diffq
