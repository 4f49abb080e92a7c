// Tests of the Fashion-MNIST example's IDX reader (examples/fashion_mnist/idx.h), report
// (report.h) and command line (cli.h).
#include "../examples/fashion_mnist/cli.h"
#include "../examples/fashion_mnist/idx.h"
#include "../examples/fashion_mnist/report.h"
#include "test_util.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;

/// A test helper could not set up its files: thrown so that the test stops (gtest reports it),
/// and not a std::runtime_error, which `expect_error` would take for the error under test.
struct SetupFailure : std::logic_error {
  using std::logic_error::logic_error;
};

bool dataset_installed(const std::string& dir) {
  for (const char* name : {"train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                           "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}) {
    if (!fs::exists(dir + "/" + name + ".gz") && !fs::exists(dir + "/" + name)) return false;
  }
  return true;
}

/// Big-endian IDX header: magic then dimensions.
std::vector<uint8_t> header(uint32_t magic, const std::vector<uint32_t>& dims) {
  std::vector<uint8_t> out;
  auto put = [&](uint32_t v) {
    for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<uint8_t>(v >> s));
  };
  put(magic);
  for (auto d : dims) put(d);
  return out;
}

std::vector<uint8_t> images_file(uint32_t count, uint32_t rows, uint32_t cols,
                                 uint64_t pixels_present, uint32_t magic = 2051) {
  auto out = header(magic, {count, rows, cols});
  for (uint64_t i = 0; i < pixels_present; ++i) out.push_back(static_cast<uint8_t>(i * 7));
  return out;
}

std::vector<uint8_t> labels_file(uint32_t count, uint64_t labels_present, uint32_t magic = 2049) {
  auto out = header(magic, {count});
  for (uint64_t i = 0; i < labels_present; ++i) out.push_back(static_cast<uint8_t>(i % 10));
  return out;
}

class FashionMnistIdx : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("diffq_fmnist_" + std::to_string(::getpid()) + "_" + info->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { EXPECT_TRUE(diffq_test::RemoveTree(dir_.string())) << dir_; }

  /// Writes `bytes` gzip-compressed to `<dir>/<name>` and returns the path; throws SetupFailure
  /// when the file cannot be written.
  std::string write_gz(const std::string& name, const std::vector<uint8_t>& bytes) {
    const std::string path = (dir_ / name).string();
    errno = 0;
    gzFile f = gzopen(path.c_str(), "wb");
    if (f == nullptr) {
      throw SetupFailure("write_gz: cannot create '" + path + "': " + std::strerror(errno));
    }
    if (!bytes.empty() && gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())) !=
                              static_cast<int>(bytes.size())) {
      gzclose(f);
      throw SetupFailure("write_gz: cannot write '" + path + "'");
    }
    if (gzclose(f) != Z_OK) throw SetupFailure("write_gz: cannot close '" + path + "'");
    return path;
  }

  /// Writes raw bytes (no compression); throws SetupFailure when the file cannot be written.
  std::string write_raw(const std::string& name, const std::vector<uint8_t>& bytes) {
    const std::string path = (dir_ / name).string();
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
    out.close();
    if (!out) throw SetupFailure("write_raw: cannot write '" + path + "'");
    return path;
  }

  /// The bytes of a file.
  static std::vector<uint8_t> read_raw(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw SetupFailure("read_raw: cannot open '" + path + "'");
    return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)),
                                std::istreambuf_iterator<char>());
  }

  fs::path dir_;
};

/// Runs `f`, expects a std::runtime_error whose message contains every one of `parts`.
template <typename F>
void expect_error(F f, const std::vector<std::string>& parts) {
  try {
    f();
    ADD_FAILURE() << "no exception; expected one mentioning '" << parts.front() << "'";
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    for (const auto& p : parts) EXPECT_NE(what.find(p), std::string::npos) << what;
  }
}

TEST(FashionMnistData, RealFilesMatchTheFormat) {
  const std::string dir = fmnist::kDefaultDataDir;
  if (!dataset_installed(dir)) GTEST_SKIP() << "Fashion-MNIST not installed in " << dir;
  const auto train = fmnist::load_fashion_mnist(dir, /*train=*/true);
  const auto test = fmnist::load_fashion_mnist(dir, /*train=*/false);
  EXPECT_EQ(train.images.count, 60000);
  EXPECT_EQ(test.images.count, 10000);
  for (const auto* s : {&train, &test}) {
    EXPECT_EQ(s->images.rows, 28);
    EXPECT_EQ(s->images.cols, 28);
    EXPECT_EQ(s->images.pixels.size(), static_cast<size_t>(s->images.count * 28 * 28));
    EXPECT_EQ(s->labels.size(), static_cast<size_t>(s->images.count));
    // Balanced classes: 6000 (train) / 1000 (test) of each.
    std::vector<int64_t> per_class(10, 0);
    for (auto l : s->labels) ++per_class.at(l);
    for (auto n : per_class) EXPECT_EQ(n, s->images.count / 10);
  }
  // The normalisation constants of the example: mean 0.2860 of the training pixels.
  double sum = 0;
  for (auto p : train.images.pixels) sum += p;
  EXPECT_NEAR(sum / train.images.pixels.size() / 255.0, 0.2860, 5e-4);
}

