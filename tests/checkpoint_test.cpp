// Tests of diffq/checkpoint.h: the byte layout against a hand-built file, exact round trips of
// every bit width and group size, encodings, the model loader (bit for bit equal to
// dequantize_levels and to the quantizer's eval mode), its error reporting, atomic writes, and
// robustness against truncation and corruption at every byte.
#include <diffq/bits.h>
#include <diffq/checkpoint.h>
#include <diffq/lsq.h>
#include <diffq/quantizer.h>
#include <diffq/state.h>
#include <diffq/uniform.h>

#include "fuzz/seeds.h"
#include "test_models.h"
#include "test_util.h"

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <zlib.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>
#ifndef _WIN32
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <csignal>
#endif

namespace {

using Bytes = std::vector<uint8_t>;
namespace fs = std::filesystem;

// ---- Independent little-endian helpers (not the library's) ---------------------------------

void le(Bytes& b, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) b.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
void le_f64(Bytes& b, double d) {
  uint64_t u;
  std::memcpy(&u, &d, 8);
  le(b, u, 8);
}
void le_f32(Bytes& b, float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  le(b, u, 4);
}
void str(Bytes& b, const std::string& s) {
  b.insert(b.end(), s.begin(), s.end());
}
uint32_t zcrc(const uint8_t* p, size_t n) {
  return static_cast<uint32_t>(::crc32(0, p, static_cast<uInt>(n)));
}
uint64_t rd(const Bytes& b, size_t at, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= uint64_t{b[at + static_cast<size_t>(i)]} << (8 * i);
  return v;
}
void wr(Bytes& b, size_t at, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) b[at + static_cast<size_t>(i)] = static_cast<uint8_t>(v >> (8 * i));
}

/// Recomputes the header CRC and every record CRC (walking the record sizes), so that a test can
/// alter the content of a checkpoint and reach the checks behind the CRCs.
void fix_crcs(Bytes& b) {
  const size_t hb = static_cast<size_t>(rd(b, 12, 4));
  wr(b, hb - 4, zcrc(b.data(), hb - 4), 4);
  size_t at = hb;
  while (at + 8 <= b.size()) {
    const size_t rb = static_cast<size_t>(rd(b, at, 8));
    if (rb < 12 || at + rb > b.size()) break;
    wr(b, at + rb - 4, zcrc(b.data() + at, rb - 4), 4);
    at += rb;
  }
}

/// Offsets of the records (walking the sizes).
std::vector<size_t> record_offsets(const Bytes& b) {
  std::vector<size_t> out;
  size_t at = static_cast<size_t>(rd(b, 12, 4));
  while (at + 8 <= b.size()) {
    out.push_back(at);
    at += static_cast<size_t>(rd(b, at, 8));
  }
  return out;
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what();
  }
  return "<no error>";
}

#define EXPECT_ERROR_HAS(stmt, sub)                                                              \
  do {                                                                                           \
    const std::string what_ = error_of([&] { stmt; });                                           \
    EXPECT_NE(what_.find(sub), std::string::npos) << "expected '" << (sub) << "' in: " << what_; \
  } while (0)

// ---- State builders --------------------------------------------------------------------------

/// A quantized tensor with the given levels (`numel`), bits, min and max.
diffq::QuantizedTensor qt(const std::string& name, std::vector<int64_t> shape, int64_t group_size,
                          at::Tensor bits, at::Tensor levels, double min = -1, double max = 1,
                          at::ScalarType dtype = at::kFloat) {
  diffq::QuantizedTensor q;
  q.name = name;
  q.shape = std::move(shape);
  q.dtype = dtype;
  q.group_size = group_size;
  q.bits = bits.to(at::kByte).clone();
  q.min = min;
  q.max = max;
  q.levels = levels.to(at::kShort).clone();
  return q;
}

/// Levels of width `b` per group: uniform, or rounded Gaussian around the middle (std 1/10 of
/// the range), clamped.
at::Tensor random_levels(const at::Tensor& bits, int64_t numel, int64_t group_size, bool gaussian) {
  auto maxl = (at::pow(2.0, diffq::expand_groups(bits.to(at::kDouble), numel, group_size)) - 1);
  at::Tensor u;
  if (gaussian) {
    u = (0.5 + 0.1 * torch::randn({numel}, at::kDouble)).clamp(0, 1);
  } else {
    u = torch::rand({numel}, at::kDouble);
  }
  return (u * maxl).round().clamp_max(maxl).to(at::kShort);
}

void expect_same_state(const diffq::QuantizedState& a, const diffq::QuantizedState& b) {
  ASSERT_EQ(a.quantized.size(), b.quantized.size());
  for (size_t i = 0; i < a.quantized.size(); ++i) {
    const auto& x = a.quantized[i];
    const auto& y = b.quantized[i];
    EXPECT_EQ(x.name, y.name);
    EXPECT_EQ(x.shape, y.shape);
    EXPECT_EQ(x.dtype, y.dtype);
    EXPECT_EQ(x.group_size, y.group_size);
    EXPECT_EQ(x.min, y.min);
    EXPECT_EQ(x.max, y.max);
    EXPECT_TRUE(torch::equal(x.bits, y.bits)) << x.name;
    EXPECT_TRUE(torch::equal(x.levels, y.levels)) << x.name;
  }
  ASSERT_EQ(a.floats.size(), b.floats.size());
  for (size_t i = 0; i < a.floats.size(); ++i) {
    EXPECT_EQ(a.floats[i].name, b.floats[i].name);
    EXPECT_EQ(a.floats[i].is_buffer, b.floats[i].is_buffer);
    EXPECT_EQ(a.floats[i].value.scalar_type(), b.floats[i].value.scalar_type());
    EXPECT_TRUE(torch::equal(a.floats[i].value, b.floats[i].value)) << a.floats[i].name;
  }
  ASSERT_EQ(a.tied.size(), b.tied.size());
  for (size_t i = 0; i < a.tied.size(); ++i) {
    EXPECT_EQ(a.tied[i].name, b.tied[i].name);
    EXPECT_EQ(a.tied[i].target, b.tied[i].target);
  }
}

/// `DiffQOptions()` as the metadata block records it (docs/checkpoint_format.md).
const std::vector<std::pair<std::string, std::string>> kDefaultDiffQOptionText = {
    {"group_size", "8"},  {"min_bits", "2"},        {"max_bits", "15"},  {"init_bits", "8"},
    {"extra_bits", "0"},  {"noise", "gaussian"},    {"param", "bits"},   {"min_size_mb", "0.01"},
    {"float16", "false"}, {"detect_bound", "true"}, {"suffix", "_diffq"}};

Bytes encode(const diffq::QuantizedState& s,
             const c10::optional<diffq::DiffQOptions>& o = c10::nullopt) {
  Bytes b;
  diffq::save_quantized_state(s, b, o);
  return b;
}

/// A small plain model: Conv2d + BatchNorm2d + Linear.
struct NetImpl : torch::nn::Module {
  NetImpl() {
    conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 8, 3)));
    bn = register_module("bn", torch::nn::BatchNorm2d(8));
    fc = register_module("fc", torch::nn::Linear(8 * 6 * 6, 10));
  }
  at::Tensor forward(at::Tensor x) {
    x = torch::relu(bn->forward(conv->forward(x)));
    return fc->forward(x.flatten(1));
  }
  torch::nn::Conv2d conv{nullptr};
  torch::nn::BatchNorm2d bn{nullptr};
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(Net);

/// The state of a plain model as a quantizer would make it: weights quantized with random bit
/// widths, the rest fp32, buffers in their dtype.
diffq::QuantizedState state_of(torch::nn::Module& m, int64_t group_size = 8) {
  diffq::QuantizedState s;
  for (const auto& p : m.named_parameters()) {
    const at::Tensor w = p.value().detach();
    if (p.key().find("weight") != std::string::npos && w.numel() > 16) {
      auto bits = torch::randint(2, 12, {diffq::num_groups(w.numel(), group_size)}).to(at::kByte);
      auto mm = diffq::finite_min_max(w, p.key());
      s.quantized.push_back(qt(p.key(), w.sizes().vec(), group_size, bits,
                               diffq::quantize_levels(w, bits, group_size, mm.first, mm.second),
                               mm.first, mm.second, w.scalar_type()));
    } else {
      s.floats.push_back({p.key(), w.clone(), false, false});
    }
  }
  for (const auto& b : m.named_buffers()) {
    s.floats.push_back({b.key(), b.value().detach().clone(), false, true});
  }
  return s;
}

/// A small checkpoint exercising every record kind and encoding, for the corruption tests.
/// An empty folder `name` in the system's temporary folder (cleared first if it exists).
fs::path fresh_temp_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / name;
  EXPECT_TRUE(diffq_test::RemoveTree(dir.string())) << "cannot clear " << dir;
  fs::create_directories(dir);
  return dir;
}

diffq::QuantizedState small_state() {
  torch::manual_seed(7);
  diffq::QuantizedState s;
  // 1024 Gaussian 4-bit levels: Huffman coded; then mixed widths: bit-packed chunks.
  auto b4 = torch::full({128}, 4, at::kByte);
  s.quantized.push_back(qt("a.weight", {64, 16}, 8, b4, random_levels(b4, 1024, 8, true)));
  auto bm = torch::tensor({3, 9, 1, 15}, at::kByte);
  s.quantized.push_back(
      qt("b.weight", {2, 3, 3}, 5, bm, random_levels(bm, 18, 5, false), -0.5, 2.0, at::kDouble));
  s.floats.push_back({"a.bias", torch::randn({5}), false, false});
  s.floats.push_back({"b.bias", torch::zeros({40}), true, false});  // zlib, fp16
  s.floats.push_back({"bn.num_batches_tracked", torch::tensor(int64_t{3}), false, true});
  s.tied.push_back({"c.weight", "a.weight"});
  s.logits.push_back({"a.weight_diffq", torch::randn({12}), false, false});
  return s;
}

// ---- Format ----------------------------------------------------------------------------------

TEST(Checkpoint, WriterMatchesHandBuiltBytes) {
  diffq::QuantizedState s;
  s.quantized.push_back(qt("w", {4}, 2, torch::tensor({3, 3}), torch::tensor({1, 2, 3, 4})));
  s.floats.push_back({"b", torch::tensor({1.5f, -2.0f}), false, false});
  s.tied.push_back({"w2", "w"});

  Bytes e;
  // Header: magic, version 2, header size, file size, 3 records, flags 1 (a metadata block),
  // segments of 2^18 elements, counts (1 quantized, 1 float, 0 buffers, 1 alias, 0 logits); the
  // metadata block: 1 entry, "library_version" = the version; CRC.
  const std::string version = DIFFQ_VERSION_STRING;
  const uint64_t header_bytes = 56 + 4 + 2 + 15 + 2 + version.size() + 4;
  str(e, "DIFFQCKP");
  le(e, 2, 4);
  le(e, header_bytes, 4);
  le(e, header_bytes + 150, 8);
  le(e, 3, 4);
  le(e, 1, 4);
  le(e, 1u << 18, 4);
  for (uint64_t c : {1, 1, 0, 1, 0}) le(e, c, 4);
  le(e, 1, 4);
  le(e, 15, 2);
  str(e, "library_version");
  le(e, version.size(), 2);
  str(e, version);
  le(e, zcrc(e.data(), e.size()), 4);
  ASSERT_EQ(e.size(), header_bytes);
  // Record 0: quantized 'w', float32, shape [4], group size 2, min -1, max 1, bit widths [3, 3]
  // as the raw nibbles 0x33, one bit-packed chunk of 4 3-bit levels 1 2 3 4 -> 0xD1 0x08.
  size_t r = e.size();
  le(e, 72, 8);
  for (uint64_t v : {1, 1, 0, 1}) le(e, v, 1);
  le(e, 1, 2);
  le(e, 0, 2);
  str(e, "w");
  le(e, 4, 8);
  le(e, 2, 8);
  le_f64(e, -1.0);
  le_f64(e, 1.0);
  le(e, 0, 4);
  le(e, 1, 4);
  e.push_back(0x33);
  le(e, 0, 4);
  le(e, 2, 4);
  e.push_back(0xD1);
  e.push_back(0x08);
  le(e, zcrc(e.data() + r, e.size() - r), 4);
  // Record 1: float 'b', float32 stored as float32, shape [2], raw payload of 8 bytes.
  r = e.size();
  le(e, 53, 8);
  for (uint64_t v : {2, 1, 1, 1}) le(e, v, 1);
  le(e, 1, 2);
  le(e, 0, 2);
  str(e, "b");
  le(e, 2, 8);
  le(e, 0, 8);
  le(e, 8, 8);
  le_f32(e, 1.5f);
  le_f32(e, -2.0f);
  le(e, zcrc(e.data() + r, e.size() - r), 4);
  // Record 2: alias 'w2' -> 'w'.
  r = e.size();
  le(e, 25, 8);
  for (uint64_t v : {4, 0, 0, 0}) le(e, v, 1);
  le(e, 2, 2);
  le(e, 0, 2);
  str(e, "w2");
  le(e, 1, 2);
  str(e, "w");
  le(e, zcrc(e.data() + r, e.size() - r), 4);
  ASSERT_EQ(e.size(), header_bytes + 150);

  const Bytes got = encode(s);
  EXPECT_EQ(got, e);
  expect_same_state(diffq::read_quantized_state(e), s);
}

TEST(Checkpoint, RoundTripEveryBitWidth) {
  torch::manual_seed(0);
  for (int64_t b = 1; b <= 15; ++b) {
    for (int64_t gs : {0, 1, 8, 5, 200}) {  // 5 does not divide 111; 200 > numel
      for (bool gaussian : {false, true}) {
        const int64_t numel = 37 * 3;
        auto bits = torch::full({diffq::num_groups(numel, gs)}, b, at::kByte);
        diffq::QuantizedState s;
        s.quantized.push_back(qt("w", {37, 3}, gs, bits, random_levels(bits, numel, gs, gaussian),
                                 -0.25, 0.75, b % 2 ? at::kFloat : at::kDouble));
        // Every level value of the width at least once, in a second tensor.
        const int64_t n = int64_t{1} << b;
        auto all = torch::arange(n, at::kLong);
        auto bits2 = torch::full({diffq::num_groups(n, gs)}, b, at::kByte);
        s.quantized.push_back(qt("all", {n}, gs, bits2, all));
        if (b == 1) {  // and an empty tensor
          s.quantized.push_back(qt("empty", {0, 4}, gs, torch::zeros({0}), torch::zeros({0})));
        }
        const Bytes bytes = encode(s);
        SCOPED_TRACE("bits=" + std::to_string(b) + " gs=" + std::to_string(gs));
        expect_same_state(diffq::read_quantized_state(bytes), s);
      }
    }
  }
}

