// Tests of the checkpoint inspector (examples/dq_inspect/inspect.h) on checkpoints of every method
// (diffq, uniform, qat, lsq) and on the version-1 file of tests/data: the method, options, user
// entries and, per tensor, the bit-width histogram computed here from the quantizer's own bit
// widths; the JSON output parsed by an independent validator; the exit statuses.
#include "../examples/dq_inspect/inspect.h"

#include <diffq/diffq.h>

#include "test_models.h"

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cctype>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;

struct Result {
  int status;
  std::string out, err;
};

Result inspect(const std::vector<std::string>& args) {
  std::ostringstream out, err;
  const int status = dq_inspect::run(args, out, err);
  return {status, out.str(), err.str()};
}

/// A minimal JSON validator (RFC 8259 grammar; no semantic checks): true if `s` is one value.
struct Json {
  const std::string& s;
  size_t i = 0;
  void ws() {
    while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
  }
  bool lit(const char* w) {
    const size_t n = std::char_traits<char>::length(w);
    if (s.compare(i, n, w) != 0) return false;
    i += n;
    return true;
  }
  bool string() {
    if (i >= s.size() || s[i] != '"') return false;
    for (++i; i < s.size(); ++i) {
      const auto c = static_cast<unsigned char>(s[i]);
      if (c == '"') return ++i, true;
      if (c < 0x20) return false;
      if (c == '\\') {
        ++i;
        if (i >= s.size()) return false;
        if (s[i] == 'u') {
          for (int k = 0; k < 4; ++k) {
            if (++i >= s.size() || !std::isxdigit(static_cast<unsigned char>(s[i]))) return false;
          }
        } else if (std::string("\"\\/bfnrt").find(s[i]) == std::string::npos) {
          return false;
        }
      }
    }
    return false;
  }
  bool number() {
    const size_t start = i;
    if (i < s.size() && s[i] == '-') ++i;
    while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.' ||
                            s[i] == 'e' || s[i] == 'E' || s[i] == '+' || s[i] == '-')) {
      ++i;
    }
    return i > start && std::isdigit(static_cast<unsigned char>(s[i - 1]));
  }
  bool value() {
    ws();
    if (i >= s.size()) return false;
    bool ok;
    if (s[i] == '{') {
      ++i;
      ws();
      ok = true;
      if (i < s.size() && s[i] == '}') {
        ++i;
      } else {
        for (;;) {
          ws();
          if (!string()) return false;
          ws();
          if (i >= s.size() || s[i++] != ':') return false;
          if (!value()) return false;
          ws();
          if (i < s.size() && s[i] == ',') {
            ++i;
            continue;
          }
          if (i < s.size() && s[i] == '}') {
            ++i;
            break;
          }
          return false;
        }
      }
    } else if (s[i] == '[') {
      ++i;
      ws();
      ok = true;
      if (i < s.size() && s[i] == ']') {
        ++i;
      } else {
        for (;;) {
          if (!value()) return false;
          ws();
          if (i < s.size() && s[i] == ',') {
            ++i;
            continue;
          }
          if (i < s.size() && s[i] == ']') {
            ++i;
            break;
          }
          return false;
        }
      }
    } else if (s[i] == '"') {
      ok = string();
    } else if (lit("true") || lit("false") || lit("null")) {
      ok = true;
    } else {
      ok = number();
    }
    ws();
    return ok;
  }
  static bool valid(const std::string& text) {
    Json j{text};
    return j.value() && j.i == text.size();
  }
};

TEST(DqInspect, JsonValidatorRejectsBrokenJson) {
  EXPECT_TRUE(Json::valid("{\"a\": [1, -2.5e3, \"x\\u0001\"], \"b\": {}}\n"));
  for (const char* bad : {"{\"a\" 1}", "[1,]", "{\"a\": \"\x01\"}", "[1] 2", "{'a': 1}", ""}) {
    EXPECT_FALSE(Json::valid(bad)) << bad;
  }
}

/// `"3:12 4:40"` from the bit widths of each quantized tensor of the quantizer's own state.
std::vector<std::pair<std::string, std::string>> expected_histograms(
    const diffq::QuantizedState& state) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& q : state.quantized) {
    const auto counts = torch::bincount(q.bits.to(torch::kLong), {}, 16);
    std::string h;
    for (int b = 1; b < 16; ++b) {
      const int64_t c = counts[b].item<int64_t>();
      if (c) h += (h.empty() ? "" : " ") + std::to_string(b) + ":" + std::to_string(c);
    }
    out.emplace_back(q.name, h);
  }
  return out;
}

