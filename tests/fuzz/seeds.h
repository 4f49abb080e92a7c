#pragma once
// Small checkpoints covering every record kind, chunk encoding and several segments, built with the
// torch-free writer core from raw arrays (no LibTorch tensors), for the sanitized corruption test
// and as the libFuzzer seed corpus.
#include <diffq/detail/format.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace diffq_fuzz {

/// Inputs of one seed checkpoint; the arrays stay alive with it.
struct Seed {
  std::vector<std::vector<uint8_t>> bits;
  std::vector<std::vector<int16_t>> levels;
  std::vector<std::vector<uint8_t>> floats;
  diffq::detail::WriterInput in;
  std::vector<uint8_t> bytes;
};

inline uint64_t numel_of(const std::vector<int64_t>& shape) {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

/// Adds a quantized tensor with widths drawn in [lo, hi] and levels Gaussian around the middle
/// (std = `spread` of the range) or uniform (`spread` <= 0).
inline void add_quantized(Seed& s, std::mt19937& rng, const std::string& name,
                          std::vector<int64_t> shape, int64_t group_size, int lo, int hi,
                          double spread, uint8_t dtype = diffq::detail::kDtFloat32) {
  const uint64_t numel = numel_of(shape);
  const uint64_t groups = diffq::detail::groups_of(numel, static_cast<uint64_t>(group_size));
  std::uniform_int_distribution<int> wd(lo, hi);
  std::vector<uint8_t> bits(groups);
  for (auto& b : bits) b = static_cast<uint8_t>(wd(rng));
  std::vector<int16_t> lv(numel);
  std::normal_distribution<double> nd(0.5, spread > 0 ? spread : 1);
  std::uniform_real_distribution<double> ud(0, 1);
  const uint64_t gs = diffq::detail::index_group_size(numel, static_cast<uint64_t>(group_size));
  for (uint64_t i = 0; i < numel; ++i) {
    const double top = std::ldexp(1.0, bits[i / gs]) - 1;
    const double u = spread > 0 ? nd(rng) : ud(rng);
    lv[i] = static_cast<int16_t>(std::round(std::min(1.0, std::max(0.0, u)) * top));
  }
  s.bits.push_back(std::move(bits));
  s.levels.push_back(std::move(lv));
  diffq::detail::QuantizedInput q;
  q.name = name;
  q.shape = std::move(shape);
  q.dtype = dtype;
  q.group_size = group_size;
  q.min = -0.75;
  q.max = 1.25;
  s.in.quantized.push_back(q);
}

inline void add_float(Seed& s, const std::string& name, std::vector<int64_t> shape, uint8_t kind,
                      uint8_t dtype, std::vector<uint8_t> data, uint8_t stored = 0) {
  diffq::detail::FloatInput f;
  f.name = name;
  f.shape = std::move(shape);
  f.kind = kind;
  f.dtype = dtype;
  f.stored_dtype = stored ? stored : dtype;
  s.floats.push_back(std::move(data));
  s.in.floats.push_back(f);
}

/// Points the writer inputs at the arrays (after all additions) and encodes.
inline void finish(Seed& s) {
  for (size_t i = 0; i < s.in.quantized.size(); ++i) {
    s.in.quantized[i].bits = s.bits[i].data();
    s.in.quantized[i].levels = s.levels[i].data();
  }
  for (size_t i = 0; i < s.in.floats.size(); ++i) s.in.floats[i].data = s.floats[i].data();
  s.bytes = diffq::detail::encode_checkpoint(s.in, diffq::detail::serial_for(), "seed").concat();
}

/// `bytes` (a checkpoint) rewritten as format version 1, as diffq 0.1 wrote it: the same fixed
/// header with version 1, then, when `o` is given, the version-1 options block built field by
/// field (docs/checkpoint_format.md, "Version 1"), in place of the metadata block; the records
/// unchanged.
inline std::vector<uint8_t> as_version1(const std::vector<uint8_t>& bytes,
                                        const diffq::DiffQOptions* o) {
  using namespace diffq::detail;
  const uint32_t hb = load_le<uint32_t>(bytes.data() + 12);
  std::vector<uint8_t> h(bytes.begin(), bytes.begin() + 56);
  patch_u32(h, 8, 1);
  patch_u32(h, 28, o ? 1 : 0);
  if (o) {
    put_i64(h, o->group_size());
    for (double v :
         {o->min_bits(), o->max_bits(), o->init_bits(), o->extra_bits(), o->min_size_mb()}) {
      put_f64(h, v);
    }
    put_u8(h, o->float16() ? 1 : 0);
    put_u8(h, o->noise() == diffq::Noise::kGaussian ? 0 : 1);
    put_u8(h, o->param() == diffq::Param::kBits ? 0 : 1);
    put_u8(h, o->detect_bound() ? 1 : 0);
    put_u16(h, static_cast<uint16_t>(o->suffix().size()));
    put_u16(h, static_cast<uint16_t>(o->exclude().size()));
    put_bytes(h, o->suffix().data(), o->suffix().size());
    for (const auto& e : o->exclude()) {
      put_u16(h, static_cast<uint16_t>(e.size()));
      put_bytes(h, e.data(), e.size());
    }
  }
  patch_u32(h, 12, static_cast<uint32_t>(h.size() + 4));
  patch_u64(h, 16, h.size() + 4 + (bytes.size() - hb));
  put_u32(h, crc32(h.data(), h.size()));
  h.insert(h.end(), bytes.begin() + hb, bytes.end());
  return h;
}

inline std::vector<uint8_t> float_bytes(const std::vector<float>& v) {
  std::vector<uint8_t> b(v.size() * 4);
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

/// The seed checkpoints (each well under 4 KiB): four of version 2, one of version 1.
inline std::vector<Seed> make_seeds() {
  using namespace diffq::detail;
  std::vector<Seed> seeds(5);
  std::mt19937 rng(2024);
  {
    Seed& s = seeds[0];  // every record kind, mixed widths over several 64-element segments
    s.in.segment_elems = 64;
    add_quantized(s, rng, "enc.0.weight", {10, 30}, 8, 1, 15, 0.1);
    add_quantized(s, rng, "enc.1.weight", {3, 3, 2}, 5, 2, 9, 0, kDtFloat64);
    add_float(s, "enc.0.bias", {10}, kKindFloat, kDtFloat32,
              float_bytes({1, -2, 3.5f, 0, 1e-3f, -7, 8, 9, 10, 11}));
    add_float(s, "enc.1.bias", {100}, kKindFloat, kDtFloat32, std::vector<uint8_t>(400, 0));
    add_float(s, "bn.num_batches_tracked", {}, kKindBuffer, kDtInt64, {7, 0, 0, 0, 0, 0, 0, 0});
    add_float(s, "mask", {3}, kKindBuffer, kDtBool, {1, 0, 1});
    add_float(s, "half", {40}, kKindFloat, kDtFloat32, std::vector<uint8_t>(80, 0x3C), kDtFloat16);
    add_float(s, "enc.0.weight_diffq", {38}, kKindLogit, kDtFloat32, std::vector<uint8_t>(152, 1));
    s.in.aliases.push_back({"dec.weight", "enc.0.weight"});
    // The metadata block as save_quantized writes it: method, library version, options, user.
    s.in.metadata = diffq::detail::metadata_entries(
        diffq::detail::checkpoint_metadata(
            diffq::DiffQOptions().group_size(8).suffix("_diffq").exclude({"*bias"}),
            {{"model", "seed 0"}}, "seed"),
        "0.2.0", "seed");
  }
  {
    Seed& s = seeds[1];  // Huffman-coded chunks: zlib-bytes and zlib-planes
    s.in.segment_elems = 1024;
    add_quantized(s, rng, "w4", {1500}, 16, 4, 4, 0.08);
    add_quantized(s, rng, "w12", {900}, 0, 12, 12, 0.08);
  }
  {
    Seed& s = seeds[2];  // group size 1, a constant tensor, an empty tensor
    add_quantized(s, rng, "g1", {50}, 1, 1, 15, 0);
    add_quantized(s, rng, "const", {4}, 2, 3, 3, 0.0001);
    s.in.quantized.back().min = s.in.quantized.back().max = 0.5;
    add_quantized(s, rng, "empty", {0, 3}, 4, 3, 3, 0);
  }
  {
    Seed& s = seeds[3];  // mixed Gaussian widths 6..11 (the benchmark's layout), small
    s.in.segment_elems = 512;
    add_quantized(s, rng, "mlp.weight", {2000}, 16, 6, 11, 0.1);
  }
  for (size_t i = 0; i < 4; ++i) finish(seeds[i]);
  {
    Seed& s = seeds[4];  // seed 0 as a version-1 file, with its DiffQ options block
    s = seeds[0];
    const auto o = diffq::DiffQOptions().group_size(8).suffix("_diffq").exclude({"*bias"});
    s.bytes = as_version1(seeds[0].bytes, &o);
  }
  return seeds;
}

/// Parses and fully decodes `data` with the torch-free reader core; returns the decoded levels of
/// each quantized record and the decoded bytes of each float record. Throws c10::Error.
struct Decoded {
  std::vector<std::vector<int16_t>> levels;
  std::vector<std::vector<uint8_t>> floats;
};

inline Decoded decode_all(const uint8_t* data, size_t size, bool verify_crc) {
  using namespace diffq::detail;
  ParseSettings settings;
  settings.verify_crc = verify_crc;
  const ParsedCheckpoint pc = parse_checkpoint(data, size, "fuzz", "<bytes>", settings);
  Decoded d;
  for (size_t r = 0; r < pc.records.size(); ++r) {
    const RecordView& rv = pc.records[r];
    if (rv.kind == kKindQuantized) {
      std::vector<int16_t> lv(static_cast<size_t>(rv.numel));
      std::vector<float> w(static_cast<size_t>(rv.numel));
      std::vector<float> step(16);
      for (int b = 1; b < 16; ++b) {
        step[static_cast<size_t>(b)] =
            static_cast<float>((rv.max - rv.min) / (std::ldexp(1.0, b) - 1));
      }
      for (size_t s = 0; s + 1 < rv.segment_first.size(); ++s) {
        decode_segment(rv, s, pc.segment_elems, lv.data(), pc.ctx, static_cast<int64_t>(r));
      }
      dequantize_range(rv, lv.data(), step.data(), w.data(), 0, rv.numel);
      d.levels.push_back(std::move(lv));
    } else if (rv.kind != kKindAlias) {
      std::vector<uint8_t> out(static_cast<size_t>(rv.numel) *
                               static_cast<size_t>(dtype_bytes(rv.stored_dtype)));
      decode_float(rv, out.data(), pc.ctx, static_cast<int64_t>(r));
      d.floats.push_back(std::move(out));
    }
  }
  return d;
}

}  // namespace diffq_fuzz
