// Character-level language model with DiffQ: trains a small decoder-only Transformer (or a 2-layer
// LSTM) on a byte corpus in fp32, with DiffQ for each penalty λ (or size budget), and the
// baselines (uniform PTQ of the fp32 model, QAT with the straight-through estimator, LSQ); writes
// the checkpoints, reloads each in a new process into a model without quantizer, checks that the
// test bits per character are exactly the same, and writes report.md and char_lm.svg.
//
//   char_lm train [--corpus fortunes|gcide | --data FILE...] [--method ...] [--penalty 1,5] ...
//   char_lm eval --checkpoint FILE [model and corpus flags as for train]
//   char_lm help

#include "../common/child_process.h"
#include "../common/progress.h"
#include "corpus.h"
#include "model.h"

#include <diffq/checkpoint.h>
#include <diffq/diffq.h>
#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace char_lm {
namespace {

using diffq_examples::ProgressBar;

constexpr double kMB = 1048576.0;
constexpr int kExitUsage = 2;
constexpr int kExitMismatch = 3;
constexpr int64_t kEvalBatch = 32;

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Config {
  std::string command;
  std::string corpus = "fortunes";
  std::vector<std::string> data;  ///< --data FILE...: replaces the corpus
  int64_t limit = -1;             ///< use the first N bytes of the corpus only
  std::string out = "out_char_lm";
  ModelOptions model;
  int64_t batch = kDefaultBatch;
  int64_t steps = 300;
  double lr = 5e-3;
  uint64_t seed = 42;
  int threads = 2;
  bool fp32 = true, diffq = true, uniform = true, qat = true, lsq = true;
  std::vector<double> penalties = {2.0};
  std::vector<double> target_sizes_mb;
  int64_t group_size = 16;
  double min_size_mb = 0.01;
  double bits_lr = 3e-2;
  std::vector<int64_t> uniform_bits = {8, 4};
  int64_t qat_bits = 4;
  int64_t lsq_bits = 4;
  /// Adam's lr of LSQ's step sizes: they are about 0.01 here, and at the weights' lr one step
  /// can take them below zero.
  double lsq_lr = 1e-4;
  std::string checkpoint;
  std::string format = "auto";
};

constexpr const char* kUsage = R"(usage:
  char_lm train [options]         train fp32, DiffQ and the baselines, check reloads, report
  char_lm eval --checkpoint FILE  test bits per character of a checkpoint (model flags as train)
  char_lm help

corpus (bytes, vocabulary 256; split by position 90/5/5 into train/validation/test):
  --corpus fortunes|gcide   Debian's fortunes (/usr/share/games/fortunes) or dict-gcide
                            (/usr/share/dictd/gcide.dict.dz) [fortunes]
  --data FILE...            these files instead (concatenated; .gz/.dz decompressed)
  --limit N                 use the first N bytes of the corpus only (smoke runs)
model:
  --arch transformer|lstm [transformer]   --layers N [2]   --d-model N [128]
  --heads N [4]   --ffn N [512]   --context N [128]
training (every method alike; Adam, linear warm-up then cosine decay to lr/10):
  --steps N [300]   --batch N sequences [16]   --lr X [5e-3]   --seed N [42]
  --threads N [2]
methods:
  --method M1,M2,...   among fp32, diffq, uniform, qat, lsq [all]; uniform is post-training
                       quantization of the trained fp32 model
  --penalty L1,...     DiffQ penalties λ (loss = cross-entropy in nats + λ·model size in MB)
                       [2]; `none`: no λ run
  --target-size-mb X,. DiffQ size budgets (diffq::SizeBudget), one run each
  --group-size N [16]  --bits-lr X [3e-2]  --min-size-mb X [0.01]
  --uniform-bits B,... [8,4]   --qat-bits B [4]   --lsq-bits B [4]
  --lsq-lr X           Adam lr of LSQ's step sizes (about 0.01 here) [1e-4]
  --out DIR            checkpoints, report.md, char_lm.svg [out_char_lm]
eval:
  --checkpoint FILE  --format auto|fp32|diffq [auto]; prints `nll_sum=<hex float> tokens=N
  bpc=X` on the last line of stdout
)";

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), f, v);
  return buf;
}

std::vector<std::string> split_list(const std::string& flag, const std::string& v) {
  std::vector<std::string> out;
  std::stringstream ss(v);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) throw UsageError(flag + " expects a comma-separated list, got '" + v + "'");
    out.push_back(item);
  }
  if (out.empty() || v.back() == ',') {
    throw UsageError(flag + " expects a comma-separated list, got '" + v + "'");
  }
  return out;
}

double parse_double(const std::string& flag, const std::string& v, double min) {
  char* end = nullptr;
  errno = 0;
  const double d = std::strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0' || errno != 0 || !std::isfinite(d) || d < min) {
    throw UsageError(flag + " expects a number >= " + fmt("%g", min) + ", got '" + v + "'");
  }
  return d;
}

