#pragma once
/// \file diffq/detail/format.h
/// The core of the compressed checkpoint format (`docs/checkpoint_format.md`), on raw bytes:
/// the writer from raw arrays, the parser (header, records, CRCs, every size checked before any
/// allocation) and the decoders of level chunks and float payloads into caller buffers.
/// Torch-free apart from `c10::Error` and the plain `DiffQOptions` struct, so that the reader can
/// be fuzzed (`tests/fuzz/checkpoint_fuzz.cpp`) and built with AddressSanitizer/UBSan without
/// LibTorch's tensors. The tensor-level API is `diffq/checkpoint.h`.

#include <diffq/detail/byte_io.h>
#include <diffq/detail/huffman.h>
#include <diffq/options.h>
#include <diffq/packing.h>

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

// ---------------------------------------------------------------------------------------------
// Constants and fixed-layout structs. The structs document the layout; they are never memcpy'd:
// every field is written and read explicitly little-endian.

/// First 8 bytes of every checkpoint.
constexpr std::array<uint8_t, 8> kMagic = {'D', 'I', 'F', 'F', 'Q', 'C', 'K', 'P'};
/// The only format version this code reads and writes.
constexpr uint32_t kFormatVersion = 1;
/// Elements per segment of a quantized tensor written by default (a power of two). Segments are
/// coded independently (in parallel), each as one chunk per bit width present in it.
constexpr uint32_t kDefaultSegmentElems = uint32_t{1} << 18;
constexpr uint32_t kMinSegmentElems = uint32_t{1} << 6;
constexpr uint32_t kMaxSegmentElems = uint32_t{1} << 24;
/// Largest header accepted by the reader (the options block with its exclude patterns).
constexpr uint32_t kMaxHeaderBytes = uint32_t{1} << 20;
constexpr int kMaxDims = 32;
/// Largest product of the non-zero dims of a stored shape.
constexpr uint64_t kMaxExtent = uint64_t{1} << 62;
/// Largest ratio of decompressed to compressed bytes of a deflate stream (a 258-byte match coded
/// in 2 bits); a declared size above it cannot be honest.
constexpr uint64_t kMaxDeflateRatio = 1032;
/// Flag bit of `FileHeaderFixed::flags`: an options block follows the fixed header.
constexpr uint32_t kFlagOptions = 1;

struct FileHeaderFixed {
  uint8_t magic[8];       ///< `kMagic`
  uint32_t version;       ///< `kFormatVersion`
  uint32_t header_bytes;  ///< the whole header: this struct, the options block, the header CRC
  uint64_t file_bytes;    ///< the whole file
  uint32_t num_records;
  uint32_t flags;          ///< bit 0: options block present; other bits 0
  uint32_t segment_elems;  ///< elements per segment of a quantized tensor
  uint32_t num_quantized;  ///< records of each kind; they add up to `num_records`
  uint32_t num_float;
  uint32_t num_buffer;
  uint32_t num_alias;
  uint32_t num_logit;
};
static_assert(sizeof(FileHeaderFixed) == 56, "FileHeaderFixed layout");

struct OptionsFixed {
  int64_t group_size;
  double min_bits, max_bits, init_bits, extra_bits, min_size_mb;
  uint8_t float16, noise, param, detect_bound;
  uint16_t suffix_bytes;  ///< followed by the suffix bytes
  uint16_t num_exclude;   ///< then `num_exclude` times: u16 length, pattern bytes
};
static_assert(sizeof(OptionsFixed) == 56, "OptionsFixed layout");

/// Record kinds.
enum Kind : uint8_t {
  kKindQuantized = 1,
  kKindFloat = 2,   ///< a non-quantized parameter
  kKindBuffer = 3,  ///< a module buffer
  kKindAlias = 4,   ///< a tied name: the tensor is stored under another record's name
  kKindLogit = 5,   ///< a learnt logit tensor (to resume training)
};

/// Dtype codes of the format (not c10's enum values, which are no stable file format).
enum DType : uint8_t {
  kDtNone = 0,
  kDtFloat32 = 1,
  kDtFloat64 = 2,
  kDtFloat16 = 3,
  kDtBFloat16 = 4,
  kDtInt64 = 5,
  kDtInt32 = 6,
  kDtInt16 = 7,
  kDtInt8 = 8,
  kDtUInt8 = 9,
  kDtBool = 10,
};
constexpr int kNumDtypes = 11;

/// Bytes per element of a dtype code (0 for unknown codes).
inline int dtype_bytes(uint8_t dt) {
  static const int kBytes[kNumDtypes] = {0, 4, 8, 2, 2, 8, 4, 2, 1, 1, 1};
  return dt < kNumDtypes ? kBytes[dt] : 0;
}
inline const char* dtype_name(uint8_t dt) {
  static const char* kNames[kNumDtypes] = {"none",     "float32", "float64", "float16",
                                           "bfloat16", "int64",   "int32",   "int16",
                                           "int8",     "uint8",   "bool"};
  return dt < kNumDtypes ? kNames[dt] : "unknown";
}

/// Whether `max − min` of a quantized tensor of dtype `dt` (`kDtFloat32` or `kDtFloat64`) is
/// finite in that dtype, as dequantization computes it (finite `min <= max` given); for float32,
/// `min` and `max` must also be float32 values in range.
inline bool range_fits(uint8_t dt, double min, double max) {
  if (dt == kDtFloat32) {
    const double top = static_cast<double>(std::numeric_limits<float>::max());
    return std::abs(min) <= top && std::abs(max) <= top && max - min <= top;
  }
  return std::isfinite(max - min);
}

inline bool dtype_is_floating(uint8_t dt) {
  return dt == kDtFloat32 || dt == kDtFloat64 || dt == kDtFloat16 || dt == kDtBFloat16;
}
inline const char* kind_name(uint8_t k) {
  switch (k) {
    case kKindQuantized:
      return "quantized";
    case kKindFloat:
      return "float";
    case kKindBuffer:
      return "buffer";
    case kKindAlias:
      return "alias";
    case kKindLogit:
      return "logit";
    default:
      return "unknown";
  }
}

struct RecordFixed {
  uint8_t kind;          ///< `Kind`
  uint8_t dtype;         ///< `DType` of the tensor (0 for aliases)
  uint8_t stored_dtype;  ///< `DType` of the stored float payload (0 for quantized and aliases)
  uint8_t ndim;          ///< followed, after the name, by `ndim` int64 dims
  uint16_t name_bytes;   ///< followed by the name (UTF-8, no NUL)
  uint16_t reserved;     ///< 0
};
static_assert(sizeof(RecordFixed) == 8, "RecordFixed layout");

