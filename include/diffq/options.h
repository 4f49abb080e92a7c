#pragma once
/// \file diffq/options.h
/// Options of every quantizer: DiffQ (Défossez, Adi, Synnaeve, "Differentiable Model Compression
/// via Pseudo Quantization Noise", TMLR 2022, arXiv 2104.09987), the uniform PTQ/QAT baselines and
/// LSQ. What they share (`SharedOptions`, `AuxOptions`) is declared and checked once.

#include <c10/util/Exception.h>
#include <torch/arg.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace diffq {

/// Largest bit width a stored level may use. Levels of 15 bits fit in an int16.
constexpr int64_t kMaxStoredBits = 15;

/// Distribution of the pseudo quantization noise `u` (paper, Section 3.1): the training forward
/// sees `w + Δ·u` with `Δ = (max w − min w) / (2^b − 1)`.
enum class Noise {
  /// `u ~ N(0, 1) / 2` (the reference implementation's default).
  kGaussian,
  /// `u ~ U[−½, ½)`, the exact distribution of the rounding error of a uniform quantizer.
  kUniform,
};

/// What the learnable logit of each group parametrises.
enum class Param {
  /// `b = min_bits + (max_bits − min_bits)·sigmoid(logit)`.
  kBits,
  /// The relative noise scale `s = exp(t·log(1/(2^max_bits − 1)) + (1 − t)·log(1/(2^min_bits −
  /// 1)))`, `t = sigmoid(logit)`, and `b = log2(1 + 1/s)`.
  kNoise,
};

/// Declares an option of a CRTP options base: a chainable setter returning the options struct
/// `Derived` (as `TORCH_ARG` does for its own struct), a getter, and the private member
/// `name_`, which the next `= value` initialises.
#define DIFFQ_SHARED_ARG(T, name)          \
 public:                                   \
  Derived& name(const T& new_##name) {     \
    this->name##_ = new_##name;            \
    return static_cast<Derived&>(*this);   \
  }                                        \
  Derived& name(T&& new_##name) {          \
    this->name##_ = std::move(new_##name); \
    return static_cast<Derived&>(*this);   \
  }                                        \
  const T& name() const noexcept {         \
    return name##_;                        \
  }                                        \
  T& name() noexcept {                     \
    return name##_;                        \
  }                                        \
                                           \
 private:                                  \
  T name##_

/// The options every quantizer has (DiffQ, uniform PTQ/QAT, LSQ): which parameters it quantizes
/// and how it stores the others. A CRTP base of each quantizer's options struct `Derived`, so that
/// its setters chain with the struct's own: `LSQOptions().min_size_mb(0).bits(3)`. Checked by
/// `detail::check_shared_options`.
template <typename Derived>
struct SharedOptions {
  /// Tensors whose fp32 size (4 · numel bytes) is at or below this many MB (2^20 bytes) are not
  /// quantized. Must be >= 0.
  DIFFQ_SHARED_ARG(double, min_size_mb) = 0.01;
  /// Store (and count in the model size) the non-quantized parameters as fp16 instead of fp32.
  /// Eval forwards and `quantize()` then give them their fp16-rounded values, as the checkpoint
  /// reloads them (training forwards use the full-precision ones), except the weight of an
  /// Embedding with `max_norm`, which its forward renormalises in place.
  DIFFQ_SHARED_ARG(bool, float16) = false;
  /// Glob patterns (`*`, `?`, `[...]`) of parameters never quantized, matched against the full
  /// dotted name (`"encoder.0.bias"`) and the leaf name (`"bias"`). A tied parameter is excluded
  /// if any of its names matches. A pattern that matches no name gets a warning (`TORCH_WARN`).
  DIFFQ_SHARED_ARG(std::vector<std::string>, exclude) = {};
  /// Tied parameters (one tensor registered under several names) are quantized once, share one
  /// auxiliary tensor (DiffQ's logit, LSQ's step size) and count once in the model size. With
  /// `false`, a model with tied parameters is refused.
  DIFFQ_SHARED_ARG(bool, detect_bound) = true;
};

/// `SharedOptions` plus the suffix of the learnable tensor a quantizer registers per quantized
/// parameter (DiffQ's logits, LSQ's step sizes) on the owning module, as `<name><suffix>`.
template <typename Derived>
struct AuxOptions : SharedOptions<Derived> {
  explicit AuxOptions(std::string default_suffix) : suffix_(std::move(default_suffix)) {}
  /// Suffix of the learnable tensors' names. Must be non-empty and contain no '.'.
  DIFFQ_SHARED_ARG(std::string, suffix);
};