int64_t parse_int(const std::string& flag, const std::string& v, int64_t min, int64_t max) {
  char* end = nullptr;
  errno = 0;
  const long long n = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || errno != 0 || n < min || n > max) {
    throw UsageError(flag + " expects an integer in [" + std::to_string(min) + ", " +
                     std::to_string(max) + "], got '" + v + "'");
  }
  return n;
}

Config parse_args(int argc, char** argv) {
  Config c;
  if (argc < 2) throw UsageError("missing command (train, eval or help)");
  c.command = argv[1];
  if (c.command == "help" || c.command == "--help" || c.command == "-h") return c;
  if (c.command != "train" && c.command != "eval") {
    throw UsageError("unknown command '" + c.command + "' (expected train, eval or help)");
  }
  constexpr int64_t kBig = int64_t{1} << 40;
  for (int i = 2; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--data") {
      while (i + 1 < argc && std::strncmp(argv[i + 1], "--", 2) != 0) c.data.push_back(argv[++i]);
      if (c.data.empty()) throw UsageError("--data expects one or more files");
      continue;
    }
    if (i + 1 >= argc) throw UsageError(flag + " expects a value");
    const std::string v = argv[++i];
    if (flag == "--corpus") {
      if (v != "fortunes" && v != "gcide") {
        throw UsageError("--corpus expects fortunes or gcide, got '" + v + "'");
      }
      c.corpus = v;
    } else if (flag == "--limit") {
      c.limit = parse_int(flag, v, 1, kBig);
    } else if (flag == "--out") {
      c.out = v;
    } else if (flag == "--arch") {
      if (v != "transformer" && v != "lstm") {
        throw UsageError("--arch expects transformer or lstm, got '" + v + "'");
      }
      c.model.arch(v);
    } else if (flag == "--layers") {
      c.model.layers(parse_int(flag, v, 1, 64));
    } else if (flag == "--d-model") {
      c.model.d_model(parse_int(flag, v, 1, 8192));
    } else if (flag == "--heads") {
      c.model.heads(parse_int(flag, v, 1, 256));
    } else if (flag == "--ffn") {
      c.model.ffn(parse_int(flag, v, 1, 65536));
    } else if (flag == "--context") {
      c.model.context(parse_int(flag, v, 1, 1 << 16));
    } else if (flag == "--steps") {
      c.steps = parse_int(flag, v, 1, kBig);
    } else if (flag == "--batch") {
      c.batch = parse_int(flag, v, 1, 1 << 20);
    } else if (flag == "--lr") {
      c.lr = parse_double(flag, v, 0);
    } else if (flag == "--seed") {
      c.seed = static_cast<uint64_t>(parse_int(flag, v, 0, kBig));
    } else if (flag == "--threads") {
      c.threads = static_cast<int>(parse_int(flag, v, 1, 1024));
    } else if (flag == "--method") {
      c.fp32 = c.diffq = c.uniform = c.qat = c.lsq = false;
      for (const auto& m : split_list(flag, v)) {
        bool* f = m == "fp32"      ? &c.fp32
                  : m == "diffq"   ? &c.diffq
                  : m == "uniform" ? &c.uniform
                  : m == "qat"     ? &c.qat
                  : m == "lsq"     ? &c.lsq
                                   : nullptr;
        if (f == nullptr) {
          throw UsageError("--method expects fp32, diffq, uniform, qat or lsq, got '" + m + "'");
        }
        *f = true;
      }
    } else if (flag == "--penalty") {
      c.penalties.clear();
      if (v != "none") {
        for (const auto& p : split_list(flag, v)) c.penalties.push_back(parse_double(flag, p, 0));
      }
    } else if (flag == "--target-size-mb") {
      c.target_sizes_mb.clear();
      for (const auto& p : split_list(flag, v)) {
        c.target_sizes_mb.push_back(parse_double(flag, p, 1e-9));
      }
    } else if (flag == "--group-size") {
      c.group_size = parse_int(flag, v, 0, kBig);
    } else if (flag == "--bits-lr") {
      c.bits_lr = parse_double(flag, v, 0);
    } else if (flag == "--min-size-mb") {
      c.min_size_mb = parse_double(flag, v, 0);
    } else if (flag == "--uniform-bits") {
      c.uniform_bits.clear();
      for (const auto& b : split_list(flag, v)) c.uniform_bits.push_back(parse_int(flag, b, 1, 15));
    } else if (flag == "--qat-bits") {
      c.qat_bits = parse_int(flag, v, 1, 15);
    } else if (flag == "--lsq-lr") {
      c.lsq_lr = parse_double(flag, v, 0);
    } else if (flag == "--lsq-bits") {
      c.lsq_bits = parse_int(flag, v, 2, 15);
    } else if (flag == "--checkpoint") {
      c.checkpoint = v;
    } else if (flag == "--format") {
      if (v != "auto" && v != "fp32" && v != "diffq") {
        throw UsageError("--format expects auto, fp32 or diffq, got '" + v + "'");
      }
      c.format = v;
    } else {
      throw UsageError("unknown option '" + flag + "'");
    }
  }
  if (c.command == "eval" && c.checkpoint.empty()) throw UsageError("eval needs --checkpoint");
  if (c.command == "train" && c.diffq && c.penalties.empty() && c.target_sizes_mb.empty()) {
    throw UsageError(
        "--penalty none leaves DiffQ no run: give --target-size-mb, or leave diffq "
        "out of --method");
  }
  // The values name the checkpoints (printed with %g): two equal names would overwrite a file.
  for (const auto* list : {&c.penalties, &c.target_sizes_mb}) {
    for (size_t i = 0; i < list->size(); ++i) {
      for (size_t j = 0; j < i; ++j) {
        if (fmt("%g", (*list)[i]) == fmt("%g", (*list)[j])) {
          throw UsageError(std::string(list == &c.penalties ? "--penalty" : "--target-size-mb") +
                           " values must differ in their first 6 significant digits, got " +
                           fmt("%g", (*list)[i]) + " twice");
        }
      }
    }
  }
  if (c.model.arch() == "transformer" && c.model.d_model() % c.model.heads() != 0) {
    throw UsageError("--d-model (" + std::to_string(c.model.d_model()) +
                     ") must be a multiple of --heads (" + std::to_string(c.model.heads()) + ")");
  }
  return c;
}