struct QuantFixed {
  int64_t group_size;           ///< >= 0; 0: one group
  double min, max;              ///< finite, min <= max
  uint8_t bits_encoding;        ///< 0: packed nibbles as is, 1: raw deflate of the packed nibbles
  uint8_t reserved[3];          ///< 0
  uint32_t bits_payload_bytes;  ///< followed by the bit widths payload, then the chunks
};
static_assert(sizeof(QuantFixed) == 32, "QuantFixed layout");

/// Level chunk encodings.
enum ChunkEncoding : uint8_t {
  kChunkBitpack = 0,     ///< values packed at `b` bits, LSB-first
  kChunkZlibBytes = 1,   ///< b <= 8: one byte per level, raw deflate
  kChunkZlibPlanes = 2,  ///< b >= 9: u32 n, deflate of the high bytes (n bytes), low bits packed
};
inline const char* chunk_encoding_name(uint8_t e) {
  switch (e) {
    case kChunkBitpack:
      return "bitpack";
    case kChunkZlibBytes:
      return "zlib-bytes";
    case kChunkZlibPlanes:
      return "zlib-planes";
    default:
      return "unknown";
  }
}

struct ChunkFixed {
  uint8_t encoding;        ///< `ChunkEncoding`
  uint8_t reserved[3];     ///< 0
  uint32_t payload_bytes;  ///< followed by the payload
};
static_assert(sizeof(ChunkFixed) == 8, "ChunkFixed layout");

/// Float payload encodings.
enum FloatEncoding : uint8_t {
  kFloatRaw = 0,   ///< little-endian elements as is
  kFloatZlib = 1,  ///< raw deflate of the byte planes (all first bytes, then all second ...)
};

struct FloatFixed {
  uint8_t encoding;        ///< `FloatEncoding`
  uint8_t reserved[7];     ///< 0
  uint64_t payload_bytes;  ///< followed by the payload
};
static_assert(sizeof(FloatFixed) == 16, "FloatFixed layout");

/// Bytes of a record around its kind-specific part: u64 record_bytes, RecordFixed, ..., u32 crc.
constexpr uint64_t kRecordOverheadBytes = 8 + sizeof(RecordFixed) + 4;

/// Runs `body(begin, end)` over `[0, n_tasks)`, possibly in parallel (the tensor layer passes
/// `at::parallel_for`). Results never depend on how the range is split.
using ParallelFor =
    std::function<void(int64_t n_tasks, const std::function<void(int64_t, int64_t)>& body)>;
inline ParallelFor serial_for() {
  return [](int64_t n, const std::function<void(int64_t, int64_t)>& body) {
    if (n > 0) body(0, n);
  };
}

// ---------------------------------------------------------------------------------------------
// Segments. A quantized tensor of `numel` levels is cut into segments of `segment_elems`
// consecutive elements (the last one may be shorter). Within a segment, the levels are bucketed
// by the bit width of their group: the chunk of width `b` holds, in element order, the segment's
// levels whose group has `b` bits. Chunks follow each other by increasing width; widths absent
// from the segment have no chunk.

/// `ceil(numel / group_size)` (1 when group_size == 0; 0 when numel == 0).
inline uint64_t groups_of(uint64_t numel, uint64_t group_size) {
  if (numel == 0) return 0;
  if (group_size == 0) return 1;
  return numel / group_size + (numel % group_size != 0 ? 1 : 0);
}

/// Group size used for indexing: `group_size`, or `numel` when it is 0 or larger than `numel`
/// (one group either way); at least 1.
inline uint64_t index_group_size(uint64_t numel, uint64_t group_size) {
  if (group_size == 0 || group_size > numel) return std::max<uint64_t>(numel, 1);
  return group_size;
}

/// Calls `f(group, begin, end)` for each group overlapping the elements `[s0, s1)`, clipped to
/// them, in order. `gs`: `index_group_size`.
template <class F>
inline void for_each_group(uint64_t gs, uint64_t s0, uint64_t s1, F&& f) {
  uint64_t g = s0 / gs;
  uint64_t pos = s0;
  while (pos < s1) {
    const uint64_t end = std::min((g + 1) * gs, s1);
    f(g, pos, end);
    pos = end;
    ++g;
  }
}

/// Elements of each bit width in `[s0, s1)`.
inline std::array<uint64_t, 16> segment_counts(const uint8_t* bits, uint64_t gs, uint64_t s0,
                                               uint64_t s1) {
  std::array<uint64_t, 16> counts{};
  for_each_group(gs, s0, s1,
                 [&](uint64_t g, uint64_t a, uint64_t e) { counts[bits[g] & 15] += e - a; });
  return counts;
}

// ---------------------------------------------------------------------------------------------
// Writer.

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
  const DiffQOptions* options = nullptr;
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

/// Per-thread scratch buffers of the chunk coders (reused: no page faults per chunk).
struct ChunkScratch {
  std::vector<uint16_t> levels;
  std::vector<uint8_t> bytes;
};
inline ChunkScratch& chunk_scratch() {
  thread_local ChunkScratch s;
  return s;
}

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