TEST(Checkpoint, RoundTripMixedWidthsAcrossSegments) {
  torch::manual_seed(1);
  // 300000 elements: two segments of 2^18; group size 16 does not divide the tensor.
  const int64_t numel = 300003, gs = 16;
  auto bits = torch::randint(1, 16, {diffq::num_groups(numel, gs)}).to(at::kByte);
  diffq::QuantizedState s;
  s.quantized.push_back(qt("big", {numel}, gs, bits, random_levels(bits, numel, gs, true)));
  const Bytes bytes = encode(s);
  expect_same_state(diffq::read_quantized_state(bytes), s);
  const auto info = diffq::read_checkpoint_info(bytes);
  ASSERT_EQ(info.tensors.size(), 1u);
  for (int64_t b = 1; b <= 15; ++b) {
    EXPECT_EQ(info.tensors[0].bits_histogram[static_cast<size_t>(b)],
              (bits == b).sum().item<int64_t>());
  }
  EXPECT_EQ(info.tensors[0].bits_histogram[0], 0);
}

TEST(Checkpoint, ChoosesTheSmallerEncoding) {
  torch::manual_seed(2);
  const int64_t numel = 50000, gs = 16;
  auto make = [&](int64_t b, bool gaussian) {
    auto bits = torch::full({diffq::num_groups(numel, gs)}, b, at::kByte);
    return qt("w" + std::to_string(b) + (gaussian ? "g" : "u"), {numel}, gs, bits,
              random_levels(bits, numel, gs, gaussian));
  };
  diffq::QuantizedState s;
  s.quantized = {make(8, false), make(4, true), make(8, true), make(12, true), make(12, false)};
  const auto info = diffq::read_checkpoint_info(encode(s));
  ASSERT_EQ(info.tensors.size(), 5u);
  EXPECT_EQ(info.tensors[0].encoding, "bitpack");     // uniform: nothing to gain
  EXPECT_EQ(info.tensors[1].encoding, "zlib-bytes");  // Gaussian, <= 8 bits
  EXPECT_EQ(info.tensors[2].encoding, "zlib-bytes");
  EXPECT_EQ(info.tensors[3].encoding, "zlib-planes");  // Gaussian, > 8 bits
  EXPECT_EQ(info.tensors[4].encoding, "bitpack");
  for (size_t i = 0; i < 5; ++i) {
    const int64_t b = s.quantized[i].bits[0].item<int64_t>();
    const double packed = std::ceil(numel * b / 8.0);
    EXPECT_LE(info.tensors[i].stored_bytes, packed + 300) << info.tensors[i].name;
  }
  // Gaussian levels with std 1/10 of the range: entropy ~ log2(0.1·2^b·sqrt(2πe)) bits.
  for (size_t i : {1u, 2u, 3u}) {
    const double b = s.quantized[i].bits[0].item<double>();
    const double h = std::log2(0.1 * (std::exp2(b) - 1) * std::sqrt(2 * M_PI * M_E));
    EXPECT_LT(info.tensors[i].stored_bytes, numel * (h + 0.1) / 8 + 1500) << info.tensors[i].name;
  }
}

TEST(Checkpoint, FloatsBuffersTiedAndLogitsRoundTrip) {
  torch::manual_seed(3);
  diffq::QuantizedState s;
  auto bits = torch::full({4}, 5, at::kByte);
  s.quantized.push_back(qt("q", {32}, 8, bits, random_levels(bits, 32, 8, true)));
  s.floats.push_back({"f32", torch::randn({3, 4}), false, false});
  s.floats.push_back({"f64", torch::randn({7}, at::kDouble), false, false});
  s.floats.push_back({"half", torch::randn({100}), true, false});
  s.floats.push_back({"zeros", torch::zeros({1000}), false, false});
  s.floats.push_back({"count", torch::tensor(int64_t{123456789012}), false, true});
  s.floats.push_back({"mask", torch::tensor({true, false, true}), false, true});
  s.floats.push_back({"bf", torch::randn({4}).to(at::kBFloat16), false, true});
  s.tied.push_back({"q2", "q"});
  s.tied.push_back({"f2", "f32"});
  s.logits.push_back({"q_diffq", torch::randn({4}), false, false});
  const Bytes bytes = encode(s);
  const auto back = diffq::read_quantized_state(bytes);
  // fp16 storage is lossy: the value read back is the fp16 rounding, in the original dtype.
  diffq::QuantizedState expected = s;
  expected.floats[2].value = s.floats[2].value.to(at::kHalf).to(at::kFloat);
  expect_same_state(back, expected);
  EXPECT_TRUE(back.floats[2].float16);
  EXPECT_FALSE(back.floats[0].float16);
  ASSERT_EQ(back.logits.size(), 1u);
  EXPECT_EQ(back.logits[0].name, "q_diffq");
  EXPECT_TRUE(torch::equal(back.logits[0].value, s.logits[0].value));
  const auto info = diffq::read_checkpoint_info(bytes);
  std::vector<std::string> kinds, encodings;
  for (const auto& t : info.tensors) {
    kinds.push_back(t.kind);
    encodings.push_back(t.encoding);
  }
  EXPECT_EQ(kinds,
            (std::vector<std::string>{"quantized", "float", "float", "float", "float", "buffer",
                                      "buffer", "buffer", "logit", "alias", "alias"}));
  EXPECT_EQ(encodings[1], "float32");       // 48 bytes: raw
  EXPECT_EQ(encodings[3], "float16");       // random fp16: deflate does not help
  EXPECT_EQ(encodings[4], "zlib-float32");  // zeros compress
  EXPECT_EQ(encodings[5], "int64");
  EXPECT_EQ(encodings[6], "bool");
  EXPECT_EQ(info.tensors[9].target, "q");
  EXPECT_LT(info.tensors[4].stored_bytes, 200);  // 4000 bytes of zeros
  EXPECT_EQ(info.tensors[3].dtype, at::kFloat);
}

TEST(Checkpoint, HighlyCompressibleFloatsRoundTrip) {
  // Zeros and a causal mask deflate about 1000:1, far beyond 8 elements per byte of the file.
  torch::manual_seed(4);
  diffq::QuantizedState s;
  auto bits = torch::full({4}, 5, at::kByte);
  s.quantized.push_back(qt("q", {32}, 8, bits, random_levels(bits, 32, 8, true)));
  s.floats.push_back({"zeros", torch::zeros({1024, 1024}), false, false});
  s.floats.push_back(
      {"mask", torch::ones({512, 512}, at::kBool).tril().view({1, 1, 512, 512}), false, true});
  // Empty tensors of any (non-overflowing) shape: no element costs a byte.
  s.floats.push_back({"empty", torch::empty({0, 1000000}), false, false});
  s.floats.push_back({"empty2", torch::empty({1000000, 0, 7}), false, true});
  const Bytes bytes = encode(s);
  ASSERT_LT(bytes.size() * 8, size_t{1} << 20);
  expect_same_state(diffq::read_quantized_state(bytes), s);
}

TEST(Checkpoint, SaveReturnsExactSizeForFileStreamAndBytes) {
  const auto s = small_state();
  Bytes bytes;
  const size_t n = diffq::save_quantized_state(s, bytes);
  EXPECT_EQ(n, bytes.size());
  std::ostringstream os;
  EXPECT_EQ(diffq::save_quantized_state(s, os), n);
  EXPECT_EQ(os.str(), std::string(bytes.begin(), bytes.end()));
  const fs::path dir = fresh_temp_dir("diffq_ckpt_size");
  const std::string path = (dir / "m.ckpt").string();
  EXPECT_EQ(diffq::save_quantized_state(s, path), n);
  EXPECT_EQ(fs::file_size(path), n);
  std::istringstream is(os.str());
  expect_same_state(diffq::read_quantized_state(is), diffq::read_quantized_state(path));
  EXPECT_TRUE(diffq_test::RemoveTree(dir.string()));
}

TEST(Checkpoint, InfoReportsShapesHistogramsAndOptions) {
  const auto s = small_state();
  const auto o = diffq::DiffQOptions()
                     .group_size(5)
                     .min_bits(1.5)
                     .max_bits(14)
                     .extra_bits(0.5)
                     .float16(true)
                     .noise(diffq::Noise::kUniform)
                     .param(diffq::Param::kNoise)
                     .suffix("_q")
                     .exclude({"*bias", "bn.*"});
  const Bytes bytes = encode(s, o);
  const auto info = diffq::read_checkpoint_info(bytes);
  EXPECT_EQ(info.version, 2u);
  EXPECT_EQ(info.file_bytes, static_cast<int64_t>(bytes.size()));
  EXPECT_EQ(info.method, "diffq");
  EXPECT_EQ(info.library_version, DIFFQ_VERSION_STRING);
  const std::vector<std::pair<std::string, std::string>> expected_text = {
      {"group_size", "5"},    {"min_bits", "1.5"},     {"max_bits", "14"},
      {"init_bits", "8"},     {"extra_bits", "0.5"},   {"noise", "uniform"},
      {"param", "noise"},     {"min_size_mb", "0.01"}, {"float16", "true"},
      {"exclude.0", "*bias"}, {"exclude.1", "bn.*"},   {"detect_bound", "true"},
      {"suffix", "_q"}};
  EXPECT_EQ(info.method_options, expected_text);
  EXPECT_TRUE(info.user_metadata.empty());
  ASSERT_TRUE(info.options.has_value());
  EXPECT_EQ(info.options->group_size(), 5);
  EXPECT_EQ(info.options->min_bits(), 1.5);
  EXPECT_EQ(info.options->max_bits(), 14);
  EXPECT_EQ(info.options->extra_bits(), 0.5);
  EXPECT_TRUE(info.options->float16());
  EXPECT_EQ(info.options->noise(), diffq::Noise::kUniform);
  EXPECT_EQ(info.options->param(), diffq::Param::kNoise);
  EXPECT_EQ(info.options->suffix(), "_q");
  EXPECT_EQ(info.options->exclude(), (std::vector<std::string>{"*bias", "bn.*"}));
  ASSERT_EQ(info.tensors.size(), 7u);
  const auto& b = info.tensors[1];
  EXPECT_EQ(b.name, "b.weight");
  EXPECT_EQ(b.kind, "quantized");
  EXPECT_EQ(b.shape, (std::vector<int64_t>{2, 3, 3}));
  EXPECT_EQ(b.dtype, at::kDouble);
  EXPECT_EQ(b.group_size, 5);
  EXPECT_EQ(b.min, -0.5);
  EXPECT_EQ(b.max, 2.0);
  std::array<int64_t, 16> h{};
  h[3] = h[9] = h[1] = h[15] = 1;
  EXPECT_EQ(b.bits_histogram, h);
  EXPECT_EQ(b.encoding, "bitpack");
  int64_t total = 0;
  for (const auto& t : info.tensors) total += t.stored_bytes;
  // The header: fixed 56 bytes, the entry count, the entries (u16 key size, "option." key, u16
  // value size, value; plus method and library_version), the CRC.
  int64_t metadata = 4 + (2 + 6 + 2 + 5) + (2 + 15 + 2 + int64_t(info.library_version.size()));
  for (const auto& e : expected_text)
    metadata += 2 + 7 + int64_t(e.first.size()) + 2 + int64_t(e.second.size());
  EXPECT_EQ(total + 56 + metadata + 4, static_cast<int64_t>(bytes.size()))
      << "records plus the header (fixed 56, metadata entries, CRC) make the file";
  const auto bare = diffq::read_checkpoint_info(encode(s));
  EXPECT_FALSE(bare.options.has_value());
  EXPECT_EQ(bare.method, "");
  EXPECT_TRUE(bare.method_options.empty());
}

TEST(Checkpoint, OutputIndependentOfThreadCount) {
  torch::manual_seed(4);
  const int64_t numel = 700000, gs = 16;
  auto bits = torch::randint(3, 13, {diffq::num_groups(numel, gs)}).to(at::kByte);
  diffq::QuantizedState s;
  s.quantized.push_back(qt("w", {numel}, gs, bits, random_levels(bits, numel, gs, true)));
  s.floats.push_back({"b", torch::randn({3000}), false, false});
  const int before = at::get_num_threads();
  at::set_num_threads(1);
  const Bytes one = encode(s);
  at::set_num_threads(2);
  const Bytes two = encode(s);
  at::set_num_threads(before);
  EXPECT_EQ(one, two);
}

// ---- Loading into a model ----------------------------------------------------------------------

TEST(Checkpoint, LoadedWeightsEqualDequantizeLevelsBitForBit) {
  torch::manual_seed(5);
  for (auto dtype : {at::kFloat, at::kDouble}) {
    for (int64_t b = 1; b <= 15; ++b) {
      for (int64_t gs : {0, 1, 8, 5, 16}) {
        const int64_t numel = 203;
        auto bits = torch::randint(1, b + 1, {diffq::num_groups(numel, gs)}).to(at::kByte);
        bits[0] = b;
        // min and max not representable in float32, to pin the rounding of the scalars.
        const double lo = -0.1 - 1e-12 * b, hi = 0.3 + 1e-9;
        diffq::QuantizedState s;
        s.quantized.push_back(
            qt("w", {7, 29}, gs, bits, random_levels(bits, numel, gs, false), lo, hi, dtype));
        const Bytes bytes = encode(s);
        auto pc = diffq::detail::parse_checkpoint(bytes.data(), bytes.size(), "t", "<bytes>");
        const auto values = diffq::detail::decode_all_weights(pc);
        const auto& q = s.quantized[0];
        const auto ref =
            diffq::dequantize_levels(q.levels, q.bits, gs, lo, hi, dtype).view({7, 29});
        ASSERT_EQ(values[0].scalar_type(), dtype);
        ASSERT_TRUE(torch::equal(values[0], ref)) << "b=" << b << " gs=" << gs << " " << dtype;
      }
    }
  }
  // A constant tensor (max == min) loads as min, sign of -0.0 included.
  diffq::QuantizedState s;
  s.quantized.push_back(qt("c", {4}, 2, torch::tensor({3, 5}), torch::zeros({4}), -0.0, -0.0));
  const Bytes bytes = encode(s);
  auto pc = diffq::detail::parse_checkpoint(bytes.data(), bytes.size(), "t", "<bytes>");
  const auto v = diffq::detail::decode_all_weights(pc)[0];
  const auto ref = diffq::dequantize_levels(s.quantized[0].levels, s.quantized[0].bits, 2, -0.0,
                                            -0.0, at::kFloat);
  for (int64_t i = 0; i < 4; ++i) {
    EXPECT_EQ(std::signbit(v[i].item<float>()), std::signbit(ref[i].item<float>()));
    EXPECT_TRUE(std::signbit(v[i].item<float>()));
  }
}

