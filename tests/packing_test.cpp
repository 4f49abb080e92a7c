// Tests of diffq/detail/packing.h and diffq/detail/huffman.h: bit packing against hand-packed
// bytes, CRC-32 against its check value, canonical Huffman codes against RFC 1951's example, and
// the literal-only deflate coder against zlib's own inflater.
#include <diffq/detail/packing.h>

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace {

using Bytes = std::vector<uint8_t>;

/// Random bytes from a rounded N(mean, std²) clamped to [0, 2^bits − 1].
Bytes gaussian_bytes(size_t n, double mean, double std, int bits, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(mean, std);
  Bytes v(n);
  const double hi = std::ldexp(1.0, bits) - 1;
  for (auto& x : v) x = static_cast<uint8_t>(std::min(hi, std::max(0.0, std::round(nd(rng)))));
  return v;
}

/// zlib's own inflater, independent of diffq's fast path.
Bytes zlib_inflate(const Bytes& in, size_t n_out) {
  Bytes out(n_out + 16);
  z_stream s{};
  EXPECT_EQ(inflateInit2(&s, -15), Z_OK);
  s.next_in = const_cast<uint8_t*>(in.data());
  s.avail_in = static_cast<uInt>(in.size());
  s.next_out = out.data();
  s.avail_out = static_cast<uInt>(out.size());
  const int rc = inflate(&s, Z_FINISH);
  EXPECT_EQ(rc, Z_STREAM_END);
  EXPECT_EQ(s.avail_in, 0u) << "the stream must end exactly at the end of its bytes";
  out.resize(s.total_out);
  inflateEnd(&s);
  return out;
}

uint32_t le32(const uint8_t* p) {
  return uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
}

TEST(Packing, PackBitsMatchesHandPackedBytes) {
  // 3 bits: 001 010 011 100 101 110 111 000, LSB-first -> 0xD1 0x58 0x1F.
  EXPECT_EQ(diffq::detail::pack_bits({1, 2, 3, 4, 5, 6, 7, 0}, 3), (Bytes{0xD1, 0x58, 0x1F}));
  // 9 bits: 0x1FF then 0x001 -> bits 0..8 set, bit 9 set -> 0xFF 0x03 0x00.
  EXPECT_EQ(diffq::detail::pack_bits({0x1FF, 0x001}, 9), (Bytes{0xFF, 0x03, 0x00}));
  // 16 bits: little-endian.
  EXPECT_EQ(diffq::detail::pack_bits({0xABCD}, 16), (Bytes{0xCD, 0xAB}));
  // 1 bit: 1 0 1 1 0 0 0 0 1 -> 0b00001101, 0b1.
  EXPECT_EQ(diffq::detail::pack_bits({1, 0, 1, 1, 0, 0, 0, 0, 1}, 1), (Bytes{0x0D, 0x01}));
  EXPECT_EQ(diffq::detail::unpack_bits(Bytes{0xD1, 0x58, 0x1F}, 8, 3),
            (std::vector<uint16_t>{1, 2, 3, 4, 5, 6, 7, 0}));
}

TEST(Packing, PackBitsRoundTripEveryWidthAndLength) {
  std::mt19937 rng(1);
  for (int bits = 1; bits <= 16; ++bits) {
    for (size_t n : {0u, 1u, 7u, 8u, 9u, 15u, 16u, 17u, 31u, 100u, 1000u}) {
      std::vector<uint16_t> v(n);
      for (auto& x : v) x = static_cast<uint16_t>(rng() & ((1u << bits) - 1));
      const Bytes packed = diffq::detail::pack_bits(v, bits);
      ASSERT_EQ(packed.size(), (n * static_cast<size_t>(bits) + 7) / 8) << bits << " " << n;
      EXPECT_EQ(diffq::detail::packed_bytes(n, bits), packed.size());
      EXPECT_EQ(diffq::detail::unpack_bits(packed, n, bits), v) << "bits=" << bits << " n=" << n;
      // Value i's bit j sits at bit i·bits + j of the stream (checked independently).
      for (size_t i = 0; i < std::min<size_t>(n, 40); ++i) {
        for (int j = 0; j < bits; ++j) {
          const size_t bit = i * static_cast<size_t>(bits) + static_cast<size_t>(j);
          ASSERT_EQ((packed[bit / 8] >> (bit % 8)) & 1, (v[i] >> j) & 1);
        }
      }
    }
  }
}

TEST(Packing, UnpackBitsRejectsShortInputAndBadWidth) {
  try {
    diffq::detail::unpack_bits(Bytes{0x00}, 3, 3);  // needs 2 bytes
    FAIL() << "expected c10::Error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("need 2 bytes, got 1"), std::string::npos) << e.what();
  }
  try {
    diffq::detail::pack_bits(std::vector<uint16_t>{1}, 17);
    FAIL() << "expected c10::Error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("bits must be in [1, 16], got 17"), std::string::npos);
  }
  try {
    diffq::detail::unpack_bits(Bytes{0x00}, 1, 0);
    FAIL() << "expected c10::Error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("bits must be in [1, 16], got 0"), std::string::npos);
  }
}

TEST(Packing, NibblesMatchHandPackedBytes) {
  const uint8_t widths[3] = {1, 15, 7};
  EXPECT_EQ(diffq::detail::pack_nibbles(widths, 3), (Bytes{0xF1, 0x07}));
  uint8_t back[3];
  const Bytes packed{0xF1, 0x07};
  diffq::detail::unpack_nibbles(packed.data(), 3, back);
  EXPECT_EQ(std::vector<uint8_t>(back, back + 3), std::vector<uint8_t>(widths, widths + 3));
}

TEST(Packing, Crc32MatchesCheckValue) {
  const std::string s = "123456789";
  EXPECT_EQ(diffq::detail::crc32(s.data(), s.size()), 0xCBF43926u);  // the CRC-32 check value
  EXPECT_EQ(diffq::detail::crc32(s.data() + 4, 5, diffq::detail::crc32(s.data(), 4)), 0xCBF43926u);
}

TEST(Packing, CanonicalCodesMatchRfc1951Example) {
  // RFC 1951, 3.2.2: lengths (3,3,3,3,3,2,4,4) give codes 010 011 100 101 110 00 1110 1111;
  // stored bit-reversed for LSB-first output.
  const uint8_t lens[8] = {3, 3, 3, 3, 3, 2, 4, 4};
  uint16_t rev[8];
  diffq::detail::canonical_codes_reversed(lens, 8, rev);
  EXPECT_EQ(std::vector<uint16_t>(rev, rev + 8),
            (std::vector<uint16_t>{0b010, 0b110, 0b001, 0b101, 0b011, 0b00, 0b0111, 0b1111}));
}

TEST(Packing, HuffmanCodeLengthsAreOptimalSmallAndLimitedLarge) {
  // a:5 b:2 c:1 d:1 -> merge c+d (2), b+(cd) (4), a+(bcd): lengths 1 2 3 3.
  const uint64_t f4[4] = {5, 2, 1, 1};
  uint8_t l4[4];
  diffq::detail::huffman_code_lengths(f4, 4, 15, l4);
  EXPECT_EQ(std::vector<uint8_t>(l4, l4 + 4), (std::vector<uint8_t>{1, 2, 3, 3}));
  // Fibonacci frequencies make a 29-deep optimal tree; limits of 15 and 7 are enforced with a
  // complete code (Kraft sum exactly 1) and monotone lengths.
  std::vector<uint64_t> fib(30);
  fib[0] = fib[1] = 1;
  for (size_t i = 2; i < fib.size(); ++i) fib[i] = fib[i - 1] + fib[i - 2];
  for (int limit : {15, 7}) {
    std::vector<uint8_t> lens(fib.size());
    diffq::detail::huffman_code_lengths(fib.data(), static_cast<int>(fib.size()), limit,
                                        lens.data());
    double kraft = 0;
    for (size_t i = 0; i < lens.size(); ++i) {
      ASSERT_GE(lens[i], 1);
      ASSERT_LE(lens[i], limit);
      kraft += std::ldexp(1.0, -lens[i]);
      if (i > 0) {
        EXPECT_LE(lens[i], lens[i - 1]) << "more frequent symbols get shorter codes";
      }
    }
    EXPECT_DOUBLE_EQ(kraft, 1.0);
  }
  // One used symbol: a dummy second symbol keeps the code complete.
  const uint64_t one[3] = {0, 9, 0};
  uint8_t l1[3];
  diffq::detail::huffman_code_lengths(one, 3, 15, l1);
  EXPECT_EQ(std::vector<uint8_t>(l1, l1 + 3), (std::vector<uint8_t>{1, 1, 0}));
}

TEST(Packing, DeflateHuffmanIsReadByZlib) {
  std::vector<Bytes> inputs = {
      {},
      {42},
      Bytes(1000, 7),                        // one symbol: 1 bit each
      gaussian_bytes(5000, 128, 24, 8, 1),   // 8-bit levels
      gaussian_bytes(100000, 8, 2.5, 4, 2),  // 4-bit levels
  };
  Bytes all(256 * 50);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint8_t>(i * 97 % 256);
  inputs.push_back(all);
  // Very skewed: forces length limiting at 15 bits.
  Bytes skew;
  for (int s = 0; s < 20; ++s)
    skew.insert(skew.end(), size_t{1} << std::min(s, 18), static_cast<uint8_t>(s));
  inputs.push_back(skew);
  for (const Bytes& in : inputs) {
    const Bytes z = diffq::detail::deflate_huffman(in.data(), in.size());
    EXPECT_EQ(zlib_inflate(z, in.size()), in) << "n=" << in.size();
    uint64_t freq[256];
    diffq::detail::byte_histogram(in.data(), in.size(), freq);
    EXPECT_EQ(z.size(), diffq::detail::plan_literal_block(freq).bytes());
    Bytes back(in.size());
    EXPECT_EQ(diffq::detail::inflate_raw_exact(z.data(), z.size(), back.data(), back.size()),
              nullptr);
    EXPECT_EQ(back, in);
  }
  // One symbol: ~1 bit per byte.
  const Bytes z = diffq::detail::deflate_huffman(inputs[2].data(), inputs[2].size());
  EXPECT_LT(z.size(), 1000 / 8 + 40);
}

TEST(Packing, DeflateHuffmanSizeMatchesZlibHuffmanOnly) {
  const Bytes in = gaussian_bytes(200000, 128, 24, 8, 3);
  const Bytes ours = diffq::detail::deflate_huffman(in.data(), in.size());
  const Bytes theirs = diffq::detail::deflate_raw(in.data(), in.size(), 6, Z_HUFFMAN_ONLY);
  EXPECT_LE(static_cast<double>(ours.size()), 1.01 * static_cast<double>(theirs.size()));
  // The entropy of the source bounds both from below.
  uint64_t freq[256];
  diffq::detail::byte_histogram(in.data(), in.size(), freq);
  double h = 0;
  for (uint64_t f : freq) {
    if (f) h -= static_cast<double>(f) * std::log2(static_cast<double>(f) / in.size());
  }
  EXPECT_GE(static_cast<double>(ours.size()) * 8, h);
  EXPECT_LE(static_cast<double>(ours.size()) * 8, h * 1.01 + 2000);
}

TEST(Packing, HuffmanQuadHoldsFourZlibStreams) {
  // Sizes around a stream header's length (the streams are written in place, next to each other)
  // and spreads from one symbol to long codes.
  for (size_t n : {0u, 1u, 2u, 3u, 5u, 7u, 13u, 40u, 97u, 1000u, 65537u})
    for (double sd : {0.2, 30.0, 90.0}) {
      SCOPED_TRACE("n=" + std::to_string(n) + " sd=" + std::to_string(sd));
      const Bytes in = gaussian_bytes(n, 100, sd, 8, 4);
      const Bytes quad = diffq::detail::deflate_huffman4(in.data(), in.size());
      // Layout: three u32 sizes, then the four quarters [k·q, (k+1)·q), q = ceil(n/4).
      ASSERT_GE(quad.size(), 12u);
      const size_t q = (n + 3) / 4;
      size_t at = 12;
      Bytes joined;
      for (size_t k = 0; k < 4; ++k) {
        const size_t sz = k < 3 ? le32(quad.data() + 4 * k) : quad.size() - at;
        const Bytes stream(quad.begin() + static_cast<std::ptrdiff_t>(at),
                           quad.begin() + static_cast<std::ptrdiff_t>(at + sz));
        const size_t begin = std::min(n, k * q), end = std::min(n, (k + 1) * q);
        const Bytes part = zlib_inflate(stream, end - begin);
        EXPECT_EQ(part, Bytes(in.begin() + static_cast<std::ptrdiff_t>(begin),
                              in.begin() + static_cast<std::ptrdiff_t>(end)));
        joined.insert(joined.end(), part.begin(), part.end());
        at += sz;
      }
      EXPECT_EQ(joined, in);
      Bytes back(n);
      EXPECT_EQ(diffq::detail::inflate_huffman4(quad.data(), quad.size(), back.data(), n), nullptr);
      EXPECT_EQ(back, in);
    }
}

TEST(Packing, InflateRawExactFallsBackToZlibAndReportsErrors) {
  // A stream with matches (zlib's default strategy) is declined by the fast decoder and decoded
  // by zlib.
  Bytes text;
  for (int i = 0; i < 2000; ++i) text.push_back(static_cast<uint8_t>("abcabcabd"[i % 9]));
  const Bytes z = diffq::detail::deflate_raw(text.data(), text.size(), 9, Z_DEFAULT_STRATEGY);
  EXPECT_LT(z.size(), text.size() / 10);
  EXPECT_FALSE(diffq::detail::inflate_literals_fast(z.data(), z.size(), Bytes(2000).data(), 2000));
  Bytes back(text.size());
  EXPECT_EQ(diffq::detail::inflate_raw_exact(z.data(), z.size(), back.data(), back.size()),
            nullptr);
  EXPECT_EQ(back, text);

  const Bytes in = gaussian_bytes(3000, 128, 20, 8, 5);
  const Bytes h = diffq::detail::deflate_huffman(in.data(), in.size());
  Bytes out(4000);
  EXPECT_EQ(std::string(diffq::detail::inflate_raw_exact(h.data(), h.size(), out.data(), 2999)),
            "deflate stream holds more data than declared");
  EXPECT_EQ(std::string(diffq::detail::inflate_raw_exact(h.data(), h.size(), out.data(), 3001)),
            "deflate stream holds less data than declared");
  Bytes trailing = h;
  trailing.push_back(0);
  EXPECT_EQ(std::string(diffq::detail::inflate_raw_exact(trailing.data(), trailing.size(),
                                                         out.data(), 3000)),
            "bytes left over after the end of the deflate stream");
  Bytes cut(h.begin(), h.begin() + static_cast<std::ptrdiff_t>(h.size() / 2));
  EXPECT_EQ(std::string(diffq::detail::inflate_raw_exact(cut.data(), cut.size(), out.data(), 3000)),
            "deflate stream ends before the declared size");
  const Bytes bad{0xFF, 0xFF, 0xFF, 0xFF};  // BTYPE = 11: invalid block type
  EXPECT_EQ(std::string(diffq::detail::inflate_raw_exact(bad.data(), bad.size(), out.data(), 10)),
            "corrupt deflate stream");
  std::string reason;
  EXPECT_EQ(std::string(
                diffq::detail::inflate_raw_exact(bad.data(), bad.size(), out.data(), 10, &reason)),
            "corrupt deflate stream");
  EXPECT_EQ(reason, "invalid block type");  // zlib's own message
  // An empty stream for an empty output lacks its final block; it does not hold too much data.
  EXPECT_EQ(std::string(diffq::detail::inflate_raw_zlib(h.data(), 0, out.data(), 0)),
            "deflate stream ends before its final block");
  const Bytes quad = diffq::detail::deflate_huffman4(in.data(), in.size());
  EXPECT_EQ(std::string(diffq::detail::inflate_huffman4(quad.data(), 11, out.data(), 3000)),
            "Huffman quad shorter than its 12-byte size table");
  Bytes big = quad;
  big[3] = 0x7F;  // first stream claims 2 GB
  EXPECT_EQ(std::string(diffq::detail::inflate_huffman4(big.data(), big.size(), out.data(), 3000)),
            "Huffman quad stream sizes exceed the payload");
  std::string detail;
  diffq::detail::inflate_huffman4(big.data(), big.size(), out.data(), 3000, &detail);
  EXPECT_EQ(detail.find("the first three streams declare " +
                        std::to_string(diffq::detail::load_le<uint32_t>(big.data())) + " + "),
            0u)
      << detail;
  // Which stream fails, its size and symbol count, and zlib's reason.
  Bytes corrupt = quad;
  const uint32_t s1 = diffq::detail::load_le<uint32_t>(quad.data());
  const uint32_t s2 = diffq::detail::load_le<uint32_t>(quad.data() + 4);
  corrupt[12 + s1] = 0xFF;  // first byte of stream 2: BTYPE = 11
  detail.clear();
  EXPECT_EQ(std::string(diffq::detail::inflate_huffman4(corrupt.data(), corrupt.size(), out.data(),
                                                        3000, &detail)),
            "corrupt deflate stream");
  EXPECT_EQ(detail, "stream 2 of 4: " + std::to_string(s2) +
                        " bytes for 750 symbols; zlib: invalid block type");
}

TEST(Packing, DeflateRawRoundTrip) {
  torch::manual_seed(0);
  auto t = torch::randn({1000});
  const auto* p = static_cast<const uint8_t*>(t.data_ptr());
  const Bytes z = diffq::detail::deflate_raw(p, 4000, 1);
  Bytes back(4000);
  EXPECT_EQ(diffq::detail::inflate_raw_exact(z.data(), z.size(), back.data(), back.size()),
            nullptr);
  EXPECT_TRUE(std::equal(back.begin(), back.end(), p));
}

}  // namespace