/// Encodes a checkpoint. Throws `c10::Error` (prefixed by `where`) on invalid input: duplicate or
/// empty names, bit widths outside 1..15, levels outside their range, non-finite or unordered
/// min/max, unknown dtypes, aliases to unknown names.
inline EncodedCheckpoint encode_checkpoint(const WriterInput& in, const ParallelFor& pfor,
                                           const std::string& where) {
  TORCH_CHECK(in.segment_elems >= kMinSegmentElems && in.segment_elems <= kMaxSegmentElems &&
                  (in.segment_elems & (in.segment_elems - 1)) == 0,
              where, ": segment_elems must be a power of two in [", kMinSegmentElems, ", ",
              kMaxSegmentElems, "], got ", in.segment_elems);
  // The reader checks the options block as a quantizer checks its options.
  if (in.options) check_options(*in.options, where + ": options");
  std::set<std::string> names;
  auto add_name = [&](const std::string& n, const char* what) {
    check_name(n, where, what);
    TORCH_CHECK(names.insert(n).second, where, ": duplicate tensor name '", n, "'");
  };
  size_t n_float = 0, n_buffer = 0, n_logit = 0;
  for (const auto& q : in.quantized) add_name(q.name, "tensor");
  for (const auto& f : in.floats) {
    add_name(f.name, "tensor");
    if (f.kind == kKindFloat) {
      ++n_float;
    } else if (f.kind == kKindBuffer) {
      ++n_buffer;
    } else {
      TORCH_CHECK(f.kind == kKindLogit, where, ": tensor '", f.name, "': bad kind ", int(f.kind));
      ++n_logit;
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

  // Segment tasks of the quantized tensors, one task per float tensor.
  struct Task {
    size_t record;  // index into in.quantized, or into in.floats when `is_float`
    bool is_float;
    uint64_t s0, s1;
  };
  std::vector<std::vector<size_t>> record_tasks(in.quantized.size());
  std::vector<Task> tasks;
  std::vector<uint64_t> numels(in.quantized.size());
  std::vector<uint64_t> groups(in.quantized.size());
  for (size_t r = 0; r < in.quantized.size(); ++r) {
    const auto& q = in.quantized[r];
    numels[r] = checked_numel(q.shape, where, q.name);
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
    groups[r] = groups_of(numels[r], static_cast<uint64_t>(q.group_size));
    for (uint64_t g = 0; g < groups[r]; ++g) {
      TORCH_CHECK(q.bits[g] >= 1 && q.bits[g] <= 15, where, ": tensor '", q.name,
                  "': bit width of group ", g, " must be in [1, 15], got ", int(q.bits[g]));
    }
    for (uint64_t s0 = 0; s0 < numels[r]; s0 += in.segment_elems) {
      record_tasks[r].push_back(tasks.size());
      tasks.push_back({r, false, s0, std::min<uint64_t>(numels[r], s0 + in.segment_elems)});
    }
  }
  std::vector<uint64_t> float_numels(in.floats.size());
  std::vector<size_t> float_task(in.floats.size());
  for (size_t r = 0; r < in.floats.size(); ++r) {
    const auto& f = in.floats[r];
    float_numels[r] = checked_numel(f.shape, where, f.name);
    TORCH_CHECK(dtype_bytes(f.dtype) > 0 && dtype_bytes(f.stored_dtype) > 0, where, ": tensor '",
                f.name, "': unsupported dtype");
    float_task[r] = tasks.size();
    tasks.push_back({r, true, 0, 0});
  }
  std::vector<ChunkOut> outs(tasks.size());
  pfor(static_cast<int64_t>(tasks.size()), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Task& task = tasks[static_cast<size_t>(t)];
      if (task.is_float) {
        outs[static_cast<size_t>(t)] =
            encode_float(in.floats[task.record], float_numels[task.record]);
      } else {
        outs[static_cast<size_t>(t)] =
            encode_segment(in.quantized[task.record], numels[task.record], task.s0, task.s1, where);
      }
    }
  });

  EncodedCheckpoint enc;
  // File header (file_bytes patched at the end).
  {
    std::vector<uint8_t> h;
    put_bytes(h, kMagic.data(), kMagic.size());
    put_u32(h, kFormatVersion);
    put_u32(h, 0);  // header_bytes, patched
    put_u64(h, 0);  // file_bytes, patched
    put_u32(h, static_cast<uint32_t>(n_records));
    put_u32(h, in.options ? kFlagOptions : 0);
    put_u32(h, in.segment_elems);
    put_u32(h, static_cast<uint32_t>(in.quantized.size()));
    put_u32(h, static_cast<uint32_t>(n_float));
    put_u32(h, static_cast<uint32_t>(n_buffer));
    put_u32(h, static_cast<uint32_t>(in.aliases.size()));
    put_u32(h, static_cast<uint32_t>(n_logit));
    TORCH_INTERNAL_ASSERT(h.size() == sizeof(FileHeaderFixed));
    if (in.options) {
      const DiffQOptions& o = *in.options;
      put_i64(h, o.group_size());
      put_f64(h, o.min_bits());
      put_f64(h, o.max_bits());
      put_f64(h, o.init_bits());
      put_f64(h, o.extra_bits());
      put_f64(h, o.min_size_mb());
      put_u8(h, o.float16() ? 1 : 0);
      put_u8(h, o.noise() == Noise::kGaussian ? 0 : 1);
      put_u8(h, o.param() == Param::kBits ? 0 : 1);
      put_u8(h, o.detect_bound() ? 1 : 0);
      TORCH_CHECK(o.suffix().size() <= 65535 && o.exclude().size() <= 65535, where,
                  ": options suffix or exclude list too long");
      put_u16(h, static_cast<uint16_t>(o.suffix().size()));
      put_u16(h, static_cast<uint16_t>(o.exclude().size()));
      put_bytes(h, o.suffix().data(), o.suffix().size());
      for (const auto& e : o.exclude()) {
        TORCH_CHECK(e.size() <= 65535, where, ": exclude pattern too long");
        put_u16(h, static_cast<uint16_t>(e.size()));
        put_bytes(h, e.data(), e.size());
      }
    }
    TORCH_CHECK(h.size() + 4 <= kMaxHeaderBytes, where, ": options too large for the header");
    patch_u32(h, 12, static_cast<uint32_t>(h.size() + 4));
    // The CRC is appended once file_bytes is known.
    enc.pieces.push_back(std::move(h));
  }
  uint64_t total = enc.pieces[0].size() + 4;

  auto finish_record = [&](std::vector<uint8_t>&& head, std::vector<ChunkOut*> body) {
    uint64_t bytes = head.size() + 4;
    for (auto* c : body) bytes += c->bytes.size();
    patch_u64(head, 0, bytes);
    uint32_t crc = crc32(head.data(), head.size());
    for (auto* c : body) {
      crc =
          static_cast<uint32_t>(crc32_combine(crc, c->crc, static_cast<z_off_t>(c->bytes.size())));
    }
    enc.pieces.push_back(std::move(head));
    for (auto* c : body) enc.pieces.push_back(std::move(c->bytes));
    std::vector<uint8_t> tail;
    put_u32(tail, crc);
    enc.pieces.push_back(std::move(tail));
    total += bytes;
  };

  for (size_t r = 0; r < in.quantized.size(); ++r) {
    const auto& q = in.quantized[r];
    std::vector<uint8_t> head;
    put_record_head(head, kKindQuantized, q.dtype, kDtNone, q.name, q.shape);
    put_i64(head, q.group_size);
    put_f64(head, q.min);
    put_f64(head, q.max);
    const auto nib = pack_nibbles(q.bits, static_cast<size_t>(groups[r]));
    std::vector<uint8_t> znib;
    if (nib.size() >= 32) znib = deflate_huffman(nib.data(), nib.size());
    const bool z = !znib.empty() && znib.size() < nib.size();
    put_u8(head, z ? 1 : 0);
    put_u8(head, 0);
    put_u8(head, 0);
    put_u8(head, 0);
    put_u32(head, static_cast<uint32_t>(z ? znib.size() : nib.size()));
    if (z) {
      put_bytes(head, znib.data(), znib.size());
    } else {
      put_bytes(head, nib.data(), nib.size());
    }
    std::vector<ChunkOut*> body;
    for (size_t t : record_tasks[r]) body.push_back(&outs[t]);
    finish_record(std::move(head), std::move(body));
  }
  for (size_t r = 0; r < in.floats.size(); ++r) {
    const auto& f = in.floats[r];
    std::vector<uint8_t> head;
    put_record_head(head, f.kind, f.dtype, f.stored_dtype, f.name, f.shape);
    finish_record(std::move(head), {&outs[float_task[r]]});
  }
  for (const auto& a : in.aliases) {
    std::vector<uint8_t> head;
    put_record_head(head, kKindAlias, kDtNone, kDtNone, a.name, {});
    put_u16(head, static_cast<uint16_t>(a.target.size()));
    put_bytes(head, a.target.data(), a.target.size());
    finish_record(std::move(head), {});
  }
  auto& h = enc.pieces[0];
  patch_u64(h, 16, total);
  put_u32(h, crc32(h.data(), h.size()));
  enc.total_bytes = total;
  return enc;
}

