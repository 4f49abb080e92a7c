#pragma once
/// \file diffq/detail/checkpoint_tensors.h
/// Between LibTorch tensors and the raw format core (`format.h`): dtype codes, a
/// `QuantizedState` as writer input, decoded levels and dequantized weights as tensors (equal bit
/// for bit to `diffq::dequantize_levels`), and a checkpoint read back into a `QuantizedState`.

#include <diffq/detail/checkpoint_io.h>
#include <diffq/detail/format.h>
#include <diffq/state.h>
#include <diffq/version.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace diffq {
namespace detail {

inline uint8_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kDtFloat32;
    case at::kDouble:
      return kDtFloat64;
    case at::kHalf:
      return kDtFloat16;
    case at::kBFloat16:
      return kDtBFloat16;
    case at::kLong:
      return kDtInt64;
    case at::kInt:
      return kDtInt32;
    case at::kShort:
      return kDtInt16;
    case at::kChar:
      return kDtInt8;
    case at::kByte:
      return kDtUInt8;
    case at::kBool:
      return kDtBool;
    default:
      return kDtNone;
  }
}

inline at::ScalarType scalar_type_of(uint8_t code) {
  switch (code) {
    case kDtFloat32:
      return at::kFloat;
    case kDtFloat64:
      return at::kDouble;
    case kDtFloat16:
      return at::kHalf;
    case kDtBFloat16:
      return at::kBFloat16;
    case kDtInt64:
      return at::kLong;
    case kDtInt32:
      return at::kInt;
    case kDtInt16:
      return at::kShort;
    case kDtInt8:
      return at::kChar;
    case kDtUInt8:
      return at::kByte;
    case kDtBool:
      return at::kBool;
    default:
      return at::ScalarType::Undefined;
  }
}

/// `at::parallel_for` over tasks, one task at a time (chunks are coarse).
inline ParallelFor aten_parallel_for() {
  return [](int64_t n, const std::function<void(int64_t, int64_t)>& body) {
    if (n <= 0) return;
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) { body(b, e); });
  };
}

/// The state as writer input; `keep` holds the converted tensors the input points into.
inline WriterInput state_to_input(const QuantizedState& state, std::vector<at::Tensor>& keep,
                                  const std::string& where) {
  WriterInput in;
  for (const auto& q : state.quantized) {
    QuantizedInput qi;
    qi.name = q.name;
    qi.shape = q.shape;
    qi.dtype = dtype_code(q.dtype);
    qi.group_size = q.group_size;
    qi.min = q.min;
    qi.max = q.max;
    const uint64_t numel = checked_numel(q.shape, where, q.name);
    TORCH_CHECK(q.group_size >= 0, where, ": tensor '", q.name, "': group_size must be >= 0, got ",
                q.group_size);
    const uint64_t groups = groups_of(numel, static_cast<uint64_t>(q.group_size));
    TORCH_CHECK(q.bits.defined() && q.bits.scalar_type() == at::kByte && q.bits.dim() == 1 &&
                    static_cast<uint64_t>(q.bits.size(0)) == groups,
                where, ": tensor '", q.name, "': expected bits as uint8 [", groups, "], got ",
                q.bits.defined() ? c10::toString(q.bits.scalar_type()) : "undefined", " ",
                q.bits.defined() ? q.bits.sizes() : at::IntArrayRef{});
    TORCH_CHECK(q.levels.defined() && q.levels.scalar_type() == at::kShort &&
                    static_cast<uint64_t>(q.levels.numel()) == numel,
                where, ": tensor '", q.name, "': expected levels as int16 with ", numel,
                " elements, got ",
                q.levels.defined() ? c10::toString(q.levels.scalar_type()) : "undefined", " with ",
                q.levels.defined() ? q.levels.numel() : 0, " elements");
    keep.push_back(q.bits.cpu().contiguous());
    qi.bits = keep.back().data_ptr<uint8_t>();
    keep.push_back(q.levels.cpu().contiguous());
    qi.levels = keep.back().data_ptr<int16_t>();
    in.quantized.push_back(std::move(qi));
  }
  auto add_float = [&](const FloatTensor& f, uint8_t kind) {
    TORCH_CHECK(f.value.defined(), where, ": tensor '", f.name, "' is undefined");
    FloatInput fi;
    fi.name = f.name;
    fi.shape = f.value.sizes().vec();
    fi.kind = kind;
    fi.dtype = dtype_code(f.value.scalar_type());
    TORCH_CHECK(fi.dtype != kDtNone, where, ": tensor '", f.name, "': unsupported dtype ",
                f.value.scalar_type());
    at::Tensor v = f.value.detach().cpu().contiguous();
    if (f.float16) {
      TORCH_CHECK(at::isFloatingType(f.value.scalar_type()), where, ": tensor '", f.name,
                  "': float16 storage needs a floating point tensor, got ", f.value.scalar_type());
      v = v.to(at::kHalf).contiguous();
    }
    fi.stored_dtype = dtype_code(v.scalar_type());
    keep.push_back(v);
    fi.data = static_cast<const uint8_t*>(keep.back().data_ptr());
    in.floats.push_back(std::move(fi));
  };
  for (const auto& f : state.floats) add_float(f, f.is_buffer ? kKindBuffer : kKindFloat);
  for (const auto& f : state.logits) add_float(f, kKindLogit);
  for (const auto& t : state.tied) in.aliases.push_back({t.name, t.target});
  return in;
}

