#pragma once
/// \file diffq/detail/format_writer.h
/// The checkpoint writer on raw arrays (`docs/checkpoint_format.md`): level chunks, float
/// payloads, records and the file header, encoded in parallel segments with an output that does
/// not depend on the number of threads. The tensor-level API is `diffq/checkpoint.h`.

#include <diffq/detail/format_spec.h>
#include <diffq/detail/huffman.h>
#include <diffq/detail/metadata.h>

#include <c10/util/Exception.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace diffq {
namespace detail {

struct QuantizedInput {
  std::string name;
  std::vector<int64_t> shape;
  uint8_t dtype = kDtFloat32;  ///< kDtFloat32 or kDtFloat64
  int64_t group_size = 0;
  double min = 0, max = 0;
  const uint8_t* bits = nullptr;    ///< [groups], each in 1..15
  const int16_t* levels = nullptr;  ///< [numel], level i in [0, 2^bits(group(i)) − 1]
};

struct FloatInput {
  std::string name;
  std::vector<int64_t> shape;
  uint8_t kind = kKindFloat;   ///< kKindFloat, kKindBuffer or kKindLogit
  uint8_t dtype = kDtFloat32;  ///< the tensor's dtype
  uint8_t stored_dtype = kDtFloat32;
  const uint8_t* data = nullptr;  ///< numel elements of `stored_dtype`, little-endian
};

struct AliasInput {
  std::string name;
  std::string target;
};

struct WriterInput {
  std::vector<QuantizedInput> quantized;
  std::vector<FloatInput> floats;  ///< parameters, buffers and logits, in this order in the file
  std::vector<AliasInput> aliases;
  /// Entries of the header's metadata block (`metadata_entries`); none: no block.
  MetadataEntries metadata;
  uint32_t segment_elems = kDefaultSegmentElems;
};

/// An encoded checkpoint as a list of byte pieces (written in order), to avoid one big copy when
/// writing to a stream.
struct EncodedCheckpoint {
  std::vector<std::vector<uint8_t>> pieces;
  uint64_t total_bytes = 0;
  std::vector<uint8_t> concat() const {
    std::vector<uint8_t> out;
    out.reserve(static_cast<size_t>(total_bytes));
    for (const auto& p : pieces) out.insert(out.end(), p.begin(), p.end());
    return out;
  }
};

inline uint64_t checked_numel(const std::vector<int64_t>& shape, const std::string& where,
                              const std::string& name) {
  TORCH_CHECK(shape.size() <= static_cast<size_t>(kMaxDims), where, ": tensor '", name, "' has ",
              shape.size(), " dims, at most ", kMaxDims, " supported");
  uint64_t extent = 1;  // product of the non-zero dims, bounded as the reader bounds it
  bool empty = false;
  for (int64_t d : shape) {
    TORCH_CHECK(d >= 0, where, ": tensor '", name, "' has a negative dim ", d);
    TORCH_CHECK(d == 0 || extent <= kMaxExtent / static_cast<uint64_t>(d), where, ": tensor '",
                name, "' has too many elements");
    if (d > 0) extent *= static_cast<uint64_t>(d);
    empty = empty || d == 0;
  }
  return empty ? 0 : extent;
}

/// One encoded chunk: ChunkFixed + payload, and its CRC.
struct ChunkOut {
  std::vector<uint8_t> bytes;
  uint32_t crc = 0;
};

/// Appends one chunk (ChunkFixed + payload) coding the `n` levels `lv` of width `b`, whose
/// (high) bytes are `sym`: the smaller of bit-packing and Huffman coding, sizes known exactly from
/// the histogram. Clobbers `lv` (planes keep only the low bits).
inline void encode_levels(uint16_t* lv, const uint8_t* sym, size_t n, int b,
                          std::vector<uint8_t>& out) {
  const int shift = b > 8 ? b - 8 : 0;
  const QuadPlan quad = plan_quad(sym, n);
  const uint64_t low_bytes = shift > 0 ? packed_bytes(n, shift) : 0;
  const uint64_t huff_bytes = quad.total_bytes + (shift > 0 ? 4 + low_bytes : 0);
  const uint64_t pack_bytes = packed_bytes(n, b);
  const bool huff = huff_bytes < pack_bytes;
  const uint64_t payload = huff ? huff_bytes : pack_bytes;
  const size_t at = out.size();
  out.resize(at + static_cast<size_t>(sizeof(ChunkFixed) + payload + 8));
  uint8_t* p = out.data() + at;
  p[0] = huff ? (shift > 0 ? kChunkZlibPlanes : kChunkZlibBytes) : kChunkBitpack;
  p[1] = p[2] = p[3] = 0;
  for (int i = 0; i < 4; ++i) p[4 + i] = static_cast<uint8_t>(payload >> (8 * i));
  p += sizeof(ChunkFixed);
  if (!huff) {
    pack_bits(lv, n, b, p);
  } else if (shift == 0) {
    encode_quad(quad, sym, n, p);
  } else {
    const uint32_t hb = static_cast<uint32_t>(quad.total_bytes);
    for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(hb >> (8 * i));
    encode_quad(quad, sym, n, p + 4);
    const uint16_t low_mask = static_cast<uint16_t>((1u << shift) - 1);
    for (size_t i = 0; i < n; ++i) lv[i] = static_cast<uint16_t>(lv[i] & low_mask);
    pack_bits(lv, n, shift, p + 4 + hb);
  }
  out.resize(at + static_cast<size_t>(sizeof(ChunkFixed) + payload));
}

/// Encodes segment `[s0, s1)` of quantized tensor `q` (its chunks, by increasing width). Throws if
/// a level is outside `[0, 2^b − 1]` for its group's width `b`.
inline ChunkOut encode_segment(const QuantizedInput& q, uint64_t numel, uint64_t s0, uint64_t s1,
                               const std::string& where) {
  const size_t n = static_cast<size_t>(s1 - s0);
  const uint64_t gs = index_group_size(numel, static_cast<uint64_t>(q.group_size));
  const auto counts = segment_counts(q.bits, gs, s0, s1);
  std::array<uint64_t, 16> cursor{};
  uint64_t total = 0;
  for (int b = 0; b < 16; ++b) {
    cursor[static_cast<size_t>(b)] = total;
    total += counts[static_cast<size_t>(b)];
  }
  const std::array<uint64_t, 16> offset = cursor;
  ChunkScratch& scratch = chunk_scratch();
  if (scratch.levels.size() < n) scratch.levels.resize(n);
  if (scratch.bytes.size() < n) scratch.bytes.resize(n);
  uint16_t* lv = scratch.levels.data();
  uint8_t* sym = scratch.bytes.data();
  // One sequential pass: bucket the levels by width, check their range, take their (high) bytes.
  uint16_t out_of_range = 0;
  for_each_group(gs, s0, s1, [&](uint64_t g, uint64_t a, uint64_t e) {
    const int b = q.bits[g];
    const uint16_t bad_mask = static_cast<uint16_t>(~((1u << b) - 1));
    const int shift = b > 8 ? b - 8 : 0;
    const uint64_t c = cursor[static_cast<size_t>(b)];
    const int16_t* __restrict src = q.levels + a;
    uint16_t* __restrict d = lv + c;
    uint8_t* __restrict y = sym + c;
    uint16_t bad = 0;
    const uint64_t len = e - a;
    for (uint64_t i = 0; i < len; ++i) {
      const uint16_t v = static_cast<uint16_t>(src[i]);
      d[i] = v;
      bad = static_cast<uint16_t>(bad | (v & bad_mask));
      y[i] = static_cast<uint8_t>(v >> shift);
    }
    out_of_range = static_cast<uint16_t>(out_of_range | bad);
    cursor[static_cast<size_t>(b)] = c + len;
  });
  if (out_of_range != 0) {
    for_each_group(gs, s0, s1, [&](uint64_t g, uint64_t a, uint64_t e) {
      const int max_level = (1 << q.bits[g]) - 1;
      for (uint64_t j = a; j < e; ++j) {
        TORCH_CHECK(q.levels[j] >= 0 && q.levels[j] <= max_level, where, ": tensor '", q.name,
                    "': level ", q.levels[j], " of element ", j, " is outside [0, ", max_level,
                    "] (its group ", g, " has ", int(q.bits[g]), " bits)");
      }
    });
  }
  ChunkOut out;
  // Room for every chunk at its bit-packed size (the upper bound encode_levels writes within),
  // so the buffer is never moved while growing.
  uint64_t reserve = 0;
  for (int b = 1; b < 16; ++b) {
    const uint64_t cnt = counts[static_cast<size_t>(b)];
    if (cnt != 0) reserve += sizeof(ChunkFixed) + packed_bytes(cnt, b) + 8;
  }
  out.bytes.reserve(static_cast<size_t>(reserve));
  for (int b = 1; b < 16; ++b) {
    const uint64_t cnt = counts[static_cast<size_t>(b)];
    if (cnt == 0) continue;
    const uint64_t o = offset[static_cast<size_t>(b)];
    encode_levels(lv + o, sym + o, static_cast<size_t>(cnt), b, out.bytes);
  }
  out.crc = crc32(out.bytes.data(), out.bytes.size());
  return out;
}

/// Float payload: FloatFixed + (raw bytes, or raw deflate of the byte planes when smaller).
inline ChunkOut encode_float(const FloatInput& f, uint64_t numel) {
  const int eb = dtype_bytes(f.stored_dtype);
  const uint64_t raw = numel * static_cast<uint64_t>(eb);
  std::vector<uint8_t> deflated;
  if (raw >= 64) {
    std::vector<uint8_t> planes(static_cast<size_t>(raw));
    for (int k = 0; k < eb; ++k) {
      uint8_t* dst = planes.data() + static_cast<size_t>(numel) * static_cast<size_t>(k);
      const uint8_t* src = f.data + k;
      for (uint64_t i = 0; i < numel; ++i) dst[i] = src[i * static_cast<uint64_t>(eb)];
    }
    deflated = deflate_raw(planes.data(), planes.size(), 1, Z_DEFAULT_STRATEGY);
  }
  const bool z = raw >= 64 && deflated.size() < raw;
  ChunkOut out;
  std::vector<uint8_t>& o = out.bytes;
  o.reserve(static_cast<size_t>(sizeof(FloatFixed) + (z ? deflated.size() : raw)));
  put_u8(o, z ? kFloatZlib : kFloatRaw);
  for (int i = 0; i < 7; ++i) put_u8(o, 0);
  put_u64(o, z ? deflated.size() : raw);
  if (z) {
    put_bytes(o, deflated.data(), deflated.size());
  } else {
    put_bytes(o, f.data, static_cast<size_t>(raw));
  }
  out.crc = crc32(o.data(), o.size());
  return out;
}

inline void put_record_head(std::vector<uint8_t>& o, uint8_t kind, uint8_t dtype,
                            uint8_t stored_dtype, const std::string& name,
                            const std::vector<int64_t>& shape) {
  put_u64(o, 0);  // record_bytes, patched later
  put_u8(o, kind);
  put_u8(o, dtype);
  put_u8(o, stored_dtype);
  put_u8(o, static_cast<uint8_t>(shape.size()));
  put_u16(o, static_cast<uint16_t>(name.size()));
  put_u16(o, 0);
  put_bytes(o, name.data(), name.size());
  for (int64_t d : shape) put_i64(o, d);
}

inline void check_name(const std::string& name, const std::string& where, const char* what) {
  TORCH_CHECK(!name.empty() && name.size() <= 65535, where, ": ", what,
              " name must have 1 to 65535 bytes, got ", name.size(), " ('", name, "')");
  // The name itself is not printed: a NUL would cut the message.
  TORCH_CHECK(name.find('\0') == std::string::npos, where, ": ", what,
              " name contains a NUL byte at position ", name.find('\0'));
}

/// Records of each kind among the floats (parameters, buffers, logits).
struct RecordCounts {
  size_t n_float = 0, n_buffer = 0, n_logit = 0;
};

/// Checks the names (unique, 1..65535 bytes, no NUL), the kinds, the aliases' targets, the
/// segment size and the metadata entries of `in`; counts the float records by kind.
inline RecordCounts check_writer_input(const WriterInput& in, const std::string& where) {
  TORCH_CHECK(in.segment_elems >= kMinSegmentElems && in.segment_elems <= kMaxSegmentElems &&
                  (in.segment_elems & (in.segment_elems - 1)) == 0,
              where, ": segment_elems must be a power of two in [", kMinSegmentElems, ", ",
              kMaxSegmentElems, "], got ", in.segment_elems);
  std::set<std::string> keys;
  for (const auto& e : in.metadata) {
    const std::string key_problem = metadata_key_problem(e.first);
    TORCH_CHECK(key_problem.empty(), where, ": metadata: ", key_problem);
    const std::string value_problem = metadata_value_problem(e.second);
    TORCH_CHECK(value_problem.empty(), where, ": metadata '", e.first, "': ", value_problem);
    TORCH_CHECK(keys.insert(e.first).second, where, ": duplicate metadata key '", e.first, "'");
  }
  std::set<std::string> names;
  auto add_name = [&](const std::string& n, const char* what) {
    check_name(n, where, what);
    TORCH_CHECK(names.insert(n).second, where, ": duplicate tensor name '", n, "'");
  };
  RecordCounts counts;
  for (const auto& q : in.quantized) add_name(q.name, "tensor");
  for (const auto& f : in.floats) {
    add_name(f.name, "tensor");
    if (f.kind == kKindFloat) {
      ++counts.n_float;
    } else if (f.kind == kKindBuffer) {
      ++counts.n_buffer;
    } else {
      TORCH_CHECK(f.kind == kKindLogit, where, ": tensor '", f.name, "': bad kind ", int(f.kind));
      ++counts.n_logit;
    }
  }
  for (const auto& a : in.aliases) {
    add_name(a.name, "tied");
    check_name(a.target, where, "tied target");
  }
  for (const auto& a : in.aliases) {
    bool found = false;
    for (const auto& q : in.quantized) found = found || q.name == a.target;
    for (const auto& f : in.floats) found = found || (f.name == a.target && f.kind != kKindLogit);
    TORCH_CHECK(found, where, ": tied name '", a.name, "' refers to '", a.target,
                "', which is not a stored tensor");
  }
  const size_t n_records = in.quantized.size() + in.floats.size() + in.aliases.size();
  TORCH_CHECK(n_records <= 0xFFFFFFFFu, where, ": too many tensors");
  return counts;
}

/// Checks quantized tensor `q` (dtype, group size, min/max, bit widths); returns its groups.
inline uint64_t check_quantized_input(const QuantizedInput& q, uint64_t numel,
                                      const std::string& where) {
  TORCH_CHECK(q.dtype == kDtFloat32 || q.dtype == kDtFloat64, where, ": tensor '", q.name,
              "': quantized tensors must be float32 or float64, got ", dtype_name(q.dtype));
  TORCH_CHECK(q.group_size >= 0, where, ": tensor '", q.name, "': group_size must be >= 0, got ",
              q.group_size);
  TORCH_CHECK(std::isfinite(q.min) && std::isfinite(q.max) && q.min <= q.max, where, ": tensor '",
              q.name, "': min and max must be finite with min <= max, got min=", q.min,
              " max=", q.max);
  TORCH_CHECK(range_fits(q.dtype, q.min, q.max), where, ": tensor '", q.name,
              "': max - min must be finite in ", dtype_name(q.dtype), ", got min=", q.min,
              " max=", q.max);
  const uint64_t groups = groups_of(numel, static_cast<uint64_t>(q.group_size));
  for (uint64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(q.bits[g] >= 1 && q.bits[g] <= 15, where, ": tensor '", q.name,
                "': bit width of group ", g, " must be in [1, 15], got ", int(q.bits[g]));
  }
  return groups;
}

/// The independent encoding tasks of a checkpoint: one per segment of each quantized tensor and
/// one per float tensor.
struct EncodePlan {
  struct Task {
    size_t record;  ///< index into `in.quantized`, or into `in.floats` when `is_float`
    bool is_float;
    uint64_t s0, s1;  ///< the segment's elements
  };
  std::vector<Task> tasks;
  std::vector<std::vector<size_t>> record_tasks;  ///< tasks of each quantized tensor
  std::vector<uint64_t> numels, groups;           ///< of each quantized tensor
  std::vector<uint64_t> float_numels;
  std::vector<size_t> float_task;  ///< task of each float tensor
};

inline EncodePlan plan_encoding(const WriterInput& in, const std::string& where) {
  EncodePlan plan;
  plan.record_tasks.resize(in.quantized.size());
  for (size_t r = 0; r < in.quantized.size(); ++r) {
    const auto& q = in.quantized[r];
    const uint64_t numel = checked_numel(q.shape, where, q.name);
    plan.numels.push_back(numel);
    plan.groups.push_back(check_quantized_input(q, numel, where));
    for (uint64_t s0 = 0; s0 < numel; s0 += in.segment_elems) {
      plan.record_tasks[r].push_back(plan.tasks.size());
      plan.tasks.push_back({r, false, s0, std::min<uint64_t>(numel, s0 + in.segment_elems)});
    }
  }
  for (size_t r = 0; r < in.floats.size(); ++r) {
    const auto& f = in.floats[r];
    plan.float_numels.push_back(checked_numel(f.shape, where, f.name));
    TORCH_CHECK(dtype_bytes(f.dtype) > 0 && dtype_bytes(f.stored_dtype) > 0, where, ": tensor '",
                f.name, "': unsupported dtype");
    plan.float_task.push_back(plan.tasks.size());
    plan.tasks.push_back({r, true, 0, 0});
  }
  return plan;
}

/// Runs the plan's tasks through `pfor`; one output per task.
inline std::vector<ChunkOut> run_encoding(const WriterInput& in, const EncodePlan& plan,
                                          const ParallelFor& pfor, const std::string& where) {
  std::vector<ChunkOut> outs(plan.tasks.size());
  pfor(static_cast<int64_t>(plan.tasks.size()), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const EncodePlan::Task& task = plan.tasks[static_cast<size_t>(t)];
      if (task.is_float) {
        outs[static_cast<size_t>(t)] =
            encode_float(in.floats[task.record], plan.float_numels[task.record]);
      } else {
        outs[static_cast<size_t>(t)] = encode_segment(
            in.quantized[task.record], plan.numels[task.record], task.s0, task.s1, where);
      }
    }
  });
  return outs;
}