// ---------------------------------------------------------------------------------------------
// Parser.

struct ChunkView {
  int bits = 0;
  uint8_t encoding = 0;
  uint64_t n = 0;  ///< levels in the chunk
  const uint8_t* payload = nullptr;
  uint32_t payload_bytes = 0;
  uint64_t offset = 0;  ///< file offset of the chunk header
};

struct RecordView {
  uint8_t kind = 0;
  uint8_t dtype = 0;
  uint8_t stored_dtype = 0;
  std::string name;
  std::vector<int64_t> shape;
  uint64_t numel = 0;
  uint64_t offset = 0;  ///< file offset of the record
  uint64_t record_bytes = 0;
  // Quantized.
  int64_t group_size = 0;
  double min = 0, max = 0;
  std::vector<uint8_t> bits;  ///< [groups], decoded and checked
  std::vector<ChunkView> chunks;
  /// Chunks of segment `s`: `[segment_first[s], segment_first[s + 1])`.
  std::vector<size_t> segment_first;
  // Float kinds.
  uint8_t float_encoding = 0;
  const uint8_t* payload = nullptr;
  uint64_t payload_bytes = 0;
  uint64_t payload_offset = 0;
  // Alias.
  std::string target;
};

struct ParsedCheckpoint {
  uint32_t version = 0;
  uint64_t file_bytes = 0;
  uint32_t segment_elems = 0;
  bool has_options = false;
  DiffQOptions options;
  /// Why a stored options block was set aside (values a quantizer refuses: files written before
  /// the writer checked them); empty otherwise. The options are informational: the tensors load.
  std::string options_problem;
  std::vector<RecordView> records;
  ErrorContext ctx;  ///< where/source, for errors of later decoding steps
};

struct ParseSettings {
  /// Verify the header and record CRCs. Only the fuzzer and the robustness tests turn this off,
  /// to reach the checks behind them.
  bool verify_crc = true;
};

inline void parse_header(ByteReader& r, ParsedCheckpoint& pc, uint32_t counts[5],
                         uint32_t& num_records, const ParseSettings& settings) {
  const uint8_t* start = r.here();
  const size_t file_size = r.remaining();
  r.need(kMagic.size(), "magic");
  if (std::memcmp(r.here(), kMagic.data(), kMagic.size()) != 0) {
    r.fail("not a diffq checkpoint (bad magic; expected \"DIFFQCKP\")");
  }
  r.take(kMagic.size(), "magic");
  pc.version = r.u32("format version");
  if (pc.version != kFormatVersion) {
    r.fail(8, "unsupported format version " + std::to_string(pc.version) +
                  " (this reader supports version " + std::to_string(kFormatVersion) + ")");
  }
  const uint64_t hb_off = r.offset();
  const uint32_t header_bytes = r.u32("header size");
  if (header_bytes < sizeof(FileHeaderFixed) + 4 || header_bytes > kMaxHeaderBytes) {
    r.fail(hb_off, "header size " + std::to_string(header_bytes) + " outside [" +
                       std::to_string(sizeof(FileHeaderFixed) + 4) + ", " +
                       std::to_string(kMaxHeaderBytes) + "]");
  }
  if (header_bytes > file_size) {
    r.fail(hb_off, "truncated header: declares " + std::to_string(header_bytes) +
                       " bytes, the file has " + std::to_string(file_size));
  }
  if (settings.verify_crc) {
    const uint32_t stored = load_le<uint32_t>(start + header_bytes - 4);
    const uint32_t computed = crc32(start, header_bytes - 4);
    if (stored != computed) {
      r.fail(header_bytes - 4, "header CRC mismatch (stored " + std::to_string(stored) +
                                   ", computed " + std::to_string(computed) + ")");
    }
  }
  ByteReader h(start, header_bytes - 4, 0, &r.ctx());
  h.take(16, "header");
  const uint64_t fb_off = h.offset();
  pc.file_bytes = h.u64("file size");
  if (pc.file_bytes != file_size) {
    h.fail(fb_off, "the header declares " + std::to_string(pc.file_bytes) +
                       " bytes but the file has " + std::to_string(file_size) +
                       (file_size < pc.file_bytes ? " (truncated)" : " (trailing bytes)"));
  }
  num_records = h.u32("record count");
  const uint64_t flags_off = h.offset();
  const uint32_t flags = h.u32("flags");
  if ((flags & ~kFlagOptions) != 0) h.fail(flags_off, "unknown flags " + std::to_string(flags));
  const uint64_t ce_off = h.offset();
  pc.segment_elems = h.u32("segment size");
  if (pc.segment_elems < kMinSegmentElems || pc.segment_elems > kMaxSegmentElems ||
      (pc.segment_elems & (pc.segment_elems - 1)) != 0) {
    h.fail(ce_off, "segment size " + std::to_string(pc.segment_elems) +
                       " is not a power of two in [" + std::to_string(kMinSegmentElems) + ", " +
                       std::to_string(kMaxSegmentElems) + "]");
  }
  uint64_t sum = 0;
  for (int k = 0; k < 5; ++k) {
    counts[k] = h.u32("record counts");
    sum += counts[k];
  }
  if (sum != num_records) {
    h.fail(24, "record counts by kind add up to " + std::to_string(sum) + ", not " +
                   std::to_string(num_records));
  }
  // Every record takes at least kRecordOverheadBytes.
  if (num_records > (file_size - header_bytes) / kRecordOverheadBytes) {
    h.fail(24, std::to_string(num_records) + " records cannot fit in the " +
                   std::to_string(file_size - header_bytes) + " bytes after the header");
  }
  pc.has_options = (flags & kFlagOptions) != 0;
  if (pc.has_options) {
    const uint64_t options_off = h.offset();
    DiffQOptions& o = pc.options;
    o.group_size(h.i64("options"));
    o.min_bits(h.f64("options"));
    o.max_bits(h.f64("options"));
    o.init_bits(h.f64("options"));
    o.extra_bits(h.f64("options"));
    o.min_size_mb(h.f64("options"));
    const uint64_t b_off = h.offset();
    const uint8_t f16 = h.u8("options"), noise = h.u8("options"), param = h.u8("options"),
                  bound = h.u8("options");
    if (f16 > 1 || noise > 1 || param > 1 || bound > 1) {
      h.fail(b_off,
             "invalid option flags (float16, noise, param, detect_bound must each be 0 or "
             "1, got " +
                 std::to_string(f16) + ", " + std::to_string(noise) + ", " + std::to_string(param) +
                 ", " + std::to_string(bound) + ")");
    }
    o.float16(f16 == 1);
    o.noise(noise == 0 ? Noise::kGaussian : Noise::kUniform);
    o.param(param == 0 ? Param::kBits : Param::kNoise);
    o.detect_bound(bound == 1);
    const uint16_t suffix_bytes = h.u16("options");
    const uint16_t num_exclude = h.u16("options");
    o.suffix(h.str(suffix_bytes, "options suffix"));
    std::vector<std::string> ex;
    for (uint16_t i = 0; i < num_exclude; ++i) {
      const uint16_t len = h.u16("exclude pattern");
      ex.push_back(h.str(len, "exclude pattern"));
    }
    o.exclude(ex);
    try {
      check_options(o, "options block");
    } catch (const c10::Error& e) {
      pc.has_options = false;
      pc.options = DiffQOptions();
      pc.options_problem = escape_control(pc.ctx.prefix(options_off) + e.msg());
    }
  }
  if (h.remaining() != 0) {
    h.fail(std::to_string(h.remaining()) + " unexpected bytes at the end of the header");
  }
  r.take(header_bytes - 16, "header");
}