inline EncodedCheckpoint encode_state(const QuantizedState& state, const CheckpointMetadata& meta,
                                      const std::string& where) {
  std::vector<at::Tensor> keep;
  WriterInput in = state_to_input(state, keep, where);
  in.metadata = metadata_entries(meta, DIFFQ_VERSION_STRING, where);
  return encode_checkpoint(in, aten_parallel_for(), where);
}

inline at::Tensor bits_tensor(const RecordView& rv) {
  if (rv.bits.empty()) return at::empty({0}, at::kByte);
  return at::from_blob(const_cast<uint8_t*>(rv.bits.data()), {static_cast<int64_t>(rv.bits.size())},
                       at::kByte)
      .clone();
}

/// Steps of `diffq::dequantize_levels` by bit width, by the very same ATen expression evaluated on
/// the widths 0..15: `(max − min) / (2^b − 1)` in `dtype`, `[16]` (entry 0 unused).
inline at::Tensor steps_by_width(double min, double max, at::ScalarType dtype) {
  std::array<uint8_t, 16> widths{};
  for (int b = 0; b < 16; ++b) widths[static_cast<size_t>(b)] = static_cast<uint8_t>(b);
  const at::Tensor w = at::from_blob(widths.data(), {16}, at::kByte).clone();
  return ((max - min) / (at::pow(2.0, w.to(dtype)) - 1)).contiguous();
}

/// Writes the dequantized weights of quantized record `rv` from its decoded `levels` (`[numel]`
/// int16) into `out` (`numel` elements of `T`, the record's dtype), in parallel over blocks; equal
/// bit for bit to `dequantize_levels(levels, bits, group_size, min, max, dtype)`, a constant
/// tensor (max == min) included (all `min`, sign of -0.0 kept). `steps`: `steps_by_width(min, max,
/// dtype)` (unused, and may be undefined, when max == min). Allocates nothing; cannot fail.
template <class T>
inline void dequantize_record_into(const RecordView& rv, const int16_t* levels,
                                   const at::Tensor& steps, T* out) {
  const int64_t numel = static_cast<int64_t>(rv.numel);
  if (rv.max == rv.min) {
    std::fill(out, out + numel, static_cast<T>(rv.min));
    return;
  }
  const T* step = steps.data_ptr<T>();
  at::parallel_for(0, numel, 1 << 16, [&](int64_t b, int64_t e) {
    dequantize_range(rv, levels, step, out, static_cast<uint64_t>(b), static_cast<uint64_t>(e));
  });
}

/// Runs `body(record, segment)` over the segments of the quantized records of `pc`, in parallel.
template <class F>
inline void for_each_segment(const ParsedCheckpoint& pc, F&& body) {
  std::vector<std::pair<size_t, size_t>> tasks;
  for (size_t r = 0; r < pc.records.size(); ++r) {
    const RecordView& rv = pc.records[r];
    if (rv.kind != kKindQuantized) continue;
    for (size_t s = 0; s + 1 < rv.segment_first.size(); ++s) tasks.emplace_back(r, s);
  }
  aten_parallel_for()(static_cast<int64_t>(tasks.size()), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      body(tasks[static_cast<size_t>(t)].first, tasks[static_cast<size_t>(t)].second);
  });
}

