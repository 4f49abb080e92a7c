#pragma once
/// \file diffq/state.h
/// The quantized state of a model: what a quantizer hands to the checkpoint writer
/// (`diffq/checkpoint.h`), independent of the quantization method. Every quantized tensor is
/// described by integer levels, per-group bit widths and a per-tensor min/max, so that
/// `diffq::dequantize_levels` (`diffq/bits.h`) rebuilds its weights bit for bit.

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

namespace diffq {

/// One quantized tensor: `w = min + levels·(max − min)/(2^bits − 1)` per group (paper, Eq. 1).
struct QuantizedTensor {
  std::string name;                   ///< full dotted parameter name, e.g. `"fc1.weight"`
  std::vector<int64_t> shape;         ///< shape of the parameter
  at::ScalarType dtype = at::kFloat;  ///< dtype of the parameter (kFloat or kDouble)
  int64_t group_size = 0;             ///< elements per group; 0 = one group for the whole tensor
  at::Tensor bits;                    ///< uint8 `[num_groups]`, each in [1, 15]
  double min = 0;                     ///< minimum of the tensor (a value of `dtype`)
  double max = 0;                     ///< maximum of the tensor (a value of `dtype`)
  at::Tensor levels;  ///< int16 `[numel]`, level `i` in `[0, 2^bits(group(i)) − 1]`
};

/// A tensor stored in floating point: a non-quantized parameter (fp32, or fp16 when `float16`)
/// or a module buffer (stored in its own dtype, e.g. BatchNorm's running statistics).
struct FloatTensor {
  std::string name;        ///< full dotted name
  at::Tensor value;        ///< on the CPU, contiguous
  bool float16 = false;    ///< store as fp16 (lossy) instead of the value's own dtype
  bool is_buffer = false;  ///< a buffer rather than a parameter
};

/// A parameter registered under several names (tied weights): stored once under `target`.
struct TiedName {
  std::string name;    ///< the other name
  std::string target;  ///< the name the tensor is stored under
};

/// Everything a checkpoint stores. Produced by `DiffQuantizer::quantized_state()`.
struct QuantizedState {
  std::vector<QuantizedTensor> quantized;
  std::vector<FloatTensor> floats;
  std::vector<TiedName> tied;
  /// Optional learnt logits (`[num_groups]` each, by logit parameter name), to resume training.
  std::vector<FloatTensor> logits;
};

}  // namespace diffq