TEST(Checkpoint, LoadFillsAFreshPlainModel) {
  torch::manual_seed(6);
  Net src;
  src->train();
  src->forward(torch::randn({4, 3, 8, 8}));  // moves the BatchNorm running statistics
  const auto s = state_of(*src);
  const Bytes bytes = encode(s);
  Net dst;  // another initialisation
  diffq::load_quantized(dst, bytes);
  auto params = dst->named_parameters();
  for (const auto& q : s.quantized) {
    // w = min + level·(max − min)/(2^b − 1) per group, computed here in double then rounded.
    auto lv = q.levels.to(at::kDouble);
    auto step =
        (q.max - q.min) /
        (at::pow(2.0, diffq::expand_groups(q.bits.to(at::kDouble), lv.numel(), q.group_size)) - 1);
    auto by_hand = (lv * step + q.min).to(at::kFloat).view(q.shape);
    EXPECT_TRUE(torch::allclose(params[q.name], by_hand, 0, 1e-6)) << q.name;
    EXPECT_TRUE(
        torch::equal(params[q.name],
                     diffq::dequantize_levels(q.levels, q.bits, q.group_size, q.min, q.max, q.dtype)
                         .view(q.shape)))
        << q.name;
  }
  for (const auto& f : s.floats) {
    const at::Tensor got = f.is_buffer ? dst->named_buffers()[f.name] : params[f.name];
    EXPECT_TRUE(torch::equal(got, f.value)) << f.name;
  }
  EXPECT_EQ(dst->bn->num_batches_tracked.item<int64_t>(), 1);
}

TEST(Checkpoint, LoadReachesEveryHandleViewAndOptimizerOfAParameter) {
  // Every way of reaching a parameter sees the loaded values, and a view stays a view.
  torch::manual_seed(17);
  Net src;
  const auto s = state_of(*src);
  const Bytes bytes = encode(s);
  Net dst;
  auto handle = dst->fc->weight;           // another handle to the same tensor
  auto view = dst->conv->weight.view(-1);  // shares the storage of conv.weight
  const void* conv_data = dst->conv->weight.data_ptr();
  const auto fc_version = dst->fc->weight._version();
  torch::optim::SGD opt(dst->parameters(), torch::optim::SGDOptions(0.1));
  diffq::load_quantized(dst, bytes);
  // Filled in place: autograd and caches see a new version.
  EXPECT_GT(dst->fc->weight._version(), fc_version);
  auto params = dst->named_parameters();
  for (const auto& q : s.quantized) {
    auto expected = diffq::dequantize_levels(q.levels, q.bits, q.group_size, q.min, q.max, q.dtype)
                        .view(q.shape);
    EXPECT_TRUE(torch::equal(params[q.name], expected)) << q.name;
  }
  EXPECT_TRUE(torch::equal(handle, params["fc.weight"]));
  EXPECT_EQ(handle.data_ptr(), dst->fc->weight.data_ptr());
  // conv.weight keeps its storage, so its view sees the loaded values.
  EXPECT_EQ(dst->conv->weight.data_ptr(), conv_data);
  EXPECT_TRUE(torch::equal(view, params["conv.weight"].view(-1)));
  // The optimizer steps the loaded values.
  for (const auto& p : opt.param_groups()[0].params()) {
    bool found = false;
    for (const auto& kv : params) found = found || kv.value().is_same(p);
    EXPECT_TRUE(found);
  }
  const auto before = dst->fc->weight.detach().clone();
  dst->zero_grad();
  dst->forward(torch::randn({2, 3, 8, 8})).sum().backward();
  opt.step();
  EXPECT_FALSE(torch::equal(dst->fc->weight, before));
  EXPECT_TRUE(torch::equal(handle, dst->fc->weight));
}

TEST(Checkpoint, LoadAcceptsPathStreamSharedPtrAndHolder) {
  torch::manual_seed(8);
  auto src = torch::nn::Linear(40, 30);
  const auto s = state_of(*src);
  const Bytes bytes = encode(s);
  const fs::path dir = fresh_temp_dir("diffq_ckpt_overloads");
  const std::string path = (dir / "lin.ckpt").string();
  diffq::save_quantized_state(s, path);
  auto expect_loaded = [&](const torch::nn::Linear& m) {
    EXPECT_TRUE(torch::equal(m->bias, s.floats[0].value));
    const auto& q = s.quantized[0];
    EXPECT_TRUE(torch::equal(
        m->weight, diffq::dequantize_levels(q.levels, q.bits, q.group_size, q.min, q.max, q.dtype)
                       .view(q.shape)));
  };
  torch::nn::Linear a(40, 30), b(40, 30), c(40, 30), d(40, 30);
  diffq::load_quantized(a, path);  // holder, path
  std::istringstream is(std::string(bytes.begin(), bytes.end()));
  diffq::load_quantized(b.ptr(), is);  // shared_ptr, stream
  diffq::load_quantized(*c, bytes);    // Module&, bytes
  diffq::load_quantized(d, std::string(path));
  for (auto* m : {&a, &b, &c, &d}) expect_loaded(*m);
  EXPECT_ERROR_HAS(diffq::load_quantized(a, (dir / "missing.ckpt").string()),
                   "diffq::load_quantized: " + (dir / "missing.ckpt").string() +
                       ": cannot open the file for reading: ");
#ifndef _WIN32
  EXPECT_ERROR_HAS(diffq::load_quantized(a, (dir / "missing.ckpt").string()),
                   ": cannot open the file for reading: No such file or directory");
  // A directory is not read (seeking to its end reports a huge size on some file systems).
  EXPECT_ERROR_HAS(diffq::load_quantized(a, dir.string()),
                   "diffq::load_quantized: " + dir.string() +
                       ": not a regular file (a directory); expected a checkpoint file (read "
                       "other sources through the std::istream overload)");
#endif
  EXPECT_TRUE(diffq_test::RemoveTree(dir.string()));
}

TEST(Checkpoint, LoadListsMissingUnexpectedAndMismatchedNamesInOneError) {
  torch::manual_seed(9);
  Net src;
  auto s = state_of(*src);
  // Unexpected: an extra record; missing: drop 'fc.bias'; mismatched: a wrong shape and dtype.
  s.floats.push_back({"extra.weight", torch::randn({2}), false, false});
  for (size_t i = 0; i < s.floats.size(); ++i) {
    if (s.floats[i].name == "fc.bias")
      s.floats.erase(s.floats.begin() + static_cast<std::ptrdiff_t>(i));
  }
  for (auto& f : s.floats) {
    if (f.name == "conv.bias") f.value = torch::randn({9});
    if (f.name == "bn.running_mean") f.value = f.value.to(at::kDouble);
  }
  const Bytes bytes = encode(s);
  Net dst;
  const std::string what = error_of([&] { diffq::load_quantized(dst, bytes); });
  EXPECT_NE(what.find("diffq::load_quantized: <bytes>: the checkpoint does not match the model:"),
            std::string::npos)
      << what;
  EXPECT_NE(what.find("missing from the checkpoint (1): 'fc.bias'"), std::string::npos) << what;
  EXPECT_NE(what.find("unexpected in the checkpoint (1): 'extra.weight'"), std::string::npos)
      << what;
  EXPECT_NE(what.find("'conv.bias' (record"), std::string::npos) << what;
  EXPECT_NE(what.find("checkpoint [9] Float, model [8] Float"), std::string::npos) << what;
  EXPECT_NE(what.find("checkpoint [8] Double, model [8] Float"), std::string::npos) << what;
  EXPECT_NE(what.find("mismatched shape or dtype (2)"), std::string::npos) << what;
}

TEST(Checkpoint, TiedNamesLoadTheirTargetAndLogitsAreIgnored) {
  // 'b.weight' is the very tensor registered as 'a.weight'.
  auto make = [] {
    auto root = std::make_shared<torch::nn::Module>();
    auto a = std::make_shared<torch::nn::Module>();
    auto b = std::make_shared<torch::nn::Module>();
    auto w = a->register_parameter("weight", torch::randn({8, 8}));
    a->register_parameter("bias", torch::randn({8}));
    b->register_parameter("weight", w);
    b->register_parameter("bias", torch::randn({8}));
    root->register_module("a", a);
    root->register_module("b", b);
    return root;
  };
  torch::manual_seed(10);
  auto src = make();
  auto p = src->named_parameters();
  diffq::QuantizedState s;
  auto bits = torch::full({8}, 6, at::kByte);
  auto mm = diffq::finite_min_max(p["a.weight"], "a.weight");
  s.quantized.push_back(qt("a.weight", {8, 8}, 8, bits,
                           diffq::quantize_levels(p["a.weight"], bits, 8, mm.first, mm.second),
                           mm.first, mm.second));
  s.floats.push_back({"a.bias", p["a.bias"].detach().clone(), false, false});
  s.floats.push_back({"b.bias", p["b.bias"].detach().clone(), false, false});
  s.tied.push_back({"b.weight", "a.weight"});
  s.logits.push_back({"a.weight_diffq", torch::zeros({8}), false, false});
  auto dst = make();
  diffq::load_quantized(dst, encode(s));
  const auto& q = s.quantized[0];
  const auto w =
      diffq::dequantize_levels(q.levels, q.bits, 8, q.min, q.max, at::kFloat).view({8, 8});
  auto d = dst->named_parameters();
  EXPECT_TRUE(torch::equal(d["a.weight"], w));
  EXPECT_TRUE(torch::equal(d["b.weight"], w));
  EXPECT_TRUE(torch::equal(d["b.bias"], p["b.bias"]));
}

TEST(Checkpoint, LoadLeavesTheModelUntouchedOnFailure) {
  torch::manual_seed(11);
  auto src = torch::nn::Linear(64, 64);
  auto s = state_of(*src);
  // Gaussian 8-bit levels: a Huffman-coded chunk whose quad size table we break (CRCs fixed, so
  // that parsing succeeds and decoding fails).
  auto bits = torch::full({512}, 8, at::kByte);
  s.quantized[0] = qt("weight", {64, 64}, 8, bits, random_levels(bits, 4096, 8, true));
  Bytes bytes = encode(s);
  const auto rec = record_offsets(bytes);
  ASSERT_EQ(diffq::read_checkpoint_info(bytes).tensors[0].encoding, "zlib-bytes");
  // Record 0: size 8, fixed 8, name 'weight' 6, dims 16, quant header 32, bit widths (raw
  // nibbles: 256 bytes, or deflated), then the chunk: 8-byte header, then the quad sizes.
  const size_t bits_size = static_cast<size_t>(rd(bytes, rec[0] + 8 + 8 + 6 + 16 + 28, 4));
  const size_t chunk = rec[0] + 8 + 8 + 6 + 16 + 32 + bits_size;
  ASSERT_EQ(bytes[chunk], 1);  // zlib-bytes
  wr(bytes, chunk + 8, 0, 4);  // first stream: 0 bytes
  fix_crcs(bytes);
  EXPECT_NO_THROW(diffq::read_checkpoint_info(bytes));
  torch::nn::Linear dst(64, 64);
  const auto w0 = dst->weight.clone(), b0 = dst->bias.clone();
  EXPECT_ERROR_HAS(diffq::load_quantized(dst, bytes),
                   "diffq::load_quantized: <bytes>: record 0 ('weight') at byte " +
                       std::to_string(chunk) +
                       ": chunk of 4096 8-bit levels in elements [0, 4096): " +
                       "Huffman quad stream too short for its symbols (stream 1 of 4: 0 bytes "
                       "for 1024 symbols)");
  EXPECT_TRUE(torch::equal(dst->weight, w0));
  EXPECT_TRUE(torch::equal(dst->bias, b0));
}

/// Two quantized tensors 'a.weight' and 'b.weight' of `shape`, group size 8, every group `b` bits,
/// random levels (Gaussian-like or uniform).
diffq::QuantizedState two_weights(std::vector<int64_t> shape, int b, bool gaussian) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  auto bits = torch::full({diffq::num_groups(numel, 8)}, b, at::kByte);
  diffq::QuantizedState s;
  for (const char* name : {"a.weight", "b.weight"}) {
    s.quantized.push_back(qt(name, shape, 8, bits, random_levels(bits, numel, 8, gaussian)));
  }
  return s;
}

/// A model whose parameters are 'a.weight' and 'b.weight' (the matching names of `two_weights`).
std::shared_ptr<torch::nn::Module> two_weight_model(const at::Tensor& a_weight,
                                                    const at::Tensor& b_weight) {
  auto root = std::make_shared<torch::nn::Module>();
  auto a = std::make_shared<torch::nn::Module>();
  auto b = std::make_shared<torch::nn::Module>();
  a->register_parameter("weight", a_weight, /*requires_grad=*/false);
  b->register_parameter("weight", b_weight, /*requires_grad=*/false);
  root->register_module("a", a);
  root->register_module("b", b);
  return root;
}

TEST(Checkpoint, LoadLeavesTheModelUntouchedWhenALaterRecordFails) {
  // Record 0 decodes fine, record 1 does not: nothing may be written, record 0's target included
  // (every payload is checked before the first parameter is filled).
  torch::manual_seed(12);
  Bytes bytes = encode(two_weights({64, 64}, 8, /*gaussian=*/true));
  const auto rec = record_offsets(bytes);
  ASSERT_EQ(rec.size(), 2u);
  // Record layout as in LoadLeavesTheModelUntouchedOnFailure, with an 8-byte name.
  const size_t bits_size = static_cast<size_t>(rd(bytes, rec[1] + 8 + 8 + 8 + 16 + 28, 4));
  const size_t chunk = rec[1] + 8 + 8 + 8 + 16 + 32 + bits_size;
  ASSERT_EQ(bytes[chunk], 1);  // zlib-bytes
  wr(bytes, chunk + 8, 0, 4);  // first stream: 0 bytes
  fix_crcs(bytes);
  auto root = two_weight_model(torch::randn({64, 64}), torch::randn({64, 64}));
  const auto a0 = root->named_parameters()["a.weight"].clone();
  const auto b0 = root->named_parameters()["b.weight"].clone();
  EXPECT_ERROR_HAS(diffq::load_quantized(root, bytes),
                   "record 1 ('b.weight') at byte " + std::to_string(chunk) +
                       ": chunk of 4096 8-bit levels in elements [0, 4096): " +
                       "Huffman quad stream too short for its symbols");
  EXPECT_TRUE(torch::equal(root->named_parameters()["a.weight"], a0));
  EXPECT_TRUE(torch::equal(root->named_parameters()["b.weight"], b0));
}