inline void parse_quantized(ByteReader& b, RecordView& rv, uint32_t segment_elems) {
  const uint64_t gs_off = b.offset();
  rv.group_size = b.i64("group size");
  if (rv.group_size < 0) b.fail(gs_off, "group size " + std::to_string(rv.group_size) + " < 0");
  const uint64_t mm_off = b.offset();
  rv.min = b.f64("min");
  rv.max = b.f64("max");
  if (!(std::isfinite(rv.min) && std::isfinite(rv.max) && rv.min <= rv.max)) {
    std::ostringstream os;
    os << "min and max must be finite with min <= max, got min=" << rv.min << " max=" << rv.max;
    b.fail(mm_off, os.str());
  }
  if (!range_fits(rv.dtype, rv.min, rv.max)) {
    std::ostringstream os;
    os << "max - min must be finite in " << dtype_name(rv.dtype) << ", got min=" << rv.min
       << " max=" << rv.max;
    b.fail(mm_off, os.str());
  }
  const uint64_t be_off = b.offset();
  const uint8_t bits_enc = b.u8("bit widths encoding");
  if (bits_enc > 1) b.fail(be_off, "unknown bit widths encoding " + std::to_string(bits_enc));
  for (int i = 0; i < 3; ++i) {
    if (b.u8("reserved") != 0) b.fail(be_off + 1, "reserved bytes are not zero");
  }
  const uint32_t bits_payload = b.u32("bit widths size");
  const uint64_t groups = groups_of(rv.numel, static_cast<uint64_t>(rv.group_size));
  const uint64_t nib_bytes = (groups + 1) / 2;
  const uint64_t bp_off = b.offset();
  const uint8_t* bp = b.take(bits_payload, "bit widths");
  std::vector<uint8_t> nib;
  if (bits_enc == 0) {
    if (bits_payload != nib_bytes) {
      b.fail(bp_off, "bit widths of " + std::to_string(groups) + " groups take " +
                         std::to_string(nib_bytes) + " bytes, got " + std::to_string(bits_payload));
    }
    nib.assign(bp, bp + bits_payload);
  } else {
    if (bits_payload == 0 || nib_bytes > kMaxDeflateRatio * bits_payload) {
      b.fail(bp_off, "compressed bit widths of " + std::to_string(bits_payload) +
                         " bytes cannot hold " + std::to_string(nib_bytes) + " bytes");
    }
    nib.resize(static_cast<size_t>(nib_bytes));
    std::string why;
    if (const char* err = inflate_raw_exact(bp, bits_payload, nib.data(), nib.size(), &why)) {
      b.fail(bp_off,
             std::string("bit widths: ") + err + (why.empty() ? "" : " (zlib: " + why + ")"));
    }
  }
  rv.bits.resize(static_cast<size_t>(groups));
  unpack_nibbles(nib.data(), static_cast<size_t>(groups), rv.bits.data());
  for (uint64_t g = 0; g < groups; ++g) {
    if (rv.bits[static_cast<size_t>(g)] == 0) {
      b.fail(bp_off, "bit width of group " + std::to_string(g) + " is 0 (must be in [1, 15])");
    }
  }
  if (groups % 2 == 1 && (nib.back() >> 4) != 0) {
    b.fail(bp_off, "padding nibble of the bit widths is not zero");
  }
  const uint64_t gs = index_group_size(rv.numel, static_cast<uint64_t>(rv.group_size));
  for (uint64_t s0 = 0; s0 < rv.numel; s0 += segment_elems) {
    const uint64_t s1 = std::min<uint64_t>(rv.numel, s0 + segment_elems);
    rv.segment_first.push_back(rv.chunks.size());
    const auto counts = segment_counts(rv.bits.data(), gs, s0, s1);
    for (int w = 1; w <= 15; ++w) {
      const uint64_t cn = counts[static_cast<size_t>(w)];
      if (cn == 0) continue;
      ChunkView c;
      c.bits = w;
      c.n = cn;
      c.offset = b.offset();
      c.encoding = b.u8("chunk encoding");
      for (int i = 0; i < 3; ++i) {
        if (b.u8("chunk header") != 0) b.fail(c.offset + 1, "reserved bytes are not zero");
      }
      c.payload_bytes = b.u32("chunk size");
      const uint64_t min_bytes = (cn + 7) / 8;  // every level takes at least one bit
      const std::string where_chunk = "chunk of " + std::to_string(cn) + " " + std::to_string(w) +
                                      "-bit levels in elements [" + std::to_string(s0) + ", " +
                                      std::to_string(s1) + ")";
      if (c.encoding == kChunkBitpack) {
        if (c.payload_bytes != packed_bytes(cn, w)) {
          b.fail(c.offset, where_chunk + ": bit-packed size must be " +
                               std::to_string(packed_bytes(cn, w)) + " bytes, got " +
                               std::to_string(c.payload_bytes));
        }
      } else if (c.encoding == kChunkZlibBytes) {
        if (w > 8) b.fail(c.offset, where_chunk + ": zlib-bytes encoding needs bits <= 8");
        if (c.payload_bytes < 12 + min_bytes) {
          b.fail(c.offset,
                 where_chunk + ": " + std::to_string(c.payload_bytes) + " bytes cannot hold them");
        }
      } else if (c.encoding == kChunkZlibPlanes) {
        if (w <= 8) b.fail(c.offset, where_chunk + ": zlib-planes encoding needs bits >= 9");
        const uint64_t need = 4 + 12 + min_bytes + packed_bytes(cn, w - 8);
        if (c.payload_bytes < need) {
          b.fail(c.offset,
                 where_chunk + ": " + std::to_string(c.payload_bytes) + " bytes cannot hold them");
        }
      } else {
        b.fail(c.offset, where_chunk + ": unknown encoding " + std::to_string(c.encoding));
      }
      c.payload = b.take(c.payload_bytes, "chunk payload");
      rv.chunks.push_back(c);
    }
  }
  rv.segment_first.push_back(rv.chunks.size());
}

