#pragma once
/// \file diffq/detail/huffman.h
/// A fast encoder of byte strings as one *literal-only* deflate block with dynamic Huffman codes
/// (RFC 1951, section 3.2.7): the exact bit stream zlib's `deflate` produces with the
/// `Z_HUFFMAN_ONLY` strategy up to the choice of code, readable by any inflater (zlib's `inflate`
/// with `windowBits = -15`). zlib's own Huffman-only path runs at ~60 MB/s here; this one skips
/// the match finder and block splitting and runs at several hundred MB/s. It also gives the exact
/// coded size from the histogram alone, before encoding, so a caller can choose between this coding
/// and plain bit-packing without trying both.
///
/// Torch-free: depends on the C++ standard library only.

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace diffq {
namespace detail {

/// Longest code of the literal/length alphabet allowed by deflate.
constexpr int kMaxLitCodeBits = 15;
/// Longest code of the code-length alphabet allowed by deflate.
constexpr int kMaxClenCodeBits = 7;
/// Order in which the code-length code lengths are transmitted (RFC 1951, 3.2.7).
constexpr std::array<uint8_t, 19> kClenOrder = {16, 17, 18, 0, 8,  7, 9,  6, 10, 5,
                                                11, 4,  12, 3, 13, 2, 14, 1, 15};

/// Length-limited Huffman code lengths for `n_symbols` symbols of frequencies `freq`, each at most
/// `limit` bits, written to `lens` (0 for unused symbols). The code is always complete (Kraft sum
/// 1), as zlib's inflater requires: when fewer than two symbols are used, a second symbol (the
/// first unused one) gets a length of 1 too. Deterministic: ties are broken by symbol index.
/// Requires `2 <= n_symbols <= 2^limit`.
inline void huffman_code_lengths(const uint64_t* freq, int n_symbols, int limit, uint8_t* lens) {
  std::vector<int> used;
  used.reserve(static_cast<size_t>(n_symbols));
  for (int s = 0; s < n_symbols; ++s) {
    lens[s] = 0;
    if (freq[s] > 0) used.push_back(s);
  }
  if (used.size() < 2) {
    // One (or no) symbol: a 1-bit code for it and for a dummy symbol keeps the code complete.
    int a = used.empty() ? 0 : used[0];
    int b = a == 0 ? 1 : 0;
    lens[a] = 1;
    lens[b] = 1;
    return;
  }
  // Leaves sorted by (frequency, symbol); two-queue Huffman construction.
  std::sort(used.begin(), used.end(),
            [&](int x, int y) { return freq[x] != freq[y] ? freq[x] < freq[y] : x < y; });
  const int m = static_cast<int>(used.size());
  std::vector<uint64_t> weight(static_cast<size_t>(2 * m - 1));
  std::vector<int> parent(static_cast<size_t>(2 * m - 1), -1);
  for (int i = 0; i < m; ++i) weight[static_cast<size_t>(i)] = freq[used[static_cast<size_t>(i)]];
  int leaf = 0, inner = m, next = m;
  auto pop = [&]() {
    if (leaf < m && (inner >= next ||
                     weight[static_cast<size_t>(leaf)] <= weight[static_cast<size_t>(inner)])) {
      return leaf++;
    }
    return inner++;
  };
  while (next < 2 * m - 1) {
    const int a = pop();
    const int b = pop();
    weight[static_cast<size_t>(next)] =
        weight[static_cast<size_t>(a)] + weight[static_cast<size_t>(b)];
    parent[static_cast<size_t>(a)] = next;
    parent[static_cast<size_t>(b)] = next;
    ++next;
  }
  std::vector<int> depth(static_cast<size_t>(2 * m - 1), 0);
  for (int i = 2 * m - 3; i >= 0; --i) {
    depth[static_cast<size_t>(i)] = depth[static_cast<size_t>(parent[static_cast<size_t>(i)])] + 1;
  }
  // Number of codes per length, lengths above `limit` folded into `limit`, then the Kraft sum
  // restored by lengthening shorter codes (the method of miniz's
  // `tdefl_huffman_enforce_max_code_size`).
  std::vector<int64_t> count(64, 0);
  for (int i = 0; i < m; ++i)
    ++count[static_cast<size_t>(std::min(depth[static_cast<size_t>(i)], limit))];
  uint64_t total = 0;
  for (int len = limit; len > 0; --len)
    total += static_cast<uint64_t>(count[static_cast<size_t>(len)]) << (limit - len);
  while (total != (uint64_t{1} << limit)) {
    --count[static_cast<size_t>(limit)];
    for (int len = limit - 1; len > 0; --len) {
      if (count[static_cast<size_t>(len)] > 0) {
        --count[static_cast<size_t>(len)];
        count[static_cast<size_t>(len + 1)] += 2;
        break;
      }
    }
    --total;
  }
  // The least frequent symbols get the longest codes.
  int i = 0;
  for (int len = limit; len > 0; --len) {
    for (int64_t k = 0; k < count[static_cast<size_t>(len)]; ++k) {
      lens[used[static_cast<size_t>(i++)]] = static_cast<uint8_t>(len);
    }
  }
}

/// Canonical Huffman codes of RFC 1951 (3.2.2) from code lengths, returned bit-reversed (deflate
/// writes codes most significant bit first into an LSB-first bit stream).
inline void canonical_codes_reversed(const uint8_t* lens, int n_symbols, uint16_t* rev_codes) {
  int bl_count[kMaxLitCodeBits + 1] = {0};
  for (int s = 0; s < n_symbols; ++s) ++bl_count[lens[s]];
  bl_count[0] = 0;
  int next_code[kMaxLitCodeBits + 2] = {0};
  int code = 0;
  for (int bits = 1; bits <= kMaxLitCodeBits; ++bits) {
    code = (code + bl_count[bits - 1]) << 1;
    next_code[bits] = code;
  }
  for (int s = 0; s < n_symbols; ++s) {
    const int len = lens[s];
    rev_codes[s] = 0;
    if (len == 0) continue;
    int c = next_code[len]++;
    int r = 0;
    for (int b = 0; b < len; ++b) {
      r = (r << 1) | (c & 1);
      c >>= 1;
    }
    rev_codes[s] = static_cast<uint16_t>(r);
  }
}

/// The plan of one literal-only dynamic deflate block: codes of the 257 literal/length symbols
/// (0..255 and the end of block 256), the run-length coded header, and the exact size.
struct LiteralBlockPlan {
  uint8_t lens[257];
  uint16_t rev_codes[257];
  /// Header symbols: (code-length symbol 0..18, extra bits value).
  std::vector<std::pair<uint8_t, uint8_t>> header;
  uint8_t clen_lens[19];
  uint16_t clen_rev_codes[19];
  int n_clen = 4;            ///< code-length code lengths transmitted (HCLEN + 4)
  uint64_t header_bits = 0;  ///< block header (up to the first data bit)
  uint64_t total_bits = 0;   ///< the whole block: header, data and end of block
  uint64_t bytes() const { return (total_bits + 7) / 8; }
};

/// Plans the block for a byte string of histogram `freq[256]` (counts of each byte value).
inline LiteralBlockPlan plan_literal_block(const uint64_t* freq) {
  LiteralBlockPlan p;
  uint64_t f[257];
  std::memcpy(f, freq, 256 * sizeof(uint64_t));
  f[256] = 1;  // end of block
  huffman_code_lengths(f, 257, kMaxLitCodeBits, p.lens);
  canonical_codes_reversed(p.lens, 257, p.rev_codes);
  // Code lengths of the 257 literal/length codes followed by one distance code of length 0
  // ("one distance code of zero bits means that ... the data is all literals").
  uint8_t seq[258];
  std::memcpy(seq, p.lens, 257);
  seq[257] = 0;
  const int n = 258;
  for (int i = 0; i < n;) {
    const uint8_t v = seq[i];
    int run = 1;
    while (i + run < n && seq[i + run] == v) ++run;
    i += run;
    if (v == 0) {
      while (run >= 11) {
        const int r = std::min(run, 138);
        p.header.emplace_back(18, static_cast<uint8_t>(r - 11));
        run -= r;
      }
      if (run >= 3) {
        p.header.emplace_back(17, static_cast<uint8_t>(run - 3));
        run = 0;
      }
      for (; run > 0; --run) p.header.emplace_back(0, 0);
    } else {
      p.header.emplace_back(v, 0);
      --run;
      while (run >= 3) {
        const int r = std::min(run, 6);
        p.header.emplace_back(16, static_cast<uint8_t>(r - 3));
        run -= r;
      }
      for (; run > 0; --run) p.header.emplace_back(v, 0);
    }
  }
  uint64_t cf[19] = {0};
  for (const auto& h : p.header) ++cf[h.first];
  huffman_code_lengths(cf, 19, kMaxClenCodeBits, p.clen_lens);
  canonical_codes_reversed(p.clen_lens, 19, p.clen_rev_codes);
  p.n_clen = 19;
  while (p.n_clen > 4 && p.clen_lens[kClenOrder[static_cast<size_t>(p.n_clen - 1)]] == 0)
    --p.n_clen;
  uint64_t bits = 3 + 5 + 5 + 4 + 3 * static_cast<uint64_t>(p.n_clen);
  static const int kExtra[19] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3, 7};
  for (const auto& h : p.header) bits += p.clen_lens[h.first] + kExtra[h.first];
  p.header_bits = bits;
  for (int s = 0; s < 256; ++s) bits += freq[s] * p.lens[s];
  bits += p.lens[256];
  p.total_bits = bits;
  return p;
}

/// LSB-first bit writer into a buffer with at least 8 bytes of slack past the data.
struct FastBitWriter {
  uint8_t* p;
  uint64_t acc = 0;
  unsigned n = 0;  ///< bits pending in `acc` (< 8 after `flush`)
  explicit FastBitWriter(uint8_t* out) : p(out) {}
  /// Adds `len` <= 32 bits (with `n + len < 64`).
  void add(uint64_t v, unsigned len) {
    acc |= v << n;
    n += len;
  }
  /// Writes out the whole bytes pending (stores 8 bytes: needs the slack).
  void flush() {
    std::memcpy(p, &acc, 8);  // little-endian host (checked in byte_io.h)
    p += n >> 3;
    acc = (n >> 3) >= 8 ? 0 : acc >> (n & ~7u);
    n &= 7;
  }
  void put(uint64_t v, unsigned len) {
    add(v, len);
    flush();
  }
};

/// Encodes `n` bytes `sym` with `plan` (made from their histogram) into `out`, which needs
/// `plan.bytes() + 8` bytes of room. Returns the bytes written (`plan.bytes()`).
inline size_t encode_literal_block(const LiteralBlockPlan& plan, const uint8_t* sym, size_t n,
                                   uint8_t* out) {
  FastBitWriter w(out);
  w.put(1, 1);  // BFINAL
  w.put(2, 2);  // BTYPE = 10: dynamic Huffman codes
  w.put(0, 5);  // HLIT: 257 literal/length codes
  w.put(0, 5);  // HDIST: 1 distance code
  w.put(static_cast<uint64_t>(plan.n_clen - 4), 4);
  for (int i = 0; i < plan.n_clen; ++i)
    w.put(plan.clen_lens[kClenOrder[static_cast<size_t>(i)]], 3);
  static const unsigned kExtra[19] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3, 7};
  for (const auto& h : plan.header) {
    w.add(plan.clen_rev_codes[h.first], plan.clen_lens[h.first]);
    w.put(h.second, kExtra[h.first]);
  }
  // Data: three codes of at most 15 bits between flushes (7 + 45 < 64).
  uint32_t table[256];
  for (int s = 0; s < 256; ++s)
    table[s] =
        static_cast<uint32_t>(plan.rev_codes[s]) | (static_cast<uint32_t>(plan.lens[s]) << 16);
  size_t i = 0;
  for (; i + 3 <= n; i += 3) {
    const uint32_t a = table[sym[i]], b = table[sym[i + 1]], c = table[sym[i + 2]];
    w.add(a & 0xFFFF, a >> 16);
    w.add(b & 0xFFFF, b >> 16);
    w.add(c & 0xFFFF, c >> 16);
    w.flush();
  }
  for (; i < n; ++i) w.put(table[sym[i]] & 0xFFFF, table[sym[i]] >> 16);
  w.put(plan.rev_codes[256], plan.lens[256]);
  if (w.n > 0) {
    w.n = 8;  // pad the last partial byte with zeros
    w.flush();
  }
  return static_cast<size_t>(w.p - out);
}