TEST(FashionMnistData, RealFileHeaders) {
  const std::string dir = fmnist::kDefaultDataDir;
  if (!dataset_installed(dir)) GTEST_SKIP() << "Fashion-MNIST not installed in " << dir;
  // The magic numbers: reading a label file as images (and vice versa) names both numbers.
  const std::string labels = fmnist::idx_path(dir, "t10k", "labels-idx1");
  const std::string images = fmnist::idx_path(dir, "t10k", "images-idx3");
  expect_error([&] { fmnist::read_idx_images(labels); }, {labels, "2051", "2049"});
  expect_error([&] { fmnist::read_idx_labels(images); }, {images, "2049", "2051"});
  // The test split is not the training split: its count is 10000, not 60000.
  expect_error([&] { fmnist::read_idx_labels(labels, 60000); }, {labels, "60000", "10000"});
}

TEST_F(FashionMnistIdx, ReadsSmallValidFiles) {
  const auto images = write_gz("i.gz", images_file(3, 28, 28, 3 * 784));
  const auto labels = write_gz("l.gz", labels_file(3, 3));
  const auto s = fmnist::read_split(images, labels, 3);
  EXPECT_EQ(s.images.count, 3);
  ASSERT_EQ(s.images.pixels.size(), 3u * 784);
  EXPECT_EQ(s.images.pixels[5], 35);
  EXPECT_EQ(s.labels, (std::vector<uint8_t>{0, 1, 2}));
  // Uncompressed files are read as well.
  const auto raw = write_raw("raw", labels_file(4, 4));
  EXPECT_EQ(fmnist::read_idx_labels(raw, 4).size(), 4u);
}