TEST(Checkpoint, LoadFillsNonContiguousParameters) {
  // A transposed parameter (not contiguous) goes through a full tensor and copy_, and gets the
  // same values as the direct path.
  torch::manual_seed(13);
  // Group size 7 leaves a partial last group (48·40 = 274·7 + 2).
  auto bits = torch::randint(1, 16, {diffq::num_groups(48 * 40, 7)}).to(at::kByte);
  diffq::QuantizedState s;
  s.quantized.push_back(
      qt("weight", {48, 40}, 7, bits, random_levels(bits, 48 * 40, 7, false), -0.7, 0.4));
  const Bytes bytes = encode(s);
  auto m = std::make_shared<torch::nn::Module>();
  m->register_parameter("weight", torch::zeros({40, 48}).t());
  ASSERT_FALSE(m->named_parameters()["weight"].is_contiguous());
  diffq::load_quantized(m, bytes);
  const auto& q = s.quantized[0];
  const auto expected =
      diffq::dequantize_levels(q.levels, q.bits, q.group_size, q.min, q.max, q.dtype).view(q.shape);
  EXPECT_TRUE(torch::equal(m->named_parameters()["weight"], expected));
}

TEST(Checkpoint, LoadIsBitExactOnSeveralThreads) {
  // Large enough for the dequantization to be split across threads at element positions inside
  // groups (block grain 2^16, group size 7).
  const int threads = at::get_num_threads();
  at::set_num_threads(2);
  torch::manual_seed(14);
  const int64_t numel = 2 * 65536 + 12345;
  auto bits = torch::randint(1, 16, {diffq::num_groups(numel, 7)}).to(at::kByte);
  diffq::QuantizedState s;
  s.quantized.push_back(qt("weight", {numel}, 7, bits, random_levels(bits, numel, 7, true),
                           -0.1 - 1e-12, 0.3 + 1e-9));
  const Bytes bytes = encode(s);
  auto m = std::make_shared<torch::nn::Module>();
  m->register_parameter("weight", torch::zeros({numel}));
  diffq::load_quantized(m, bytes);
  at::set_num_threads(threads);
  const auto& q = s.quantized[0];
  EXPECT_TRUE(torch::equal(m->named_parameters()["weight"],
                           diffq::dequantize_levels(q.levels, q.bits, 7, q.min, q.max, q.dtype)));
}

TEST(Checkpoint, LoadRefusesTargetsItCannotFillAndLeavesTheModelUntouched) {
  torch::manual_seed(15);
  const diffq::QuantizedState s = two_weights({8, 40}, 6, /*gaussian=*/false);
  const Bytes bytes = encode(s);
  auto make = [](const at::Tensor& b_weight) {
    return two_weight_model(torch::randn({8, 40}), b_weight);
  };
  // An inference tensor ('b.weight', after 'a.weight' in name order) outside InferenceMode.
  at::Tensor inference;
  {
    c10::InferenceMode guard;
    inference = torch::randn({8, 40});
  }
  auto m = make(inference);
  const auto a0 = m->named_parameters()["a.weight"].clone();
  const auto b0 = m->named_parameters()["b.weight"].clone();
  EXPECT_ERROR_HAS(diffq::load_quantized(m, bytes),
                   "diffq::load_quantized: <bytes>: cannot fill 'b.weight': it is an inference "
                   "tensor, which can only be written inside c10::InferenceMode");
  EXPECT_TRUE(torch::equal(m->named_parameters()["a.weight"], a0));
  EXPECT_TRUE(torch::equal(m->named_parameters()["b.weight"], b0));
  {
    // Inside InferenceMode the same model loads.
    c10::InferenceMode guard;
    diffq::load_quantized(m, bytes);
  }
  const auto& q = s.quantized[1];
  EXPECT_TRUE(torch::equal(
      m->named_parameters()["b.weight"],
      diffq::dequantize_levels(q.levels, q.bits, 8, q.min, q.max, q.dtype).view({8, 40})));
  // An expanded tensor (every row the same memory).
  auto e = make(torch::zeros({1, 40}).expand({8, 40}));
  const auto e0 = e->named_parameters()["a.weight"].clone();
  EXPECT_ERROR_HAS(diffq::load_quantized(e, bytes),
                   "cannot fill 'b.weight': its elements overlap in memory (an expanded tensor)");
  EXPECT_TRUE(torch::equal(e->named_parameters()["a.weight"], e0));
}

TEST(Checkpoint, LoadFillsCudaParameters_CUDA) {
  // Targets on another device go through a full CPU tensor and copy_.
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(16);
  const diffq::QuantizedState s = two_weights({8, 40}, 5, /*gaussian=*/true);
  auto m = two_weight_model(torch::zeros({8, 40}, torch::kCUDA), torch::zeros({8, 40}));
  diffq::load_quantized(m, encode(s));
  for (const auto& q : s.quantized) {
    const auto expected =
        diffq::dequantize_levels(q.levels, q.bits, 8, q.min, q.max, q.dtype).view({8, 40});
    EXPECT_TRUE(torch::equal(m->named_parameters()[q.name].cpu(), expected)) << q.name;
  }
  EXPECT_TRUE(m->named_parameters()["a.weight"].is_cuda());
}

// ---- Corrupt input -----------------------------------------------------------------------------

/// The model matching `small_state()`.
std::shared_ptr<torch::nn::Module> small_model() {
  auto root = std::make_shared<torch::nn::Module>();
  auto a = std::make_shared<torch::nn::Module>();
  a->register_parameter("weight", torch::zeros({64, 16}));
  a->register_parameter("bias", torch::zeros({5}));
  auto b = std::make_shared<torch::nn::Module>();
  b->register_parameter("weight", torch::zeros({2, 3, 3}, at::kDouble));
  b->register_parameter("bias", torch::zeros({40}));
  auto bn = std::make_shared<torch::nn::Module>();
  bn->register_buffer("num_batches_tracked", torch::tensor(int64_t{0}));
  auto c = std::make_shared<torch::nn::Module>();
  c->register_parameter("weight", a->named_parameters()["weight"]);
  root->register_module("a", a);
  root->register_module("b", b);
  root->register_module("bn", bn);
  root->register_module("c", c);
  return root;
}

TEST(Checkpoint, SmallModelLoads) {
  const Bytes bytes = encode(small_state(), diffq::DiffQOptions());
  auto m = small_model();
  diffq::load_quantized(m, bytes);
  EXPECT_EQ(m->named_buffers()["bn.num_batches_tracked"].item<int64_t>(), 3);
}

TEST(Checkpoint, TruncationAtEveryOffsetThrows) {
  const Bytes bytes = encode(small_state(), diffq::DiffQOptions());
  ASSERT_LT(bytes.size(), 2000u);
  auto m = small_model();
  for (size_t n = 0; n < bytes.size(); ++n) {
    const Bytes cut(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(n));
    const std::string what = error_of([&] { diffq::load_quantized(m, cut); });
    ASSERT_NE(what.find("diffq::load_quantized: <bytes>: "), std::string::npos)
        << n << ": " << what;
    ASSERT_NE(what.find(" at byte "), std::string::npos) << n << ": " << what;
    const std::string info = error_of([&] { diffq::read_checkpoint_info(cut); });
    ASSERT_NE(info.find("diffq::read_checkpoint_info: <bytes>: "), std::string::npos) << info;
  }
  const size_t cut_at = static_cast<size_t>(rd(bytes, 12, 4)) + 10;  // past the header
  EXPECT_ERROR_HAS(diffq::read_checkpoint_info(Bytes(bytes.begin(), bytes.begin() + cut_at)),
                   "header at byte 16: the header declares " + std::to_string(bytes.size()) +
                       " bytes but the file has " + std::to_string(cut_at) + " (truncated)");
  EXPECT_ERROR_HAS(diffq::read_checkpoint_info(Bytes(bytes.begin(), bytes.begin() + 5)),
                   "header at byte 0: truncated magic: needs 8 bytes, only 5 remain");
}

TEST(Checkpoint, EveryBitFlipThrows) {
  const Bytes bytes = encode(small_state(), diffq::DiffQOptions());
  auto m = small_model();
  const auto before = m->named_parameters()["a.weight"].clone();
  for (size_t i = 0; i < bytes.size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      Bytes bad = bytes;
      bad[i] = static_cast<uint8_t>(bad[i] ^ (1 << bit));
      const std::string what = error_of([&] { diffq::load_quantized(m, bad); });
      ASSERT_NE(what.find("diffq::load_quantized: <bytes>: "), std::string::npos)
          << "byte " << i << " bit " << bit << ": " << what;
      ASSERT_NE(what.find(" at byte "), std::string::npos) << what;
    }
    Bytes bad = bytes;
    bad[i] ^= 0xFF;
    ASSERT_NE(error_of([&] { diffq::load_quantized(m, bad); }), "<no error>") << i;
  }
  EXPECT_TRUE(torch::equal(m->named_parameters()["a.weight"], before));
}

TEST(Checkpoint, EveryByteCorruptionBehindTheCrcsIsHandled) {
  // With the CRCs out of the way, every corrupted byte must still give a clean c10::Error or a
  // well-formed result: the checks behind the CRCs (sizes, counts, widths, levels, deflate
  // streams) hold on their own.
  const Bytes bytes = encode(small_state(), diffq::DiffQOptions());
  diffq::detail::ParseSettings no_crc;
  no_crc.verify_crc = false;
  int errors = 0, decoded = 0;
  std::mt19937 rng(12);
  for (size_t i = 0; i < bytes.size(); ++i) {
    for (int variant = 0; variant < 4; ++variant) {
      Bytes bad = bytes;
      bad[i] = variant == 0   ? static_cast<uint8_t>(bad[i] ^ 0xFF)
               : variant == 1 ? uint8_t{0}
               : variant == 2 ? static_cast<uint8_t>(bad[i] ^ 1)
                              : static_cast<uint8_t>(rng());
      try {
        auto pc = diffq::detail::parse_checkpoint(bad.data(), bad.size(), "t", "<bytes>", no_crc);
        diffq::detail::decode_all_weights(pc);
        diffq::detail::decode_all_levels(pc);
        for (size_t r = 0; r < pc.records.size(); ++r) {
          const auto k = pc.records[r].kind;
          if (k == diffq::detail::kKindFloat || k == diffq::detail::kKindBuffer ||
              k == diffq::detail::kKindLogit) {
            diffq::detail::decode_float_tensor(pc, r);
          }
        }
        ++decoded;
      } catch (const c10::Error& e) {
        ++errors;
        ASSERT_NE(std::string(e.what()).find("t: <bytes>: "), std::string::npos) << e.what();
      }
    }
  }
  EXPECT_GT(errors, 0);
  EXPECT_GT(decoded, 0);  // e.g. changed payload bits that still decode
}

TEST(Checkpoint, RejectsBadMagicVersionFlagsCountsAndCrcs) {
  const Bytes good = encode(small_state());
  auto info_error = [](const Bytes& b) {
    return error_of([&] { diffq::read_checkpoint_info(b); });
  };
  Bytes b = good;
  b[0] = 'X';
  EXPECT_NE(info_error(b).find("header at byte 0: not a diffq checkpoint (bad magic"),
            std::string::npos);
  b = good;
  wr(b, 8, 3, 4);
  fix_crcs(b);
  EXPECT_NE(
      info_error(b).find("header at byte 8: unsupported format version 3 (this reader supports "
                         "versions 1 and 2)"),
      std::string::npos)
      << info_error(b);
  b = good;
  wr(b, 28, 6, 4);
  fix_crcs(b);
  EXPECT_NE(info_error(b).find("header at byte 28: unknown flags 6"), std::string::npos);
  b = good;
  wr(b, 36, rd(b, 36, 4) + 1, 4);  // one more quantized record than present
  fix_crcs(b);
  EXPECT_NE(info_error(b).find("record counts by kind add up to 8, not 7"), std::string::npos)
      << info_error(b);
  b = good;
  wr(b, 36, rd(b, 36, 4) + 1, 4);
  wr(b, 40, rd(b, 40, 4) - 1, 4);
  fix_crcs(b);
  EXPECT_NE(info_error(b).find("the header declares 3 quantized records, the file holds 2"),
            std::string::npos)
      << info_error(b);
  b = good;
  wr(b, 24, 100000, 4);
  wr(b, 36, rd(b, 36, 4) + 100000 - 7, 4);
  fix_crcs(b);
  EXPECT_NE(info_error(b).find("100000 records cannot fit"), std::string::npos) << info_error(b);
  b = good;
  b[20] ^= 1;
  EXPECT_NE(info_error(b).find("header at byte " + std::to_string(rd(b, 12, 4) - 4) +
                               ": header CRC mismatch"),
            std::string::npos)
      << info_error(b);
  b = good;
  b.push_back(0);
  EXPECT_NE(info_error(b).find("(trailing bytes)"), std::string::npos);
  const auto rec = record_offsets(good);
  b = good;
  b[rec[2] + 20] ^= 1;
  const size_t crc_at = rec[2] + static_cast<size_t>(rd(good, rec[2], 8)) - 4;
  EXPECT_NE(
      info_error(b).find("record 2 at byte " + std::to_string(crc_at) + ": record CRC mismatch"),
      std::string::npos)
      << info_error(b);
  b = good;
  wr(b, rec[0], 1u << 30, 8);
  EXPECT_NE(info_error(b).find("record 0 at byte " + std::to_string(rec[0]) + ": record size " +
                               std::to_string(1u << 30) + " outside"),
            std::string::npos)
      << info_error(b);
}