/// Histogram of `n` bytes into `freq[256]` (zeroed first); four interleaved tables avoid store
/// forwarding stalls on runs of equal bytes.
inline void byte_histogram(const uint8_t* data, size_t n, uint64_t* freq) {
  uint32_t h[4][256];
  std::memset(h, 0, sizeof(h));
  for (int s = 0; s < 256; ++s) freq[s] = 0;
  size_t i = 0;
  while (i < n) {
    // Flush before 32-bit counters could overflow.
    const size_t end = std::min(n, i + (size_t{1} << 30));
    for (; i + 4 <= end; i += 4) {
      ++h[0][data[i]];
      ++h[1][data[i + 1]];
      ++h[2][data[i + 2]];
      ++h[3][data[i + 3]];
    }
    for (; i < end; ++i) ++h[0][data[i]];
    for (int s = 0; s < 256; ++s) {
      freq[s] += uint64_t{h[0][s]} + h[1][s] + h[2][s] + h[3][s];
      h[0][s] = h[1][s] = h[2][s] = h[3][s] = 0;
    }
  }
}

/// The four quarters of `n` symbols coded as four deflate streams: quarter k holds symbols
/// `[min(n, k·q), min(n, (k+1)·q))` with `q = ceil(n / 4)`.
inline void quarters(size_t n, size_t begin[4], size_t size[4]) {
  const size_t q = (n + 3) / 4;
  for (int k = 0; k < 4; ++k) {
    begin[k] = std::min(n, static_cast<size_t>(k) * q);
    size[k] = std::min(n, static_cast<size_t>(k + 1) * q) - begin[k];
  }
}

