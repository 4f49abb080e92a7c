#pragma once
/// \file diffq/detail/format_decoder.h
/// Decoders of a parsed checkpoint (`format_reader.h`) into caller buffers: level chunks
/// (bit-packed or Huffman-coded), segments, dequantized weights and float payloads.

#include <diffq/detail/format_reader.h>
#include <diffq/detail/huffman.h>

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
