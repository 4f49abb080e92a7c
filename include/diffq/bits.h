#pragma once
/// \file diffq/bits.h
/// Pure math of DiffQ as free functions: bit widths from logits, the quantization unit and its
/// derivative, uniform quantization with per-tensor min/max and per-group bit widths, and the
/// model-size formula. Sources: Défossez, Adi, Synnaeve, arXiv 2104.09987 (Sections 3.1–3.3), and
/// the reference implementation (facebookresearch/diffq, `diffq/diffq.py`).

#include <diffq/detail/level_kernels.h>
#include <diffq/options.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>

namespace diffq {

/// How a tensor of `numel` elements splits into groups of `group_size` consecutive elements (in
/// the flattened tensor) sharing one bit width: every group but the last holds `group_size`
/// elements, the last `last_group_numel` in `[1, group_size]` (it may be partial).
/// `group_size == 0` in the options means one group for the whole tensor. The one home of the
/// rule for the partial last group: kernels, penalty, sizes and the size budget use it.
struct GroupLayout {
  int64_t numel = 0;
  int64_t group_size = 1;        ///< effective group size (> 0): `numel` for option 0
  int64_t groups = 0;            ///< `ceil(numel / group_size)`; 0 for an empty tensor
  int64_t last_group_numel = 0;  ///< elements of the last group; 0 for an empty tensor

  GroupLayout() = default;
  /// Throws if `numel < 0` or `group_size < 0` (`group_size == 0`: one group per tensor).
  GroupLayout(int64_t numel_, int64_t group_size_option) : numel(numel_) {
    TORCH_CHECK(numel >= 0, "diffq::GroupLayout: numel must be >= 0, got ", numel);
    TORCH_CHECK(group_size_option >= 0, "diffq::GroupLayout: group_size must be >= 0, got ",
                group_size_option);
    group_size = group_size_option == 0 ? std::max<int64_t>(numel, 1) : group_size_option;
    groups = numel == 0 ? 0 : (numel + group_size - 1) / group_size;
    last_group_numel = numel - std::max<int64_t>(groups - 1, 0) * group_size;
  }

