#pragma once
/// \file diffq/options.h
/// Options of the DiffQ quantizer (Défossez, Adi, Synnaeve, "Differentiable Model Compression via
/// Pseudo Quantization Noise", TMLR 2022, arXiv 2104.09987).

#include <c10/util/Exception.h>
#include <torch/arg.h>

#include <cmath>
#include <cstdint>
#include <string>
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

/// Options of `diffq::DiffQuantizer`, chainable like `torch::nn::LinearOptions`:
/// `DiffQOptions().group_size(16).min_size(0.01).exclude({"*bias"})`.
/// They are checked when the quantizer is built (`diffq::check_options`).
struct DiffQOptions {
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
  /// Tensors whose fp32 size (4 · numel bytes) is at or below this many MB (2^20 bytes) are not
  /// quantized. Must be >= 0.
  TORCH_ARG(double, min_size_mb) = 0.01;
  /// Store (and count in the model size) the non-quantized parameters as fp16 instead of fp32.
  /// Eval forwards and `quantize()` then give them their fp16-rounded values, as the checkpoint
  /// reloads them (training forwards use the full-precision ones), except the weight of an
  /// Embedding with `max_norm`, which its forward renormalises in place.
  TORCH_ARG(bool, float16) = false;
  /// Distribution of the pseudo quantization noise.
  TORCH_ARG(Noise, noise) = Noise::kGaussian;
  /// What the logits parametrise.
  TORCH_ARG(Param, param) = Param::kBits;
  /// Glob patterns (`*`, `?`, `[...]`) of parameters never quantized, matched against the full
  /// dotted name (`"encoder.0.bias"`) and the leaf name (`"bias"`). A tied parameter is excluded
  /// if any of its names matches. A pattern that matches no name gets a warning (`TORCH_WARN`).
  TORCH_ARG(std::vector<std::string>, exclude) = {};
  /// Tied parameters (one tensor registered under several names) share one logit and count once in
  /// the model size. With `false`, a model with tied parameters is refused.
  TORCH_ARG(bool, detect_bound) = true;
  /// Suffix of the logit parameters registered on the owning modules: `<name><suffix>`.
  TORCH_ARG(std::string, suffix) = "_diffq";
};

/// Checks the option values shared by every quantizer; throws `c10::Error` naming the option,
/// e.g. `"diffq::DiffQuantizer: group_size must be >= 0, got -3"`. `where` prefixes the message.
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
  TORCH_CHECK(std::isfinite(o.min_size_mb()) && o.min_size_mb() >= 0, where,
              ": min_size_mb must be >= 0, got ", o.min_size_mb());
  TORCH_CHECK(!o.suffix().empty() && o.suffix().find('.') == std::string::npos, where,
              ": suffix must be non-empty and contain no '.', got '", o.suffix(), "'");
}

}  // namespace diffq