// ---------------------------------------------------------------------------------------------
// Data

struct Data {
  torch::Tensor train, valid, test;  ///< uint8 [n] each
  int64_t corpus_bytes = 0;
  std::string source;
};

Data load_data(const Config& c) {
  std::string text = read_corpus(c.corpus, c.data);
  if (c.limit > 0 && static_cast<int64_t>(text.size()) > c.limit) text.resize(c.limit);
  const SplitBounds s = split_bounds(static_cast<int64_t>(text.size()), c.model.context() + 1);
  auto all =
      torch::from_blob(text.data(), {static_cast<int64_t>(text.size())}, torch::kUInt8).clone();
  Data d;
  d.train = all.narrow(0, 0, s.train_end);
  d.valid = all.narrow(0, s.train_end, s.valid_end - s.train_end);
  d.test = all.narrow(0, s.valid_end, s.size - s.valid_end);
  d.corpus_bytes = s.size;
  d.source = c.data.empty() ? c.corpus : c.data.front() + (c.data.size() > 1 ? ", ..." : "");
  return d;
}

/// Summed cross-entropy (nats, accumulated in double over batches of `kEvalBatch` windows) of
/// `forward` over the non-overlapping windows of `context + 1` bytes of `part`, each predicting
/// its last `context` bytes from the ones before. The module must be in eval mode.
struct NLL {
  double sum = 0;
  int64_t tokens = 0;
  double bpc() const { return tokens > 0 ? sum / tokens / std::log(2.0) : 0.0; }
};

using Forward = std::function<torch::Tensor(const torch::Tensor&)>;