#undef DIFFQ_SHARED_ARG

namespace detail {

/// Checks the options of `SharedOptions`; `where` prefixes the message (e.g.
/// `"diffq::LSQQuantizer: min_size_mb must be >= 0, got -1"`).
template <typename Derived>
void check_shared_options(const SharedOptions<Derived>& o, const std::string& where) {
  TORCH_CHECK(std::isfinite(o.min_size_mb()) && o.min_size_mb() >= 0, where,
              ": min_size_mb must be >= 0, got ", o.min_size_mb());
}

/// `check_shared_options`, and the suffix.
template <typename Derived>
void check_shared_options(const AuxOptions<Derived>& o, const std::string& where) {
  check_shared_options(static_cast<const SharedOptions<Derived>&>(o), where);
  TORCH_CHECK(!o.suffix().empty() && o.suffix().find('.') == std::string::npos, where,
              ": suffix must be non-empty and contain no '.', got '", o.suffix(), "'");
}

}  // namespace detail

/// Options of `diffq::DiffQuantizer`, chainable like `torch::nn::LinearOptions`:
/// `DiffQOptions().group_size(16).min_size_mb(0.01).exclude({"*bias"})`. Besides its own, the
/// options of `SharedOptions` and `AuxOptions` (suffix `"_diffq"`). They are checked when the
/// quantizer is built (`diffq::check_options`).
struct DiffQOptions : AuxOptions<DiffQOptions> {
  DiffQOptions() : AuxOptions<DiffQOptions>("_diffq") {}
  /// Number of consecutive elements (in the flattened tensor) sharing one bit width.
  /// 0 means one group for the whole tensor. Need not divide the tensor size: the last group of a
  /// tensor may be partial. Must be >= 0.
  TORCH_ARG(int64_t, group_size) = 8;
  /// Smallest bit width the logits can reach (paper: `b_min`). Must be >= 1 and < init_bits.
  TORCH_ARG(double, min_bits) = 2;
  /// Largest bit width the logits can reach (paper: `b_max`). Must be > init_bits and <= 15.
  TORCH_ARG(double, max_bits) = 15;
  /// Bit width every group starts from; the logits are initialised so that `b == init_bits`.
  TORCH_ARG(double, init_bits) = 8;
  /// Bits added to the learnt bit width before rounding, for true quantization and model size.
  TORCH_ARG(double, extra_bits) = 0;
  /// Distribution of the pseudo quantization noise.
  TORCH_ARG(Noise, noise) = Noise::kGaussian;
  /// What the logits parametrise.
  TORCH_ARG(Param, param) = Param::kBits;
};

/// Checks `DiffQOptions`; throws `c10::Error` naming the option, e.g.
/// `"diffq::DiffQuantizer: group_size must be >= 0, got -3"`. `where` prefixes the message.
inline void check_options(const DiffQOptions& o,
                          const std::string& where = "diffq::DiffQuantizer") {
  TORCH_CHECK(o.group_size() >= 0, where, ": group_size must be >= 0, got ", o.group_size());
  TORCH_CHECK(std::isfinite(o.min_bits()) && o.min_bits() >= 1, where,
              ": min_bits must be >= 1, got ", o.min_bits());
  TORCH_CHECK(std::isfinite(o.max_bits()) && o.max_bits() <= kMaxStoredBits, where,
              ": max_bits must be <= ", kMaxStoredBits, ", got ", o.max_bits());
  TORCH_CHECK(o.min_bits() < o.init_bits(), where,
              ": min_bits must be < init_bits, got min_bits=", o.min_bits(),
              " and init_bits=", o.init_bits());
  TORCH_CHECK(o.init_bits() < o.max_bits(), where,
              ": init_bits must be < max_bits, got init_bits=", o.init_bits(),
              " and max_bits=", o.max_bits());
  TORCH_CHECK(std::isfinite(o.extra_bits()), where, ": extra_bits must be finite, got ",
              o.extra_bits());
  detail::check_shared_options(o, where);
}

