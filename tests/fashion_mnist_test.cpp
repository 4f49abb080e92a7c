// Tests of the Fashion-MNIST example's IDX reader (examples/fashion_mnist/idx.h) and report.
#include "../examples/fashion_mnist/idx.h"
#include "../examples/fashion_mnist/report.h"
#include "test_util.h"

#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;

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

  /// Writes `bytes` gzip-compressed to `<dir>/<name>` and returns the path.
  std::string write_gz(const std::string& name, const std::vector<uint8_t>& bytes) {
    const std::string path = (dir_ / name).string();
    gzFile f = gzopen(path.c_str(), "wb");
    EXPECT_NE(f, nullptr);
    if (!bytes.empty()) {
      EXPECT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())),
                static_cast<int>(bytes.size()));
    }
    EXPECT_EQ(gzclose(f), Z_OK);
    return path;
  }

  /// Writes raw bytes (no compression).
  std::string write_raw(const std::string& name, const std::vector<uint8_t>& bytes) {
    const std::string path = (dir_ / name).string();
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
    return path;
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

}  // namespace