TEST(Checkpoint, RejectsInconsistentRecordsBehindValidCrcs) {
  const Bytes good = encode(small_state());
  const auto rec = record_offsets(good);
  auto info_error = [](Bytes b) {
    fix_crcs(b);
    return error_of([&] { diffq::read_checkpoint_info(b); });
  };
  const size_t r0 = rec[0];  // quantized 'a.weight' [64, 16], group size 8, 4 bits
  Bytes b = good;
  b[r0 + 8] = 9;  // kind
  EXPECT_NE(
      info_error(b).find("record 0 at byte " + std::to_string(r0 + 8) + ": unknown record kind 9"),
      std::string::npos)
      << info_error(b);
  b = good;
  b[r0 + 9] = 5;  // dtype int64 for a quantized tensor
  EXPECT_NE(info_error(b).find("quantized tensors are float32 or float64, got dtype int64"),
            std::string::npos);
  b = good;
  wr(b, r0 + 8 + 8 + 8, static_cast<uint64_t>(-3), 8);  // first dim
  EXPECT_NE(info_error(b).find("record 0 ('a.weight') at byte " + std::to_string(r0 + 24) +
                               ": negative dim -3"),
            std::string::npos)
      << info_error(b);
  b = good;
  wr(b, r0 + 24, uint64_t{1} << 40, 8);
  EXPECT_NE(info_error(b).find("shape declares more elements than the file can hold"),
            std::string::npos);
  // After a zero dim the element count is 0, but the non-zero dims stay bounded (the strides of
  // the empty tensor would overflow).
  b = good;
  wr(b, r0 + 24, 0, 8);
  wr(b, r0 + 32, (uint64_t{1} << 62) + 1, 8);
  EXPECT_NE(info_error(b).find("record 0 ('a.weight') at byte " + std::to_string(r0 + 32) +
                               ": the non-zero dims of the shape multiply to more than 2^62"),
            std::string::npos)
      << info_error(b);
  const size_t qh = r0 + 8 + 8 + 8 + 16;  // group size, min, max, bits encoding
  b = good;
  wr(b, qh, static_cast<uint64_t>(-1), 8);
  EXPECT_NE(info_error(b).find("group size -1 < 0"), std::string::npos);
  b = good;
  {
    double nan = std::nan("");
    uint64_t u;
    std::memcpy(&u, &nan, 8);
    wr(b, qh + 8, u, 8);
  }
  EXPECT_NE(info_error(b).find("min and max must be finite with min <= max, got min=nan"),
            std::string::npos)
      << info_error(b);
  // Finite doubles, but max − min overflows the tensor's dtype (float32 here), or a value lies
  // beyond float32's range.
  auto put_f64 = [](Bytes& bytes, size_t at, double v) {
    uint64_t u;
    std::memcpy(&u, &v, 8);
    wr(bytes, at, u, 8);
  };
  b = good;
  put_f64(b, qh + 8, -1e300);
  put_f64(b, qh + 16, 1e300);
  EXPECT_NE(info_error(b).find("record 0 ('a.weight') at byte " + std::to_string(qh + 8) +
                               ": max - min must be finite in float32, got min=-1e+300 "
                               "max=1e+300"),
            std::string::npos)
      << info_error(b);
  b = good;
  put_f64(b, qh + 8, 1e300);
  put_f64(b, qh + 16, 1e300);
  EXPECT_NE(info_error(b).find("max - min must be finite in float32, got min=1e+300"),
            std::string::npos)
      << info_error(b);
  b = good;  // record 1 is float64: its max − min must be finite in double
  put_f64(b, rec[1] + 8 + 8 + 8 + 8 * 3 + 8, -1e308);
  put_f64(b, rec[1] + 8 + 8 + 8 + 8 * 3 + 16, 1e308);
  EXPECT_NE(info_error(b).find("max - min must be finite in float64, got min=-1e+308"),
            std::string::npos)
      << info_error(b);
  b = good;
  b[qh + 24] = 7;
  EXPECT_NE(info_error(b).find("unknown bit widths encoding 7"), std::string::npos);
  // Record 1: 'b.weight' [2, 3, 3] with 4 groups of widths 3 9 1 15: raw nibbles 0x93 0xF1.
  const size_t qh1 = rec[1] + 8 + 8 + 8 + 24;
  b = good;
  ASSERT_EQ(b[qh1 + 24], 0);
  ASSERT_EQ(b[qh1 + 32], 0x93);
  b[qh1 + 32] = 0x90;
  EXPECT_NE(info_error(b).find("record 1 ('b.weight') at byte " + std::to_string(qh1 + 32) +
                               ": bit width of group 0 is 0 (must be in [1, 15])"),
            std::string::npos)
      << info_error(b);
  b = good;
  wr(b, qh1 + 28, 3, 4);
  EXPECT_NE(info_error(b).find("bit widths of 4 groups take 2 bytes, got 3"), std::string::npos)
      << info_error(b);
  // Record 0: 'a.weight', 1024 4-bit Gaussian levels in one Huffman-coded chunk.
  const size_t chunk = qh + 32 + static_cast<size_t>(rd(good, qh + 28, 4));
  ASSERT_EQ(good[chunk], 1);  // zlib-bytes
  b = good;
  b[chunk] = 2;
  EXPECT_NE(info_error(b).find("chunk of 1024 4-bit levels in elements [0, 1024): zlib-planes "
                               "encoding needs bits >= 9"),
            std::string::npos)
      << info_error(b);
  b = good;
  b[chunk] = 0;
  EXPECT_NE(info_error(b).find("bit-packed size must be 512 bytes"), std::string::npos)
      << info_error(b);
  b = good;
  b[chunk] = 5;
  EXPECT_NE(info_error(b).find("unknown encoding 5"), std::string::npos);
  b = good;
  b[chunk + 1] = 1;
  EXPECT_NE(info_error(b).find("reserved bytes are not zero"), std::string::npos);
  b = good;
  wr(b, chunk + 4, 5, 4);
  EXPECT_NE(info_error(b).find("5 bytes cannot hold them"), std::string::npos);
  b = good;
  wr(b, chunk + 4, rd(b, chunk + 4, 4) + 1000, 4);
  EXPECT_NE(info_error(b).find("truncated chunk payload"), std::string::npos) << info_error(b);
  // Levels beyond 2^b - 1 in a Huffman chunk are refused at decoding.
  diffq::QuantizedState s;
  s.quantized.push_back(
      qt("w", {64}, 8, torch::full({8}, 7, at::kByte), torch::arange(64).remainder(100)));
  Bytes z = encode(s);
  {
    // Re-code the levels as 8-bit values with one level of 200 > 127: rebuild the chunk payload
    // with deflate_huffman4 and patch the sizes.
    Bytes lv(64);
    for (size_t i = 0; i < 64; ++i) lv[i] = static_cast<uint8_t>(i % 100);
    lv[10] = 200;
    const Bytes quad = diffq::detail::deflate_huffman4(lv.data(), lv.size());
    const auto r = record_offsets(z)[0];
    const size_t ch = r + 8 + 8 + 1 + 8 + 32 + 4;  // 8 groups of 7 bits: 4 raw nibble bytes
    Bytes head(z.begin(), z.begin() + static_cast<std::ptrdiff_t>(ch));
    head.push_back(1);
    le(head, 0, 3);
    le(head, quad.size(), 4);
    head.insert(head.end(), quad.begin(), quad.end());
    le(head, 0, 4);  // record CRC, fixed below
    wr(head, r, head.size() - r, 8);
    wr(head, 16, head.size(), 8);
    z = head;
    fix_crcs(z);
  }
  EXPECT_NO_THROW(diffq::read_checkpoint_info(z));
  EXPECT_ERROR_HAS(diffq::read_quantized_state(z), "level 200 exceeds 127");
}

TEST(Checkpoint, RejectsFloatAliasHeaderAndLayoutInconsistencies) {
  const Bytes good = encode(small_state());
  const auto rec = record_offsets(good);
  ASSERT_EQ(rec.size(), 7u);
  auto fixed_error = [](Bytes b) {
    fix_crcs(b);
    return error_of([&] { diffq::read_quantized_state(b); });
  };
  auto raw_error = [](const Bytes& b) { return error_of([&] { diffq::read_quantized_state(b); }); };
#define EXPECT_HAS(what, sub) \
  EXPECT_NE((what).find(sub), std::string::npos) << "expected '" << (sub) << "' in: " << (what)
  // Record 2: float 'a.bias' [5], float32, raw; FloatFixed at +30.
  const size_t r2 = rec[2], f2 = r2 + 8 + 8 + 6 + 8;
  Bytes b = good;
  b[f2] = 3;
  EXPECT_HAS(fixed_error(b),
             "record 2 ('a.bias') at byte " + std::to_string(f2) + ": unknown float encoding 3");
  b = good;
  b[f2 + 1] = 1;
  EXPECT_HAS(fixed_error(b), "reserved bytes are not zero");
  b = good;
  wr(b, f2 + 8, 16, 8);
  EXPECT_HAS(fixed_error(b), "5 elements of float32 take 20 bytes, got 16");
  b = good;
  b[r2 + 9] = 77;
  EXPECT_HAS(fixed_error(b), "unknown dtype 77");
  // Record 3: 'b.bias' [40] float32 stored as deflated float16.
  const size_t f3 = rec[3] + 8 + 8 + 6 + 8;
  ASSERT_EQ(good[f3], 1);
  b = good;
  wr(b, f3 + 8, 0, 8);
  EXPECT_HAS(fixed_error(b), "compressed payload of 0 bytes cannot hold 80 bytes");
  // Record 4: int64 buffer.
  b = good;
  b[rec[4] + 10] = 3;
  EXPECT_HAS(fixed_error(b), "a int64 tensor cannot be stored as float16");
  // Quantized and alias records carry no stored dtype / no dtype.
  b = good;
  b[rec[0] + 10] = 1;
  EXPECT_HAS(fixed_error(b), "stored dtype must be 0");
  b = good;
  b[rec[6] + 9] = 1;
  EXPECT_HAS(fixed_error(b), "alias records have no dtype and no shape");
  // Names: a duplicate, an alias to nothing.
  b = good;
  b[rec[1] + 16] = 'a';  // 'b.weight' -> 'a.weight'
  EXPECT_HAS(fixed_error(b), "record 1 ('a.weight') at byte " + std::to_string(rec[1]) +
                                 ": duplicate tensor name 'a.weight'");
  b = good;
  b[rec[6] + 8 + 8 + 8 + 2] = 'x';  // target 'a.weight' -> 'x.weight'
  EXPECT_HAS(fixed_error(b), "record 6 ('c.weight') at byte " + std::to_string(rec[6]) +
                                 ": tied name refers to 'x.weight', which is not a stored tensor");
  // Header fields.
  b = good;
  wr(b, 32, 100, 4);
  EXPECT_HAS(fixed_error(b),
             "header at byte 32: segment size 100 is not a power of two in [64, "
             "16777216]");
  b = good;
  wr(b, 12, 10, 4);
  EXPECT_HAS(raw_error(b), "header at byte 12: header size 10 outside [60, 1048576]");
  b = good;
  wr(b, 12, 1 << 20, 4);
  EXPECT_HAS(raw_error(b), "truncated header: declares 1048576 bytes, the file has " +
                               std::to_string(good.size()));
  // Version 1's options block (the reader still reads version 1; diffq_fuzz::as_version1 builds
  // it field by field from the specification).
  const diffq::DiffQOptions default_options;
  const Bytes with_options = diffq_fuzz::as_version1(good, &default_options);
  b = with_options;
  b[56 + 48] = 2;  // float16 flag
  EXPECT_HAS(fixed_error(b),
             "header at byte 104: invalid option flags (float16, noise, param, detect_bound must "
             "each be 0 or 1, got 2, 0, 0, 1)");
  // The options block is checked as a quantizer checks its options. Options it would refuse
  // (written before the writer checked them) are informational: they are set aside with a
  // warning, and the tensors still load.
  const auto expected_state = diffq::read_quantized_state(good);
  auto info_warning = [&](Bytes bytes) {
    fix_crcs(bytes);
    testing::internal::CaptureStderr();
    const auto info = diffq::read_checkpoint_info(bytes);
    const std::string err = testing::internal::GetCapturedStderr();
    EXPECT_FALSE(info.options.has_value());
    expect_same_state(diffq::read_quantized_state(bytes), expected_state);
    return err;
  };
  b = with_options;
  wr(b, 56, static_cast<uint64_t>(-5), 8);  // group_size
  EXPECT_HAS(info_warning(b),
             "header at byte 56: options block: group_size must be >= 0, got -5; the options are "
             "not reported");
  b = with_options;
  {
    const double nan = std::nan("");
    uint64_t u;
    std::memcpy(&u, &nan, 8);
    wr(b, 64, u, 8);  // min_bits
  }
  EXPECT_HAS(info_warning(b), "header at byte 56: options block: min_bits must be >= 1, got nan");
  EXPECT_HAS(error_of([] { encode(small_state(), diffq::DiffQOptions().max_bits(16)); }),
             "diffq::save_quantized: options: max_bits must be <= 15, got 16");
  b = with_options;
  {
    const size_t hb = static_cast<size_t>(rd(b, 12, 4));
    b.insert(b.begin() + static_cast<std::ptrdiff_t>(hb - 4), 0);
    wr(b, 12, hb + 1, 4);
    wr(b, 16, b.size(), 8);
  }
  EXPECT_HAS(fixed_error(b), "1 unexpected bytes at the end of the header");
  b = good;
  {
    const size_t rb = static_cast<size_t>(rd(b, r2, 8));
    b.insert(b.begin() + static_cast<std::ptrdiff_t>(r2 + rb - 4), 0);
    wr(b, r2, rb + 1, 8);
    wr(b, 16, b.size(), 8);
  }
  EXPECT_HAS(fixed_error(b), "1 unexpected bytes at the end of the record");
  // A bool buffer holding 2.
  diffq::QuantizedState sb;
  sb.floats.push_back({"m", torch::tensor({true, false, true}), false, true});
  Bytes bb = encode(sb);
  const size_t payload = record_offsets(bb)[0] + 8 + 8 + 1 + 8 + 16;
  ASSERT_EQ(bb[payload + 1], 0);
  bb[payload + 1] = 2;
  EXPECT_HAS(fixed_error(bb), "bool element 1 has value 2 (must be 0 or 1)");
  // An odd number of groups: the padding nibble must be zero.
  diffq::QuantizedState sp;
  sp.quantized.push_back(qt("w", {24}, 8, torch::full({3}, 2), torch::zeros({24})));
  Bytes bp = encode(sp);
  const size_t nib = record_offsets(bp)[0] + 8 + 8 + 1 + 8 + 32;
  ASSERT_EQ(bp[nib + 1], 0x02);
  bp[nib + 1] = 0x12;
  EXPECT_HAS(fixed_error(bp), "padding nibble of the bit widths is not zero");
  // zlib-planes: the quad size must add up with the low bits to the payload.
  torch::manual_seed(14);
  diffq::QuantizedState sz;
  auto b12 = torch::full({1}, 12, at::kByte);
  sz.quantized.push_back(qt("p", {16384}, 0, b12, random_levels(b12, 16384, 0, true)));
  Bytes bz = encode(sz);
  const size_t chunk = record_offsets(bz)[0] + 8 + 8 + 1 + 8 + 32 + 1;
  ASSERT_EQ(bz[chunk], 2);
  const uint64_t quad = rd(bz, chunk + 8, 4);
  wr(bz, chunk + 8, quad + 1, 4);
  EXPECT_HAS(fixed_error(bz), "high-byte plane of " + std::to_string(quad + 1) +
                                  " bytes does not add up to the " +
                                  std::to_string(rd(bz, chunk + 4, 4)) + "-byte payload");
  // Writer and stream errors.
  diffq::detail::WriterInput in;
  in.segment_elems = 100;
  EXPECT_HAS(
      error_of([&] { diffq::detail::encode_checkpoint(in, diffq::detail::serial_for(), "w"); }),
      "w: segment_elems must be a power of two in [64, 16777216], got 100");
  std::ostringstream bad_out;
  bad_out.setstate(std::ios::badbit);
  EXPECT_HAS(error_of([&] { diffq::save_quantized_state(small_state(), bad_out); }),
             "diffq::save_quantized: <stream>: writing failed");
  std::istringstream bad_in("x");
  bad_in.setstate(std::ios::badbit);
  EXPECT_HAS(error_of([&] { diffq::read_checkpoint_info(bad_in); }),
             "diffq::read_checkpoint_info: <stream>: the stream is not readable");
#undef EXPECT_HAS
}