/// Plan of a Huffman quad: one code (from the histogram of all `n` symbols) shared by the four
/// streams, and each stream's exact size.
struct QuadPlan {
  LiteralBlockPlan plan;
  uint64_t stream_bytes[4] = {0, 0, 0, 0};
  uint64_t total_bytes = 0;  ///< 12 bytes of sizes + the four streams
};

inline QuadPlan plan_quad(const uint8_t* data, size_t n) {
  size_t begin[4], size[4];
  quarters(n, begin, size);
  uint64_t freq[4][256], all[256];
  for (int k = 0; k < 4; ++k) byte_histogram(data + begin[k], size[k], freq[k]);
  for (int s = 0; s < 256; ++s) all[s] = freq[0][s] + freq[1][s] + freq[2][s] + freq[3][s];
  QuadPlan q;
  q.plan = plan_literal_block(all);
  q.total_bytes = 12;
  for (int k = 0; k < 4; ++k) {
    uint64_t bits = q.plan.header_bits + q.plan.lens[256];
    for (int s = 0; s < 256; ++s) bits += freq[k][s] * q.plan.lens[s];
    q.stream_bytes[k] = (bits + 7) / 8;
    q.total_bytes += q.stream_bytes[k];
  }
  return q;
}

/// Writes the quad planned by `q` for `data` (`n` symbols) at `out`, which needs
/// `q.total_bytes + 8` bytes of room: three u32 little-endian sizes of streams 0..2, then the four
/// streams. Returns `q.total_bytes`.
inline size_t encode_quad(const QuadPlan& q, const uint8_t* data, size_t n, uint8_t* out) {
  size_t begin[4], size[4];
  quarters(n, begin, size);
  for (int k = 0; k < 3; ++k) {
    for (int i = 0; i < 4; ++i) out[4 * k + i] = static_cast<uint8_t>(q.stream_bytes[k] >> (8 * i));
  }
  size_t at = 12;
  for (int k = 0; k < 4; ++k)
    at += encode_literal_block(q.plan, data + begin[k], size[k], out + at);
  return at;
}