inline void parse_float(ByteReader& b, RecordView& rv) {
  const uint64_t off = b.offset();
  rv.float_encoding = b.u8("float encoding");
  if (rv.float_encoding > kFloatZlib) {
    b.fail(off, "unknown float encoding " + std::to_string(rv.float_encoding));
  }
  for (int i = 0; i < 7; ++i) {
    if (b.u8("float header") != 0) b.fail(off + 1, "reserved bytes are not zero");
  }
  rv.payload_bytes = b.u64("float payload size");
  rv.payload_offset = b.offset();
  const uint64_t raw = rv.numel * static_cast<uint64_t>(dtype_bytes(rv.stored_dtype));
  if (rv.float_encoding == kFloatRaw && rv.payload_bytes != raw) {
    b.fail(off, std::to_string(rv.numel) + " elements of " + dtype_name(rv.stored_dtype) +
                    " take " + std::to_string(raw) + " bytes, got " +
                    std::to_string(rv.payload_bytes));
  }
  if (rv.float_encoding == kFloatZlib &&
      (rv.payload_bytes == 0 || raw / kMaxDeflateRatio > rv.payload_bytes)) {
    b.fail(off, "compressed payload of " + std::to_string(rv.payload_bytes) +
                    " bytes cannot hold " + std::to_string(raw) + " bytes");
  }
  rv.payload = b.take(rv.payload_bytes, "float payload");
}