  /// `Σ_g n_g·x_g` from `sum = Σ_g x_g` and `last() = x_{groups−1}`: every group counted with
  /// `group_size` elements, then the partial last group corrected. `S`: double or a 0-dim tensor;
  /// `last` is called only for a partial last group (no indexing op when every group is full).
  template <typename S, typename Last>
  S element_sum(const S& sum, Last last) const {
    if (last_group_numel == group_size) return sum * static_cast<double>(group_size);
    return sum * static_cast<double>(group_size) -
           last() * static_cast<double>(group_size - last_group_numel);
  }
};

/// Number of groups of a tensor of `numel` elements: `ceil(numel / group_size)`, or 1 when
/// `group_size == 0` (one group per tensor). A tensor with no element has 0 groups.
/// Throws if `numel < 0` or `group_size < 0`.
inline int64_t num_groups(int64_t numel, int64_t group_size) {
  TORCH_CHECK(numel >= 0, "diffq::num_groups: numel must be >= 0, got ", numel);
  TORCH_CHECK(group_size >= 0, "diffq::num_groups: group_size must be >= 0, got ", group_size);
  return GroupLayout(numel, group_size).groups;
}

/// Effective group size: `group_size`, or `numel` when `group_size == 0`.
inline int64_t effective_group_size(int64_t numel, int64_t group_size) {
  return GroupLayout(numel, group_size).group_size;
}

/// Element count of the last group of a tensor of `numel > 0` elements (the others hold
/// `effective_group_size` each), in `[1, effective_group_size]`.
inline int64_t last_group_numel(int64_t numel, int64_t group_size) {
  return GroupLayout(numel, group_size).last_group_numel;
}

/// Smallest (`min_noise`) and largest (`max_noise`) relative noise scales of `Param::kNoise`:
/// `1/(2^max_bits − 1)` and `1/(2^min_bits − 1)`.
inline double min_noise_scale(double max_bits) {
  return 1.0 / (std::exp2(max_bits) - 1.0);
}
inline double max_noise_scale(double min_bits) {
  return 1.0 / (std::exp2(min_bits) - 1.0);
}

// GCC keeps float clamps out of vectorized loops under its default -ftrapping-math; the CPU
// kernels raise no floating-point exception that anyone reads, so they and the scalar math they
// inline opt out (clang vectorizes anyway).
#ifndef DIFFQ_VECTORIZE_CLAMPS
#if defined(__GNUC__) && !defined(__clang__)
#define DIFFQ_VECTORIZE_CLAMPS __attribute__((optimize("no-trapping-math")))
#else
#define DIFFQ_VECTORIZE_CLAMPS
#endif
#endif
#if defined(__GNUC__) || defined(__clang__)
#define DIFFQ_MATH_INLINE inline __attribute__((always_inline))
#else
#define DIFFQ_MATH_INLINE inline
#endif

namespace detail {

// ---- The parametrisation of the bit widths by logits, written once ----
// Scalar templates in the precision `T` (float in the CPU kernels, double elsewhere) with the
// `2^x` of the caller (`Exp2`: an approximation in the kernels, `std::exp2` elsewhere). Every
// scalar computation of bit widths, their slopes and the quantization units calls these; the
// ATen expressions of the reference path (`bits_from_logit`, the tensor `unit_from_logit`) are
// their only other statement. Source: reference implementation, `DiffQuantizer._get_bits`.

constexpr double kLn2 = 0.693147180559945309417;
constexpr double kLog2e = 1.442695040888963407360;

/// `2^x` by `std::exp2`.
struct Exp2Exact {
  double operator()(double x) const { return std::exp2(x); }
};

/// `t = sigmoid(l)` and `dt = dt/dl = t(1 − t)`.
template <typename T>
struct SigmoidTerms {
  T t, dt;
};

/// `sigmoid_terms` in double from `e = exp(−|l|) <= 1`: no overflow and no cancellation for any
/// finite `l`.
inline SigmoidTerms<double> sigmoid_terms(double l) {
  const double e = std::exp(-std::abs(l));
  return {l >= 0 ? 1.0 / (1.0 + e) : e / (1.0 + e), e / ((1.0 + e) * (1.0 + e))};
}

/// The kernels' `sigmoid_terms`, in `T` with `exp2`: `e = 2^(−l·log2 e)`, `t = 1/(1 + e)`,
/// `dt = e·t²` (no cancellation). `exp2` must not overflow to inf for large `−l` (the kernels'
/// approximation clamps its argument).
template <typename T, typename Exp2>
DIFFQ_VECTORIZE_CLAMPS DIFFQ_MATH_INLINE SigmoidTerms<T> sigmoid_terms(T l, Exp2 exp2) {
  const T e = exp2(-l * static_cast<T>(kLog2e));
  const T t = static_cast<T>(1) / (static_cast<T>(1) + e);
  return {t, e * t * t};
}

/// The constants of one parametrisation in `T`, from `min_bits` and `max_bits`.
template <typename T>
struct BitsParam {
  T min_bits;  ///< `Param::kBits`: `b = min_bits + range·t`
  T range;     ///< `max_bits − min_bits`
  T unit_k;    ///< `−ln 2·range`: `d unit/d logit = unit_k·(u + u²)·dt` (`Param::kBits`)
  T log_max;   ///< `Param::kNoise`: `log s = log_max + span·t`, `log_max = log max_noise_scale`
  T span;      ///< `log min_noise_scale − log max_noise_scale` (< 0)