NLL evaluate(const Forward& forward, const torch::Tensor& part, int64_t context) {
  torch::NoGradGuard no_grad;
  NLL r;
  const int64_t windows = (part.size(0) - 1) / context;
  auto offsets = torch::arange(context + 1, torch::kLong);
  for (int64_t w = 0; w < windows; w += kEvalBatch) {
    const int64_t n = std::min(kEvalBatch, windows - w);
    auto starts = torch::arange(w, w + n, torch::kLong).mul(context);
    auto seq = part.index_select(0, (starts.unsqueeze(1) + offsets).flatten())
                   .view({n, context + 1})
                   .to(torch::kLong);
    auto logits = forward(seq.narrow(1, 0, context));
    auto loss = torch::nn::functional::cross_entropy(
        logits.reshape({-1, kVocab}), seq.narrow(1, 1, context).reshape({-1}),
        torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
    r.sum += loss.item<double>();
    r.tokens += n * context;
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// Training

struct Method {
  std::string name;
  Forward forward;
  std::function<torch::Tensor()> penalty;  ///< added to the loss; may be null
  std::function<std::string()> status;     ///< extra progress text; may be null
  std::function<void()> after_step;        ///< e.g. the size budget's step; may be null
};

/// `c.steps` Adam steps on random windows of the training part (a generator of its own, seeded:
/// every method sees the same batches); the learning rate of every parameter group follows a
/// linear warm-up over the first 5 % of steps, then a cosine decay to a tenth. Gradients of
/// `clipped` (the model's own weights) are clipped to norm 1. Returns the training seconds.
double train(const Config& c, torch::nn::Module& model, torch::optim::Adam& optimizer,
             const std::vector<torch::Tensor>& clipped, const Method& m,
             const torch::Tensor& data) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(c.seed);
  const int64_t t = c.model.context();
  const int64_t max_start = data.size(0) - t - 1;
  auto offsets = torch::arange(t + 1, torch::kLong);
  std::vector<double> base_lr;
  for (auto& g : optimizer.param_groups()) {
    base_lr.push_back(static_cast<torch::optim::AdamOptions&>(g.options()).lr());
  }
  const int64_t warmup = std::max<int64_t>(1, c.steps / 20);
  model.train();
  ProgressBar bar(m.name, c.steps);
  double loss_avg = 0;
  for (int64_t step = 0; step < c.steps; ++step) {
    const double scale = step < warmup
                             ? static_cast<double>(step + 1) / warmup
                             : 0.1 + 0.45 * (1 + std::cos(M_PI * (step - warmup) /
                                                          std::max<int64_t>(1, c.steps - warmup)));
    for (size_t i = 0; i < base_lr.size(); ++i) {
      static_cast<torch::optim::AdamOptions&>(optimizer.param_groups()[i].options())
          .lr(base_lr[i] * scale);
    }
    auto starts = torch::randint(0, max_start + 1, {c.batch}, gen, torch::kLong);
    auto seq = data.index_select(0, (starts.unsqueeze(1) + offsets).flatten())
                   .view({c.batch, t + 1})
                   .to(torch::kLong);
    auto logits = m.forward(seq.narrow(1, 0, t));
    auto ce = torch::nn::functional::cross_entropy(logits.reshape({-1, kVocab}),
                                                   seq.narrow(1, 1, t).reshape({-1}));
    auto loss = m.penalty ? ce + m.penalty() : ce;
    optimizer.zero_grad();
    loss.backward();
    torch::nn::utils::clip_grad_norm_(clipped, 1.0);
    optimizer.step();
    if (m.after_step) m.after_step();
    const double v = ce.item<double>();
    loss_avg = step == 0 ? v : 0.9 * loss_avg + 0.1 * v;
    if (bar.due(step + 1)) {
      std::string s = fmt("bpc %.3f", loss_avg / std::log(2.0));
      if (m.status) s += " " + m.status();
      bar.update(step + 1, s);
    }
  }
  return bar.elapsed();
}

// ---------------------------------------------------------------------------------------------
// Results, checkpoints, the new-process evaluation

struct Run {
  std::string method;
  std::string kind;  ///< fp32, diffq, uniform, qat, lsq
  double lambda = 0, target_mb = 0;
  NLL valid, test, reload;
  bool reloaded = false;
  std::string checkpoint;
  uint64_t file_bytes = 0;
  double mean_bits = 32, model_size_mb = 0, train_seconds = 0;
  std::vector<std::pair<std::string, double>> bits_per_layer;
  bool reload_equal() const {
    return reloaded && reload.tokens == test.tokens && reload.sum == test.sum;
  }
};

/// The flags that rebuild the model and the corpus split in the eval process.
std::vector<std::string> model_and_corpus_flags(const Config& c) {
  std::vector<std::string> a = {"--arch",    c.model.arch(),
                                "--layers",  std::to_string(c.model.layers()),
                                "--d-model", std::to_string(c.model.d_model()),
                                "--heads",   std::to_string(c.model.heads()),
                                "--ffn",     std::to_string(c.model.ffn()),
                                "--context", std::to_string(c.model.context()),
                                "--threads", std::to_string(c.threads),
                                "--corpus",  c.corpus};
  if (c.limit > 0) {
    a.push_back("--limit");
    a.push_back(std::to_string(c.limit));
  }
  if (!c.data.empty()) {
    a.push_back("--data");
    for (const auto& f : c.data) a.push_back(f);
  }
  return a;
}

/// Runs `self eval --checkpoint path` in a new process; parses the last line of its stdout.
NLL eval_in_new_process(const Config& c, const std::string& checkpoint, const std::string& format) {
  std::vector<std::string> args = {
      diffq_examples::self_exe("char_lm"), "eval", "--checkpoint", checkpoint, "--format", format};
  for (const auto& a : model_and_corpus_flags(c)) args.push_back(a);
  const std::string output = diffq_examples::run_and_capture_stdout(args, "char_lm");
  const size_t at = output.rfind("nll_sum=");
  TORCH_CHECK(at != std::string::npos, "char_lm: no nll_sum= in the eval output: ", output);
  NLL r;
  long long tokens = 0;
  char hex[64] = {0};
  TORCH_CHECK(std::sscanf(output.c_str() + at, "nll_sum=%63s tokens=%lld", hex, &tokens) == 2,
              "char_lm: cannot parse the eval output: ", output.substr(at));
  r.sum = std::strtod(hex, nullptr);
  r.tokens = tokens;
  return r;
}

int run_eval(const Config& c) {
  torch::set_num_threads(c.threads);
  const std::string format = c.format == "auto"
                                 ? diffq_examples::detect_checkpoint_format(c.checkpoint, "char_lm")
                                 : c.format;
  CharLM model(c.model);
  try {
    if (format == "fp32") {
      torch::load(model, c.checkpoint);
    } else {
      diffq::load_quantized(*model, c.checkpoint);
    }
  } catch (const c10::Error& e) {
    throw std::runtime_error("char_lm: cannot load the " + format + " checkpoint '" + c.checkpoint +
                             "': " + e.what_without_backtrace());
  }
  model->eval();
  const Data d = load_data(c);
  const NLL r = evaluate([&](const torch::Tensor& x) { return model->forward(x); }, d.test,
                         c.model.context());
  std::printf("checkpoint=%s format=%s\n", c.checkpoint.c_str(), format.c_str());
  std::printf("nll_sum=%a tokens=%lld bpc=%.6f\n", r.sum, static_cast<long long>(r.tokens),
              r.bpc());
  return 0;
}

uint64_t file_size(const std::string& path) {
  std::error_code ec;
  const auto s = std::filesystem::file_size(path, ec);
  TORCH_CHECK(!ec, "char_lm: cannot stat '", path, "': ", ec.message());
  return s;
}

void finish(const Config& c, Run& r, const std::string& format) {
  r.file_bytes = file_size(r.checkpoint);
  r.reload = eval_in_new_process(c, r.checkpoint, format);
  r.reloaded = true;
  std::printf(
      "%-14s test bpc %.4f (valid %.4f), reloaded in a new process %.4f: %s; %llu bytes "
      "in %s, %.2f mean bits, trained in %.1f s\n",
      r.method.c_str(), r.test.bpc(), r.valid.bpc(), r.reload.bpc(),
      r.reload_equal() ? "equal" : "DIFFERENT", static_cast<unsigned long long>(r.file_bytes),
      r.checkpoint.c_str(), r.mean_bits, r.train_seconds);
  std::fflush(stdout);
}

std::string lambda_name(double v) {
  std::string s = fmt("%g", v);
  return s;
}

template <class Quantizer>
void finish_quantized(const Config& c, Quantizer& q, CharLM& model, const Data& d,
                      const std::string& stem, Run& r) {
  model->eval();
  const Forward f = [&](const torch::Tensor& x) { return q.forward(x); };
  r.valid = evaluate(f, d.valid, c.model.context());
  r.test = evaluate(f, d.test, c.model.context());
  r.mean_bits = q.mean_bits(/*rounded=*/true);
  r.model_size_mb = q.true_model_size();
  r.bits_per_layer = q.mean_bits_per_param(/*rounded=*/true);
  r.checkpoint = c.out + "/char_lm_" + stem + ".dq";
  diffq::save_quantized(q, r.checkpoint);
  finish(c, r, "diffq");
}

std::vector<torch::Tensor> own_weights(CharLM& model) {
  return model->parameters();
}

Run run_fp32(const Config& c, CharLM& model, const Data& d) {
  torch::manual_seed(c.seed);
  model = CharLM(c.model);
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(c.lr));
  Method m;
  m.name = "fp32";
  m.forward = [&](const torch::Tensor& x) { return model->forward(x); };
  Run r;
  r.method = "fp32";
  r.kind = "fp32";
  r.train_seconds = train(c, *model, opt, own_weights(model), m, d.train);
  model->eval();
  r.valid = evaluate(m.forward, d.valid, c.model.context());
  r.test = evaluate(m.forward, d.test, c.model.context());
  int64_t numel = 0;
  for (const auto& p : model->parameters()) numel += p.numel();
  r.model_size_mb = 4.0 * numel / kMB;
  r.checkpoint = c.out + "/char_lm_fp32.pt";
  torch::save(model, r.checkpoint);
  finish(c, r, "fp32");
  return r;
}

diffq::DiffQOptions diffq_options(const Config& c) {
  return diffq::DiffQOptions().group_size(c.group_size).min_size_mb(c.min_size_mb);
}

Run run_diffq(const Config& c, double lambda, double target_mb, const Data& d) {
  torch::manual_seed(c.seed);
  CharLM model(c.model);
  const auto weights = own_weights(model);
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(c.lr));
  diffq::DiffQuantizer<CharLM> q(model, diffq_options(c));
  q.setup_optimizer(opt, c.bits_lr);
  std::optional<diffq::SizeBudget<CharLM>> budget;
  if (target_mb > 0) budget.emplace(q, target_mb);
  Run r;
  r.kind = "diffq";
  r.lambda = lambda;
  r.target_mb = target_mb;
  r.method = budget ? "DiffQ ≤" + fmt("%g", target_mb) + " MB" : "DiffQ λ=" + lambda_name(lambda);
  Method m;
  m.name = budget ? "DiffQ <=" + fmt("%g", target_mb) + "MB" : "DiffQ l=" + lambda_name(lambda);
  m.forward = [&](const torch::Tensor& x) { return q.forward(x); };
  if (budget) {
    m.penalty = [&]() { return budget->loss_term(); };
    m.after_step = [&]() { budget->step(); };
  } else {
    m.penalty = [&, lambda]() { return lambda * q.penalty(); };
  }
  m.status = [&]() { return fmt("bits %.2f", q.mean_bits()); };
  r.train_seconds = train(c, *model, opt, weights, m, d.train);
  if (budget) {
    budget->finalize();
    r.lambda = budget->penalty_weight();
  }
  finish_quantized(c, q, model, d,
                   budget ? "diffq_budget" + fmt("%g", target_mb) : "diffq_l" + lambda_name(lambda),
                   r);
  return r;
}