/// The file header without its CRC; `file_bytes` is patched once known.
inline std::vector<uint8_t> encode_header(const WriterInput& in, const RecordCounts& counts,
                                          const std::string& where) {
  std::vector<uint8_t> h;
  put_bytes(h, kMagic.data(), kMagic.size());
  put_u32(h, kFormatVersion);
  put_u32(h, 0);  // header_bytes, patched below
  put_u64(h, 0);  // file_bytes, patched by the caller
  put_u32(h, static_cast<uint32_t>(in.quantized.size() + in.floats.size() + in.aliases.size()));
  put_u32(h, in.metadata.empty() ? 0 : kFlagMetadata);
  put_u32(h, in.segment_elems);
  put_u32(h, static_cast<uint32_t>(in.quantized.size()));
  put_u32(h, static_cast<uint32_t>(counts.n_float));
  put_u32(h, static_cast<uint32_t>(counts.n_buffer));
  put_u32(h, static_cast<uint32_t>(in.aliases.size()));
  put_u32(h, static_cast<uint32_t>(counts.n_logit));
  TORCH_INTERNAL_ASSERT(h.size() == sizeof(FileHeaderFixed));
  if (!in.metadata.empty()) {
    put_u32(h, static_cast<uint32_t>(in.metadata.size()));
    for (const auto& e : in.metadata) {
      put_u16(h, static_cast<uint16_t>(e.first.size()));
      put_bytes(h, e.first.data(), e.first.size());
      put_u16(h, static_cast<uint16_t>(e.second.size()));
      put_bytes(h, e.second.data(), e.second.size());
      TORCH_CHECK(h.size() + 4 <= kMaxHeaderBytes, where, ": metadata too large for the header (",
                  kMaxHeaderBytes, " bytes at most)");
    }
  }
  patch_u32(h, 12, static_cast<uint32_t>(h.size() + 4));
  return h;
}