TEST(Checkpoint, RejectsNamesDimsAndTrailingRecordsBehindValidCrcs) {
  const Bytes good = encode(small_state());
  const auto rec = record_offsets(good);
  auto fixed_error = [](Bytes b) {
    fix_crcs(b);
    return error_of([&] { diffq::read_quantized_state(b); });
  };
#define EXPECT_HAS(what, sub) \
  EXPECT_NE((what).find(sub), std::string::npos) << "expected '" << (sub) << "' in: " << (what)
  Bytes b = good;
  wr(b, rec[2] + 12, 0, 2);  // name_bytes
  EXPECT_HAS(fixed_error(b),
             "record 2 at byte " + std::to_string(rec[2] + 12) + ": empty tensor name");
  b = good;
  b[rec[2] + 17] = 0;  // a NUL inside 'a.bias'
  EXPECT_HAS(fixed_error(b), "name contains a NUL byte");
  b = good;
  b[rec[2] + 11] = 33;  // ndim
  EXPECT_HAS(fixed_error(b), "33 dims, at most 32");
  b[rec[2] + 17] = 0x1b;  // an escape character in the name is printed escaped
  b[rec[2] + 19] = '\n';
  EXPECT_HAS(fixed_error(b), "record 2 ('a\\x1bb\\x0aas') at byte " + std::to_string(rec[2] + 11) +
                                 ": 33 dims, at most 32");
  b = good;
  b[rec[2] + 10] = 99;
  EXPECT_HAS(fixed_error(b), "unknown stored dtype 99");
  b = good;
  wr(b, rec[6] + 24, 0, 2);  // alias target_bytes
  EXPECT_HAS(fixed_error(b), "empty alias target");
  b = good;
  b[rec[6] + 27] = 0;
  EXPECT_HAS(fixed_error(b), "alias target contains a NUL byte");
  b = good;
  wr(b, rec[0] + 24, 400, 8);  // 'a.weight' [400, 16]: more levels than its record can hold
  EXPECT_HAS(fixed_error(b), "6400 levels cannot fit in a record of " +
                                 std::to_string(rd(good, rec[0], 8)) + " bytes");
  // 'b.weight': 18 levels, groups of 5 with widths 3 9 1 15: bit-packed chunks of widths 1
  // (1 byte), 3 (2 bytes), 9 (6 bytes), 15 (6 bytes).
  const size_t c0 = rec[1] + 8 + 8 + 8 + 24 + 32 + 2;
  ASSERT_EQ(good[c0 + 9 + 10], 0);
  ASSERT_EQ(rd(good, c0 + 9 + 10 + 4, 4), 6u);
  b = good;
  b[c0 + 19] = 1;
  EXPECT_HAS(fixed_error(b),
             "chunk of 5 9-bit levels in elements [0, 18): zlib-bytes encoding "
             "needs bits <= 8");
  b = good;
  b[rec[1] + 8 + 8 + 8 + 24 + 24] = 1;  // the raw nibbles read as a deflate stream
  EXPECT_HAS(fixed_error(b), "record 1 ('b.weight') at byte " +
                                 std::to_string(rec[1] + 8 + 8 + 8 + 24 + 32) + ": bit widths: ");
  // 'b.bias': deflated float16 payload made invalid (block type 3).
  const size_t f3 = rec[3] + 8 + 8 + 6 + 8;
  b = good;
  b[f3 + 16] = 0xFF;
  EXPECT_HAS(fixed_error(b), "record 3 ('b.bias') at byte " + std::to_string(f3 + 16) +
                                 ": float payload: corrupt deflate stream");
  // One record fewer declared than present.
  b = good;
  wr(b, 24, 6, 4);
  wr(b, 48, 0, 4);  // no alias
  EXPECT_HAS(fixed_error(b), "header at byte " + std::to_string(rec[6]) +
                                 ": unexpected bytes after the last record");
  // Writer: names, dims, options.
  auto save_error = [](const diffq::QuantizedState& s,
                       const c10::optional<diffq::DiffQOptions>& o = c10::nullopt) {
    return error_of([&] { encode(s, o); });
  };
  diffq::QuantizedState s;
  s.floats.push_back({std::string("a\0b", 3), torch::zeros({1}), false, false});
  EXPECT_HAS(save_error(s), "diffq::save_quantized: tensor name contains a NUL byte at position 1");
  s.floats[0] = {"x", torch::zeros(std::vector<int64_t>(33, 1)), false, false};
  EXPECT_HAS(save_error(s), "tensor 'x' has 33 dims, at most 32 supported");
  s.floats.clear();
  s.quantized.push_back(qt("q", {-1}, 0, torch::zeros({0}), torch::zeros({0})));
  EXPECT_HAS(save_error(s), "tensor 'q' has a negative dim -1");
  s.quantized.clear();
  EXPECT_HAS(save_error(s, diffq::DiffQOptions().suffix(std::string(70000, 's'))),
             "diffq::save_quantized: metadata 'option.suffix': a metadata value must have at most "
             "65535 bytes, got 70000");
  EXPECT_HAS(save_error(s, diffq::DiffQOptions().exclude({std::string(70000, 'e')})),
             "diffq::save_quantized: metadata 'option.exclude.0': a metadata value must have at "
             "most 65535 bytes, got 70000");
  EXPECT_HAS(save_error(s, diffq::DiffQOptions().exclude(
                               std::vector<std::string>(20, std::string(60000, 'e')))),
             "diffq::save_quantized: metadata too large for the header (1048576 bytes at most)");
  EXPECT_HAS(error_of([&] { diffq::load_quantized(std::shared_ptr<NetImpl>(), good); }),
             "diffq::load_quantized: null model");
#undef EXPECT_HAS
}

TEST(Checkpoint, WriterRejectsInvalidStates) {
  auto bits = torch::full({2}, 4, at::kByte);
  auto lv = torch::arange(16).remainder(16);
  auto base = [&] {
    diffq::QuantizedState s;
    s.quantized.push_back(qt("w", {16}, 8, bits, lv));
    return s;
  };
  auto save_error = [](const diffq::QuantizedState& s) { return error_of([&] { encode(s); }); };
  auto s = base();
  s.floats.push_back({"w", torch::zeros({1}), false, false});
  EXPECT_NE(save_error(s).find("diffq::save_quantized: duplicate tensor name 'w'"),
            std::string::npos);
  s = base();
  s.quantized[0].bits[1] = 0;
  EXPECT_NE(save_error(s).find("tensor 'w': bit width of group 1 must be in [1, 15], got 0"),
            std::string::npos);
  s = base();
  s.quantized[0].bits[0] = 16;
  EXPECT_NE(save_error(s).find("got 16"), std::string::npos);
  s = base();
  s.quantized[0].levels[9] = 16;
  EXPECT_NE(save_error(s).find("tensor 'w': level 16 of element 9 is outside [0, 15] (its group 1 "
                               "has 4 bits)"),
            std::string::npos)
      << save_error(s);
  s = base();
  s.quantized[0].levels[3] = -1;
  EXPECT_NE(save_error(s).find("level -1 of element 3"), std::string::npos);
  s = base();
  s.quantized[0].min = std::nan("");
  EXPECT_NE(save_error(s).find("min and max must be finite with min <= max"), std::string::npos);
  s = base();
  s.quantized[0].min = 2;
  EXPECT_NE(save_error(s).find("got min=2 max=1"), std::string::npos);
  s = base();
  s.quantized[0].min = -3e38;
  s.quantized[0].max = 3e38;
  EXPECT_NE(save_error(s).find("tensor 'w': max - min must be finite in float32, got min=-3e+38 "
                               "max=3e+38"),
            std::string::npos)
      << save_error(s);
  s = base();
  s.quantized[0].levels = lv.to(at::kInt);
  EXPECT_NE(save_error(s).find("expected levels as int16 with 16 elements, got Int"),
            std::string::npos)
      << save_error(s);
  s = base();
  s.quantized[0].bits = torch::full({3}, 4, at::kByte);
  EXPECT_NE(save_error(s).find("expected bits as uint8 [2], got Byte [3]"), std::string::npos)
      << save_error(s);
  s = base();
  s.quantized[0].group_size = -2;
  EXPECT_NE(save_error(s).find("group_size must be >= 0, got -2"), std::string::npos);
  s = base();
  s.quantized[0].dtype = at::kHalf;
  EXPECT_NE(save_error(s).find("quantized tensors must be float32 or float64, got float16"),
            std::string::npos);
  s = base();
  s.tied.push_back({"v", "nope"});
  EXPECT_NE(save_error(s).find("tied name 'v' refers to 'nope', which is not a stored tensor"),
            std::string::npos);
  s = base();
  s.floats.push_back({"i", torch::zeros({2}, at::kLong), true, false});
  EXPECT_NE(save_error(s).find("tensor 'i': float16 storage needs a floating point tensor"),
            std::string::npos);
  s = base();
  s.floats.push_back({"", torch::zeros({2}), false, false});
  EXPECT_NE(save_error(s).find("tensor name must have 1 to 65535 bytes, got 0"), std::string::npos);
  s = base();
  s.floats.push_back({"c", torch::zeros({2}, at::kComplexFloat), false, false});
  EXPECT_NE(save_error(s).find("tensor 'c': unsupported dtype"), std::string::npos);
  s = base();
  s.floats.push_back({"u", at::Tensor(), false, false});
  EXPECT_NE(save_error(s).find("tensor 'u' is undefined"), std::string::npos);
}

/// The bytes of the file at `path` (empty if it cannot be read).
Bytes read_file_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return Bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

TEST(Checkpoint, AtomicWriteKeepsThePreviousFileOnFailure) {
  const fs::path dir = fresh_temp_dir("diffq_ckpt_atomic");
  const std::string path = (dir / "m.ckpt").string();
  const auto s = small_state();
  const size_t n = diffq::save_quantized_state(s, path);
  const Bytes before = read_file_bytes(path);
  ASSERT_EQ(before.size(), n);
  // Encoding fails: nothing written.
  auto bad = s;
  bad.quantized[0].bits = bad.quantized[0].bits.clone();  // the copy shares its tensors
  bad.quantized[0].bits[0] = 0;
  EXPECT_ERROR_HAS(diffq::save_quantized_state(bad, path), "diffq::save_quantized");
  // The rename fails (the target is a non-empty directory): the temporary file is removed.
  const fs::path blocked = dir / "blocked.ckpt";
  fs::create_directories(blocked / "x");
  EXPECT_ERROR_HAS(diffq::save_quantized_state(s, blocked.string()),
                   "cannot rename the temporary file into place: Is a directory");
  // The folder does not exist: the temporary file cannot be created.
#ifdef _WIN32
  EXPECT_ERROR_HAS(diffq::save_quantized_state(s, (dir / "no" / "m.ckpt").string()),
                   "cannot create the temporary file");
#else
  try {
    diffq::save_quantized_state(s, (dir / "no" / "m.ckpt").string());
    ADD_FAILURE() << "save_quantized_state did not throw for a missing folder";
  } catch (const c10::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("cannot create the temporary file '"), std::string::npos) << what;
    EXPECT_NE(what.find("': No such file or directory"), std::string::npos) << what;
  }
#endif
  EXPECT_EQ(read_file_bytes(path), before);
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"blocked.ckpt", "m.ckpt"})) << "no temporary left";
  // Overwriting works.
  // With options: the method and option entries (u16 key size, key, u16 value size, value).
  size_t entries = 2 + 6 + 2 + 5;  // method = diffq
  for (const auto& e : kDefaultDiffQOptionText)
    entries += 2 + 7 + e.first.size() + 2 + e.second.size();
  EXPECT_EQ(diffq::save_quantized_state(s, path, diffq::DiffQOptions()), n + entries);
  EXPECT_TRUE(diffq_test::RemoveTree(dir.string()));
}

#ifndef _WIN32
TEST(Checkpoint, AtomicWriteFollowsSymlinksKeepsPermissionsAndTakesLongNames) {
  const fs::path dir = fresh_temp_dir("diffq_ckpt_links");
  const auto s = small_state();
  const std::string real = (dir / "real.ckpt").string();
  const std::string link = (dir / "link.ckpt").string();
  diffq::save_quantized_state(s, real);
  ASSERT_EQ(::symlink("real.ckpt", link.c_str()), 0);
  ASSERT_EQ(::chmod(real.c_str(), 0600), 0);
  // Saving through the link replaces the file it points to; the link and the mode stay.
  const size_t n = diffq::save_quantized_state(s, link, diffq::DiffQOptions());
  struct stat lst;
  ASSERT_EQ(::lstat(link.c_str(), &lst), 0);
  EXPECT_TRUE(S_ISLNK(lst.st_mode));
  EXPECT_EQ(read_file_bytes(real).size(), n);
  struct stat st;
  ASSERT_EQ(::stat(real.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  // A file name of 250 bytes (the temporary file's name is cut to fit the 255-byte limit).
  const std::string long_path = (dir / (std::string(245, 'm') + ".ckpt")).string();
  const size_t long_bytes = diffq::save_quantized_state(s, long_path);
  EXPECT_EQ(read_file_bytes(long_path).size(), long_bytes);
  // A dangling link: the file it names is created, the link stays.
  const std::string dangling = (dir / "dangling.ckpt").string();
  ASSERT_EQ(::symlink("created.ckpt", dangling.c_str()), 0);
  const size_t created_bytes = diffq::save_quantized_state(s, dangling);
  ASSERT_EQ(::lstat(dangling.c_str(), &lst), 0);
  EXPECT_TRUE(S_ISLNK(lst.st_mode));
  EXPECT_EQ(read_file_bytes((dir / "created.ckpt").string()).size(), created_bytes);
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  EXPECT_EQ(names.size(), 5u) << "no temporary left";
  EXPECT_TRUE(diffq_test::RemoveTree(dir.string()));
}

// A write(2) that fails half way (here: the file size limit, EFBIG) is reported with the system's
// reason, the temporary file is removed and the previous checkpoint stays as it was.
TEST(Checkpoint, AtomicWriteReportsAFailedWriteAndKeepsThePreviousFile) {
  const fs::path dir = fresh_temp_dir("diffq_ckpt_write_fails");
  const std::string path = (dir / "m.ckpt").string();
  const auto s = small_state();
  const size_t n = diffq::save_quantized_state(s, path);
  ASSERT_GT(n, 200u);
  const Bytes before = read_file_bytes(path);
  ASSERT_EQ(before.size(), n);
  rlimit old{};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old), 0);
  ASSERT_TRUE(old.rlim_max == RLIM_INFINITY || old.rlim_max > 100);
  bool threw = false;
  std::string what;  // checked once the limit is lifted, so that a failure message can be written
  {
    // Restores the limit and the signal's disposition even if a check below fails.
    struct Restore {
      rlimit limit;
      void (*handler)(int);
      ~Restore() {
        setrlimit(RLIMIT_FSIZE, &limit);
        if (handler != SIG_ERR) std::signal(SIGXFSZ, handler);
      }
    } restore{old, std::signal(SIGXFSZ, SIG_IGN)};  // ignored: write(2) returns EFBIG instead
    ASSERT_NE(restore.handler, SIG_ERR);
    rlimit small = old;
    small.rlim_cur = 100;  // bytes: the first 100 are written, the next write(2) fails
    ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
    try {
      diffq::save_quantized_state(s, path);
    } catch (const c10::Error& e) {
      threw = true;
      what = e.what();
    }
  }
  EXPECT_TRUE(threw) << "save_quantized_state did not throw past the file size limit";
  EXPECT_NE(what.find("diffq::save_quantized: " + path + ": writing the temporary file '"),
            std::string::npos)
      << what;
  EXPECT_NE(what.find("' failed: File too large"), std::string::npos) << what;
  EXPECT_EQ(read_file_bytes(path), before);
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  EXPECT_EQ(names, (std::vector<std::string>{"m.ckpt"})) << "no temporary left";
  // With the limit back, the same save succeeds.
  EXPECT_EQ(diffq::save_quantized_state(s, path), n);
  EXPECT_TRUE(diffq_test::RemoveTree(dir.string()));
}
#endif