/// Fast decoder state of one deflate stream made of literal-only dynamic-Huffman blocks, as
/// `encode_literal_block` writes them: complete literal/length codes, no length or distance code.
/// Anything else (another block type, a length code, an irregular header, a corrupt or truncated
/// stream, a size mismatch) makes it fail; callers then run zlib's `inflate`, which decodes any
/// valid stream and diagnoses invalid ones, so this decoder only ever accepts streams that zlib
/// decodes to the same bytes. It never reads or writes out of bounds: past the end of the input
/// it reads zero bits and fails at the end.
struct LiteralStreamDecoder {
  static constexpr unsigned kTableBits = 11;
  static constexpr unsigned kTableMask = (1u << kTableBits) - 1;

  const uint8_t* in = nullptr;
  size_t n_in = 0;
  size_t pos = 0;              ///< next byte of `in` to load
  uint64_t acc = 0;            ///< buffered bits, LSB first
  unsigned have = 0;           ///< valid bits in `acc`
  uint64_t virtual_bytes = 0;  ///< zero bytes loaded past the end
  uint8_t* out = nullptr;
  size_t n_out = 0;
  size_t written = 0;
  bool last_block = false;
  bool done = false;
  /// Primary table: `symbol << 4 | length` for codes up to kTableBits bits, 0 for longer ones.
  uint16_t table[1u << kTableBits];
  int count[kMaxLitCodeBits + 1];
  int first_code[kMaxLitCodeBits + 1];
  int first_index[kMaxLitCodeBits + 1];
  uint16_t sorted[257];  ///< symbols by (code length, symbol)

