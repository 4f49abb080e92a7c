#pragma once
/// \file diffq/detail/format_spec.h
/// Constants, fixed-layout structs, codes and the segment rule of the compressed checkpoint
/// format (`docs/checkpoint_format.md`), shared by its writer (`format_writer.h`), reader and
/// validator (`format_reader.h`) and decoder (`format_decoder.h`). Torch-free apart from
/// `c10::Error`, so that the reader can be fuzzed (`tests/fuzz/checkpoint_fuzz.cpp`) and built
/// with AddressSanitizer/UBSan without LibTorch's tensors.

#include <diffq/detail/byte_io.h>
#include <diffq/detail/packing.h>

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
/// The format version this code writes; it also reads version 1 (`kFormatVersion1`), whose
/// header holds a `DiffQOptions` block in place of the metadata block.
constexpr uint32_t kFormatVersion = 2;
constexpr uint32_t kFormatVersion1 = 1;
/// Elements per segment of a quantized tensor written by default (a power of two). Segments are
/// coded independently (in parallel), each as one chunk per bit width present in it.
constexpr uint32_t kDefaultSegmentElems = uint32_t{1} << 18;
constexpr uint32_t kMinSegmentElems = uint32_t{1} << 6;
constexpr uint32_t kMaxSegmentElems = uint32_t{1} << 24;
/// Largest header accepted by the reader (the metadata block with its entries).
constexpr uint32_t kMaxHeaderBytes = uint32_t{1} << 20;
constexpr int kMaxDims = 32;
/// Largest product of the non-zero dims of a stored shape.
constexpr uint64_t kMaxExtent = uint64_t{1} << 62;
/// Largest ratio of decompressed to compressed bytes of a deflate stream (a 258-byte match coded
/// in 2 bits); a declared size above it cannot be honest.
constexpr uint64_t kMaxDeflateRatio = 1032;
/// Flag bit of `FileHeaderFixed::flags`: a metadata block (version 2) or an options block
/// (version 1) follows the fixed header.
constexpr uint32_t kFlagMetadata = 1;
constexpr uint32_t kFlagOptions = 1;

struct FileHeaderFixed {
  uint8_t magic[8];       ///< `kMagic`
  uint32_t version;       ///< `kFormatVersion`
  uint32_t header_bytes;  ///< the whole header: this struct, the metadata block, the header CRC
  uint64_t file_bytes;    ///< the whole file
  uint32_t num_records;
  uint32_t flags;          ///< bit 0: metadata (v1: options) block present; other bits 0
  uint32_t segment_elems;  ///< elements per segment of a quantized tensor
  uint32_t num_quantized;  ///< records of each kind; they add up to `num_records`
  uint32_t num_float;
  uint32_t num_buffer;
  uint32_t num_alias;
  uint32_t num_logit;
};
static_assert(sizeof(FileHeaderFixed) == 56, "FileHeaderFixed layout");

/// Version 1's options block (the `DiffQOptions` a model was trained with).
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

/// Per-thread scratch buffers of the chunk coders (reused: no page faults per chunk).
struct ChunkScratch {
  std::vector<uint16_t> levels;
  std::vector<uint8_t> bytes;
};
inline ChunkScratch& chunk_scratch() {
  thread_local ChunkScratch s;
  return s;
}

}  // namespace detail
}  // namespace diffq
