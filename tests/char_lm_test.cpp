// Tests of the character-level LM example's corpus reader and split (examples/char_lm/corpus.h)
// and of its models' causality (examples/char_lm/model.h).
#include "../examples/char_lm/corpus.h"
#include "../examples/char_lm/model.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>
#include <zlib.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

/// A fresh directory under the temporary directory, removed at the end of the test.
struct TempDir {
  TempDir() {
    path = fs::temp_directory_path() /
           ("char_lm_test_" + std::to_string(getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name, const std::string& bytes) const {
    const std::string p = (path / name).string();
    std::ofstream(p, std::ios::binary) << bytes;
    return p;
  }
  fs::path path;
};

template <typename F>
std::string corpus_error(F f) {
  try {
    f();
  } catch (const char_lm::CorpusError& e) {
    return e.what();
  }
  ADD_FAILURE() << "no CorpusError";
  return "";
}

TEST(CharLMCorpus, FortuneEntriesSplitAtPercentLinesOnly) {
  // A '%' inside a line, a line "%%" and a missing final separator are text, not separators.
  const std::string text = "one\n100% sure\n%\n%%\ntwo\n%\n%\nthree";
  const auto e = char_lm::fortune_entries(text);
  ASSERT_EQ(e.size(), 3u);
  EXPECT_EQ(e[0], "one\n100% sure\n");
  EXPECT_EQ(e[1], "%%\ntwo\n");
  EXPECT_EQ(e[2], "three");
  // CRLF files: "%\r" separates too, and the entry keeps its '\r' bytes.
  const auto crlf = char_lm::fortune_entries("a\r\n%\r\nb\r\n");
  ASSERT_EQ(crlf.size(), 2u);
  EXPECT_EQ(crlf[0], "a\r\n");
  EXPECT_EQ(crlf[1], "b\r\n");
}

TEST(CharLMCorpus, FortunesDirectoryKeepsBytesExactly) {
  TempDir d;
  // Every byte value but '\n' and '%' in an entry (UTF-8, NUL, 0xFF): kept as is.
  std::string odd;
  for (int b = 0; b < 256; ++b) {
    if (b != '\n' && b != '%') odd.push_back(static_cast<char>(b));
  }
  d.file("b", "second\n%\n");
  d.file("a", odd + "\n%\nx\xc3\xa9y\n%\n");
  d.file("a.dat", "index bytes, skipped");
  fs::create_symlink(d.path / "a", d.path / "a.u8");  // a link: skipped, else read twice
  const std::string corpus = char_lm::read_fortunes(d.path.string());
  const std::string sep(1, char_lm::kEntrySeparator);
  EXPECT_EQ(corpus, odd + "\n" + sep + "x\xc3\xa9y\n" + sep + "second\n");
}

TEST(CharLMCorpus, MissingAndEmptyCorporaNameThePathAndPackage) {
  TempDir d;
  EXPECT_THAT(corpus_error([&] { char_lm::read_fortunes((d.path / "none").string()); }),
              HasSubstr("install Debian's package `fortunes`"));
  EXPECT_THAT(corpus_error([&] { char_lm::read_fortunes(d.path.string()); }),
              HasSubstr("no fortune files in '" + d.path.string() + "'"));
  d.file("empty", "%\n%\n");
  EXPECT_THAT(corpus_error([&] { char_lm::read_fortunes(d.path.string()); }),
              HasSubstr("hold no text"));
  const std::string missing = (d.path / "missing.txt").string();
  EXPECT_THAT(corpus_error([&] { char_lm::read_corpus("fortunes", {missing}); }),
              HasSubstr("corpus file '" + missing + "' does not exist"));
  const std::string empty = d.file("empty.txt", "");
  EXPECT_THAT(corpus_error([&] { char_lm::read_corpus("fortunes", {empty}); }),
              HasSubstr("hold no bytes (first: '" + empty + "')"));
  EXPECT_THAT(corpus_error([&] { char_lm::read_file_bytes(d.path.string()); }),
              HasSubstr("is not a regular file"));
  EXPECT_THAT(corpus_error([&] { char_lm::read_corpus("wiki", {}); }),
              HasSubstr("unknown corpus 'wiki' (expected fortunes or gcide)"));
}

TEST(CharLMCorpus, DataFilesConcatenateAndGzipDecompresses) {
  TempDir d;
  const std::string plain = d.file("a.txt", std::string("ab\0c", 4));
  const std::string gz = (d.path / "b.dz").string();
  gzFile f = gzopen(gz.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  const std::string payload(100000, 'z');
  ASSERT_EQ(gzwrite(f, payload.data(), static_cast<unsigned>(payload.size())),
            static_cast<int>(payload.size()));
  gzclose(f);
  EXPECT_EQ(char_lm::read_corpus("fortunes", {plain, gz}), std::string("ab\0c", 4) + payload);
  // A corrupt compressed file is an error, not silent garbage.
  const std::string bad = d.file("c.gz", std::string("\x1f\x8b\x08\x00garbage-garbage", 19));
  EXPECT_THAT(corpus_error([&] { char_lm::read_file_bytes(bad); }), HasSubstr("cannot decompress"));
}

TEST(CharLMSplit, BoundariesByPosition) {
  const auto s = char_lm::split_bounds(1000, 10);
  EXPECT_EQ(s.train_end, 900);
  EXPECT_EQ(s.valid_end, 950);
  EXPECT_EQ(s.size, 1000);
  // floor(size·0.9) and floor(size·0.95).
  const auto t = char_lm::split_bounds(2561458, 129);
  EXPECT_EQ(t.train_end, 2305312);
  EXPECT_EQ(t.valid_end, 2433385);
  // Large sizes: no overflow.
  const int64_t big = int64_t{1} << 50;
  EXPECT_EQ(char_lm::split_bounds(big, 1).train_end, big / 10 * 9 + big % 10 * 9 / 10);
  EXPECT_THAT(corpus_error([] { char_lm::split_bounds(1000, 51); }),
              HasSubstr("gives a validation part of 50 bytes, fewer than the 51"));
  EXPECT_THAT(corpus_error([] { char_lm::split_bounds(10, 2); }),
              HasSubstr("gives a validation part of 0 bytes"));
}

/// The logits at positions <= p do not change when the token at p + 1 changes (any later token).
void expect_causal(char_lm::CharLM& model, int64_t t) {
  model->eval();
  torch::NoGradGuard no_grad;
  auto tokens = torch::randint(0, char_lm::kVocab, {2, t}, torch::kLong);
  const auto base = model->forward(tokens);
  ASSERT_EQ(base.sizes(), (std::vector<int64_t>{2, t, char_lm::kVocab}));
  for (int64_t p : {int64_t{0}, t / 2, t - 2}) {
    auto changed = tokens.clone();
    changed.narrow(1, p + 1, 1).add_(1).remainder_(char_lm::kVocab);
    const auto out = model->forward(changed);
    EXPECT_TRUE(torch::equal(out.narrow(1, 0, p + 1), base.narrow(1, 0, p + 1))) << "p=" << p;
    // The changed position itself does see its token (the test can fail).
    EXPECT_FALSE(torch::allclose(out.narrow(1, p + 1, 1), base.narrow(1, p + 1, 1))) << "p=" << p;
  }
}

TEST(CharLMModel, TransformerIsCausal) {
  torch::manual_seed(0);
  char_lm::CharLM model(char_lm::ModelOptions().layers(2).d_model(32).heads(4).ffn(64).context(16));
  expect_causal(model, 16);
}

TEST(CharLMModel, LstmIsCausal) {
  torch::manual_seed(0);
  char_lm::CharLM model(char_lm::ModelOptions().arch("lstm").layers(2).d_model(16).context(16));
  expect_causal(model, 12);
}

TEST(CharLMModel, CausalMaskAndTiedProjection) {
  const auto m = char_lm::causal_mask(3);
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(
      torch::equal(m, torch::tensor({{0.f, -inf, -inf}, {0.f, 0.f, -inf}, {0.f, 0.f, 0.f}})));
  torch::manual_seed(0);
  char_lm::CharLM model(char_lm::ModelOptions().layers(1).d_model(8).heads(2).ffn(8).context(4));
  // The output projection is the token embedding: no other [256, d] parameter.
  for (const auto& p : model->named_parameters()) {
    if (p.key() != "tok.weight") EXPECT_NE(p.value().size(0), char_lm::kVocab) << p.key();
  }
  torch::NoGradGuard no_grad;
  auto tokens = torch::tensor({{1, 2, 3}}, torch::kLong);
  model->eval();
  // logits = ln_f(h)·tokᵀ: a change of the embedding row of a token absent from the input moves
  // that token's logit column only.
  const auto before = model->forward(tokens);
  model->tok->weight[7].add_(1.0);
  const auto after = model->forward(tokens);
  // Token 7 is not in the input: only logit column 7 moves, by ln_f(h)·1.
  auto diff = after - before;
  EXPECT_TRUE(torch::allclose(diff.narrow(2, 0, 7), torch::zeros({1, 3, 7}), 0, 0));
  EXPECT_GT(diff.narrow(2, 7, 1).abs().max().item<float>(), 0);
  EXPECT_THAT(
      [] {
        try {
          char_lm::CharLM(char_lm::ModelOptions().d_model(10).heads(4));
        } catch (const c10::Error& e) {
          return std::string(e.what());
        }
        return std::string();
      }(),
      HasSubstr("d_model must be a multiple of heads, got d_model=10 and heads=4"));
}

}  // namespace