  void init(const uint8_t* input, size_t input_bytes, uint8_t* output, size_t output_bytes) {
    in = input;
    n_in = input_bytes;
    out = output;
    n_out = output_bytes;
  }
  /// Tops the buffer up to at least 56 bits.
  void refill() {
    if (pos + 8 <= n_in) {
      // Unaligned 8-byte load; the bytes beyond `have` are the stream's next ones, loaded again
      // (OR-ed identically) by the next refill.
      uint64_t w;
      std::memcpy(&w, in + pos, 8);  // little-endian host (checked in byte_io.h)
      acc |= w << have;
      pos += (63 - have) >> 3;
      have |= 56;
      return;
    }
    while (have <= 56) {
      if (pos < n_in) {
        acc |= static_cast<uint64_t>(in[pos++]) << have;
      } else {
        ++virtual_bytes;
      }
      have += 8;
    }
  }
  uint32_t bits(unsigned n) {  // n <= 32 and n <= have
    const uint32_t v = static_cast<uint32_t>(acc & ((uint64_t{1} << n) - 1));
    acc >>= n;
    have -= n;
    return v;
  }
  void consume(unsigned n) {
    acc >>= n;
    have -= n;
  }

  /// Reads a block header and builds the tables; false if the block is not literal-only dynamic.
  bool read_header() {
    refill();
    last_block = bits(1) == 1;
    if (bits(2) != 2) return false;  // only dynamic Huffman blocks
    const unsigned hlit = bits(5) + 257, hdist = bits(5) + 1, hclen = bits(4) + 4;
    if (hlit > 286 || hdist > 30) return false;
    uint8_t clen_lens[19] = {0};
    for (unsigned i = 0; i < hclen; ++i) {
      if (have < 3) refill();
      clen_lens[kClenOrder[i]] = static_cast<uint8_t>(bits(3));
    }
    // Code-length code: complete, decoded through a 7-bit table of `symbol << 3 | length`.
    uint16_t ctab[128];
    {
      int cnt[8] = {0};
      for (int sym = 0; sym < 19; ++sym) ++cnt[clen_lens[sym]];
      cnt[0] = 0;
      int left = 1;
      for (int len = 1; len <= 7; ++len) {
        left = (left << 1) - cnt[len];
        if (left < 0) return false;
      }
      if (left != 0) return false;
      uint16_t rev[19];
      canonical_codes_reversed(clen_lens, 19, rev);
      for (int sym = 0; sym < 19; ++sym) {
        const int len = clen_lens[sym];
        if (len == 0) continue;
        for (int r = rev[sym]; r < 128; r += 1 << len)
          ctab[r] = static_cast<uint16_t>(sym << 3 | len);
      }
    }
    uint8_t lens[286 + 30] = {0};
    const unsigned total = hlit + hdist;
    for (unsigned i = 0; i < total;) {
      if (have < 16) refill();
      const uint16_t e = ctab[acc & 127];
      const unsigned sym = e >> 3;
      consume(e & 7);
      unsigned rep = 0;
      uint8_t val = 0;
      if (sym < 16) {
        lens[i++] = static_cast<uint8_t>(sym);
        continue;
      } else if (sym == 16) {
        if (i == 0) return false;
        val = lens[i - 1];
        rep = 3 + bits(2);
      } else if (sym == 17) {
        rep = 3 + bits(3);
      } else {
        rep = 11 + bits(7);
      }
      if (i + rep > total) return false;
      for (unsigned k = 0; k < rep; ++k) lens[i++] = val;
    }
    for (unsigned i = 257; i < total; ++i) {
      if (lens[i] != 0) return false;  // a length or distance code: not literal-only
    }
    if (lens[256] == 0) return false;
    for (int len = 0; len <= kMaxLitCodeBits; ++len) count[len] = 0;
    for (int sym = 0; sym < 257; ++sym) ++count[lens[sym]];
    count[0] = 0;
    int left = 1;
    for (int len = 1; len <= kMaxLitCodeBits; ++len) {
      left = (left << 1) - count[len];
      if (left < 0) return false;
    }
    if (left != 0) return false;  // incomplete: leave it to zlib
    uint16_t rev[257];
    canonical_codes_reversed(lens, 257, rev);
    int code = 0, index = 0;
    int next[kMaxLitCodeBits + 1] = {0};
    for (int len = 1; len <= kMaxLitCodeBits; ++len) {
      first_code[len] = code;
      first_index[len] = index;
      next[len] = index;
      code = (code + count[len]) << 1;
      index += count[len];
    }
    for (int sym = 0; sym < 257; ++sym) {
      if (lens[sym]) sorted[next[lens[sym]]++] = static_cast<uint16_t>(sym);
    }
    std::memset(table, 0, sizeof(table));
    for (int sym = 0; sym < 257; ++sym) {
      const unsigned len = lens[sym];
      if (len == 0 || len > kTableBits) continue;
      for (unsigned r = rev[sym]; r <= kTableMask; r += 1u << len) {
        table[r] = static_cast<uint16_t>(sym << 4 | len);
      }
    }
    return true;
  }