  BitsParam(double min_bits_, double max_bits_)
      : min_bits(static_cast<T>(min_bits_)),
        range(static_cast<T>(max_bits_ - min_bits_)),
        unit_k(static_cast<T>(-kLn2) * static_cast<T>(max_bits_ - min_bits_)),
        log_max(static_cast<T>(std::log(max_noise_scale(min_bits_)))),
        span(static_cast<T>(std::log(min_noise_scale(max_bits_))) -
             static_cast<T>(std::log(max_noise_scale(min_bits_)))) {}
};

/// A group's bit width `b` and its slope `db/dl`.
template <typename T>
struct BitsAndSlope {
  T bits, dbits;
};

/// The quantization unit `u = 1/(2^b − 1)` (the noise scale relative to `max − min`) and
/// `du/dl`.
template <typename T>
struct UnitAndSlope {
  T unit, dunit;
};

/// The noise scale `s = exp(log_max + span·t)` of `Param::kNoise`.
template <typename T, typename Exp2>
DIFFQ_VECTORIZE_CLAMPS DIFFQ_MATH_INLINE T noise_scale(T t, const BitsParam<T>& c, Exp2 exp2) {
  return exp2((c.log_max + c.span * t) * static_cast<T>(kLog2e));
}

/// `b(l)` and `db/dl` from `sigmoid_terms(l)`:
/// - `Param::kBits`: `b = min_bits + range·t`, `db/dl = range·t(1 − t)`;
/// - `Param::kNoise`: `b = log2(1 + 1/s)`, `db/dl = −span·t(1 − t)/(ln 2·(1 + s))`.
template <Param P, typename T, typename Exp2>
DIFFQ_VECTORIZE_CLAMPS DIFFQ_MATH_INLINE BitsAndSlope<T> bits_and_slope(SigmoidTerms<T> st,
                                                                        const BitsParam<T>& c,
                                                                        Exp2 exp2) {
  if (P == Param::kBits) return {c.min_bits + c.range * st.t, c.range * st.dt};
  const T s = noise_scale(st.t, c, exp2);
  return {std::log2(static_cast<T>(1) + static_cast<T>(1) / s),
          -c.span * st.dt / (static_cast<T>(kLn2) * (static_cast<T>(1) + s))};
}

/// `u` and `du/dl` from `sigmoid_terms(l)` and, for `Param::kBits`, the group's `b`:
/// - `Param::kBits`: `u = 1/(2^b − 1)`, `du/dl = −ln 2·range·(u + u²)·t(1 − t)` (`2^b·u² = u +
/// u²`);
/// - `Param::kNoise`: `u = s`, `du/dl = s·span·t(1 − t)`.
template <Param P, typename T, typename Exp2>
DIFFQ_VECTORIZE_CLAMPS DIFFQ_MATH_INLINE UnitAndSlope<T> unit_and_slope(SigmoidTerms<T> st, T bits,
                                                                        const BitsParam<T>& c,
                                                                        Exp2 exp2) {
  if (P == Param::kBits) {
    const T u = static_cast<T>(1) / (exp2(bits) - static_cast<T>(1));
    return {u, c.unit_k * (u + u * u) * st.dt};
  }
  const T s = noise_scale(st.t, c, exp2);
  return {s, s * c.span * st.dt};
}

/// `bits_and_slope` of one logit in double, for a parametrisation known at run time.
inline BitsAndSlope<double> bits_and_slope(double logit, const BitsParam<double>& c, Param param) {
  const auto st = sigmoid_terms(logit);
  return param == Param::kBits ? bits_and_slope<Param::kBits>(st, c, Exp2Exact{})
                               : bits_and_slope<Param::kNoise>(st, c, Exp2Exact{});
}

}  // namespace detail

/// Bit widths `b` from logits, differentiable (ATen ops), same shape as `logit` (`[num_groups]`).
/// - `Param::kBits`: `b = min_bits + (max_bits − min_bits)·sigmoid(logit)`;
/// - `Param::kNoise`: `s = exp(t·log(1/(2^max_bits−1)) + (1−t)·log(1/(2^min_bits−1)))`,
///   `t = sigmoid(logit)`, `b = log2(1 + 1/s)`.
/// Source: reference implementation, `DiffQuantizer._get_bits`.
inline at::Tensor bits_from_logit(const at::Tensor& logit, double min_bits, double max_bits,
                                  Param param) {
  auto t = at::sigmoid(logit);
  if (param == Param::kBits) return min_bits + (max_bits - min_bits) * t;
  const double log_min = std::log(min_noise_scale(max_bits));
  const double log_max = std::log(max_noise_scale(min_bits));
  auto scale = at::exp(t * log_min + (1 - t) * log_max);
  return at::log2(1 + 1 / scale);
}

/// The logit at which `bits_from_logit` gives exactly `bits` (up to floating point), for
/// `min_bits < bits < max_bits`. Throws otherwise.
inline double logit_for_bits(double bits, double min_bits, double max_bits, Param param) {
  TORCH_CHECK(min_bits < bits && bits < max_bits, "diffq::logit_for_bits: bits must be in (",
              min_bits, ", ", max_bits, "), got ", bits);
  // The inverse of `detail::bits_and_slope`'s `b(t)`, then of the sigmoid.
  const detail::BitsParam<double> c(min_bits, max_bits);
  const double t = param == Param::kBits ? (bits - c.min_bits) / c.range
                                         : (-std::log(std::exp2(bits) - 1.0) - c.log_max) / c.span;
  return std::log(t / (1 - t));
}

/// The quantization unit `1/(2^b − 1)` of one group (the noise scale relative to `max − min`) and
/// its derivative with respect to the group's logit, in double precision.
struct UnitAndGrad {
  double unit;          ///< `1/(2^b − 1)`
  double dunit_dlogit;  ///< `d unit / d logit`
};

/// `unit = 1/(2^b − 1)` with `b = bits_from_logit(logit)`, and its exact derivative
/// (`detail::unit_and_slope`, in double):
/// - `Param::kBits`: `d unit/d b = −2^b·ln 2/(2^b − 1)²`, `d b/d logit = (max_bits −
/// min_bits)·t(1−t)`;
/// - `Param::kNoise`: `unit = s` and `d s/d logit = s·(log min_noise − log max_noise)·t(1−t)`.
inline UnitAndGrad unit_from_logit(double logit, double min_bits, double max_bits, Param param) {
  const detail::BitsParam<double> c(min_bits, max_bits);
  const auto st = detail::sigmoid_terms(logit);
  const detail::Exp2Exact exp2;
  const auto u = param == Param::kBits
                     ? detail::unit_and_slope<Param::kBits>(
                           st, detail::bits_and_slope<Param::kBits>(st, c, exp2).bits, c, exp2)
                     : detail::unit_and_slope<Param::kNoise>(st, 0.0, c, exp2);
  return {u.unit, u.dunit};
}

/// Tensor form of `unit_from_logit`: `{unit, d unit/d logit}`, each `[num_groups]` with the dtype
/// and device of `logit`, computed with ATen ops (no autograd, no host synchronisation).
inline std::pair<at::Tensor, at::Tensor> unit_from_logit(const at::Tensor& logit, double min_bits,
                                                         double max_bits, Param param) {
  auto l = logit.detach();
  auto t = at::sigmoid(l);
  auto dt = t * (1 - t);
  if (param == Param::kBits) {
    auto p = at::exp2(min_bits + (max_bits - min_bits) * t);
    auto unit = 1 / (p - 1);
    auto dunit = p * unit * unit * dt * (-std::log(2.0) * (max_bits - min_bits));
    return {unit, dunit};
  }
  const double log_min = std::log(min_noise_scale(max_bits));
  const double log_max = std::log(max_noise_scale(min_bits));
  auto s = at::exp(t * (log_min - log_max) + log_max);
  return {s, s * dt * (log_min - log_max)};
}

/// Bit widths of true quantization: `clamp(round(b + extra_bits), 1, 15)`, as uint8 `[num_groups]`.
/// `b`: float tensor `[num_groups]` (e.g. from `bits_from_logit`). Source: reference
/// implementation, `DiffQuantizer._quantize_param`. Throws if `b` holds NaN (a NaN logit), naming
/// the group and `name` (the parameter, if given); this reads one flag back from the device.
inline at::Tensor rounded_bits(const at::Tensor& b, double extra_bits,
                               const std::string& name = "") {
  const auto nan = at::isnan(b.detach()).reshape(-1);
  if (nan.any().item<bool>()) {
    const int64_t group = at::nonzero(nan)[0][0].item<int64_t>();
    TORCH_CHECK(false, "diffq::rounded_bits: the bit width of group ", group,
                name.empty() ? std::string() : " of '" + name + "'",
                " is NaN (a NaN logit: did the training diverge?)");
  }
  return (b.detach() + extra_bits).round().clamp(1, kMaxStoredBits).to(at::kByte);
}

/// Lowest bit width of true quantization (`rounded_bits`) that a group can reach: the smallest
/// integer `r` in [1, 15] with `round(b + extra_bits) == r` for some `b` in `(min_bits,
/// max_bits)`, i.e. `floor(min_bits + extra_bits − ½) + 1`, clamped to [1, 15]. Gives the smallest
/// model size (`DiffQuantizer::min_true_model_size`).
inline int64_t lowest_rounded_bits(double min_bits, double extra_bits) {
  const double r = std::floor(min_bits + extra_bits - 0.5) + 1;
  return static_cast<int64_t>(std::min<double>(std::max<double>(r, 1), kMaxStoredBits));
}

/// The learnt bit widths `b` in `(min_bits, max_bits)` whose true quantization is `rounded` bits:
/// `[max(min_bits, rounded − ½ − extra_bits), min(max_bits, rounded + ½ − extra_bits)]` (the
/// clamp of `rounded_bits` widens the ends at 1 and 15 bits). Empty (`first >= second`) when no
/// such `b` exists. Its midpoint is a bit width that rounds to `rounded` with a margin.
inline std::pair<double, double> bits_interval_of_rounded(int64_t rounded, double min_bits,
                                                          double max_bits, double extra_bits) {
  const double lo = rounded <= 1 ? min_bits : std::max(min_bits, rounded - 0.5 - extra_bits);
  const double hi =
      rounded >= kMaxStoredBits ? max_bits : std::min(max_bits, rounded + 0.5 - extra_bits);
  return {lo, hi};
}

/// Per-element expansion of a per-group tensor `[num_groups]` to `[numel]` (the last group may be
/// partial).
inline at::Tensor expand_groups(const at::Tensor& per_group, int64_t numel, int64_t group_size) {
  const int64_t gs = effective_group_size(numel, group_size);
  TORCH_INTERNAL_ASSERT(per_group.dim() == 1 && per_group.size(0) == num_groups(numel, group_size));
  // A broadcast view copied once (repeat_interleave is an order of magnitude slower).
  return per_group.unsqueeze(1).expand({per_group.size(0), gs}).reshape(-1).narrow(0, 0, numel);
}

/// Minimum and maximum of a tensor, as values of its own dtype stored in doubles. Throws, naming
/// `name`, if the tensor is empty, holds NaN or ±Inf values, or spans a range `max − min` that
/// overflows its dtype (dequantization could not compute it).
inline std::pair<double, double> finite_min_max(const at::Tensor& w, const std::string& name) {
  TORCH_CHECK(w.numel() > 0, "diffq: tensor '", name, "' is empty");
  auto mm = at::aminmax(w.detach());
  const double lo = std::get<0>(mm).item<double>();
  const double hi = std::get<1>(mm).item<double>();
  TORCH_CHECK(std::isfinite(lo) && std::isfinite(hi), "diffq: tensor '", name,
              "' holds non-finite values (min=", lo, ", max=", hi,
              "); cannot quantize NaN or Inf weights");
  const bool is_float = w.scalar_type() == at::kFloat;
  const double range = hi - lo;
  TORCH_CHECK(is_float ? range <= static_cast<double>(std::numeric_limits<float>::max())
                       : std::isfinite(range),
              "diffq: tensor '", name, "' spans [", lo, ", ", hi, "]: max - min overflows ",
              w.scalar_type(), "; cannot quantize it");
  return {lo, hi};
}

/// Integer levels of uniform quantization with per-tensor `min`/`max` and per-group bit widths:
/// `levels = round((w − min)/(max − min)·(2^b − 1))`, int16 `[numel]` in `[0, 2^b − 1]`.
/// `w`: any shape (flattened), float or double, its values in `[min, max]` (pass its own finite
/// min and max, e.g. from `finite_min_max`); `bits`: integer `[num_groups]` in [1, 15].
/// A constant tensor (`max == min`) gives all-zero levels. Throws if `bits` has the wrong shape,
/// or (uint8 `bits` of a CPU tensor, the fused kernel) a width outside [1, 15]. Source: paper
/// Section 3.1 (Eq. 1).
inline at::Tensor quantize_levels(const at::Tensor& w, const at::Tensor& bits, int64_t group_size,
                                  double min, double max) {
  auto flat = w.detach().reshape(-1);
  const int64_t numel = flat.numel();
  TORCH_CHECK(bits.dim() == 1 && bits.size(0) == num_groups(numel, group_size),
              "diffq::quantize_levels: expected bits of shape [", num_groups(numel, group_size),
              "], got ", bits.sizes());
  if (max == min) return at::zeros({numel}, flat.options().dtype(at::kShort));
  const at::ScalarType dt = flat.scalar_type();
  if (flat.device().is_cpu() && (dt == at::kFloat || dt == at::kDouble) && bits.device().is_cpu() &&
      bits.scalar_type() == at::kByte && numel > 0) {
    // Fused one-pass kernel: the same operations in the same precision as the ATen expression
    // below, so the same levels bit for bit (checked in tests/bits_test.cpp).
    auto b = bits.contiguous();
    const uint8_t* bp = b.data_ptr<uint8_t>();
    const int64_t groups = b.size(0);
    for (int64_t g = 0; g < groups; ++g) {
      TORCH_CHECK(bp[g] >= 1 && bp[g] <= kMaxStoredBits,
                  "diffq::quantize_levels: bit widths must be in [1, ", kMaxStoredBits, "], got ",
                  static_cast<int>(bp[g]), " for group ", g);
    }
    auto src = flat.contiguous();
    auto out = at::empty({numel}, flat.options().dtype(at::kShort));
    const int64_t gs = effective_group_size(numel, group_size);
    if (dt == at::kFloat) {
      detail::quantize_levels_cpu<float>(src.data_ptr<float>(), bp, numel, gs, min, max,
                                         out.data_ptr<int16_t>());
    } else {
      detail::quantize_levels_cpu<double>(src.data_ptr<double>(), bp, numel, gs, min, max,
                                          out.data_ptr<int16_t>());
    }
    return out;
  }
  auto levels_max = (at::pow(2.0, bits.to(flat.scalar_type())) - 1);
  // 0 <= (w − min)/(max − min) <= 1 holds in floating point too, so levels lie in [0, 2^b − 1].
  // The divisor is a 0-dim tensor on the weights' device, not a scalar: CUDA divides by a CPU
  // scalar as a product with its reciprocal (one more rounding), and its levels would then differ
  // from the CPU kernel's, which the checkpoint export uses.
  auto range = at::scalar_tensor(max - min, flat.options());
  auto scaled = (flat - min) / range * expand_groups(levels_max, numel, group_size);
  return scaled.round().to(at::kShort);
}

/// Weights from levels: `w = min + levels · (max − min)/(2^b − 1)`, `[numel]` of `dtype`.
/// Inverse of `quantize_levels` up to rounding; bit-exact given the same inputs, which is what
/// makes a loaded checkpoint equal the quantizer's eval-mode weights. A constant tensor gives
/// `min`.
inline at::Tensor dequantize_levels(const at::Tensor& levels, const at::Tensor& bits,
                                    int64_t group_size, double min, double max,
                                    at::ScalarType dtype) {
  const int64_t numel = levels.numel();
  TORCH_CHECK(bits.dim() == 1 && bits.size(0) == num_groups(numel, group_size),
              "diffq::dequantize_levels: expected bits of shape [", num_groups(numel, group_size),
              "], got ", bits.sizes());
  auto opts = levels.options().dtype(dtype);
  if (max == min) return at::full({numel}, min, opts);
  auto step = (max - min) / (at::pow(2.0, bits.to(dtype)) - 1);
  return levels.reshape(-1).to(dtype) * expand_groups(step, numel, group_size) + min;
}

/// True quantization of a tensor: `dequantize_levels(quantize_levels(w))`, same shape and dtype as
/// `w`. Throws on NaN/Inf values (naming `name`).
inline at::Tensor quantize_dequantize(const at::Tensor& w, const at::Tensor& bits,
                                      int64_t group_size, const std::string& name = "tensor") {
  auto mm = finite_min_max(w, name);
  auto levels = quantize_levels(w, bits, group_size, mm.first, mm.second);
  return dequantize_levels(levels, bits, group_size, mm.first, mm.second, w.scalar_type())
      .view(w.sizes());
}

/// Bits used to store each group's bit width in the size estimate:
/// `ceil(log2(1 + round(max b) − min_bits))` (0 when that is below 1), computed on the device
/// without host synchronisation, not differentiated. `b`: `[num_groups]`. Source: reference
/// implementation, `DiffQuantizer.model_size`.
inline at::Tensor bits_bits(const at::Tensor& b, double min_bits) {
  return (1 + b.detach().max().round() - min_bits).clamp_min(1).log2().ceil();
}

/// Size in bits of one quantized tensor of `numel` elements, differentiable with respect to `b`
/// (`[num_groups]`): `Σ_g n_g·b_g + 64 (min, max) + 8 + bits_bits·num_groups`, where `n_g` is the
/// element count of group g (the last group may be partial). Source: reference
/// `DiffQuantizer.model_size`, with exact counts for partial groups.
inline at::Tensor quantized_size_bits(const at::Tensor& b, int64_t numel, int64_t group_size,
                                      double min_bits) {
  const GroupLayout layout(numel, group_size);
  TORCH_INTERNAL_ASSERT(b.dim() == 1 && b.size(0) == layout.groups);
  return layout.element_sum(b.sum(), [&] { return b[layout.groups - 1]; }) + (64 + 8) +
         bits_bits(b, min_bits) * static_cast<double>(layout.groups);
}

/// Size in bits of one tensor of `numel` elements quantized at the fixed bit width `bits` with a
/// per-tensor min/max (uniform PTQ/QAT, LSQ): `bits·numel + 64`.
inline int64_t fixed_width_size_bits(int64_t numel, int64_t bits) {
  return bits * numel + 64;
}

/// Bits per element of a non-quantized tensor: 16 when stored as fp16, else 32.
inline int64_t float_bits(bool float16) {
  return float16 ? 16 : 32;
}

/// Bits per MB (MB = 2^20 bytes).
constexpr double kBitsPerMB = 8.0 * 1048576.0;

}  // namespace diffq