/// Decoded levels of every quantized record of `pc` (`[numel]` int16 each, by record index;
/// undefined for other kinds), segments decoded in parallel.
inline std::vector<at::Tensor> decode_all_levels(const ParsedCheckpoint& pc) {
  std::vector<at::Tensor> levels(pc.records.size());
  for (size_t r = 0; r < pc.records.size(); ++r) {
    if (pc.records[r].kind == kKindQuantized) {
      levels[r] = at::empty({static_cast<int64_t>(pc.records[r].numel)}, at::kShort);
    }
  }
  for_each_segment(pc, [&](size_t r, size_t s) {
    decode_segment(pc.records[r], s, pc.segment_elems, levels[r].data_ptr<int16_t>(), pc.ctx,
                   static_cast<int64_t>(r));
  });
  return levels;
}

/// Dequantized weights of the quantized record `rv` from its decoded `levels`, `[shape]` of the
/// record's dtype.
inline at::Tensor dequantize_record(const RecordView& rv, const at::Tensor& levels) {
  const at::ScalarType dt = scalar_type_of(rv.dtype);
  at::Tensor out = at::empty(rv.shape, at::TensorOptions().dtype(dt));
  const at::Tensor steps = steps_by_width(rv.min, rv.max, dt);
  if (rv.dtype == kDtFloat32) {
    dequantize_record_into(rv, levels.data_ptr<int16_t>(), steps, out.data_ptr<float>());
  } else {
    dequantize_record_into(rv, levels.data_ptr<int16_t>(), steps, out.data_ptr<double>());
  }
  return out;
}

/// Dequantized weights of every quantized record of `pc` (`[shape]` of the record's dtype, by
/// record index; undefined for other kinds), equal bit for bit to
/// `dequantize_levels(levels, bits, group_size, min, max, dtype).view(shape)`.
/// `tests/checkpoint_test.cpp` checks the equality with `dequantize_levels` for every width.
inline std::vector<at::Tensor> decode_all_weights(const ParsedCheckpoint& pc) {
  std::vector<at::Tensor> values = decode_all_levels(pc);
  for (size_t r = 0; r < pc.records.size(); ++r) {
    if (values[r].defined()) values[r] = dequantize_record(pc.records[r], values[r]);
  }
  return values;
}

/// A float record's value in its stored dtype, `[shape]`.
inline at::Tensor decode_float_tensor(const ParsedCheckpoint& pc, size_t r) {
  const RecordView& rv = pc.records[r];
  at::Tensor t = at::empty(rv.shape, at::TensorOptions().dtype(scalar_type_of(rv.stored_dtype)));
  decode_float(rv, static_cast<uint8_t*>(t.data_ptr()), pc.ctx, static_cast<int64_t>(r));
  return t;
}

inline QuantizedState state_from_source(const ByteSource& src, const std::string& where) {
  ParsedCheckpoint pc = parse_checkpoint(src.data, src.size, where, src.name);
  std::vector<at::Tensor> levels = decode_all_levels(pc);
  QuantizedState state;
  for (size_t r = 0; r < pc.records.size(); ++r) {
    const RecordView& rv = pc.records[r];
    if (rv.kind == kKindQuantized) {
      QuantizedTensor q;
      q.name = rv.name;
      q.shape = rv.shape;
      q.dtype = scalar_type_of(rv.dtype);
      q.group_size = rv.group_size;
      q.bits = bits_tensor(rv);
      q.min = rv.min;
      q.max = rv.max;
      q.levels = levels[r];
      state.quantized.push_back(std::move(q));
    } else if (rv.kind == kKindAlias) {
      state.tied.push_back({rv.name, rv.target});
    } else {
      FloatTensor f;
      f.name = rv.name;
      f.value = decode_float_tensor(pc, r).to(scalar_type_of(rv.dtype));
      f.float16 = rv.stored_dtype != rv.dtype;
      f.is_buffer = rv.kind == kKindBuffer;
      (rv.kind == kKindLogit ? state.logits : state.floats).push_back(std::move(f));
    }
  }
  return state;
}

}  // namespace detail
}  // namespace diffq