  /// The next symbol and its code length without consuming it (needs `have >= 15`); symbol
  /// 0xFFFF when no code matches.
  unsigned peek(unsigned& len) const {
    const uint16_t e = table[acc & kTableMask];
    if (e != 0) {
      len = e & 15;
      return e >> 4;
    }
    int code = 0;
    for (unsigned l = 1; l <= static_cast<unsigned>(kMaxLitCodeBits); ++l) {
      code = (code << 1) | static_cast<int>((acc >> (l - 1)) & 1);
      const int idx = code - first_code[l];
      if (idx >= 0 && idx < count[l]) {
        len = l;
        return sorted[first_index[l] + idx];
      }
    }
    len = 0;
    return 0xFFFF;
  }

  /// Decodes to the end of the stream, one symbol at a time (with a four-literal fast path).
  /// True when the stream ends exactly after `n_out` bytes and exactly at the end of the input.
  bool finish() {
    while (!done) {
      // Fast loop on local copies: one 8-byte refill (>= 56 bits), then up to three
      // table-resolved literals (3 · 11 <= 56); long codes and the end of block go below.
      {
        uint64_t a = acc;
        unsigned h = have;
        size_t p = pos, w = written;
        const uint16_t* t = table;
        while (w + 3 <= n_out && p + 8 <= n_in) {
          uint64_t x;
          std::memcpy(&x, in + p, 8);
          a |= x << h;
          p += (63 - h) >> 3;
          h |= 56;
          bool stop = false;
          for (int k = 0; k < 3; ++k) {
            const uint16_t e = t[a & kTableMask];
            if (e == 0 || e >= 4096) {
              stop = true;
              break;
            }
            out[w++] = static_cast<uint8_t>(e >> 4);
            a >>= e & 15;
            h -= e & 15;
          }
          if (stop) break;
        }
        acc = a;
        have = h;
        pos = p;
        written = w;
      }
      if (have < 48) refill();
      if (virtual_bytes > 8) return false;  // ran well past the end: truncated or corrupt
      unsigned len;
      const unsigned sym = peek(len);
      if (sym == 0xFFFF) return false;
      consume(len);
      if (sym < 256) {
        if (written == n_out) return false;  // more data than declared
        out[written++] = static_cast<uint8_t>(sym);
      } else if (last_block) {
        done = true;
      } else if (!read_header()) {
        return false;
      }
    }
    // Whole bytes consumed: everything loaded, minus the whole bytes still buffered.
    const uint64_t consumed = static_cast<uint64_t>(pos) + virtual_bytes - have / 8;
    return written == n_out && consumed == n_in;
  }
};

/// Decodes one literal-only stream (see `LiteralStreamDecoder`) into exactly `n_out` bytes; false
/// when the stream is anything else (the caller then uses zlib).
inline bool inflate_literals_fast(const uint8_t* in, size_t n_in, uint8_t* out, size_t n_out) {
  auto d = std::make_unique<LiteralStreamDecoder>();
  d->init(in, n_in, out, n_out);
  return d->read_header() && d->finish();
}

