#pragma once
/// \file diffq/detail/packing.h
/// Byte-level building blocks of the compressed checkpoint (`diffq/checkpoint.h`,
/// `docs/checkpoint_format.md`): bit packing of integer levels, 4-bit packing of bit widths, byte
/// planes of 9..15-bit levels, raw-deflate (zlib) compression helpers and CRC-32.
///
/// Conventions: bit streams are LSB-first (value `i` of width `b` occupies bits `[i·b, (i+1)·b)`
/// of the little-endian bit stream, like deflate); deflate streams are raw (RFC 1951, zlib's
/// `windowBits = -15`): the checkpoint's per-record CRC-32 protects them.
///
/// Torch-free apart from `c10::Error` (`TORCH_CHECK`), so that the checkpoint reader core can be
/// fuzzed and sanitized without LibTorch's tensors.

#include <diffq/detail/byte_io.h>
#include <diffq/detail/huffman.h>

#include <c10/util/Exception.h>
#include <zlib.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace diffq {
namespace detail {

/// Bytes needed to bit-pack `n` values of `bits` bits: `ceil(n·bits / 8)`.
inline uint64_t packed_bytes(uint64_t n, int bits) {
  return (n / 8) * static_cast<uint64_t>(bits) + ((n % 8) * static_cast<uint64_t>(bits) + 7) / 8;
}

/// Packs 8 values of `B` bits into `B` bytes at `out` (LSB-first).
template <int B>
inline void pack8(const uint16_t* v, uint8_t* out) {
  uint64_t lo = 0, hi = 0;
  for (int k = 0; k < 8; ++k) {
    const int sh = k * B;
    const uint64_t x = v[k];
    if (sh < 64) {
      lo |= x << sh;
      if (sh + B > 64) hi |= x >> (64 - sh);
    } else {
      hi |= x << (sh - 64);
    }
  }
  uint8_t tmp[16];
  std::memcpy(tmp, &lo, 8);  // little-endian host (checked in byte_io.h)
  std::memcpy(tmp + 8, &hi, 8);
  std::memcpy(out, tmp, B);
}

/// Splits the 128-bit little-endian word `hi:lo` into its 8 low values of `B` bits (LSB-first).
template <int B>
inline void split8(uint64_t lo, uint64_t hi, uint16_t* v) {
  constexpr uint64_t mask = (uint64_t{1} << B) - 1;
  for (int k = 0; k < 8; ++k) {
    const int sh = k * B;
    uint64_t x;
    if (sh < 64) {
      x = lo >> sh;
      if (sh + B > 64) x |= hi << (64 - sh);
    } else {
      x = hi >> (sh - 64);
    }
    v[k] = static_cast<uint16_t>(x & mask);
  }
}

/// Unpacks 8 values of `B` bits from the `B` bytes at `in` (reads no byte past them).
template <int B>
inline void unpack8(const uint8_t* in, uint16_t* v) {
  uint8_t tmp[16] = {0};
  std::memcpy(tmp, in, B);
  uint64_t lo, hi;
  std::memcpy(&lo, tmp, 8);
  std::memcpy(&hi, tmp + 8, 8);
  split8<B>(lo, hi, v);
}

template <int B>
inline void pack_bits_t(const uint16_t* values, size_t n, uint8_t* out) {
  const size_t full = n / 8;
  const size_t total = (n * B + 7) / 8;
  size_t i = 0;
  // Direct 16-byte stores while they stay inside the output (each group overwrites the previous
  // group's spill).
  for (; i < full && B * i + 16 <= total; ++i) {
    uint64_t lo = 0, hi = 0;
    const uint16_t* v = values + 8 * i;
    for (int k = 0; k < 8; ++k) {
      const int sh = k * B;
      const uint64_t x = v[k];
      if (sh < 64) {
        lo |= x << sh;
        if (sh + B > 64) hi |= x >> (64 - sh);
      } else {
        hi |= x << (sh - 64);
      }
    }
    std::memcpy(out + B * i, &lo, 8);  // little-endian host (checked in byte_io.h)
    std::memcpy(out + B * i + 8, &hi, 8);
  }
  for (; i < full; ++i) pack8<B>(values + 8 * i, out + B * i);
  const size_t rest = n - 8 * full;
  if (rest > 0) {
    uint16_t last[8] = {0};
    std::memcpy(last, values + 8 * full, rest * sizeof(uint16_t));
    uint8_t tmp[16];
    pack8<B>(last, tmp);
    std::memcpy(out + B * full, tmp, (rest * B + 7) / 8);
  }
}

template <int B>
inline void unpack_bits_t(const uint8_t* in, size_t n, uint16_t* out) {
  const size_t full = n / 8;
  const size_t total = (n * B + 7) / 8;
  size_t i = 0;
  // Direct 16-byte loads while they stay inside the input.
  for (; i < full && B * i + 16 <= total; ++i) {
    uint64_t lo, hi;
    std::memcpy(&lo, in + B * i, 8);
    std::memcpy(&hi, in + B * i + 8, 8);
    split8<B>(lo, hi, out + 8 * i);
  }
  for (; i < full; ++i) unpack8<B>(in + B * i, out + 8 * i);
  const size_t rest = n - 8 * full;
  if (rest > 0) {
    uint8_t tmp[16] = {0};
    std::memcpy(tmp, in + B * full, (rest * B + 7) / 8);
    uint16_t last[8];
    unpack8<B>(tmp, last);
    std::memcpy(out + 8 * full, last, rest * sizeof(uint16_t));
  }
}

/// Packs `n` values of `bits` bits (1..16) each, LSB-first, into `out` (`packed_bytes(n, bits)`
/// bytes). The values must be `< 2^bits` (not checked: higher bits would spill into the next
/// value). Example: `bits = 3`, values `1 2 3 4 5 6 7 0` give bytes `0xD1 0x58 0x1F`.
inline void pack_bits(const uint16_t* values, size_t n, int bits, uint8_t* out) {
  switch (bits) {
    case 1:
      return detail::pack_bits_t<1>(values, n, out);
    case 2:
      return detail::pack_bits_t<2>(values, n, out);
    case 3:
      return detail::pack_bits_t<3>(values, n, out);
    case 4:
      return detail::pack_bits_t<4>(values, n, out);
    case 5:
      return detail::pack_bits_t<5>(values, n, out);
    case 6:
      return detail::pack_bits_t<6>(values, n, out);
    case 7:
      return detail::pack_bits_t<7>(values, n, out);
    case 8:
      return detail::pack_bits_t<8>(values, n, out);
    case 9:
      return detail::pack_bits_t<9>(values, n, out);
    case 10:
      return detail::pack_bits_t<10>(values, n, out);
    case 11:
      return detail::pack_bits_t<11>(values, n, out);
    case 12:
      return detail::pack_bits_t<12>(values, n, out);
    case 13:
      return detail::pack_bits_t<13>(values, n, out);
    case 14:
      return detail::pack_bits_t<14>(values, n, out);
    case 15:
      return detail::pack_bits_t<15>(values, n, out);
    case 16:
      return detail::pack_bits_t<16>(values, n, out);
    default:
      TORCH_CHECK(false, "diffq::pack_bits: bits must be in [1, 16], got ", bits);
  }
}

/// `pack_bits` into a new vector of `packed_bytes(values.size(), bits)` bytes.
inline std::vector<uint8_t> pack_bits(const std::vector<uint16_t>& values, int bits) {
  TORCH_CHECK(bits >= 1 && bits <= 16, "diffq::pack_bits: bits must be in [1, 16], got ", bits);
  std::vector<uint8_t> out(static_cast<size_t>(packed_bytes(values.size(), bits)));
  pack_bits(values.data(), values.size(), bits, out.data());
  return out;
}

/// Unpacks `n` values of `bits` bits (1..16) from `in`, which must hold at least
/// `packed_bytes(n, bits)` bytes (checked by callers), into `out`. Every value is `< 2^bits`.
/// Reads no byte past `packed_bytes(n, bits)`.
inline void unpack_bits(const uint8_t* in, size_t n_in_bytes, size_t n, int bits, uint16_t* out) {
  (void)n_in_bytes;
  switch (bits) {
    case 1:
      return detail::unpack_bits_t<1>(in, n, out);
    case 2:
      return detail::unpack_bits_t<2>(in, n, out);
    case 3:
      return detail::unpack_bits_t<3>(in, n, out);
    case 4:
      return detail::unpack_bits_t<4>(in, n, out);
    case 5:
      return detail::unpack_bits_t<5>(in, n, out);
    case 6:
      return detail::unpack_bits_t<6>(in, n, out);
    case 7:
      return detail::unpack_bits_t<7>(in, n, out);
    case 8:
      return detail::unpack_bits_t<8>(in, n, out);
    case 9:
      return detail::unpack_bits_t<9>(in, n, out);
    case 10:
      return detail::unpack_bits_t<10>(in, n, out);
    case 11:
      return detail::unpack_bits_t<11>(in, n, out);
    case 12:
      return detail::unpack_bits_t<12>(in, n, out);
    case 13:
      return detail::unpack_bits_t<13>(in, n, out);
    case 14:
      return detail::unpack_bits_t<14>(in, n, out);
    case 15:
      return detail::unpack_bits_t<15>(in, n, out);
    case 16:
      return detail::unpack_bits_t<16>(in, n, out);
    default:
      TORCH_CHECK(false, "diffq::unpack_bits: bits must be in [1, 16], got ", bits);
  }
}

/// `unpack_bits` of `n` values from a vector; throws if it holds fewer than `packed_bytes(n,
/// bits)`.
inline std::vector<uint16_t> unpack_bits(const std::vector<uint8_t>& in, size_t n, int bits) {
  TORCH_CHECK(bits >= 1 && bits <= 16, "diffq::unpack_bits: bits must be in [1, 16], got ", bits);
  TORCH_CHECK(in.size() >= packed_bytes(n, bits), "diffq::unpack_bits: ", n, " values of ", bits,
              " bits need ", packed_bytes(n, bits), " bytes, got ", in.size());
  std::vector<uint16_t> out(n);
  unpack_bits(in.data(), in.size(), n, bits, out.data());
  return out;
}

/// Packs bit widths (each 0..15) two per byte: width `2k` in the low nibble of byte `k`, width
/// `2k+1` in its high nibble. `ceil(n/2)` bytes.
inline std::vector<uint8_t> pack_nibbles(const uint8_t* widths, size_t n) {
  std::vector<uint8_t> out((n + 1) / 2, 0);
  for (size_t i = 0; i < n; ++i) {
    out[i / 2] = static_cast<uint8_t>(out[i / 2] | ((widths[i] & 0xF) << (4 * (i % 2))));
  }
  return out;
}

/// Inverse of `pack_nibbles`: `n` values from `ceil(n/2)` bytes at `in` (checked by callers).
inline void unpack_nibbles(const uint8_t* in, size_t n, uint8_t* widths) {
  for (size_t i = 0; i < n; ++i)
    widths[i] = static_cast<uint8_t>((in[i / 2] >> (4 * (i % 2))) & 0xF);
}

/// zlib's CRC-32 (the one of gzip and PNG) of `n_bytes` bytes, continuing from `crc`.
inline uint32_t crc32(const void* data, size_t n_bytes, uint32_t crc = 0) {
  const auto* p = static_cast<const Bytef*>(data);
  uLong c = crc;
  while (n_bytes > 0) {
    const uInt step = static_cast<uInt>(std::min<size_t>(n_bytes, 1u << 30));
    c = ::crc32(c, p, step);
    p += step;
    n_bytes -= step;
  }
  return static_cast<uint32_t>(c);
}

/// Compresses `n_bytes` bytes into a raw deflate stream (RFC 1951) with zlib at `level` (0..9) and
/// `strategy` (`Z_DEFAULT_STRATEGY`, `Z_HUFFMAN_ONLY`, ...). Throws `c10::Error` if zlib fails.
inline std::vector<uint8_t> deflate_raw(const uint8_t* data, size_t n_bytes, int level = 6,
                                        int strategy = Z_DEFAULT_STRATEGY) {
  z_stream s;
  std::memset(&s, 0, sizeof(s));
  TORCH_CHECK(deflateInit2(&s, level, Z_DEFLATED, -15, 8, strategy) == Z_OK,
              "diffq::deflate_raw: deflateInit2 failed");
  std::vector<uint8_t> out;
  size_t done = 0;
  int rc = Z_OK;
  uint8_t* next_in = const_cast<uint8_t*>(data);
  size_t left_in = n_bytes;
  out.resize(std::max<size_t>(64, n_bytes / 2 + 64));
  while (rc != Z_STREAM_END) {
    if (done == out.size()) out.resize(out.size() * 2);
    const uInt in_step = static_cast<uInt>(std::min<size_t>(left_in, 1u << 30));
    s.next_in = next_in;
    s.avail_in = in_step;
    s.next_out = out.data() + done;
    s.avail_out = static_cast<uInt>(std::min<size_t>(out.size() - done, 1u << 30));
    const uInt avail_out = s.avail_out;
    rc = deflate(&s, left_in == in_step ? Z_FINISH : Z_NO_FLUSH);
    const size_t consumed = in_step - s.avail_in;
    next_in += consumed;
    left_in -= consumed;
    done += avail_out - s.avail_out;
    if (rc != Z_OK && rc != Z_STREAM_END && rc != Z_BUF_ERROR) {
      deflateEnd(&s);
      TORCH_CHECK(false, "diffq::deflate_raw: deflate failed with code ", rc);
    }
  }
  deflateEnd(&s);
  out.resize(done);
  return out;
}

/// Decompresses the raw deflate stream `in` (`n_in` bytes) into exactly `n_out` bytes at `out`.
/// Returns nullptr on success, else a description of the failure: a corrupt stream, a stream that
/// ends early or would produce more than `n_out` bytes, or bytes left over after its end; `reason`,
/// if given, then receives zlib's own message when it has one (e.g. "invalid block type"). Never
/// writes past `out + n_out`.
inline const char* inflate_raw_zlib(const uint8_t* in, size_t n_in, uint8_t* out, size_t n_out,
                                    std::string* reason = nullptr) {
  z_stream s;
  std::memset(&s, 0, sizeof(s));
  if (inflateInit2(&s, -15) != Z_OK) return "inflateInit2 failed";
  size_t in_left = n_in, out_left = n_out;
  const uint8_t* next_in = in;
  uint8_t* next_out = out;
  int rc = Z_OK;
  for (;;) {
    const uInt in_step = static_cast<uInt>(std::min<size_t>(in_left, 1u << 30));
    const uInt out_step = static_cast<uInt>(std::min<size_t>(out_left, 1u << 30));
    s.next_in = const_cast<uint8_t*>(next_in);
    s.avail_in = in_step;
    s.next_out = next_out;
    s.avail_out = out_step;
    rc = inflate(&s, Z_NO_FLUSH);
    next_in += in_step - s.avail_in;
    in_left -= in_step - s.avail_in;
    next_out += out_step - s.avail_out;
    out_left -= out_step - s.avail_out;
    if (rc == Z_STREAM_END) break;
    if (rc != Z_OK) break;  // Z_DATA_ERROR, Z_BUF_ERROR (no progress possible), Z_MEM_ERROR
    if (out_left == 0 && s.avail_out == 0 && in_step == s.avail_in) break;  // output full
  }
  if (reason != nullptr && rc != Z_STREAM_END && s.msg != nullptr) *reason = s.msg;
  inflateEnd(&s);
  if (rc == Z_DATA_ERROR) return "corrupt deflate stream";
  if (rc == Z_MEM_ERROR) return "out of memory in inflate";
  if (rc != Z_STREAM_END) {
    if (in_left == 0) {
      return out_left == 0 ? "deflate stream ends before its final block"
                           : "deflate stream ends before the declared size";
    }
    return "deflate stream holds more data than declared";
  }
  if (out_left != 0) return "deflate stream holds less data than declared";
  if (in_left != 0) return "bytes left over after the end of the deflate stream";
  return nullptr;
}

/// `inflate_raw_zlib`, after trying the fast decoder of literal-only Huffman blocks (what the
/// checkpoint writer produces), which declines anything else.
inline const char* inflate_raw_exact(const uint8_t* in, size_t n_in, uint8_t* out, size_t n_out,
                                     std::string* reason = nullptr) {
  if (detail::inflate_literals_fast(in, n_in, out, n_out)) return nullptr;
  return inflate_raw_zlib(in, n_in, out, n_out, reason);
}

/// Encodes `n` bytes as one literal-only raw deflate block with a dynamic Huffman code built from
/// their histogram (zlib's `Z_HUFFMAN_ONLY` coding, without zlib's match finder). Any inflater
/// decodes it. Size: `detail::plan_literal_block(histogram).bytes()`.
inline std::vector<uint8_t> deflate_huffman(const uint8_t* data, size_t n) {
  uint64_t freq[256];
  detail::byte_histogram(data, n, freq);
  const auto plan = detail::plan_literal_block(freq);
  std::vector<uint8_t> out(static_cast<size_t>(plan.bytes()) + 8);
  out.resize(detail::encode_literal_block(plan, data, n, out.data()));
  return out;
}

/// Encodes `n` bytes as a *Huffman quad*: the four quarters of the bytes (quarter k: bytes
/// `[min(n, k·q), min(n, (k+1)·q))`, `q = ceil(n/4)`) as four literal-only raw deflate streams
/// sharing one Huffman code, preceded by the sizes of the first three streams (u32
/// little-endian each; the fourth takes the rest). Four independent streams decode about three
/// times faster than one (their table lookups overlap); each is a standard deflate stream.
inline std::vector<uint8_t> deflate_huffman4(const uint8_t* data, size_t n) {
  const auto q = detail::plan_quad(data, n);
  std::vector<uint8_t> out(static_cast<size_t>(q.total_bytes) + 8);
  out.resize(detail::encode_quad(q, data, n, out.data()));
  return out;
}

/// Decodes a Huffman quad (`deflate_huffman4`) of `n_in` bytes into exactly `n_out` bytes.
/// Returns nullptr on success, else a description of the failure; `why`, if given, then
/// receives which stream failed and the sizes involved (and zlib's message, if any). Never reads
/// or writes out of bounds.
inline const char* inflate_huffman4(const uint8_t* in, size_t n_in, uint8_t* out, size_t n_out,
                                    std::string* why = nullptr) {
  if (n_in < 12) return "Huffman quad shorter than its 12-byte size table";
  uint64_t sizes[4], sum = 0;
  for (int k = 0; k < 3; ++k) {
    sizes[k] = detail::load_le<uint32_t>(in + 4 * k);
    sum += sizes[k];
  }
  if (sum > n_in - 12) {
    if (why != nullptr) {
      *why = "the first three streams declare " + std::to_string(sizes[0]) + " + " +
             std::to_string(sizes[1]) + " + " + std::to_string(sizes[2]) + " bytes, " +
             std::to_string(n_in - 12) + " follow the size table";
    }
    return "Huffman quad stream sizes exceed the payload";
  }
  sizes[3] = n_in - 12 - sum;
  size_t begin[4], size[4];
  detail::quarters(n_out, begin, size);
  const uint8_t* ins[4];
  size_t n_ins[4];
  uint8_t* outs[4];
  size_t at = 12;
  auto stream_detail = [&](int k, const std::string& extra) {
    if (why != nullptr) {
      *why = "stream " + std::to_string(k + 1) + " of 4: " + std::to_string(sizes[k]) +
             " bytes for " + std::to_string(size[k]) + " symbols" +
             (extra.empty() ? std::string() : "; zlib: " + extra);
    }
  };
  for (int k = 0; k < 4; ++k) {
    if (sizes[k] < (size[k] + 7) / 8) {
      stream_detail(k, "");
      return "Huffman quad stream too short for its symbols";
    }
    ins[k] = in + at;
    n_ins[k] = static_cast<size_t>(sizes[k]);
    outs[k] = out + begin[k];
    at += n_ins[k];
  }
  bool ok[4];
  detail::inflate_literals_fast4(ins, n_ins, outs, size, ok);
  for (int k = 0; k < 4; ++k) {
    if (ok[k]) continue;
    std::string reason;
    if (const char* err = inflate_raw_zlib(ins[k], n_ins[k], outs[k], size[k], &reason)) {
      stream_detail(k, reason);
      return err;
    }
  }
  return nullptr;
}

}  // namespace detail
}  // namespace diffq