Run run_uniform_ptq(const Config& c, CharLM& model, int64_t bits, const Data& d) {
  diffq::UniformQuantizer<CharLM> q(model,
                                    diffq::UniformOptions().bits(bits).min_size_mb(c.min_size_mb));
  Run r;
  r.kind = "uniform";
  r.method = "uniform PTQ " + std::to_string(bits) + "-bit";
  finish_quantized(c, q, model, d, "uniform" + std::to_string(bits), r);
  q.detach();
  return r;
}

template <class Quantizer, class Options, class Setup>
Run run_aware(const Config& c, const Options& options, const std::string& name,
              const std::string& kind, const std::string& stem, const Data& d, Setup setup) {
  torch::manual_seed(c.seed);
  CharLM model(c.model);
  const auto weights = own_weights(model);
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(c.lr));
  Quantizer q(model, options);
  setup(q, opt);
  Method m;
  m.name = name;
  m.forward = [&](const torch::Tensor& x) { return q.forward(x); };
  Run r;
  r.kind = kind;
  r.method = name;
  r.train_seconds = train(c, *model, opt, weights, m, d.train);
  finish_quantized(c, q, model, d, stem, r);
  return r;
}

// ---------------------------------------------------------------------------------------------
// Report

std::string with_commas(uint64_t v) {
  std::string s = std::to_string(v);
  for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3) s.insert(static_cast<size_t>(i), ",");
  return s;
}