// ---- With the quantizer
// --------------------------------------------------------------------------

/// Three training steps: they move the weights, the bit widths and the running statistics.
void train_three_steps(diffq::DiffQuantizer<Net>& q, torch::optim::Optimizer& opt,
                       const at::Tensor& x) {
  for (int step = 0; step < 3; ++step) {
    opt.zero_grad();
    auto loss = q.forward(x).pow(2).mean() + 1e-3 * q.penalty();
    loss.backward();
    opt.step();
  }
}

TEST(Checkpoint, QuantizerEvalOutputEqualsLoadedModelOutput) {
  torch::manual_seed(13);
  Net model;
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-2));
  diffq::DiffQuantizer<Net> q(model, diffq::DiffQOptions().group_size(8).min_size_mb(0));
  q.setup_optimizer(opt, 1e-1);
  const auto x = torch::randn({5, 3, 8, 8});
  train_three_steps(q, opt, x);
  model->eval();
  const at::Tensor expected = q.forward(x);
  const fs::path dir = fresh_temp_dir("diffq_ckpt_quantizer");
  const std::string path = (dir / "net.ckpt").string();
  const size_t n = diffq::save_quantized(q, path);
  EXPECT_EQ(fs::file_size(path), n);
  Net plain;
  diffq::load_quantized(plain, path);
  plain->eval();
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::equal(plain->forward(x), expected));
  // Bytes and stream overloads give the same file; logits on request.
  Bytes bytes;
  EXPECT_EQ(diffq::save_quantized(q, bytes), n);
  std::ostringstream os;
  EXPECT_GT(diffq::save_quantized(q, os, /*include_logits=*/true), n);
  const auto info = diffq::read_checkpoint_info(bytes);
  ASSERT_TRUE(info.options.has_value());
  EXPECT_EQ(info.options->group_size(), 8);
  EXPECT_TRUE(diffq_test::RemoveTree(dir.string()));
}

// A model wrapped by a quantizer again (to resume training) gets the stored logits with the
// quantized weights, even while its quantizer holds substituted weights; a checkpoint without
// logits is refused with the names and the way out, and so is a load under quantize().
TEST(Checkpoint, RestoreQuantizedFillsTheWeightsAndLogitsOfAWrappedModel) {
  torch::manual_seed(14);
  Net model;
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-2));
  const auto options = diffq::DiffQOptions().group_size(8).min_size_mb(0);
  diffq::DiffQuantizer<Net> q(model, options);
  q.setup_optimizer(opt, 1e-1);
  const auto x = torch::randn({5, 3, 8, 8});
  train_three_steps(q, opt, x);
  model->eval();
  const at::Tensor expected = q.forward(x);  // true quantized weights
  std::map<std::string, at::Tensor> trained_logits;
  for (const auto& p : model->named_parameters()) {
    const auto& n = p.key();
    if (n.size() > 6 && n.compare(n.size() - 6, 6, "_diffq") == 0) {
      trained_logits[n] = p.value().detach().clone();
    }
  }
  ASSERT_EQ(trained_logits.size(), 6u);  // every parameter of conv, bn and fc (min_size_mb 0)
  Bytes with_logits, without_logits;
  diffq::save_quantized(q, with_logits, /*include_logits=*/true);
  diffq::save_quantized(q, without_logits);

  torch::manual_seed(15);
  Net again;
  torch::optim::Adam opt2(again->parameters(), torch::optim::AdamOptions(1e-2));
  diffq::DiffQuantizer<Net> q2(again, options);  // fresh logits: init_bits everywhere
  q2.setup_optimizer(opt2, 1e-1);
  for (const auto& kv : trained_logits) {
    ASSERT_FALSE(torch::equal(again->named_parameters()[kv.first], kv.second)) << kv.first;
  }
  // Warm the quantizer's caches (the penalty's pass over the logits, the eval weights), and
  // leave the eval weights in place: an eval forward with grad mode on keeps them until its graph
  // is released.
  const double fresh_penalty = q2.penalty().item<double>();
  std::map<std::string, at::Tensor> snapshot;  // the clean weights and the fresh logits
  for (const auto& p : again->named_parameters()) snapshot[p.key()] = p.value().detach().clone();
  again->eval();
  at::Tensor pending = q2.forward(x);
  EXPECT_ERROR_HAS(diffq::restore_quantized(q2, without_logits),
                   "missing from the checkpoint (6): 'bn.bias_diffq', 'bn.weight_diffq', "
                   "'conv.bias_diffq', 'conv.weight_diffq', 'fc.bias_diffq', 'fc.weight_diffq';");
  EXPECT_ERROR_HAS(diffq::restore_quantized(q2, without_logits),
                   "the model carries a quantizer's logits or step sizes ('*_diffq'), which the "
                   "checkpoint does not store: load into a model without a quantizer, or save "
                   "with include_logits = true;");
  {
    diffq::QuantizedGuard<diffq::DiffQuantizer<Net>> guard(q2);
    EXPECT_ERROR_HAS(
        diffq::restore_quantized(q2, with_logits),
        "diffq::DiffQuantizer::restore_clean_weights: the weights are quantized by "
        "quantize() or a QuantizedGuard; call unquantize() (or leave the guard) first");
  }
  for (const auto& p : again->named_parameters()) {  // clean weights and logits as they were
    EXPECT_TRUE(torch::equal(p.value(), snapshot[p.key()])) << p.key() << " was touched";
  }
  pending = q2.forward(x);  // the eval weights in place again
  diffq::restore_quantized(q2, with_logits);
  auto loaded = again->named_parameters();
  for (const auto& kv : trained_logits) {
    EXPECT_TRUE(torch::equal(loaded[kv.first], kv.second)) << kv.first;
  }
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::equal(again->forward(x), expected));  // the module's own forward
  // The new quantizer sees the loaded logits: its bit widths and penalty are the trained ones.
  for (const auto& name : q.quantized_names()) {
    EXPECT_TRUE(torch::equal(q2.bits(name), q.bits(name))) << name;
  }
  EXPECT_EQ(q2.penalty().item<double>(), q.penalty().item<double>());
  EXPECT_NE(q2.penalty().item<double>(), fresh_penalty);
  // A plain model ignores the stored logits.
  Net plain;
  diffq::load_quantized(plain, with_logits);
  plain->eval();
  EXPECT_TRUE(torch::equal(plain->forward(x), expected));
}

TEST(Checkpoint, QuantizerOnCudaExportsWhatItsEvalUses_CUDA) {
  // Trained on the device: the file holds the eval-mode weights bit for bit, and loads into fresh
  // models on the device and on the CPU.
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(13);
  Net model;
  model->to(torch::kCUDA);
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-2));
  diffq::DiffQuantizer<Net> q(model, diffq::DiffQOptions().group_size(8).min_size_mb(0));
  q.setup_optimizer(opt, 1e-1);
  const auto x = torch::randn({5, 3, 8, 8}, torch::kCUDA);
  train_three_steps(q, opt, x);
  model->eval();
  const at::Tensor expected = q.forward(x);
  std::map<std::string, at::Tensor> eval_weights;
  {
    diffq::QuantizedGuard<diffq::DiffQuantizer<Net>> guard(q);
    for (const auto& p : model->named_parameters())
      eval_weights[p.key()] = p.value().detach().clone();
  }
  Bytes bytes;
  diffq::save_quantized(q, bytes);
  Net on_cuda;
  on_cuda->to(torch::kCUDA);
  diffq::load_quantized(on_cuda, bytes);
  Net on_cpu;
  diffq::load_quantized(on_cpu, bytes);
  for (const auto& n : q.quantized_names()) {
    EXPECT_TRUE(torch::equal(on_cuda->named_parameters()[n], eval_weights[n])) << n;
    EXPECT_TRUE(torch::equal(on_cpu->named_parameters()[n], eval_weights[n].cpu())) << n;
  }
  EXPECT_TRUE(torch::equal(on_cuda->named_buffers()["bn.running_mean"],
                           model->named_buffers()["bn.running_mean"]));
  on_cuda->eval();
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::equal(on_cuda->forward(x), expected));
}

}  // namespace

namespace {

using diffq_test::BitEqual;

/// With `float16`, an eval forward and `quantize()` give the non-quantized parameters (here the
/// biases) their fp16-rounded values: the forward equals that of the model the checkpoint
/// reloads, bit for bit, and the clean fp32 values come back after it.
template <typename Quantizer, typename Options>
void CheckFloat16EvalEqualsReloaded(const Options& options) {
  torch::manual_seed(21);
  diffq_test::MLP model;
  Quantizer q(model, options);
  ASSERT_EQ(q.quantized_names(), (std::vector<std::string>{"fc1.weight", "fc2.weight"}));
  const auto bias1 = model->fc1->bias.detach().clone();
  const auto bias2 = model->fc2->bias.detach().clone();
  const auto rounded1 = bias1.to(torch::kHalf).to(torch::kFloat);  // the formula, by hand
  ASSERT_FALSE(torch::equal(rounded1, bias1)) << "the rounding must change the biases";
  Bytes bytes;
  diffq::save_quantized(q, bytes);
  diffq_test::MLP fresh;
  diffq::load_quantized(fresh, bytes);
  EXPECT_TRUE(BitEqual(fresh->fc1->bias, rounded1));
  const auto x = torch::randn({4, 10});
  model->eval();
  {
    torch::NoGradGuard no_grad;
    EXPECT_TRUE(BitEqual(q.forward(x), fresh->forward(x)));
  }
  EXPECT_TRUE(BitEqual(model->fc1->bias, bias1)) << "the clean biases are back";
  // Grad mode on: the rounded biases stay until the backward, which restores them.
  auto y = q.forward(x);
  EXPECT_TRUE(BitEqual(y, fresh->forward(x).detach()));
  y.sum().backward();
  EXPECT_TRUE(BitEqual(model->fc1->bias, bias1));
  EXPECT_TRUE(BitEqual(model->fc2->bias, bias2));
  {
    diffq::QuantizedGuard<Quantizer> guard(q);
    EXPECT_TRUE(BitEqual(model->fc1->bias, rounded1));
    EXPECT_TRUE(BitEqual(model->fc2->bias, fresh->fc2->bias));
    EXPECT_TRUE(BitEqual(model->fc1->weight, fresh->fc1->weight));
  }
  EXPECT_TRUE(BitEqual(model->fc1->bias, bias1));
  // Training forwards use the full-precision values.
  model->train();
  q.no_optimizer();
  torch::NoGradGuard no_grad;
  q.forward(x);
  EXPECT_TRUE(BitEqual(model->fc1->bias, bias1));
}

}  // namespace

TEST(Checkpoint, Float16EvalForwardEqualsReloadedModelForEveryMethod) {
  {
    SCOPED_TRACE("DiffQ");
    CheckFloat16EvalEqualsReloaded<diffq::DiffQuantizer<diffq_test::MLP>>(
        diffq::DiffQOptions().min_size_mb(0).group_size(4).exclude({"*bias"}).float16(true));
  }
  {
    SCOPED_TRACE("uniform");
    CheckFloat16EvalEqualsReloaded<diffq::UniformQuantizer<diffq_test::MLP>>(
        diffq::UniformOptions().bits(4).min_size_mb(0).exclude({"*bias"}).float16(true));
  }
  {
    SCOPED_TRACE("LSQ");
    CheckFloat16EvalEqualsReloaded<diffq::LSQQuantizer<diffq_test::MLP>>(
        diffq::LSQOptions().bits(4).min_size_mb(0).exclude({"*bias"}).float16(true));
  }
}

namespace {

/// The child of `SaveFlushesTheFileThenRenamesThenFlushesTheFolder`: saves a checkpoint to the
/// path in DIFFQ_FSYNC_TEST_PATH (run under strace); does nothing without it.
TEST(Checkpoint, SaveForTheFsyncTrace) {
  const char* path = std::getenv("DIFFQ_FSYNC_TEST_PATH");
  if (path == nullptr) return;
  diffq::save_quantized_state(small_state(), path);
}

}  // namespace

TEST(Checkpoint, SaveFlushesTheFileThenRenamesThenFlushesTheFolder) {
  if (std::system("command -v strace > /dev/null 2>&1") != 0) {
    GTEST_SKIP() << "strace is not installed (tests/run_tests.sh installs it)";
  }
  const fs::path dir = fresh_temp_dir("diffq_ckpt_fsync");
  const std::string target = (dir / "m.ckpt").string();
  const std::string trace = (dir / "trace.txt").string();
  const std::string self = fs::read_symlink("/proc/self/exe").string();
  const std::string cmd = "DIFFQ_FSYNC_TEST_PATH='" + target + "' timeout 60 strace -f -qq -o '" +
                          trace + "' -e trace=openat,fsync,rename,renameat,renameat2,close '" +
                          self + "' --gtest_filter=Checkpoint.SaveForTheFsyncTrace > /dev/null";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  ASSERT_TRUE(fs::exists(target));
  // The sequence on the checkpoint's files, from strace's lines `<pid> call(args) = result`.
  std::ifstream in(trace);
  std::string line, tmp_fd, dir_fd;
  std::vector<std::string> steps;
  while (std::getline(in, line)) {
    const auto eq = line.rfind("= ");
    const std::string result = eq == std::string::npos ? "" : line.substr(eq + 2);
    if (line.find("openat(") != std::string::npos &&
        line.find(target + ".tmp-") != std::string::npos) {
      tmp_fd = result;
      steps.push_back("open tmp");
    } else if (line.find("openat(") != std::string::npos &&
               line.find("\"" + dir.string() + "\"") != std::string::npos &&
               line.find("O_DIRECTORY") != std::string::npos) {
      dir_fd = result;
      if (dir_fd == tmp_fd) tmp_fd.clear();  // the temporary file's descriptor was closed
      steps.push_back("open dir");
    } else if (line.find("fsync(") != std::string::npos) {
      const std::string fd =
          line.substr(line.find("fsync(") + 6, line.find(')') - line.find("fsync(") - 6);
      if (fd == tmp_fd && !tmp_fd.empty()) steps.push_back("fsync tmp = " + result);
      if (fd == dir_fd && !dir_fd.empty()) steps.push_back("fsync dir = " + result);
    } else if (line.find("rename") != std::string::npos &&
               line.find(target + ".tmp-") != std::string::npos &&
               line.find("\"" + target + "\"") != std::string::npos) {
      steps.push_back("rename = " + result);
    }
  }
  const std::vector<std::string> expected = {"open tmp", "fsync tmp = 0", "rename = 0", "open dir",
                                             "fsync dir = 0"};
  EXPECT_EQ(steps, expected);
  EXPECT_TRUE(diffq_test::RemoveTree(dir.string()));
}