/// Head of quantized record `q` of `groups` groups: record head, group size, min, max and the
/// bit widths (packed nibbles, deflated when smaller).
inline std::vector<uint8_t> quantized_record_head(const QuantizedInput& q, uint64_t groups) {
  std::vector<uint8_t> head;
  put_record_head(head, kKindQuantized, q.dtype, kDtNone, q.name, q.shape);
  put_i64(head, q.group_size);
  put_f64(head, q.min);
  put_f64(head, q.max);
  const auto nib = pack_nibbles(q.bits, static_cast<size_t>(groups));
  std::vector<uint8_t> znib;
  if (nib.size() >= 32) znib = deflate_huffman(nib.data(), nib.size());
  const bool z = !znib.empty() && znib.size() < nib.size();
  const std::vector<uint8_t>& payload = z ? znib : nib;
  put_u8(head, z ? 1 : 0);
  for (int i = 0; i < 3; ++i) put_u8(head, 0);
  put_u32(head, static_cast<uint32_t>(payload.size()));
  put_bytes(head, payload.data(), payload.size());
  return head;
}

/// Appends a record (its head, then the encoded bodies, then the CRC of all) to `enc`, with its
/// size patched into the head; returns the record's bytes.
inline uint64_t append_record(EncodedCheckpoint& enc, std::vector<uint8_t>&& head,
                              const std::vector<ChunkOut*>& body) {
  uint64_t bytes = head.size() + 4;
  for (auto* c : body) bytes += c->bytes.size();
  patch_u64(head, 0, bytes);
  uint32_t crc = crc32(head.data(), head.size());
  for (auto* c : body) {
    crc = static_cast<uint32_t>(crc32_combine(crc, c->crc, static_cast<z_off_t>(c->bytes.size())));
  }
  enc.pieces.push_back(std::move(head));
  for (auto* c : body) enc.pieces.push_back(std::move(c->bytes));
  std::vector<uint8_t> tail;
  put_u32(tail, crc);
  enc.pieces.push_back(std::move(tail));
  return bytes;
}