TEST_F(FashionMnistIdx, TruncatedFile) {
  // The header announces 5 images but only 3 and a half are there.
  const auto images = write_gz("i.gz", images_file(5, 28, 28, 3 * 784 + 392));
  expect_error([&] { fmnist::read_idx_images(images, 5); },
               {images, "truncated", "3920 bytes", std::to_string(3 * 784 + 392)});
  // A header cut short.
  const auto head = write_gz("h.gz", {0, 0, 8, 3, 0, 0});
  expect_error([&] { fmnist::read_idx_images(head); }, {head, "truncated", "header"});
  // An empty file.
  const auto empty = write_gz("e.gz", {});
  expect_error([&] { fmnist::read_idx_labels(empty); }, {empty, "truncated"});
  // A gzip stream cut in the middle (compressed bytes missing).
  std::ifstream in(images, std::ios::binary);
  std::vector<char> gz((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<uint8_t> half(gz.begin(), gz.begin() + static_cast<std::ptrdiff_t>(gz.size() / 2));
  const auto cut = write_raw("cut.gz", half);
  expect_error([&] { fmnist::read_idx_images(cut); }, {cut});
}

/// `n` pseudo-random bytes (a deflate stream of them is made of real Huffman codes, not of a few
/// back-references as for a regular pattern).
std::vector<uint8_t> noise_bytes(size_t n) {
  std::vector<uint8_t> out(n);
  uint32_t x = 12345;
  for (auto& b : out) {
    x = x * 1103515245u + 12345u;
    b = static_cast<uint8_t>((x >> 16) & 0x3f);
  }
  return out;
}

TEST_F(FashionMnistIdx, CorruptStreamIsNotBlamedOnTheHeader) {
  // 20 images: zlib decodes all of them (and meets the damage) while the 16-byte header is read.
  auto bytes = header(2051, {20, 28, 28});
  const auto pixels = noise_bytes(20 * 784);
  bytes.insert(bytes.end(), pixels.begin(), pixels.end());
  const auto good = write_gz("good.gz", bytes);
  EXPECT_EQ(fmnist::read_idx_images(good, 20).pixels, pixels);
  auto gz = read_raw(good);
  ASSERT_GT(gz.size(), 4000u);
  // Damage deep in the compressed data, three quarters in.
  for (size_t i = gz.size() * 3 / 4; i < gz.size() * 3 / 4 + 32; ++i) gz[i] ^= 0x55;
  const auto deep = write_raw("deep.gz", gz);
  expect_error([&] { fmnist::read_idx_images(deep, 20); },
               {"'" + deep + "'", "the gzip stream is corrupt (", "decompression stopped at byte ",
                "of the compressed file", "after 0 bytes of IDX data"});
  try {
    fmnist::read_idx_images(deep, 20);
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(std::string(e.what()), Not(HasSubstr("header")));
    // zlib's message is given without its own copy of the path.
    EXPECT_THAT(std::string(e.what()), Not(HasSubstr("(" + deep)));
  }
  // A wrong CRC in the gzip trailer (the 8 last bytes: CRC-32, then the length).
  auto crc = read_raw(good);
  crc[crc.size() - 8] ^= 0xff;
  const auto bad_crc = write_raw("crc.gz", crc);
  expect_error([&] { fmnist::read_idx_images(bad_crc, 20); },
               {bad_crc, "the gzip stream is corrupt (incorrect data check)",
                "at byte " + std::to_string(crc.size() - 4) + " of the compressed file"});
  try {
    fmnist::read_idx_images(bad_crc, 20);
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(std::string(e.what()), Not(HasSubstr("header")));
  }
}

TEST_F(FashionMnistIdx, DirectoryIsNotAFile) {
  const fs::path d = dir_ / "train-images-idx3-ubyte.gz";
  fs::create_directories(d);
  expect_error([&] { fmnist::read_idx_images(d.string()); },
               {"'" + d.string() + "'", "expected a regular file", "found a directory"});
  expect_error([&] { fmnist::read_idx_labels(d.string()); }, {d.string(), "found a directory"});
  // The split: the directory is reported, not "corrupt data".
  try {
    fmnist::load_fashion_mnist(dir_.string(), /*train=*/true);
    ADD_FAILURE() << "no exception";
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(std::string(e.what()),
                AllOf(HasSubstr(d.string()), HasSubstr("found a directory"),
                      Not(HasSubstr("corrupt")), Not(HasSubstr("Is a directory"))));
  }
  // A regular uncompressed file next to a directory named like the .gz one is chosen.
  const auto raw = write_raw("t10k-labels-idx1-ubyte", labels_file(10000, 10000));
  fs::create_directories(dir_ / "t10k-labels-idx1-ubyte.gz");
  EXPECT_EQ(fmnist::idx_path(dir_.string(), "t10k", "labels-idx1"), raw);
}

TEST_F(FashionMnistIdx, TrailingBytes) {
  const auto labels = write_gz("l.gz", labels_file(3, 4));
  expect_error([&] { fmnist::read_idx_labels(labels, 3); }, {labels, "trailing"});
}

TEST_F(FashionMnistIdx, WrongMagic) {
  const auto images = write_gz("i.gz", images_file(2, 28, 28, 2 * 784, /*magic=*/2049));
  expect_error([&] { fmnist::read_idx_images(images); },
               {images, "expected magic number 2051", "found 2049"});
  const auto labels = write_gz("l.gz", labels_file(2, 2, /*magic=*/0x12345678));
  expect_error([&] { fmnist::read_idx_labels(labels); },
               {labels, "expected magic number 2049", "found 305419896"});
}

TEST_F(FashionMnistIdx, CountMismatch) {
  // Image and label counts differ.
  const auto images = write_gz("i.gz", images_file(4, 28, 28, 4 * 784));
  const auto labels = write_gz("l.gz", labels_file(3, 3));
  expect_error([&] { fmnist::read_split(images, labels); }, {labels, "3 labels", "(4)"});
  // The header's count is not the split's.
  expect_error([&] { fmnist::read_idx_images(images, 60000); },
               {images, "expected 60000 images", "says 4"});
  // Wrong image size.
  const auto big = write_gz("b.gz", images_file(1, 32, 32, 32 * 32));
  expect_error([&] { fmnist::read_idx_images(big); }, {big, "28x28", "32x32"});
}

TEST_F(FashionMnistIdx, LabelOutOfRange) {
  auto bytes = labels_file(3, 3);
  bytes.back() = 10;
  const auto labels = write_gz("l.gz", bytes);
  expect_error([&] { fmnist::read_idx_labels(labels); }, {labels, "label 2 is 10", "0..9"});
}

TEST_F(FashionMnistIdx, MissingFiles) {
  const std::string dir = (dir_ / "nowhere").string();
  expect_error([&] { fmnist::load_fashion_mnist(dir, true); },
               {dir + "/train-images-idx3-ubyte.gz", "cannot open", "--data"});
}

TEST_F(FashionMnistIdx, ImplausibleHeaderFailsWithoutAllocating) {
  const auto images = write_gz("i.gz", header(2051, {0xffffffffu, 0xffffu, 0xffffu}));
  expect_error([&] { fmnist::read_idx_images(images, -1, -1, -1); }, {images, "implausible"});
  const auto labels = write_gz("l.gz", header(2049, {0xffffffffu}));
  expect_error([&] { fmnist::read_idx_labels(labels); }, {labels, "truncated"});
}

TEST(FashionMnistReport, MarkdownAndSvg) {
  fmnist::RunResult fp32;
  fp32.method = "fp32";
  fp32.correct = fp32.reload_correct = 9100;
  fp32.total = fp32.reload_total = 10000;
  fp32.file_bytes = 1700000;
  fp32.train_seconds = 100;
  fp32.checkpoint = "out/fp32.pt";
  std::vector<fmnist::RunResult> runs = {fp32};
  for (double lambda : {1.0, 5.0}) {
    fmnist::RunResult r = fp32;
    r.diffq = true;
    r.lambda = lambda;
    r.method = "DiffQ λ=" + fmnist::lambda_string(lambda);
    r.correct = r.reload_correct = lambda == 1 ? 9050 : 8900;
    r.file_bytes = lambda == 1 ? 140000 : 90000;
    r.mean_bits = 3.5 / lambda;
    r.bits_per_layer = {{"conv2.weight", 4}, {"fc1.weight", 3.0 / lambda}};
    runs.push_back(r);
  }
  runs.back().reload_correct = 8901;  // a mismatch shows
  const std::vector<fmnist::ParamInfo> params = {{"conv1.weight", {32, 1, 3, 3}, 288},
                                                 {"conv2.weight", {64, 32, 3, 3}, 18432},
                                                 {"fc1.weight", {128, 3136}, 401408},
                                                 {"fc1.bias", {128}, 128}};
  const auto md = fmnist::markdown_report(runs, params, {"setup line"}, "fig.svg");
  EXPECT_NE(md.find("| DiffQ λ=1 | 90.50 % | 140,000 B (0.134 MB) | 12.14× | 3.50 |"),
            std::string::npos)
      << md;
  EXPECT_NE(md.find("| `conv1.weight` | 32×1×3×3 | 288 | fp32 | fp32 |"), std::string::npos) << md;
  EXPECT_NE(md.find("| `fc1.weight` | 128×3136 | 401,408 | 3.00 | 0.60 |"), std::string::npos)
      << md;
  EXPECT_NE(md.find("**a different**"), std::string::npos);
  EXPECT_NE(md.find("8900/10000 | 8901/10000 | **NO**"), std::string::npos) << md;
  EXPECT_NE(md.find("![bits per layer and accuracy against size](fig.svg)"), std::string::npos);

  const auto svg = fmnist::svg_figure(runs, params, 15);
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_NE(svg.find("</svg>"), std::string::npos);
  EXPECT_NE(svg.find("Test accuracy against checkpoint size"), std::string::npos);
  EXPECT_NE(svg.find(">fc1.weight<"), std::string::npos);
  EXPECT_EQ(svg.find("nan"), std::string::npos);
  // With a single DiffQ run only the bits panel is drawn.
  runs.pop_back();
  EXPECT_EQ(fmnist::svg_figure(runs, params, 15).find("against checkpoint size"),
            std::string::npos);
}

TEST(FashionMnistReport, NiceTicks) {
  const auto t = fmnist::svg::nice_ticks(0, 9, 5);
  ASSERT_FALSE(t.empty());
  EXPECT_EQ(t.front(), 0);
  EXPECT_GE(t.back(), 9 - 1e-9);
  EXPECT_LE(t.size(), 8u);
}

/// The runs of a report: fp32, then `quantized` baselines with their bits.
std::vector<fmnist::RunResult> baseline_runs(bool with_fp32) {
  std::vector<fmnist::RunResult> runs;
  fmnist::RunResult fp32;
  fp32.method = "fp32";
  fp32.correct = fp32.reload_correct = 9100;
  fp32.total = fp32.reload_total = 10000;
  fp32.file_bytes = 1700000;
  fp32.checkpoint = "out/fashion_mnist_fp32.pt";
  if (with_fp32) runs.push_back(fp32);
  for (int bits : {8, 4}) {
    fmnist::RunResult r = fp32;
    r.quantized = true;
    r.method = "uniform PTQ " + std::to_string(bits) + "-bit";
    r.correct = r.reload_correct = bits == 8 ? 9090 : 8700;
    r.file_bytes = bits == 8 ? 420000 : 215000;
    r.mean_bits = bits;
    r.bits_per_layer = {{"conv2.weight", bits}, {"fc1.weight", bits}};
    runs.push_back(r);
  }
  return runs;
}

const std::vector<fmnist::ParamInfo> kParams = {{"conv1.weight", {32, 1, 3, 3}, 288},
                                                {"conv2.weight", {64, 32, 3, 3}, 18432},
                                                {"fc1.weight", {128, 3136}, 401408},
                                                {"fc1.bias", {128}, 128}};

/// The number of SVG elements `<tag ...>` whose attributes contain `attr`.
size_t count_elements(const std::string& svg, const std::string& tag, const std::string& attr) {
  size_t n = 0;
  for (size_t at = svg.find("<" + tag + " "); at != std::string::npos;
       at = svg.find("<" + tag + " ", at + 1)) {
    const std::string element = svg.substr(at, svg.find('>', at) - at);
    if (element.find(attr) != std::string::npos) ++n;
  }
  return n;
}

TEST(FashionMnistReport, BitsPanelShowsBaselineRuns) {
  // `train --method uniform --uniform-bits 8,4`: no DiffQ run, the baselines' bits are drawn.
  const auto runs = baseline_runs(/*with_fp32=*/true);
  const auto svg = fmnist::svg_figure(runs, kParams, 15);
  EXPECT_THAT(svg, Not(HasSubstr("no parameter quantized")));
  // One bar per run and quantized parameter, labelled with its bits, in the run's colour.
  size_t eights = 0, fours = 0;
  for (size_t at = svg.find(">8.00</text>"); at != std::string::npos;
       at = svg.find(">8.00</text>", at + 1)) {
    ++eights;
  }
  for (size_t at = svg.find(">4.00</text>"); at != std::string::npos;
       at = svg.find(">4.00</text>", at + 1)) {
    ++fours;
  }
  EXPECT_EQ(eights, 2u);
  EXPECT_EQ(fours, 2u);
  EXPECT_THAT(svg, AllOf(HasSubstr(">uniform PTQ 8-bit</text>"),
                         HasSubstr(">uniform PTQ 4-bit</text>"), HasSubstr(">conv2.weight<"),
                         HasSubstr(">fc1.weight<"), HasSubstr(">fp32: conv1.weight, fc1.bias<")));
  // Bars + legend swatch of each run: 2 + 1 rects per colour.
  EXPECT_EQ(count_elements(svg, "rect", "fill=\"#1f77b4\""), 3u);
  EXPECT_EQ(count_elements(svg, "rect", "fill=\"#ff7f0e\""), 3u);
  // The axis reaches the largest bits (8) even when --max-bits is lower (DiffQ did not run).
  const auto low = fmnist::svg_figure(runs, kParams, 4);
  EXPECT_THAT(low, HasSubstr("font-size=\"11\">8</text>"));
  // ... and stops near it, not at max_bits = 15.
  EXPECT_THAT(svg, AllOf(HasSubstr("font-size=\"11\">10</text>"),
                         Not(HasSubstr("font-size=\"11\">15</text>")),
                         Not(HasSubstr("font-size=\"11\">16</text>"))));
  // The markdown shows the same bits.
  const auto md = fmnist::markdown_report(runs, kParams, {}, "fig.svg");
  EXPECT_THAT(md, HasSubstr("| `fc1.weight` | 128×3136 | 401,408 | 8.00 | 4.00 |"));
}

TEST(FashionMnistReport, TradeoffLegendMatchesThePoints) {
  auto runs = baseline_runs(/*with_fp32=*/true);
  for (double lambda : {1.0, 5.0}) {
    fmnist::RunResult r = runs.front();
    r.diffq = true;
    r.lambda = lambda;
    r.method = "DiffQ λ=" + fmnist::lambda_string(lambda);
    r.file_bytes = lambda == 1 ? 140000 : 90000;
    r.bits_per_layer = {{"conv2.weight", 5}, {"fc1.weight", 3}};
    runs.push_back(r);
  }
  fmnist::RunResult qat = runs[1];
  qat.method = "QAT 4-bit";
  runs.push_back(qat);
  const auto svg = fmnist::svg_figure(runs, kParams, 15);
  const std::string tradeoff = svg.substr(svg.find("Test accuracy against checkpoint size"));
  // DiffQ: every circle (the two points and the legend's) in one colour.
  EXPECT_EQ(count_elements(tradeoff, "circle", ""), 3u);
  EXPECT_EQ(count_elements(tradeoff, "circle", "fill=\"#1f77b4\""), 3u);
  // Each baseline method: diamonds of its own colour, one legend entry (uniform PTQ: 2 points).
  EXPECT_EQ(count_elements(tradeoff, "polygon", "fill=\"#ff7f0e\""), 3u);
  EXPECT_EQ(count_elements(tradeoff, "polygon", "fill=\"#2ca02c\""), 2u);
  EXPECT_EQ(count_elements(tradeoff, "polygon", ""), 5u);
  EXPECT_THAT(tradeoff, AllOf(HasSubstr(">DiffQ (one point per penalty λ)</text>"),
                              HasSubstr(">uniform PTQ</text>"), HasSubstr(">QAT</text>"),
                              HasSubstr(">fp32 baseline</text>")));
  EXPECT_EQ(count_elements(tradeoff, "rect", "fill=\"#555555\""), 2u);  // point and legend
  // Without an fp32 run: no fp32 entry, no grey square.
  runs.erase(runs.begin());
  const auto no_fp32 = fmnist::svg_figure(runs, kParams, 15);
  EXPECT_THAT(no_fp32, Not(HasSubstr("fp32 baseline")));
  EXPECT_EQ(count_elements(no_fp32, "rect", "fill=\"#555555\""), 0u);
  EXPECT_EQ(fmnist::svg::baseline_family("uniform PTQ 12-bit"), "uniform PTQ");
  EXPECT_EQ(fmnist::svg::baseline_family("LSQ 4-bit"), "LSQ");
  EXPECT_EQ(fmnist::svg::baseline_family("fp32"), "fp32");
}

TEST(FashionMnistReport, SizeBudgetRunsBesideTheLambdaRuns) {
  auto runs = baseline_runs(/*with_fp32=*/true);
  fmnist::RunResult l = runs.front();
  l.diffq = true;
  l.lambda = 3;
  l.method = "DiffQ λ=3";
  l.file_bytes = 95000;
  l.model_size_mb = 0.1312;
  l.correct = 8950;
  runs.push_back(l);
  fmnist::RunResult b = l;
  b.lambda = 2.5625;  // the final penalty weight
  b.target_mb = 0.13;
  b.size_before_fit_mb = 0.13034;
  b.lowered_groups = 153;
  b.model_size_mb = 0.12999;
  b.file_bytes = 94000;
  b.correct = 8912;
  b.method = "DiffQ ≤0.13 MB";
  runs.push_back(b);
  const auto md = fmnist::markdown_report(runs, kParams, {}, "fig.svg");
  EXPECT_THAT(md, HasSubstr("### Size budgets"));
  EXPECT_THAT(md, HasSubstr("| DiffQ λ=3 | – | 0.1312 MB | – | – | 95,000 B |"));
  EXPECT_THAT(md, HasSubstr("| DiffQ ≤0.13 MB | 0.1300 MB | 0.1300 MB | 0.1303 MB | 153 | "
                            "94,000 B | 89.12 % | 2.56 |"));
  // The figure: the λ run a filled circle, the budget run a ring, each with its legend entry.
  const auto svg = fmnist::svg_figure(runs, kParams, 15);
  const std::string tradeoff = svg.substr(svg.find("Test accuracy against checkpoint size"));
  EXPECT_EQ(count_elements(tradeoff, "circle", "fill=\"white\" stroke=\"#1f77b4\""), 2u);
  EXPECT_EQ(count_elements(tradeoff, "circle", "fill=\"#1f77b4\""), 2u);
  EXPECT_THAT(tradeoff, AllOf(HasSubstr(">DiffQ (one point per penalty λ)</text>"),
                              HasSubstr(">DiffQ size budget (one per budget)</text>")));
  // Without budget runs: no table, no ring.
  runs.pop_back();
  EXPECT_THAT(fmnist::markdown_report(runs, kParams, {}, ""), Not(HasSubstr("Size budgets")));
}

TEST(FashionMnistReport, NonFiniteValues) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  EXPECT_TRUE(fmnist::svg::nice_ticks(nan, 1).empty());
  EXPECT_TRUE(fmnist::svg::nice_ticks(0, inf).empty());
  EXPECT_TRUE(fmnist::svg::nice_ticks(-inf, 0).empty());
  // Far from 0, k + 1 == k in double: no endless loop.
  EXPECT_TRUE(fmnist::svg::nice_ticks(1e19, 1e19 + 1e4).empty());
  EXPECT_EQ(fmnist::svg::num(nan), "0.0");
  auto runs = baseline_runs(/*with_fp32=*/true);
  runs[1].bits_per_layer = {{"conv2.weight", nan}, {"fc1.weight", 8}};
  runs[2].bits_per_layer = {{"conv2.weight", inf}, {"fc1.weight", 4}};
  for (double max_bits : {15.0, nan, inf}) {
    const auto svg = fmnist::svg_figure(runs, kParams, max_bits);
    EXPECT_THAT(svg, AllOf(Not(HasSubstr("nan")), Not(HasSubstr("inf")), HasSubstr(">8.00<"),
                           HasSubstr("</svg>")))
        << "max_bits " << max_bits;
  }
}

/// Runs `fashion_mnist <args>`'s parse; expects a fmnist::UsageError (exit status 2) whose message
/// contains every one of `parts`.
void expect_usage_error(std::vector<const char*> args, const std::vector<std::string>& parts) {
  args.insert(args.begin(), "fashion_mnist");
  try {
    fmnist::parse_args(static_cast<int>(args.size()), args.data());
    ADD_FAILURE() << "no usage error; expected one mentioning '" << parts.front() << "'";
  } catch (const fmnist::UsageError& e) {
    for (const auto& p : parts) EXPECT_THAT(std::string(e.what()), HasSubstr(p));
  }
}

fmnist::Config parse(std::vector<const char*> args) {
  args.insert(args.begin(), "fashion_mnist");
  return fmnist::parse_args(static_cast<int>(args.size()), args.data());
}

TEST(FashionMnistCli, PenaltyNamesMustBeDistinct) {
  expect_usage_error({"train", "--penalty", "1,1"},
                     {"--penalty", "1 and 1", "'fashion_mnist_diffq_l1.dq'"});
  expect_usage_error({"train", "--penalty", "0.5,0.1,0.10000001"},
                     {"--penalty", "0.1 and 0.10000001", "'fashion_mnist_diffq_l0.1.dq'"});
  expect_usage_error({"train", "--penalty", "1e-5,0.00001"}, {"1e-5 and 0.00001"});
  expect_usage_error({"train", "--penalty", "0,-0"}, {"0 and -0"});
  const auto c = parse({"train", "--penalty", "0.1,0.2,1e-05"});
  EXPECT_EQ(c.penalties, (std::vector<double>{0.1, 0.2, 1e-5}));
  EXPECT_EQ(fmnist::diffq_checkpoint_name(1e-5), "fashion_mnist_diffq_l1e-05.dq");
  // Distinct uniform bit widths likewise (each names a checkpoint).
  expect_usage_error({"train", "--uniform-bits", "4,8,4"}, {"--uniform-bits", "4 twice"});
  // Not checked when DiffQ does not run.
  EXPECT_EQ(parse({"train", "--method", "fp32", "--penalty", "1,1"}).penalties.size(), 2u);
}

TEST(FashionMnistCli, SizeBudgetFlags) {
  const auto c = parse({"train", "--penalty", "none", "--target-size-mb", "0.115,0.25",
                        "--budget-lr", "0.3", "--budget-measure-every", "4"});
  EXPECT_TRUE(c.penalties.empty());
  EXPECT_EQ(c.target_sizes_mb, (std::vector<double>{0.115, 0.25}));
  EXPECT_EQ(c.budget_lr, 0.3);
  EXPECT_EQ(c.budget_measure_every, 4);
  // Defaults: no budget, the library's rate and measurement interval.
  const auto d = parse({"train"});
  EXPECT_TRUE(d.target_sizes_mb.empty());
  EXPECT_EQ(d.budget_lr, 0.5);
  EXPECT_EQ(d.budget_measure_every, 10);
  EXPECT_EQ(fmnist::diffq_budget_checkpoint_name(0.13), "fashion_mnist_diffq_budget0.13.dq");
  expect_usage_error({"train", "--target-size-mb", "0.1,-1"},
                     {"--target-size-mb values must be finite and > 0, got -1"});
  expect_usage_error({"train", "--target-size-mb", "0"},
                     {"--target-size-mb values must be finite and > 0, got 0"});
  expect_usage_error({"train", "--target-size-mb", "nan"}, {"expects a number, got 'nan'"});
  expect_usage_error({"train", "--target-size-mb", "0.13,0.130000001"},
                     {"--target-size-mb lists 0.13 twice", "'fashion_mnist_diffq_budget0.13.dq'"});
  expect_usage_error({"train", "--budget-lr", "0"}, {"--budget-lr must be finite and > 0, got 0"});
  expect_usage_error({"train", "--budget-measure-every", "0"}, {"--budget-measure-every"});
  expect_usage_error({"eval", "--target-size-mb", "0.1"}, {"--target-size-mb"});
  expect_usage_error({"train", "--penalty", "none"},
                     {"--penalty none without --target-size-mb leaves DiffQ nothing to run"});
  EXPECT_TRUE(parse({"train", "--method", "fp32", "--penalty", "none"}).penalties.empty());
}

TEST(FashionMnistCli, ThreadsBound) {
  expect_usage_error({"train", "--threads", "4294967297"},
                     {"--threads", "in [1, 1024]", "got 4294967297"});
  expect_usage_error({"eval", "--checkpoint", "x", "--threads", "0"}, {"--threads", "got 0"});
  expect_usage_error({"train", "--threads=1025"}, {"--threads", "got 1025"});
  expect_usage_error({"train", "--threads", "99999999999999999999"},
                     {"--threads", "in [1, 1024]", "99999999999999999999"});
  expect_usage_error({"train", "--threads", "2x"}, {"--threads expects an integer, got '2x'"});
  EXPECT_EQ(parse({"train", "--threads", "1024"}).threads, 1024);
  // The other integer flags report overflow as out of range, naming the flag.
  expect_usage_error({"train", "--epochs", "99999999999999999999"},
                     {"--epochs expects an integer >= 1, got 99999999999999999999"});
}

TEST(FashionMnistCli, DataParallelFlags) {
  const auto one = parse({"train"});
  EXPECT_EQ(one.world_size, 1);
  EXPECT_EQ(one.rank, -1);
  EXPECT_EQ(one.threads, 2);
  // Local launch: the threads are shared among the ranks unless given; the port is picked later.
  const auto two = parse({"train", "--world-size", "2"});
  EXPECT_EQ(two.world_size, 2);
  EXPECT_EQ(two.threads, 1);
  EXPECT_EQ(two.master_port, 0);
  EXPECT_EQ(parse({"train", "--world-size", "2", "--threads", "2"}).threads, 2);
  // One rank of a run across machines: the default port is torchrun's.
  const auto r1 = parse({"train", "--world-size", "4", "--rank", "3", "--master-addr", "10.0.0.1"});
  EXPECT_EQ(r1.rank, 3);
  EXPECT_EQ(r1.master_addr, "10.0.0.1");
  EXPECT_EQ(r1.master_port, 29500);
  EXPECT_EQ(parse({"train", "--world-size=2", "--rank=1", "--master-port=1234"}).master_port, 1234);
  expect_usage_error({"train", "--world-size", "0"}, {"--world-size", "in [1, 64]", "got 0"});
  expect_usage_error({"train", "--world-size", "65"}, {"--world-size", "got 65"});
  expect_usage_error({"train", "--world-size", "2", "--rank", "2"},
                     {"--rank must be < --world-size (2), got 2"});
  expect_usage_error({"train", "--rank", "-1"}, {"--rank"});
  expect_usage_error({"train", "--master-port", "65536"}, {"--master-port", "got 65536"});
  expect_usage_error({"train", "--master-addr", ""}, {"--master-addr expects an address"});
  expect_usage_error({"eval", "--checkpoint", "x", "--world-size", "2"},
                     {"--world-size is a train option"});
}

TEST(FashionMnistCli, NoFp32WithUniform) {
  // The default methods include uniform, which quantizes the trained fp32 model.
  expect_usage_error({"train", "--no-fp32"},
                     {"--no-fp32", "uniform", "default methods", "fp32 model", "--method"});
  expect_usage_error({"train", "--method", "diffq,uniform", "--no-fp32"},
                     {"--no-fp32", "listed in --method"});
  expect_usage_error({"train", "--method", "fp32,diffq", "--no-fp32"}, {"--no-fp32", "fp32"});
  for (const auto& args : {std::vector<const char*>{"train", "--method", "diffq", "--no-fp32"},
                           std::vector<const char*>{"train", "--no-fp32", "--method", "diffq"}}) {
    const auto c = parse(args);
    EXPECT_FALSE(c.fp32);
    EXPECT_FALSE(c.uniform);
    EXPECT_TRUE(c.diffq);
  }
}

TEST(FashionMnistCli, OnlySelectedMethodsOptionsAreChecked) {
  const auto c = parse({"train", "--method", "fp32", "--init-bits", "20", "--lsq-bits", "1",
                        "--uniform-bits", "99", "--bits-lr", "0"});
  EXPECT_TRUE(c.fp32);
  EXPECT_FALSE(c.diffq);
  expect_usage_error({"train", "--init-bits", "20"},
                     {"--init-bits, --max-bits (method diffq)",
                      "init_bits must be < max_bits, got init_bits=20 and max_bits=15"});
  expect_usage_error({"train", "--method", "diffq", "--min-bits", "0"},
                     {"--min-bits (method diffq)", "got 0"});
  expect_usage_error({"train", "--method", "lsq", "--lsq-bits", "1"},
                     {"--lsq-bits (method lsq)", "got 1"});
  expect_usage_error({"train", "--method", "qat", "--qat-bits", "16"},
                     {"--qat-bits (method qat)", "got 16"});
  expect_usage_error({"train", "--method", "uniform", "--uniform-bits", "8,4294967297"},
                     {"--uniform-bits (method uniform)", "got 4294967297"});
  expect_usage_error({"train", "--method", "qat", "--min-size-mb", "-1"},
                     {"--min-size-mb (method qat)", "got -1"});
}

TEST(FashionMnistCli, EvalOutputParse) {
  // The checkpoint path may hold "correct=" and even newlines: only the last line counts.
  const auto a = fmnist::parse_eval_output(
      "checkpoint=/tmp/correct=1 total=2/fashion_mnist_fp32.pt format=fp32\n"
      "correct=8123 total=10000 accuracy=81.23%\n");
  EXPECT_EQ(a.correct, 8123);
  EXPECT_EQ(a.total, 10000);
  const auto b = fmnist::parse_eval_output(
      "checkpoint=/tmp/x\ncorrect=1 total=2 accuracy=50.00%\n/y.dq format=diffq\n"
      "correct=7 total=10 accuracy=70.00%\n");
  EXPECT_EQ(b.correct, 7);
  EXPECT_EQ(b.total, 10);
  // Not the last line, or not exactly the expected form.
  for (const char* bad :
       {"correct=7 total=10 accuracy=70.00%\nsomething else\n",
        "checkpoint=/tmp/correct=1 total=2 format=fp32\n", "correct=11 total=10 accuracy=110.00%\n",
        "correct=7 total=10 accuracy=70.00% extra\n", ""}) {
    expect_error([&] { fmnist::parse_eval_output(bad); },
                 {"expected the last line of the eval process's output to be 'correct=N total=M "
                  "accuracy=A%'"});
  }
}

TEST_F(FashionMnistIdx, OutDirectoryIsProbed) {
  // Created when missing, and left empty (the probe file is removed).
  const fs::path out = dir_ / "a" / "b";
  fmnist::prepare_out_dir(out.string());
  EXPECT_TRUE(fs::is_directory(out));
  EXPECT_TRUE(fs::is_empty(out));
  // A regular file in the way.
  const auto file = write_raw("file", {1});
  expect_error([&] { fmnist::prepare_out_dir(file); },
               {"--out", "'" + file + "'", "not a directory"});
  expect_error([&] { fmnist::prepare_out_dir(file + "/sub"); },
               {"cannot create the --out directory '" + file + "/sub'"});
  // An existing directory where no file can be created (root included): /proc.
  if (fs::is_directory("/proc")) {
    expect_error([&] { fmnist::prepare_out_dir("/proc"); },
                 {"the --out directory '/proc' is not writable: cannot create "
                  "'/proc/.fashion_mnist_write_probe_"});
  }
}

}  // namespace