// ---- Format version 2: metadata; version 1 still loads ----------------------------------------

namespace {

/// `bytes` (a version-2 checkpoint) with its metadata block replaced by `entries`, written raw
/// (field by field per docs/checkpoint_format.md, nothing checked), CRCs fixed.
Bytes with_metadata(const Bytes& bytes,
                    const std::vector<std::pair<std::string, std::string>>& entries,
                    int64_t count = -1) {
  const size_t hb = static_cast<size_t>(rd(bytes, 12, 4));
  Bytes h(bytes.begin(), bytes.begin() + 56);
  wr(h, 28, 1, 4);
  le(h, count >= 0 ? static_cast<uint64_t>(count) : entries.size(), 4);
  for (const auto& e : entries) {
    le(h, e.first.size(), 2);
    str(h, e.first);
    le(h, e.second.size(), 2);
    str(h, e.second);
  }
  wr(h, 12, h.size() + 4, 4);
  wr(h, 16, h.size() + 4 + (bytes.size() - hb), 8);
  le(h, zcrc(h.data(), h.size()), 4);
  h.insert(h.end(), bytes.begin() + static_cast<std::ptrdiff_t>(hb), bytes.end());
  return h;
}

/// The model of tests/data/v1_diffq.dqc (see tests/data/README.md): a tied embedding, Linear,
/// BatchNorm1d, Linear.
struct V1ProjImpl : torch::nn::Module {
  explicit V1ProjImpl(const torch::Tensor& w) : weight(register_parameter("weight", w)) {}
  torch::Tensor weight;
};
TORCH_MODULE(V1Proj);
struct V1NetImpl : torch::nn::Module {
  V1NetImpl()
      : emb(register_module("emb", torch::nn::Embedding(16, 12))),
        fc(register_module("fc", torch::nn::Linear(12, 24))),
        bn(register_module("bn", torch::nn::BatchNorm1d(24))),
        head(register_module("head", torch::nn::Linear(24, 12))),
        out(register_module("out", V1Proj(emb->weight))) {}
  torch::nn::Embedding emb;
  torch::nn::Linear fc;
  torch::nn::BatchNorm1d bn;
  torch::nn::Linear head;
  V1Proj out;
};
TORCH_MODULE(V1Net);

}  // namespace

TEST(Checkpoint, Version1FileOfDiffQ01Loads) {
  const std::string dir = DIFFQ_TEST_DATA_DIR;
  const std::string path = dir + "/v1_diffq.dqc";
  torch::serialize::InputArchive expected;
  expected.load_from(dir + "/v1_diffq.expected.pt");
  // Into a plain model: every tensor as the quantizer's eval forward saw it (fp16-rounded floats).
  V1Net net;
  diffq::load_quantized(net, path);
  for (const auto& p : net->named_parameters()) {
    torch::Tensor want;
    expected.read(p.key(), want);
    EXPECT_TRUE(torch::equal(p.value(), want)) << p.key();
  }
  for (const auto& b : net->named_buffers()) {
    torch::Tensor want;
    expected.read(b.key(), want);
    EXPECT_TRUE(torch::equal(b.value(), want)) << b.key();
  }
  EXPECT_TRUE(net->out->weight.is_same(net->emb->weight));
  // Its options block reads as method diffq with those options; no library version.
  const auto info = diffq::read_checkpoint_info(path);
  EXPECT_EQ(info.version, 1u);
  EXPECT_EQ(info.method, "diffq");
  EXPECT_EQ(info.library_version, "");
  ASSERT_TRUE(info.options.has_value());
  EXPECT_EQ(info.options->group_size(), 8);
  EXPECT_EQ(info.options->init_bits(), 6);
  EXPECT_EQ(info.options->min_size_mb(), 0);
  EXPECT_TRUE(info.options->float16());
  EXPECT_EQ(info.options->exclude(), (std::vector<std::string>{"head.bias"}));
  const std::pair<std::string, std::string> exclude0{"exclude.0", "head.bias"};
  EXPECT_NE(std::find(info.method_options.begin(), info.method_options.end(), exclude0),
            info.method_options.end());
  // Into a model wrapped again by a quantizer: the stored logits come back too.
  V1Net again;
  diffq::DiffQuantizer<V1Net> q(again, *info.options);
  diffq::restore_quantized(q, path);
  for (const auto& p : again->named_parameters()) {
    torch::Tensor want;
    expected.read(p.key(), want);
    if (p.key().find("_diffq") != std::string::npos) {
      EXPECT_TRUE(torch::equal(p.value(), want)) << p.key();
    }
  }
}

TEST(Checkpoint, MetadataRecordsMethodOptionsVersionAndUserEntries) {
  const diffq::UserMetadata user = {{"model", "mlp 10-6-3"}, {"epoch", "3"}, {"note", ""}};
  auto check_common = [&](const diffq::CheckpointInfo& info, const char* method) {
    EXPECT_EQ(info.version, 2u);
    EXPECT_EQ(info.method, method);
    EXPECT_EQ(info.library_version, DIFFQ_VERSION_STRING);
    EXPECT_EQ(info.user_metadata, user);
  };
  torch::manual_seed(3);
  {
    diffq_test::MLP m;
    diffq::DiffQuantizer<diffq_test::MLP> q(
        m, diffq::DiffQOptions().group_size(4).min_bits(1.25).min_size_mb(0).exclude({"*bias"}));
    Bytes b;
    diffq::save_quantized(q, b, false, user);
    const auto info = diffq::read_checkpoint_info(b);
    check_common(info, "diffq");
    ASSERT_TRUE(info.options.has_value());
    EXPECT_EQ(info.options->group_size(), 4);
    EXPECT_EQ(info.options->min_bits(), 1.25);
    EXPECT_EQ(info.options->exclude(), (std::vector<std::string>{"*bias"}));
    EXPECT_FALSE(info.uniform_options.has_value());
    EXPECT_FALSE(info.lsq_options.has_value());
  }
  for (bool qat : {false, true}) {
    diffq_test::MLP m;
    diffq::UniformQuantizer<diffq_test::MLP> q(
        m, diffq::UniformOptions().bits(3).qat(qat).min_size_mb(0).float16(true));
    Bytes b;
    diffq::save_quantized(q, b, false, user);
    const auto info = diffq::read_checkpoint_info(b);
    check_common(info, qat ? "qat" : "uniform");
    const std::vector<std::pair<std::string, std::string>> text = {{"bits", "3"},
                                                                   {"qat", qat ? "true" : "false"},
                                                                   {"min_size_mb", "0"},
                                                                   {"float16", "true"},
                                                                   {"detect_bound", "true"}};
    EXPECT_EQ(info.method_options, text);
    ASSERT_TRUE(info.uniform_options.has_value());
    EXPECT_EQ(info.uniform_options->bits(), 3);
    EXPECT_EQ(info.uniform_options->qat(), qat);
    EXPECT_TRUE(info.uniform_options->float16());
    EXPECT_FALSE(info.options.has_value());
  }
  {
    diffq_test::MLP m;
    diffq::LSQQuantizer<diffq_test::MLP> q(
        m, diffq::LSQOptions().bits(5).min_size_mb(0).suffix("_step").detect_bound(false));
    Bytes b;
    diffq::save_quantized(q, b, true, user);
    const auto info = diffq::read_checkpoint_info(b);
    check_common(info, "lsq");
    ASSERT_TRUE(info.lsq_options.has_value());
    EXPECT_EQ(info.lsq_options->bits(), 5);
    EXPECT_EQ(info.lsq_options->suffix(), "_step");
    EXPECT_FALSE(info.lsq_options->detect_bound());
  }
  // Bad user entries are refused by the writer, naming the entry.
  diffq_test::MLP m;
  diffq::UniformQuantizer<diffq_test::MLP> q(m, diffq::UniformOptions().min_size_mb(0));
  Bytes b;
  EXPECT_ERROR_HAS(diffq::save_quantized(q, b, false, {{"a b", "x"}}),
                   "diffq::save_quantized: user metadata 'a b': a metadata key must be printable "
                   "ASCII without spaces, got byte 32 at position 6");
  EXPECT_ERROR_HAS(diffq::save_quantized(q, b, false, {{"", "x"}}),
                   "diffq::save_quantized: user metadata: a key must not be empty");
  EXPECT_ERROR_HAS(diffq::save_quantized(q, b, false, {{std::string(251, 'k'), "x"}}),
                   "a metadata key must have 1 to 255 bytes, got 256");
  EXPECT_ERROR_HAS(diffq::save_quantized(q, b, false, {{"k", std::string("a\0b", 3)}}),
                   "diffq::save_quantized: user metadata 'k': a metadata value contains a NUL byte "
                   "at position 1");
  EXPECT_ERROR_HAS(diffq::save_quantized(q, b, false, {{"k", std::string(65536, 'v')}}),
                   "a metadata value must have at most 65535 bytes, got 65536");
}

TEST(Checkpoint, OptionValuesReadBackExactly) {
  // Doubles are written in the shortest decimal form that reads back to the same value.
  for (double v : {0.0, 0.01, 0.1, 1.0 / 3, 2.5, 1e-300, 123456789.125, 15.0, -0.75,
                   std::nextafter(8.0, 9.0)}) {
    const std::string t = diffq::detail::option_text(v);
    double back = -1;
    ASSERT_TRUE(diffq::detail::read_option(t, back)) << t;
    EXPECT_EQ(back, v) << t;
    EXPECT_EQ(std::strtod(t.c_str(), nullptr), v) << t;  // and by the C library
  }
  EXPECT_EQ(diffq::detail::option_text(0.01), "0.01");
  EXPECT_EQ(diffq::detail::option_text(8.0), "8");
  double d = 0;
  for (const char* bad : {"", " 1", "1 ", "1x", "nan", "0x10", "--1"}) {
    EXPECT_FALSE(diffq::detail::read_option(bad, d)) << "'" << bad << "'";
  }
  int64_t i = 0;
  EXPECT_FALSE(diffq::detail::read_option("1.5", i));
  EXPECT_FALSE(diffq::detail::read_option("99999999999999999999", i));
  bool f = false;
  EXPECT_FALSE(diffq::detail::read_option("1", f));
}

#define EXPECT_HAS(what, sub) \
  EXPECT_NE((what).find(sub), std::string::npos) << "expected '" << (sub) << "' in: " << (what)
TEST(Checkpoint, RejectsBadMetadataAndSetsAsideOptionsItCannotRead) {
  const Bytes good = encode(small_state());
  const auto expected_state = diffq::read_quantized_state(good);
  auto info_error = [](const Bytes& b) {
    return error_of([&] { diffq::read_checkpoint_info(b); });
  };
  EXPECT_HAS(info_error(with_metadata(good, {{"k", "1"}, {"k", "2"}})),
             "diffq::read_checkpoint_info: <bytes>: header at byte 66: duplicate metadata key 'k'");
  EXPECT_HAS(info_error(with_metadata(good, {{"a b", "1"}})),
             "header at byte 60: metadata entry 0: a metadata key must be printable ASCII without "
             "spaces, got byte 32 at position 1");
  EXPECT_HAS(info_error(with_metadata(good, {{"", "1"}})),
             "header at byte 60: metadata entry 0: a metadata key must have 1 to 255 bytes, got 0");
  EXPECT_HAS(
      info_error(with_metadata(good, {{"k\x1b", "1"}})),
      "metadata entry 0: a metadata key must be printable ASCII without spaces, got byte 27");
  EXPECT_HAS(info_error(with_metadata(good, {{"k", std::string("a\0b", 3)}})),
             "header at byte 60: metadata 'k': a metadata value contains a NUL byte at position 1");
  EXPECT_HAS(info_error(with_metadata(good, {{"k", "1"}}, 1000)),
             "header at byte 56: 1000 metadata entries cannot fit in the 6 bytes left in the "
             "header");
  EXPECT_HAS(info_error(with_metadata(good, {{"k", "1234567890"}}, 2)),
             "header at byte 75: truncated");
  // Entries of a later writer are not reported; a method this reader does not know is, with its
  // options as text.
  auto info = diffq::read_checkpoint_info(
      with_metadata(good, {{"method", "gptq"}, {"option.damp", "0.01"}, {"later.key", "v"}}));
  EXPECT_EQ(info.method, "gptq");
  EXPECT_EQ(info.method_options,
            (std::vector<std::pair<std::string, std::string>>{{"damp", "0.01"}}));
  EXPECT_TRUE(info.user_metadata.empty());
  EXPECT_FALSE(info.options.has_value());
  // Options that do not read back as the method's are set aside with a warning; the tensors load.
  auto info_warning = [&](const Bytes& bytes) {
    testing::internal::CaptureStderr();
    const auto i2 = diffq::read_checkpoint_info(bytes);
    const std::string err = testing::internal::GetCapturedStderr();
    EXPECT_FALSE(i2.options.has_value());
    EXPECT_FALSE(i2.method_options.empty());
    expect_same_state(diffq::read_quantized_state(bytes), expected_state);
    return err;
  };
  EXPECT_HAS(info_warning(with_metadata(good, {{"method", "diffq"}, {"option.bogus", "1"}})),
             "header at byte 56: metadata: unknown option 'bogus'; the options are not reported");
  EXPECT_HAS(info_warning(with_metadata(good, {{"method", "diffq"}, {"option.min_bits", "abc"}})),
             "metadata: option min_bits: cannot read 'abc'; the options are not reported");
  EXPECT_HAS(info_warning(with_metadata(good, {{"method", "diffq"}, {"option.max_bits", "16"}})),
             "metadata: option: max_bits must be <= 15, got 16; the options are not reported");
  EXPECT_HAS(info_warning(with_metadata(good, {{"method", "lsq"}, {"option.bits", "1"}})),
             "metadata: option: bits must be in [2, 15], got 1");
}
#undef EXPECT_HAS