/// Encodes a checkpoint. Throws `c10::Error` (prefixed by `where`) on invalid input: duplicate or
/// empty names, bit widths outside 1..15, levels outside their range, non-finite or unordered
/// min/max, unknown dtypes, aliases to unknown names, metadata the format cannot hold.
inline EncodedCheckpoint encode_checkpoint(const WriterInput& in, const ParallelFor& pfor,
                                           const std::string& where) {
  const RecordCounts counts = check_writer_input(in, where);
  const EncodePlan plan = plan_encoding(in, where);
  std::vector<ChunkOut> outs = run_encoding(in, plan, pfor, where);
  EncodedCheckpoint enc;
  enc.pieces.push_back(encode_header(in, counts, where));
  uint64_t total = enc.pieces[0].size() + 4;
  for (size_t r = 0; r < in.quantized.size(); ++r) {
    std::vector<ChunkOut*> body;
    for (size_t t : plan.record_tasks[r]) body.push_back(&outs[t]);
    total += append_record(enc, quantized_record_head(in.quantized[r], plan.groups[r]), body);
  }
  for (size_t r = 0; r < in.floats.size(); ++r) {
    const auto& f = in.floats[r];
    std::vector<uint8_t> head;
    put_record_head(head, f.kind, f.dtype, f.stored_dtype, f.name, f.shape);
    total += append_record(enc, std::move(head), {&outs[plan.float_task[r]]});
  }
  for (const auto& a : in.aliases) {
    std::vector<uint8_t> head;
    put_record_head(head, kKindAlias, kDtNone, kDtNone, a.name, {});
    put_u16(head, static_cast<uint16_t>(a.target.size()));
    put_bytes(head, a.target.data(), a.target.size());
    total += append_record(enc, std::move(head), {});
  }
  auto& h = enc.pieces[0];
  patch_u64(h, 16, total);
  put_u32(h, crc32(h.data(), h.size()));
  enc.total_bytes = total;
  return enc;
}

}  // namespace detail
}  // namespace diffq