std::string markdown_report(const std::vector<Run>& runs, const std::vector<std::string>& setup,
                            const CharLM& shape_model) {
  std::ostringstream o;
  o << "# Character-level language model: DiffQ against fp32, QAT and LSQ\n\n";
  for (const auto& s : setup) o << "- " << s << "\n";
  uint64_t fp32_bytes = 0;
  double fp32_bpc = 0;
  for (const auto& r : runs) {
    if (r.kind == "fp32") {
      fp32_bytes = r.file_bytes;
      fp32_bpc = r.test.bpc();
    }
  }
  o << "\n| method | test bpc | Δ vs fp32 | valid bpc | reloaded bpc | checkpoint bytes | "
       "vs fp32 file | model size (MB) | mean bits | train s |\n";
  o << "|---|---|---|---|---|---|---|---|---|---|\n";
  for (const auto& r : runs) {
    o << "| " << r.method << " | " << fmt("%.4f", r.test.bpc()) << " | "
      << (fp32_bytes > 0 && r.kind != "fp32" ? fmt("%+.4f", r.test.bpc() - fp32_bpc) : "") << " | "
      << fmt("%.4f", r.valid.bpc()) << " | " << fmt("%.4f", r.reload.bpc())
      << (r.reload_equal() ? " (equal)" : " (DIFFERENT)") << " | " << with_commas(r.file_bytes)
      << " | " << (fp32_bytes > 0 ? fmt("%.2f×", double(fp32_bytes) / r.file_bytes) : "") << " | "
      << fmt("%.4f", r.model_size_mb) << " | " << fmt("%.2f", r.mean_bits) << " | "
      << fmt("%.1f", r.train_seconds) << " |\n";
  }
  // Bits per layer: one column per quantized run.
  std::vector<const Run*> q;
  for (const auto& r : runs) {
    if (r.kind != "fp32") q.push_back(&r);
  }
  if (!q.empty()) {
    o << "\n## Bits per layer (rounded, stored; — = kept as floats)\n\n| parameter | shape |";
    for (const auto* r : q) o << " " << r->method << " |";
    o << "\n|---|---|";
    for (size_t i = 0; i < q.size(); ++i) o << "---|";
    o << "\n";
    for (const auto& p : shape_model->named_parameters()) {
      std::string shape;
      for (auto s : p.value().sizes()) shape += (shape.empty() ? "" : "×") + std::to_string(s);
      o << "| " << p.key() << " | " << shape << " |";
      for (const auto* r : q) {
        std::string cell = "—";
        for (const auto& b : r->bits_per_layer) {
          if (b.first == p.key()) cell = fmt("%.2f", b.second);
        }
        o << " " << cell << " |";
      }
      o << "\n";
    }
  }
  o << "\n![test bpc against checkpoint size](char_lm.svg)\n";
  return o.str();
}