/// Options of `diffq::UniformQuantizer`, chainable: `UniformOptions().bits(4).qat(true)`. Besides
/// its own, the options of `SharedOptions` (it registers no learnable tensor, so no suffix).
struct UniformOptions : SharedOptions<UniformOptions> {
  /// Bit width of every quantized tensor, in [1, 15].
  TORCH_ARG(int64_t, bits) = 8;
  /// Quantization-aware training: training forwards see the quantized weights and the gradient
  /// passes to the clean weights unchanged (straight-through estimator). With `false` (PTQ)
  /// training forwards see the clean weights.
  TORCH_ARG(bool, qat) = false;
};

/// Checks `UniformOptions`; throws `c10::Error` naming the option, e.g.
/// `"diffq::UniformQuantizer: bits must be in [1, 15], got 16"`.
inline void check_options(const UniformOptions& o,
                          const std::string& where = "diffq::UniformQuantizer") {
  TORCH_CHECK(o.bits() >= 1 && o.bits() <= kMaxStoredBits, where, ": bits must be in [1, ",
              kMaxStoredBits, "], got ", o.bits());
  detail::check_shared_options(o, where);
}

/// Options of `diffq::LSQQuantizer`, chainable: `LSQOptions().bits(3).exclude({"*bias"})`.
/// Besides its own, the options of `SharedOptions` and `AuxOptions` (suffix `"_lsq"`, of the step
/// sizes).
struct LSQOptions : AuxOptions<LSQOptions> {
  LSQOptions() : AuxOptions<LSQOptions>("_lsq") {}
  /// Bit width of every quantized tensor, in [2, 15] (signed levels need `Qp = 2^(b−1) − 1 >= 1`).
  TORCH_ARG(int64_t, bits) = 4;
};

/// Checks `LSQOptions`; throws `c10::Error` naming the option, e.g.
/// `"diffq::LSQQuantizer: bits must be in [2, 15], got 1"`.
inline void check_options(const LSQOptions& o, const std::string& where = "diffq::LSQQuantizer") {
  TORCH_CHECK(o.bits() >= 2 && o.bits() <= kMaxStoredBits, where, ": bits must be in [2, ",
              kMaxStoredBits, "], got ", o.bits());
  detail::check_shared_options(o, where);
}

// -------------------------------------------------------------------------------------------------
// The list of each struct's options, in one place: checkpoints record them by these names
// (`docs/checkpoint_format.md`, `read_checkpoint_info`). Adding an option means adding it here.

namespace detail {

template <class O, class F>
void visit_shared_options(O& o, F&& f) {
  f("min_size_mb", o.min_size_mb());
  f("float16", o.float16());
  f("exclude", o.exclude());
  f("detect_bound", o.detect_bound());
}

template <class O, class Want>
using if_options_t = std::enable_if_t<std::is_same<std::remove_const_t<O>, Want>::value, int>;

}  // namespace detail

/// Calls `f(name, value)` for each option of `o` (a `DiffQOptions`, `UniformOptions` or
/// `LSQOptions`, const or not; `value` is a reference to the option's member), the method's own
/// options first, in declaration order, then the shared ones. The names are those of the setters.
template <class O, class F, detail::if_options_t<O, DiffQOptions> = 0>
void visit_options(O& o, F&& f) {
  f("group_size", o.group_size());
  f("min_bits", o.min_bits());
  f("max_bits", o.max_bits());
  f("init_bits", o.init_bits());
  f("extra_bits", o.extra_bits());
  f("noise", o.noise());
  f("param", o.param());
  detail::visit_shared_options(o, f);
  f("suffix", o.suffix());
}
template <class O, class F, detail::if_options_t<O, UniformOptions> = 0>
void visit_options(O& o, F&& f) {
  f("bits", o.bits());
  f("qat", o.qat());
  detail::visit_shared_options(o, f);
}
template <class O, class F, detail::if_options_t<O, LSQOptions> = 0>
void visit_options(O& o, F&& f) {
  f("bits", o.bits());
  detail::visit_shared_options(o, f);
  f("suffix", o.suffix());
}

/// The name of the quantization method a checkpoint records for these options: `"diffq"`,
/// `"uniform"` (post-training), `"qat"` (`UniformOptions::qat`) or `"lsq"`.
inline const char* method_name(const DiffQOptions&) {
  return "diffq";
}
inline const char* method_name(const UniformOptions& o) {
  return o.qat() ? "qat" : "uniform";
}
inline const char* method_name(const LSQOptions&) {
  return "lsq";
}

}  // namespace diffq