/// Parses and checks a whole checkpoint held in `[data, data + size)`: header, record framing,
/// CRCs, names, shapes, bit widths and every declared size (against the bytes present before any
/// allocation). Payloads stay undecoded (views into `data`, which must outlive the result).
/// Throws `c10::Error` prefixed by `"<where>: <source>: ... at byte <offset>: "`.
inline ParsedCheckpoint parse_checkpoint(const uint8_t* data, size_t size, const std::string& where,
                                         const std::string& source,
                                         const ParseSettings& settings = ParseSettings()) {
  ParsedCheckpoint pc;
  pc.ctx.where = where;
  pc.ctx.source = source;
  ErrorContext& ctx = pc.ctx;
  ByteReader r(data, size, 0, &ctx);
  uint32_t counts[5];
  uint32_t num_records = 0;
  parse_header(r, pc, counts, num_records, settings);
  uint32_t seen[5] = {0, 0, 0, 0, 0};
  std::unordered_map<std::string, size_t> by_name;
  pc.records.reserve(num_records);
  for (uint32_t i = 0; i < num_records; ++i) {
    ctx.record = i;
    ctx.name.clear();
    const uint64_t off = r.offset();
    const uint64_t rb = r.u64("record size");
    if (rb < kRecordOverheadBytes || rb - 8 > r.remaining()) {
      r.fail(off, "record size " + std::to_string(rb) + " outside [" +
                      std::to_string(kRecordOverheadBytes) + ", " +
                      std::to_string(r.remaining() + 8) + "] (bytes left in the file)");
    }
    const uint8_t* rec = r.here() - 8;
    if (settings.verify_crc) {
      const uint32_t stored = load_le<uint32_t>(rec + rb - 4);
      const uint32_t computed = crc32(rec, static_cast<size_t>(rb - 4));
      if (stored != computed) {
        r.fail(off + rb - 4, "record CRC mismatch (stored " + std::to_string(stored) +
                                 ", computed " + std::to_string(computed) + ")");
      }
    }
    ByteReader b(rec + 8, static_cast<size_t>(rb - 12), off + 8, &ctx);
    r.take(rb - 8, "record");
    RecordView rv;
    rv.offset = off;
    rv.record_bytes = rb;
    const uint64_t fixed_off = b.offset();
    rv.kind = b.u8("record kind");
    rv.dtype = b.u8("dtype");
    rv.stored_dtype = b.u8("stored dtype");
    const uint8_t ndim = b.u8("ndim");
    const uint16_t name_bytes = b.u16("name size");
    if (b.u16("reserved") != 0) b.fail(fixed_off + 6, "reserved bytes are not zero");
    if (rv.kind < kKindQuantized || rv.kind > kKindLogit) {
      b.fail(fixed_off, "unknown record kind " + std::to_string(rv.kind));
    }
    if (name_bytes == 0) b.fail(fixed_off + 4, "empty tensor name");
    rv.name = b.str(name_bytes, "name");
    if (rv.name.find('\0') != std::string::npos) b.fail(fixed_off + 8, "name contains a NUL byte");
    ctx.name = rv.name;
    if (ndim > kMaxDims) {
      b.fail(fixed_off + 3, std::to_string(ndim) + " dims, at most " + std::to_string(kMaxDims));
    }
    rv.numel = 1;
    // No record holds more than kMaxDeflateRatio elements per byte of the file (a deflated float
    // payload inflates at most that much; a quantized level takes at least a bit, checked below).
    // The product of the non-zero dims stays below 2^62 (as the writer's), so that the strides
    // of an empty tensor cannot overflow.
    const uint64_t shape_off = b.offset();
    uint64_t extent = 1;
    bool empty = false;
    for (int d = 0; d < ndim; ++d) {
      const uint64_t d_off = b.offset();
      const int64_t dim = b.i64("shape");
      if (dim < 0) b.fail(d_off, "negative dim " + std::to_string(dim));
      if (dim > 0 && extent > kMaxExtent / static_cast<uint64_t>(dim)) {
        b.fail(d_off, "the non-zero dims of the shape multiply to more than 2^62");
      }
      if (dim > 0) extent *= static_cast<uint64_t>(dim);
      empty = empty || dim == 0;
      rv.shape.push_back(dim);
    }
    rv.numel = empty ? 0 : extent;
    const uint64_t max_elems = kMaxDeflateRatio * static_cast<uint64_t>(size);
    if (rv.numel > max_elems) {
      b.fail(shape_off, "shape declares more elements than the file can hold (" +
                            std::to_string(rv.numel) + " > " + std::to_string(max_elems) +
                            ", 1032 per byte of the file)");
    }
    const uint8_t k = rv.kind;
    if (k == kKindAlias) {
      if (rv.dtype != kDtNone || rv.stored_dtype != kDtNone || ndim != 0) {
        b.fail(fixed_off, "alias records have no dtype and no shape");
      }
      const uint16_t tb = b.u16("alias target size");
      if (tb == 0) b.fail("empty alias target");
      rv.target = b.str(tb, "alias target");
      if (rv.target.find('\0') != std::string::npos) b.fail("alias target contains a NUL byte");
    } else if (k == kKindQuantized) {
      if (rv.dtype != kDtFloat32 && rv.dtype != kDtFloat64) {
        b.fail(fixed_off + 1, std::string("quantized tensors are float32 or float64, got dtype ") +
                                  dtype_name(rv.dtype));
      }
      if (rv.stored_dtype != kDtNone) b.fail(fixed_off + 2, "stored dtype must be 0");
      // Every level takes at least one bit of the record.
      if (rv.numel > 8 * rb) {
        b.fail(fixed_off, std::to_string(rv.numel) + " levels cannot fit in a record of " +
                              std::to_string(rb) + " bytes");
      }
      parse_quantized(b, rv, pc.segment_elems);
    } else {
      if (dtype_bytes(rv.dtype) == 0) {
        b.fail(fixed_off + 1, "unknown dtype " + std::to_string(rv.dtype));
      }
      if (dtype_bytes(rv.stored_dtype) == 0) {
        b.fail(fixed_off + 2, "unknown stored dtype " + std::to_string(rv.stored_dtype));
      }
      if (rv.stored_dtype != rv.dtype &&
          !(rv.stored_dtype == kDtFloat16 && dtype_is_floating(rv.dtype))) {
        b.fail(fixed_off + 2, std::string("a ") + dtype_name(rv.dtype) +
                                  " tensor cannot be stored as " + dtype_name(rv.stored_dtype));
      }
      parse_float(b, rv);
    }
    if (b.remaining() != 0) {
      b.fail(std::to_string(b.remaining()) + " unexpected bytes at the end of the record");
    }
    if (!by_name.emplace(rv.name, pc.records.size()).second) {
      r.fail(off, "duplicate tensor name '" + rv.name + "'");
    }
    ++seen[k - 1];
    pc.records.push_back(std::move(rv));
  }
  ctx.record = -1;
  ctx.name.clear();
  for (int k = 0; k < 5; ++k) {
    if (seen[k] != counts[k]) {
      r.fail(24, std::string("the header declares ") + std::to_string(counts[k]) + " " +
                     kind_name(static_cast<uint8_t>(k + 1)) + " records, the file holds " +
                     std::to_string(seen[k]));
    }
  }
  for (size_t i = 0; i < pc.records.size(); ++i) {
    const RecordView& rv = pc.records[i];
    if (rv.kind != kKindAlias) continue;
    auto it = by_name.find(rv.target);
    if (it == by_name.end() || pc.records[it->second].kind == kKindAlias ||
        pc.records[it->second].kind == kKindLogit) {
      ctx.record = static_cast<int64_t>(i);
      ctx.name = rv.name;
      fail_at(ctx, rv.offset,
              "tied name refers to '" + rv.target + "', which is not a stored tensor");
    }
  }
  if (r.remaining() != 0) r.fail("unexpected bytes after the last record");
  return pc;
}

// ---------------------------------------------------------------------------------------------
// Decoders.

/// Decodes the `c.n` levels of chunk `c` into `lv` (scratch `sym` of `c.n` bytes). Throws on a
/// corrupt deflate stream or a level above its width's range.
inline void decode_levels(const ChunkView& c, uint16_t* lv, uint8_t* sym, const ErrorContext& ctx,
                          uint64_t s0, uint64_t s1) {
  const size_t n = static_cast<size_t>(c.n);
  const int b = c.bits;
  auto chunk_fail = [&](const std::string& msg) {
    fail_at(ctx, c.offset,
            "chunk of " + std::to_string(n) + " " + std::to_string(b) +
                "-bit levels in elements [" + std::to_string(s0) + ", " + std::to_string(s1) +
                "): " + msg);
  };
  if (c.encoding == kChunkBitpack) {
    unpack_bits(c.payload, c.payload_bytes, n, b, lv);
  } else if (c.encoding == kChunkZlibBytes) {
    std::string why;
    if (const char* err = inflate_huffman4(c.payload, c.payload_bytes, sym, n, &why)) {
      chunk_fail(std::string(err) + (why.empty() ? "" : " (" + why + ")"));
    }
    uint8_t mx = 0;
    for (size_t i = 0; i < n; ++i) {
      mx = std::max(mx, sym[i]);
      lv[i] = sym[i];
    }
    if (b < 8 && mx >= (1u << b)) {
      chunk_fail("level " + std::to_string(mx) + " exceeds " + std::to_string((1u << b) - 1));
    }
  } else {
    const uint32_t hb = load_le<uint32_t>(c.payload);
    const int shift = b - 8;
    const uint64_t low = packed_bytes(n, shift);
    if (hb < 12 + (n + 7) / 8 || uint64_t{4} + hb + low != c.payload_bytes) {
      chunk_fail("high-byte plane of " + std::to_string(hb) + " bytes does not add up to the " +
                 std::to_string(c.payload_bytes) + "-byte payload");
    }
    std::string why;
    if (const char* err = inflate_huffman4(c.payload + 4, hb, sym, n, &why)) {
      chunk_fail(std::string("high-byte plane: ") + err + (why.empty() ? "" : " (" + why + ")"));
    }
    unpack_bits(c.payload + 4 + hb, static_cast<size_t>(low), n, shift, lv);
    for (size_t i = 0; i < n; ++i) lv[i] = static_cast<uint16_t>(lv[i] | (sym[i] << shift));
  }
}