template <class Quantizer>
void check_inspection(const Quantizer& q, const std::string& method,
                      const std::vector<std::string>& option_lines) {
  const fs::path path = fs::temp_directory_path() /
                        ("dq_inspect_test_" + std::to_string(getpid()) + "_" + method + ".dqc");
  diffq::save_quantized(q, path.string(), false, {{"model", "mlp \"10-6-3\""}});
  const auto state = q.quantized_state();
  const Result text = inspect({path.string()});
  ASSERT_EQ(text.status, 0) << text.err;
  EXPECT_NE(text.out.find("format version 2"), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("method: " + method + "\n"), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("library version: " DIFFQ_VERSION_STRING "\n"), std::string::npos);
  EXPECT_NE(text.out.find("  model = mlp \"10-6-3\"\n"), std::string::npos) << text.out;
  for (const auto& line : option_lines) {
    EXPECT_NE(text.out.find("  " + line + "\n"), std::string::npos) << line << "\n" << text.out;
  }
  const auto histograms = expected_histograms(state);
  ASSERT_FALSE(histograms.empty());
  for (const auto& h : histograms) {
    EXPECT_NE(text.out.find("  " + h.first + " | quantized | "), std::string::npos) << h.first;
    EXPECT_NE(text.out.find(" | " + h.second + " | "), std::string::npos)
        << h.first << ": " << h.second << "\n"
        << text.out;
  }
  for (const auto& f : state.floats) {
    EXPECT_NE(text.out.find("  " + f.name + " | " + (f.is_buffer ? "buffer" : "float") + " | "),
              std::string::npos)
        << f.name;
  }
  // The records and the header add up to the file.
  const size_t at = text.out.find("records: ");
  ASSERT_NE(at, std::string::npos);
  int64_t records = 0, header = 0;
  ASSERT_EQ(std::sscanf(text.out.c_str() + at, "records: %ld bytes; header: %ld bytes", &records,
                        &header),
            2);
  EXPECT_EQ(records + header, static_cast<int64_t>(fs::file_size(path)));
  EXPECT_GT(header, 60);
  const Result json = inspect({"--json", path.string()});
  ASSERT_EQ(json.status, 0) << json.err;
  EXPECT_TRUE(Json::valid(json.out)) << json.out;
  EXPECT_NE(json.out.find("\"method\": \"" + method + "\""), std::string::npos) << json.out;
  EXPECT_NE(json.out.find("\"user_metadata\": {\"model\": \"mlp \\\"10-6-3\\\"\"}"),
            std::string::npos)
      << json.out;
  for (const auto& h : histograms) {
    std::string want = "{";
    std::istringstream parts(h.second);
    std::string part;
    while (parts >> part) {
      const size_t colon = part.find(':');
      want += (want.size() > 1 ? ", \"" : "\"") + part.substr(0, colon) +
              "\": " + part.substr(colon + 1);
    }
    want += "}";
    EXPECT_NE(json.out.find("\"bits_histogram\": " + want), std::string::npos)
        << h.first << " " << want << "\n"
        << json.out;
  }
  fs::remove(path);
}

TEST(DqInspect, DiffQCheckpoint) {
  torch::manual_seed(1);
  diffq_test::MLP m;
  diffq::DiffQuantizer<diffq_test::MLP> q(m, diffq::DiffQOptions().group_size(4).min_size_mb(0));
  {
    torch::NoGradGuard ng;  // several bit widths
    for (auto& p : m->named_parameters()) {
      if (p.key().find("_diffq") != std::string::npos) p.value().uniform_(-4, 4);
    }
  }
  check_inspection(q, "diffq", {"group_size = 4", "min_size_mb = 0", "noise = gaussian"});
}

TEST(DqInspect, UniformAndQatCheckpoints) {
  torch::manual_seed(2);
  diffq_test::MLP m;
  diffq::UniformQuantizer<diffq_test::MLP> ptq(m, diffq::UniformOptions().bits(3).min_size_mb(0));
  check_inspection(ptq, "uniform", {"bits = 3", "qat = false"});
  diffq_test::MLP m2;
  diffq::UniformQuantizer<diffq_test::MLP> qat(
      m2, diffq::UniformOptions().bits(6).qat(true).min_size_mb(0).float16(true));
  check_inspection(qat, "qat", {"bits = 6", "qat = true", "float16 = true"});
}

TEST(DqInspect, LsqCheckpoint) {
  torch::manual_seed(3);
  diffq_test::MLP m;
  diffq::LSQQuantizer<diffq_test::MLP> q(
      m, diffq::LSQOptions().bits(5).min_size_mb(0).exclude({"fc2.*"}));
  check_inspection(q, "lsq", {"bits = 5", "exclude.0 = fc2.*", "suffix = _lsq"});
}

TEST(DqInspect, Version1File) {
  const Result r = inspect({std::string(DIFFQ_TEST_DATA_DIR) + "/v1_diffq.dqc"});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("format version 1)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("method: diffq\n"), std::string::npos);
  EXPECT_NE(r.out.find("library version: (not recorded)\n"), std::string::npos);
  EXPECT_NE(r.out.find("  exclude.0 = head.bias\n"), std::string::npos);
  EXPECT_NE(r.out.find("  out.weight | alias | -> emb.weight | "), std::string::npos) << r.out;
  const Result json = inspect({"--json", std::string(DIFFQ_TEST_DATA_DIR) + "/v1_diffq.dqc"});
  EXPECT_TRUE(Json::valid(json.out)) << json.out;
  EXPECT_NE(json.out.find("\"target\": \"emb.weight\""), std::string::npos);
}

TEST(DqInspect, ExitStatusesAndErrors) {
  Result r = inspect({});
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.err.find("dq_inspect: expected a checkpoint file"), std::string::npos);
  r = inspect({"--yaml", "x"});
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.err.find("dq_inspect: unknown option '--yaml'"), std::string::npos);
  r = inspect({"a", "b"});
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.err.find("expected one checkpoint, got a second: 'b'"), std::string::npos);
  r = inspect({"--help"});
  EXPECT_EQ(r.status, 0);
  EXPECT_NE(r.out.find("usage: dq_inspect"), std::string::npos);
  r = inspect({"/nonexistent/m.dqc"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("dq_inspect: diffq::read_checkpoint_info: /nonexistent/m.dqc: cannot open"),
            std::string::npos)
      << r.err;
  // A corrupt file: the reader's message, with the byte offset.
  const fs::path path =
      fs::temp_directory_path() / ("dq_inspect_test_" + std::to_string(getpid()) + "_bad.dqc");
  {
    std::ofstream f(path, std::ios::binary);
    f << "DIFFQCKP garbage";
  }
  r = inspect({path.string()});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("at byte 8: unsupported format version"), std::string::npos) << r.err;
  fs::remove(path);
}

}  // namespace