/// Test bpc against checkpoint bytes (log scale), one labelled point per run.
std::string svg_figure(const std::vector<Run>& runs) {
  const double W = 720, H = 420, L = 70, R = 20, T = 40, B = 60;
  double xmin = 1e300, xmax = 0, ymin = 1e300, ymax = -1e300;
  for (const auto& r : runs) {
    xmin = std::min(xmin, std::log10(double(r.file_bytes)));
    xmax = std::max(xmax, std::log10(double(r.file_bytes)));
    ymin = std::min(ymin, r.test.bpc());
    ymax = std::max(ymax, r.test.bpc());
  }
  const double xpad = std::max(0.1, 0.08 * (xmax - xmin)),
               ypad = std::max(0.02, 0.1 * (ymax - ymin));
  xmin -= xpad;
  xmax += xpad;
  ymin -= ypad;
  ymax += ypad;
  auto X = [&](double v) { return L + (std::log10(v) - xmin) / (xmax - xmin) * (W - L - R); };
  auto Y = [&](double v) { return T + (ymax - v) / (ymax - ymin) * (H - T - B); };
  std::ostringstream o;
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
    << "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" "
       "fill=\"white\"/>\n";
  o << "<text x=\"" << W / 2
    << "\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">Test bits per "
       "character against checkpoint size (lower left is better)</text>\n";
  o << "<rect x=\"" << L << "\" y=\"" << T << "\" width=\"" << W - L - R << "\" height=\""
    << H - T - B << "\" fill=\"none\" stroke=\"#444\"/>\n";
  // x ticks at 1, 2 and 5 × 10^k KiB inside the range.
  for (double decade = std::pow(10.0, std::floor(xmin - std::log10(1024.0)));
       decade * 1024 <= std::pow(10.0, xmax); decade *= 10) {
    for (double m : {1.0, 2.0, 5.0}) {
      const double v = m * decade * 1024;
      if (std::log10(v) < xmin || std::log10(v) > xmax) continue;
      const double x = X(v);
      o << "<line x1=\"" << x << "\" y1=\"" << H - B << "\" x2=\"" << x << "\" y2=\"" << H - B + 5
        << "\" stroke=\"#444\"/><text x=\"" << x << "\" y=\"" << H - B + 18
        << "\" text-anchor=\"middle\">" << fmt("%g", m * decade) << " KiB</text>\n";
    }
  }
  const double ystep = std::max(0.01, std::pow(10.0, std::floor(std::log10((ymax - ymin) / 2))));
  for (double v = std::ceil(ymin / ystep) * ystep; v <= ymax; v += ystep) {
    o << "<line x1=\"" << L - 5 << "\" y1=\"" << Y(v) << "\" x2=\"" << L << "\" y2=\"" << Y(v)
      << "\" stroke=\"#444\"/><text x=\"" << L - 8 << "\" y=\"" << Y(v) + 4
      << "\" text-anchor=\"end\">" << fmt("%.2f", v) << "</text>\n";
  }
  o << "<text x=\"" << (L + W - R) / 2 << "\" y=\"" << H - 15
    << "\" text-anchor=\"middle\">checkpoint bytes (log scale)</text>\n";
  o << "<text x=\"18\" y=\"" << (T + H - B) / 2
    << "\" text-anchor=\"middle\" transform=\"rotate(-90 " << 18 << " " << (T + H - B) / 2
    << ")\">test bpc</text>\n";
  const std::map<std::string, const char*> colour = {{"fp32", "#444444"},
                                                     {"diffq", "#1f77b4"},
                                                     {"uniform", "#2ca02c"},
                                                     {"qat", "#ff7f0e"},
                                                     {"lsq", "#d62728"}};
  for (const auto& r : runs) {
    const double x = X(double(r.file_bytes)), y = Y(r.test.bpc());
    o << "<circle cx=\"" << x << "\" cy=\"" << y << "\" r=\"5\" fill=\"" << colour.at(r.kind)
      << "\"/><text x=\"" << x + 8 << "\" y=\"" << y - 6 << "\" fill=\"" << colour.at(r.kind)
      << "\">";
    for (char ch : r.method) {
      if (ch == '<')
        o << "&lt;";
      else if (ch == '&')
        o << "&amp;";
      else
        o << ch;
    }
    o << "</text>\n";
  }
  o << "</svg>\n";
  return o.str();
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path);
  f << text;
  f.close();
  TORCH_CHECK(f.good(), "char_lm: cannot write '", path, "'");
}