/// Hot loop over two streams at once: their table-lookup dependency chains overlap (one chain
/// alone is latency-bound), and two streams' bit buffers fit in registers where four spill. Per
/// round: refill both to >= 56 bits, then up to three table-resolved literals from each. Stops at
/// anything else (a long code, the end of block, the end of the input or output), leaving the
/// rest to each stream's careful `finish`.
inline void interleave_pair(LiteralStreamDecoder& A, LiteralStreamDecoder& B) {
  constexpr unsigned M = LiteralStreamDecoder::kTableMask;
  for (;;) {
    uint64_t a0 = A.acc, a1 = B.acc;
    unsigned h0 = A.have, h1 = B.have;
    size_t p0 = A.pos, p1 = B.pos;
    uint8_t* o0 = A.out + A.written;
    uint8_t* o1 = B.out + B.written;
    const uint16_t* t0 = A.table;
    const uint16_t* t1 = B.table;
    // Rounds that surely fit: >= 3 output bytes and >= 8 input bytes left in both streams (a
    // round consumes at most 7 input bytes).
    auto rounds_left = [](const LiteralStreamDecoder& S, size_t written, size_t p) {
      if (S.n_in < p + 8) return size_t{0};
      return std::min((S.n_out - written) / 3, (S.n_in - p - 8) / 7 + 1);
    };
    size_t rounds = std::min(rounds_left(A, A.written, p0), rounds_left(B, B.written, p1));
    if (rounds == 0) return;
    bool stop = false;
    for (; rounds > 0 && !stop; --rounds) {
      uint64_t w0, w1;
      std::memcpy(&w0, A.in + p0, 8);  // little-endian host (checked in byte_io.h)
      std::memcpy(&w1, B.in + p1, 8);
      a0 |= w0 << h0;
      a1 |= w1 << h1;
      p0 += (63 - h0) >> 3;
      p1 += (63 - h1) >> 3;
      h0 |= 56;
      h1 |= 56;
      for (int j = 0; j < 3; ++j) {
        const uint16_t e0 = t0[a0 & M], e1 = t1[a1 & M];
        // Zero entries (long codes) and the end of block (256 << 4 | len >= 4096) stop.
        if (e0 == 0 || e1 == 0 || (e0 | e1) >= 4096) {
          stop = true;
          break;
        }
        *o0++ = static_cast<uint8_t>(e0 >> 4);
        *o1++ = static_cast<uint8_t>(e1 >> 4);
        a0 >>= e0 & 15;
        a1 >>= e1 & 15;
        h0 -= e0 & 15;
        h1 -= e1 & 15;
      }
    }
    A.acc = a0, B.acc = a1;
    A.have = h0, B.have = h1;
    A.pos = p0, B.pos = p1;
    A.written = static_cast<size_t>(o0 - A.out);
    B.written = static_cast<size_t>(o1 - B.out);
    if (!stop) continue;
    // One careful literal for a stream whose next code is long; the end of block (or a full
    // output) ends the interleaving.
    for (LiteralStreamDecoder* S : {&A, &B}) {
      if (S->have < 48) S->refill();
      unsigned len;
      const unsigned sym = S->peek(len);
      if (sym >= 256 || S->written == S->n_out) return;
      if (S->table[S->acc & M] != 0) continue;  // a short code: the hot loop takes it
      S->out[S->written++] = static_cast<uint8_t>(sym);
      S->consume(len);
    }
  }
}

/// Decodes four literal-only streams, two at a time interleaved (`interleave_pair`). `ok[k]`
/// tells whether stream k was decoded completely and exactly; the others must go through zlib.
inline void inflate_literals_fast4(const uint8_t* const in[4], const size_t n_in[4],
                                   uint8_t* const out[4], const size_t n_out[4], bool ok[4]) {
  auto d = std::make_unique<std::array<LiteralStreamDecoder, 4>>();
  auto& st = *d;
  bool header_ok[4];
  for (int k = 0; k < 4; ++k) {
    st[k].init(in[k], n_in[k], out[k], n_out[k]);
    header_ok[k] = st[k].read_header();
  }
  if (header_ok[0] && header_ok[1]) interleave_pair(st[0], st[1]);
  if (header_ok[2] && header_ok[3]) interleave_pair(st[2], st[3]);
  for (int k = 0; k < 4; ++k) ok[k] = header_ok[k] && st[k].finish();
}

}  // namespace detail
}  // namespace diffq