/// Dequantized weights of elements `[begin, end)` of quantized record `rv` from its levels
/// (`[numel]`, element order): `out[i] = T(levels[i]) * step_by_width[bits[group of i]] + min`,
/// the product rounded before the sum: two separate loops over at most `kDequantBlock` elements,
/// so that no compiler contracts them into an FMA (ATen's `mul` and `add` kernels round each), and
/// the second loop reads the block back from L1. `step_by_width[b]` is the step of width `b`.
constexpr uint64_t kDequantBlock = 2048;
template <class T>
inline void dequantize_range(const RecordView& rv, const int16_t* __restrict levels,
                             const T* step_by_width, T* __restrict out, uint64_t begin,
                             uint64_t end) {
  const uint64_t gs = index_group_size(rv.numel, static_cast<uint64_t>(rv.group_size));
  const T m = static_cast<T>(rv.min);
  for (uint64_t b0 = begin; b0 < end; b0 += kDequantBlock) {
    const uint64_t b1 = std::min(end, b0 + kDequantBlock);
    for (uint64_t i = b0; i < b1;) {
      const uint64_t g = i / gs;
      const uint64_t e = std::min(b1, (g + 1) * gs);
      const T s = step_by_width[rv.bits[static_cast<size_t>(g)]];
      for (uint64_t k = i; k < e; ++k) out[k] = static_cast<T>(levels[k]) * s;
      i = e;
    }
    for (uint64_t k = b0; k < b1; ++k) out[k] = out[k] + m;
  }
}

/// Decodes segment `s` of quantized record `rv` into `levels` (the record's `[numel]` int16 levels,
/// of which it writes the segment's elements, in element order).
inline void decode_segment(const RecordView& rv, size_t s, uint64_t segment_elems, int16_t* levels,
                           const ErrorContext& base_ctx, int64_t record_index) {
  ErrorContext ctx = base_ctx;
  ctx.record = record_index;
  ctx.name = rv.name;
  const uint64_t s0 = static_cast<uint64_t>(s) * segment_elems;
  const uint64_t s1 = std::min<uint64_t>(rv.numel, s0 + segment_elems);
  const size_t n = static_cast<size_t>(s1 - s0);
  const uint64_t gs = index_group_size(rv.numel, static_cast<uint64_t>(rv.group_size));
  ChunkScratch& scratch = chunk_scratch();
  if (scratch.levels.size() < n) scratch.levels.resize(n);
  if (scratch.bytes.size() < n) scratch.bytes.resize(n);
  uint16_t* lv = scratch.levels.data();
  uint8_t* sym = scratch.bytes.data();
  std::array<uint64_t, 16> cursor{};
  uint64_t total = 0;
  for (size_t k = rv.segment_first[s]; k < rv.segment_first[s + 1]; ++k) {
    const ChunkView& c = rv.chunks[k];
    cursor[static_cast<size_t>(c.bits)] = total;
    decode_levels(c, lv + total, sym + total, ctx, s0, s1);
    total += c.n;
  }
  for_each_group(gs, s0, s1, [&](uint64_t g, uint64_t a, uint64_t e) {
    const size_t b = rv.bits[static_cast<size_t>(g)];
    const uint16_t* __restrict src = lv + cursor[b];
    int16_t* __restrict d = levels + a;
    for (uint64_t i = 0; i < e - a; ++i) d[i] = static_cast<int16_t>(src[i]);
    cursor[b] += e - a;
  });
}

/// Decodes the float payload of `rv` into `out` (`numel` elements of `rv.stored_dtype`). Throws
/// on a corrupt stream, or on bool values other than 0 and 1.
inline void decode_float(const RecordView& rv, uint8_t* out, const ErrorContext& base_ctx,
                         int64_t record_index) {
  ErrorContext ctx = base_ctx;
  ctx.record = record_index;
  ctx.name = rv.name;
  const int eb = dtype_bytes(rv.stored_dtype);
  const uint64_t raw = rv.numel * static_cast<uint64_t>(eb);
  if (rv.float_encoding == kFloatRaw) {
    if (raw > 0) std::memcpy(out, rv.payload, static_cast<size_t>(raw));
  } else {
    std::vector<uint8_t> planes(static_cast<size_t>(raw));
    std::string why;
    if (const char* err = inflate_raw_exact(rv.payload, static_cast<size_t>(rv.payload_bytes),
                                            planes.data(), planes.size(), &why)) {
      fail_at(ctx, rv.payload_offset,
              std::string("float payload: ") + err + (why.empty() ? "" : " (zlib: " + why + ")"));
    }
    for (int k = 0; k < eb; ++k) {
      const uint8_t* src = planes.data() + static_cast<size_t>(rv.numel) * static_cast<size_t>(k);
      for (uint64_t i = 0; i < rv.numel; ++i)
        out[i * static_cast<uint64_t>(eb) + static_cast<uint64_t>(k)] = src[i];
    }
  }
  if (rv.stored_dtype == kDtBool) {
    for (uint64_t i = 0; i < rv.numel; ++i) {
      if (out[i] > 1) {
        fail_at(ctx, rv.payload_offset,
                "bool element " + std::to_string(i) + " has value " + std::to_string(out[i]) +
                    " (must be 0 or 1)");
      }
    }
  }
}

}  // namespace detail
}  // namespace diffq