int run_train(const Config& c) {
  torch::set_num_threads(c.threads);
  std::error_code ec;
  std::filesystem::create_directories(c.out, ec);
  TORCH_CHECK(!ec && std::filesystem::is_directory(c.out), "char_lm: cannot create --out '", c.out,
              "': ", ec.message());
  const Data d = load_data(c);
  std::fprintf(stderr, "char_lm: %lld bytes from %s: train %lld, validation %lld, test %lld\n",
               static_cast<long long>(d.corpus_bytes), d.source.c_str(),
               static_cast<long long>(d.train.size(0)), static_cast<long long>(d.valid.size(0)),
               static_cast<long long>(d.test.size(0)));
  std::vector<Run> runs;
  CharLM fp32_model{nullptr};
  if (c.fp32 || c.uniform) runs.push_back(run_fp32(c, fp32_model, d));
  if (c.diffq) {
    for (double l : c.penalties) runs.push_back(run_diffq(c, l, 0, d));
    for (double t : c.target_sizes_mb) runs.push_back(run_diffq(c, 0, t, d));
  }
  if (c.uniform) {
    for (int64_t b : c.uniform_bits) runs.push_back(run_uniform_ptq(c, fp32_model, b, d));
  }
  if (c.qat) {
    runs.push_back(run_aware<diffq::UniformQuantizer<CharLM>>(
        c, diffq::UniformOptions().bits(c.qat_bits).min_size_mb(c.min_size_mb).qat(true),
        "QAT " + std::to_string(c.qat_bits) + "-bit", "qat", "qat" + std::to_string(c.qat_bits), d,
        [](auto&, auto&) {}));
  }
  if (c.lsq) {
    runs.push_back(run_aware<diffq::LSQQuantizer<CharLM>>(
        c, diffq::LSQOptions().bits(c.lsq_bits).min_size_mb(c.min_size_mb),
        "LSQ " + std::to_string(c.lsq_bits) + "-bit", "lsq", "lsq" + std::to_string(c.lsq_bits), d,
        [&c](auto& q, auto& opt) { q.setup_optimizer(opt, c.lsq_lr); }));
  }
  CharLM shape_model(c.model);
  int64_t numel = 0;
  for (const auto& p : shape_model->parameters()) numel += p.numel();
  const auto& mo = c.model;
  std::vector<std::string> setup = {
      "corpus: " + d.source + ", " + with_commas(d.corpus_bytes) +
          " bytes, split by position 90/5/5: train " + with_commas(d.train.size(0)) +
          ", validation " + with_commas(d.valid.size(0)) + ", test " + with_commas(d.test.size(0)) +
          " bytes; vocabulary: the 256 byte values",
      "model: " +
          (mo.arch() == "transformer"
               ? std::to_string(mo.layers()) + "-layer decoder-only Transformer, d_model " +
                     std::to_string(mo.d_model()) + ", " + std::to_string(mo.heads()) +
                     " heads, feed-forward " + std::to_string(mo.ffn()) + ", context " +
                     std::to_string(mo.context()) +
                     ", pre-norm, learnt positions, output projection tied to the embedding"
               : std::to_string(mo.layers()) + "-layer LSTM, hidden " +
                     std::to_string(mo.d_model()) + ", output projection tied to the embedding") +
          "; " + with_commas(numel) + " parameters",
      "training: " + std::to_string(c.steps) + " Adam steps of " + std::to_string(c.batch) +
          " random windows of " + std::to_string(mo.context()) + " bytes, lr " + fmt("%g", c.lr) +
          " (5 % warm-up, cosine to lr/10), gradient norm clipped to 1, seed " +
          std::to_string(c.seed) + ", " + std::to_string(c.threads) +
          " thread(s); the same batches for every method",
      "evaluation: non-overlapping windows of " + std::to_string(mo.context()) +
          " bytes, each predicted from the bytes before it in its window; bpc = mean "
          "cross-entropy / ln 2; reloaded = the checkpoint evaluated by a new process "
          "(`char_lm eval`) into a model without quantizer",
      "DiffQ: group size " + std::to_string(c.group_size) +
          ", bits in [2, 15] from 8, bit logits' "
          "lr " +
          fmt("%g", c.bits_lr) +
          ", loss = cross-entropy (nats) + λ·model size (MB); "
          "tensors ≤ " +
          fmt("%g", c.min_size_mb) + " MB kept fp32 (every method)",
      "baselines: uniform PTQ = `diffq::UniformQuantizer` on the trained fp32 model; QAT = the "
      "same quantizer with the straight-through estimator, trained like fp32; LSQ = "
      "`diffq::LSQQuantizer`, trained like fp32, its step sizes at Adam lr " +
          fmt("%g", c.lsq_lr),
      "files: fp32 = `torch::save`; quantized = `diffq::save_quantized`. MB = 2^20 bytes",
  };
  const std::string md = markdown_report(runs, setup, shape_model);
  write_text(c.out + "/report.md", md);
  write_text(c.out + "/char_lm.svg", svg_figure(runs));
  std::printf("\n%s\nreport: %s/report.md, figure: %s/char_lm.svg\n", md.c_str(), c.out.c_str(),
              c.out.c_str());
  for (const auto& r : runs) {
    if (!r.reload_equal()) {
      std::fprintf(stderr,
                   "char_lm: %s: the reloaded checkpoint's test bpc differs from the "
                   "in-process one\n",
                   r.method.c_str());
      return kExitMismatch;
    }
  }
  return 0;
}

}  // namespace
}  // namespace char_lm

int main(int argc, char** argv) {
  char_lm::Config c;
  try {
    c = char_lm::parse_args(argc, argv);
  } catch (const char_lm::UsageError& e) {
    std::fprintf(stderr, "char_lm: %s\n\n%s", e.what(), char_lm::kUsage);
    return char_lm::kExitUsage;
  }
  if (c.command == "help" || c.command == "--help" || c.command == "-h") {
    std::fputs(char_lm::kUsage, stdout);
    return 0;
  }
  try {
    return c.command == "train" ? char_lm::run_train(c) : char_lm::run_eval(c);
  } catch (const char_lm::CorpusError& e) {
    std::fprintf(stderr, "%s\n", e.what());
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "%s\n", e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
  }
  return 1;
}
