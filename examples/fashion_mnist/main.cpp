// Fashion-MNIST with DiffQ: trains a small CNN in fp32 and with DiffQ for each penalty λ, and the
// baselines (uniform post-training quantization of the fp32 model, QAT with the straight-through
// estimator, LSQ), writes the checkpoints, reloads each one in a new process into a model without
// quantizer, checks that the test accuracy is the same, and writes a markdown report and an SVG
// figure.
//
//   fashion_mnist train [--method fp32,diffq,uniform] [--penalty 1,5] [--epochs 3] [--out DIR] ...
//   (see `fashion_mnist help`)
//   fashion_mnist eval --checkpoint FILE [--format auto|fp32|diffq]
//
// Data: Debian's dataset-fashion-mnist package (/usr/share/datasets/fashion-mnist), or --data DIR.

#include "idx.h"
#include "progress.h"
#include "report.h"

#include <diffq/checkpoint.h>
#include <diffq/diffq.h>
#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>
#include <spawn.h>
#include <sys/wait.h>
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
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

extern char** environ;

namespace fmnist {
namespace {

// ---------------------------------------------------------------------------------------------
// Options

struct Config {
  std::string command;
  // Data and output.
  std::string data = kDefaultDataDir;
  std::string out = "out";
  int64_t train_limit = -1;
  int64_t test_limit = -1;
  // Training.
  int64_t epochs = 3;
  double lr = 1e-3;
  int64_t batch_size = 128;
  uint64_t seed = 42;
  int threads = 2;
  bool fp32 = true;
  // Methods (--method): fp32, diffq, uniform (PTQ of the fp32 model), qat, lsq.
  bool diffq = true;
  bool uniform = true;
  bool qat = false;
  bool lsq = false;
  std::vector<int64_t> uniform_bits = {8, 4};
  int64_t qat_bits = 4;
  int64_t lsq_bits = 4;
  // DiffQ.
  std::vector<double> penalties = {1.0};
  int64_t group_size = 16;
  double min_size_mb = 0.01;
  double min_bits = 2;
  double max_bits = 15;
  double init_bits = 8;
  std::string noise = "gaussian";
  std::string param = "bits";
  double bits_lr = 1e-2;
  // eval.
  std::string checkpoint;
  std::string format = "auto";
};

constexpr int kEvalBatch = 1000;
constexpr double kMean = 0.2860;
constexpr double kStd = 0.3530;
constexpr int kExitUsage = 2;
constexpr int kExitMismatch = 3;

const char* kUsage = R"(usage:
  fashion_mnist train [options]        train fp32 and DiffQ models, check, report
  fashion_mnist eval --checkpoint FILE evaluate a checkpoint on the test set
  fashion_mnist help

train options (defaults in brackets):
  --method M1,M2,...    among fp32, diffq, uniform, qat, lsq [fp32,diffq,uniform]
                        uniform: post-training quantization of the trained fp32 model (no
                        training; trains fp32 first); qat: uniform QAT with the straight-through
                        estimator; lsq: Learned Step Size Quantization (qat and lsq train for
                        --epochs like fp32, so they are not in the default list)
  --uniform-bits B1,... bit widths of the uniform PTQ runs [8,4]
  --qat-bits B [4]      --lsq-bits B [4]
  --penalty L1,L2,...   DiffQ model-size penalties λ, one run each [1]
  --no-fp32             skip the fp32 baseline run (same as leaving fp32 out of --method)
  --epochs N            [3]          --lr X            Adam learning rate [1e-3]
  --batch-size N        [128]        --seed N          [42]
  --threads N           intra-op threads [2]
  --group-size N        weights sharing one bit width [16]
  --min-size-mb X       tensors at or below this fp32 size stay fp32 [0.01]
  --min-bits X [2]  --max-bits X [15]  --init-bits X [8]
  --noise gaussian|uniform   pseudo quantization noise [gaussian]
  --param bits|noise         what the learnt logits parametrise [bits]
  --bits-lr X           learning rate of the bit logits [1e-2]
  --data DIR            IDX files [/usr/share/datasets/fashion-mnist]
  --out DIR             checkpoints, report.md, fashion_mnist.svg [out]
  --train-limit N / --test-limit N   use the first N images only (smoke runs)

eval options:
  --checkpoint FILE     written by `train` (fp32: torch::save; DiffQ: diffq::save_quantized)
  --format auto|fp32|diffq   [auto: from the file's first bytes]
  --data DIR, --test-limit N, --threads N   as for train
eval prints `correct=N total=M accuracy=A%` on stdout.
)";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

double parse_double(const std::string& flag, const std::string& v) {
  size_t pos = 0;
  double d = 0;
  try {
    d = std::stod(v, &pos);
  } catch (const std::exception&) {
    pos = std::string::npos;
  }
  if (pos != v.size() || !std::isfinite(d)) {
    throw UsageError(flag + " expects a number, got '" + v + "'");
  }
  return d;
}

int64_t parse_int(const std::string& flag, const std::string& v, int64_t min) {
  size_t pos = 0;
  long long i = 0;
  try {
    i = std::stoll(v, &pos);
  } catch (const std::exception&) {
    pos = std::string::npos;
  }
  if (pos != v.size()) throw UsageError(flag + " expects an integer, got '" + v + "'");
  if (i < min) {
    throw UsageError(flag + " must be >= " + std::to_string(min) + ", got " + std::to_string(i));
  }
  return i;
}

Config parse_args(int argc, char** argv) {
  Config c;
  if (argc < 2) throw UsageError("missing command");
  c.command = argv[1];
  if (c.command == "help" || c.command == "--help" || c.command == "-h") return c;
  if (c.command != "train" && c.command != "eval") {
    throw UsageError("unknown command '" + c.command + "'");
  }
  const bool train = c.command == "train";
  for (int i = 2; i < argc; ++i) {
    std::string flag = argv[i];
    std::string value;
    bool has_value = false;
    const auto eq = flag.find('=');
    if (flag.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = flag.substr(eq + 1);
      flag = flag.substr(0, eq);
      has_value = true;
    }
    auto next = [&]() -> std::string {
      if (has_value) return value;
      if (i + 1 >= argc) throw UsageError(flag + " expects a value");
      return argv[++i];
    };
    auto train_only = [&]() {
      if (!train) throw UsageError(flag + " is a train option");
    };
    if (flag == "--data") {
      c.data = next();
    } else if (flag == "--test-limit") {
      c.test_limit = parse_int(flag, next(), 1);
    } else if (flag == "--threads") {
      c.threads = static_cast<int>(parse_int(flag, next(), 1));
    } else if (flag == "--checkpoint" && !train) {
      c.checkpoint = next();
    } else if (flag == "--format" && !train) {
      c.format = next();
      if (c.format != "auto" && c.format != "fp32" && c.format != "diffq") {
        throw UsageError("--format expects auto, fp32 or diffq, got '" + c.format + "'");
      }
    } else if (flag == "--out") {
      train_only();
      c.out = next();
    } else if (flag == "--train-limit") {
      train_only();
      c.train_limit = parse_int(flag, next(), 1);
    } else if (flag == "--epochs") {
      train_only();
      c.epochs = parse_int(flag, next(), 1);
    } else if (flag == "--lr") {
      train_only();
      c.lr = parse_double(flag, next());
    } else if (flag == "--batch-size") {
      train_only();
      c.batch_size = parse_int(flag, next(), 1);
    } else if (flag == "--seed") {
      train_only();
      c.seed = static_cast<uint64_t>(parse_int(flag, next(), 0));
    } else if (flag == "--no-fp32") {
      train_only();
      if (has_value) throw UsageError(flag + " takes no value");
      c.fp32 = false;
    } else if (flag == "--method") {
      train_only();
      const std::string v = next();
      c.fp32 = c.diffq = c.uniform = c.qat = c.lsq = false;
      std::stringstream ss(v);
      std::string item;
      while (std::getline(ss, item, ',')) {
        if (item == "fp32") {
          c.fp32 = true;
        } else if (item == "diffq") {
          c.diffq = true;
        } else if (item == "uniform") {
          c.uniform = true;
        } else if (item == "qat") {
          c.qat = true;
        } else if (item == "lsq") {
          c.lsq = true;
        } else {
          throw UsageError(
              "--method expects a comma-separated list of fp32, diffq, uniform, qat, "
              "lsq, got '" +
              item + "'");
        }
      }
      if (v.empty() || v.back() == ',') {
        throw UsageError("--method expects a comma-separated list of methods, got '" + v + "'");
      }
    } else if (flag == "--uniform-bits") {
      train_only();
      const std::string v = next();
      c.uniform_bits.clear();
      std::stringstream ss(v);
      std::string item;
      while (std::getline(ss, item, ',')) c.uniform_bits.push_back(parse_int(flag, item, 1));
      if (v.empty() || v.back() == ',') {
        throw UsageError("--uniform-bits expects a comma-separated list of integers, got '" + v +
                         "'");
      }
    } else if (flag == "--qat-bits") {
      train_only();
      c.qat_bits = parse_int(flag, next(), 1);
    } else if (flag == "--lsq-bits") {
      train_only();
      c.lsq_bits = parse_int(flag, next(), 2);
    } else if (flag == "--penalty") {
      train_only();
      const std::string v = next();
      c.penalties.clear();
      std::stringstream ss(v);
      std::string item;
      while (std::getline(ss, item, ',')) {
        const double l = parse_double("--penalty", item);
        if (l < 0) throw UsageError("--penalty values must be >= 0, got " + item);
        c.penalties.push_back(l);
      }
      if (v.empty() || v.back() == ',') {
        throw UsageError("--penalty expects a comma-separated list of numbers, got '" + v + "'");
      }
    } else if (flag == "--group-size") {
      train_only();
      c.group_size = parse_int(flag, next(), 0);
    } else if (flag == "--min-size-mb") {
      train_only();
      c.min_size_mb = parse_double(flag, next());
    } else if (flag == "--min-bits") {
      train_only();
      c.min_bits = parse_double(flag, next());
    } else if (flag == "--max-bits") {
      train_only();
      c.max_bits = parse_double(flag, next());
    } else if (flag == "--init-bits") {
      train_only();
      c.init_bits = parse_double(flag, next());
    } else if (flag == "--noise") {
      train_only();
      c.noise = next();
      if (c.noise != "gaussian" && c.noise != "uniform") {
        throw UsageError("--noise expects gaussian or uniform, got '" + c.noise + "'");
      }
    } else if (flag == "--param") {
      train_only();
      c.param = next();
      if (c.param != "bits" && c.param != "noise") {
        throw UsageError("--param expects bits or noise, got '" + c.param + "'");
      }
    } else if (flag == "--bits-lr") {
      train_only();
      c.bits_lr = parse_double(flag, next());
    } else {
      throw UsageError("unknown option '" + flag + "' for " + c.command);
    }
  }
  if (!train && c.checkpoint.empty()) throw UsageError("eval needs --checkpoint FILE");
  if (train && !(c.lr > 0)) throw UsageError("--lr must be > 0");
  if (train && !(c.bits_lr > 0)) throw UsageError("--bits-lr must be > 0");
  return c;
}

diffq::DiffQOptions diffq_options(const Config& c) {
  auto o = diffq::DiffQOptions()
               .group_size(c.group_size)
               .min_size_mb(c.min_size_mb)
               .min_bits(c.min_bits)
               .max_bits(c.max_bits)
               .init_bits(c.init_bits)
               .noise(c.noise == "uniform" ? diffq::Noise::kUniform : diffq::Noise::kGaussian)
               .param(c.param == "noise" ? diffq::Param::kNoise : diffq::Param::kBits);
  return o;
}

diffq::UniformOptions uniform_options(const Config& c, int64_t bits, bool qat) {
  return diffq::UniformOptions().bits(bits).min_size_mb(c.min_size_mb).qat(qat);
}

diffq::LSQOptions lsq_options(const Config& c) {
  return diffq::LSQOptions().bits(c.lsq_bits).min_size_mb(c.min_size_mb);
}

// ---------------------------------------------------------------------------------------------
// Data and model

struct Data {
  torch::Tensor x;  ///< float [N, 1, 28, 28], normalised
  torch::Tensor y;  ///< int64 [N]
};

/// The first `limit` (or all, when -1) items of a split, as normalised tensors.
Data to_tensors(const Split& s, int64_t limit) {
  const int64_t n = limit < 0 ? s.images.count : std::min(limit, s.images.count);
  auto pixels = torch::from_blob(const_cast<uint8_t*>(s.images.pixels.data()),
                                 {n, 1, s.images.rows, s.images.cols}, torch::kUInt8);
  auto labels = torch::from_blob(const_cast<uint8_t*>(s.labels.data()), {n}, torch::kUInt8);
  return {(pixels.to(torch::kFloat) / 255.0 - kMean) / kStd, labels.to(torch::kLong)};
}

Data load_data(const Config& c, bool train) {
  return to_tensors(load_fashion_mnist(c.data, train), train ? c.train_limit : c.test_limit);
}

/// conv(1→32, 3, pad 1)-relu-maxpool2-conv(32→64, 3, pad 1)-relu-maxpool2-fc(3136→128)-relu-
/// fc(128→10).
struct NetImpl : torch::nn::Module {
  NetImpl()
      : conv1(register_module("conv1",
                              torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 32, 3).padding(1)))),
        conv2(register_module("conv2",
                              torch::nn::Conv2d(torch::nn::Conv2dOptions(32, 64, 3).padding(1)))),
        fc1(register_module("fc1", torch::nn::Linear(64 * 7 * 7, 128))),
        fc2(register_module("fc2", torch::nn::Linear(128, kNumClasses))) {}

  torch::Tensor forward(torch::Tensor x) {
    x = torch::max_pool2d(torch::relu(conv1(x)), 2);
    x = torch::max_pool2d(torch::relu(conv2(x)), 2);
    x = torch::relu(fc1(x.flatten(1)));
    return fc2(x);
  }

  torch::nn::Conv2d conv1;
  torch::nn::Conv2d conv2;
  torch::nn::Linear fc1;
  torch::nn::Linear fc2;
};
TORCH_MODULE(Net);

using Forward = std::function<torch::Tensor(const torch::Tensor&)>;

struct Accuracy {
  int64_t correct = 0;
  int64_t total = 0;
};

/// Test accuracy of `forward` (the module must be in eval mode), batches of 1000, no grad.
Accuracy evaluate(const Forward& forward, const Data& test) {
  torch::NoGradGuard no_grad;
  Accuracy a;
  const int64_t n = test.x.size(0);
  for (int64_t i = 0; i < n; i += kEvalBatch) {
    const int64_t len = std::min<int64_t>(kEvalBatch, n - i);
    auto logits = forward(test.x.narrow(0, i, len));
    a.correct += logits.argmax(1).eq(test.y.narrow(0, i, len)).sum().item<int64_t>();
    a.total += len;
  }
  return a;
}

// ---------------------------------------------------------------------------------------------
// Training

/// Hooks that make one training loop serve both fp32 and DiffQ.
struct Method {
  std::string name;
  Forward forward;
  /// Added to the cross-entropy (λ·model size); undefined tensor for fp32.
  std::function<torch::Tensor()> penalty;
  /// Extra progress text from the last penalty value (e.g. model size and mean bits); may be null.
  std::function<std::string(double penalty_value)> status;
};

/// Trains for `c.epochs` epochs; returns the training time in seconds (batches only).
double train(const Config& c, torch::nn::Module& model, torch::optim::Optimizer& optimizer,
             const Method& m, const Data& train_data) {
  // A generator of its own: every run sees the batches in the same order, whatever the quantizer
  // draws from the global generator.
  auto gen = at::make_generator<at::CPUGeneratorImpl>(c.seed);
  const int64_t n = train_data.x.size(0);
  const int64_t batches = (n + c.batch_size - 1) / c.batch_size;
  double seconds = 0;
  for (int64_t epoch = 1; epoch <= c.epochs; ++epoch) {
    model.train();
    auto perm = torch::randperm(n, gen, torch::kLong);
    ProgressBar bar(m.name + " epoch " + std::to_string(epoch) + "/" + std::to_string(c.epochs),
                    batches);
    double loss_sum = 0;
    int64_t correct = 0, seen = 0;
    torch::Tensor last_penalty;
    for (int64_t b = 0; b < batches; ++b) {
      const int64_t start = b * c.batch_size;
      auto idx = perm.narrow(0, start, std::min(c.batch_size, n - start));
      auto x = train_data.x.index_select(0, idx);
      auto y = train_data.y.index_select(0, idx);
      auto logits = m.forward(x);
      auto ce = torch::nn::functional::cross_entropy(logits, y);
      auto loss = ce;
      if (m.penalty) {
        last_penalty = m.penalty();
        loss = ce + last_penalty;
      }
      optimizer.zero_grad();
      loss.backward();
      optimizer.step();
      loss_sum += ce.item<double>() * x.size(0);
      correct += logits.argmax(1).eq(y).sum().item<int64_t>();
      seen += x.size(0);
      if (bar.due(b + 1)) {
        std::string status =
            fmt("loss %.4f", loss_sum / seen) + fmt(" acc %.2f%%", 100.0 * correct / seen);
        if (m.status && last_penalty.defined()) {
          status += " " + m.status(last_penalty.item<double>());
        }
        bar.update(b + 1, status);
      }
    }
    seconds += bar.elapsed();
  }
  return seconds;
}

/// A few untimed steps on a throwaway model, so that one-time costs (thread pool, kernel selection,
/// allocator) do not land in the first run's training time.
void warm_up(const Config& c, const Data& train_data) {
  Net model;
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(c.lr));
  const int64_t n = std::min(c.batch_size, train_data.x.size(0));
  for (int i = 0; i < 3; ++i) {
    auto loss = torch::nn::functional::cross_entropy(model->forward(train_data.x.narrow(0, 0, n)),
                                                     train_data.y.narrow(0, 0, n));
    optimizer.zero_grad();
    loss.backward();
    optimizer.step();
  }
}

std::vector<ParamInfo> param_infos(torch::nn::Module& model) {
  std::vector<ParamInfo> out;
  for (const auto& p : model.named_parameters()) {
    out.push_back({p.key(), p.value().sizes().vec(), p.value().numel()});
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Checkpoints and the evaluation in a new process

uint64_t file_size(const std::string& path) {
  std::error_code ec;
  const auto s = std::filesystem::file_size(path, ec);
  TORCH_CHECK(!ec, "fashion_mnist: cannot stat '", path, "': ", ec.message());
  return s;
}

/// "fp32" for a zip archive (torch::save), "diffq" for a DiffQ checkpoint (magic "DIFFQCKP").
std::string detect_format(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, "fashion_mnist: cannot open checkpoint '", path, "': ", std::strerror(errno));
  char magic[8] = {0};
  in.read(magic, sizeof(magic));
  if (in.gcount() >= 4 && std::memcmp(magic, "PK\x03\x04", 4) == 0) return "fp32";
  if (in.gcount() == 8 && std::memcmp(magic, "DIFFQCKP", 8) == 0) return "diffq";
  TORCH_CHECK(false, "fashion_mnist: '", path, "' is neither a DiffQ checkpoint (magic DIFFQCKP) ",
              "nor a torch::save archive (a zip file); pass --format to force one");
  return "";
}

std::string self_exe() {
  std::vector<char> buf(4096);
  const ssize_t len = readlink("/proc/self/exe", buf.data(), buf.size() - 1);
  TORCH_CHECK(len > 0, "fashion_mnist: cannot read /proc/self/exe: ", std::strerror(errno));
  return std::string(buf.data(), static_cast<size_t>(len));
}

/// Runs `self eval --checkpoint path ...` in a new process and reads its accuracy from its stdout.
Accuracy eval_in_new_process(const Config& c, const std::string& checkpoint,
                             const std::string& format) {
  const std::string exe = self_exe();
  std::vector<std::string> args = {
      exe,    "eval",   "--checkpoint", checkpoint,  "--format",
      format, "--data", c.data,         "--threads", std::to_string(c.threads)};
  if (c.test_limit > 0) {
    args.push_back("--test-limit");
    args.push_back(std::to_string(c.test_limit));
  }
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

  int fds[2];
  TORCH_CHECK(pipe(fds) == 0, "fashion_mnist: pipe failed: ", std::strerror(errno));
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addclose(&actions, fds[0]);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_addclose(&actions, fds[1]);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, exe.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  close(fds[1]);
  if (rc != 0) {
    close(fds[0]);
    TORCH_CHECK(false, "fashion_mnist: cannot start '", exe, " eval': ", std::strerror(rc));
  }
  std::string output;
  char buf[4096];
  for (;;) {
    const ssize_t got = read(fds[0], buf, sizeof(buf));
    if (got > 0) {
      output.append(buf, static_cast<size_t>(got));
    } else if (got == 0 || errno != EINTR) {
      break;
    }
  }
  close(fds[0]);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  TORCH_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "fashion_mnist: '", exe,
              " eval --checkpoint ", checkpoint, "' failed (",
              WIFEXITED(status) ? "exit status " + std::to_string(WEXITSTATUS(status))
                                : "killed by signal " + std::to_string(WTERMSIG(status)),
              "); its output: ", output);
  Accuracy a;
  long long correct = -1, total = -1;
  const auto pos = output.find("correct=");
  TORCH_CHECK(
      pos != std::string::npos &&
          std::sscanf(output.c_str() + pos, "correct=%lld total=%lld", &correct, &total) == 2,
      "fashion_mnist: no 'correct=N total=M' in the output of the eval process: ", output);
  a.correct = correct;
  a.total = total;
  return a;
}

int run_eval(const Config& c) {
  torch::set_num_threads(c.threads);
  const std::string format = c.format == "auto" ? detect_format(c.checkpoint) : c.format;
  Net model;
  try {
    if (format == "fp32") {
      torch::load(model, c.checkpoint);
    } else {
      diffq::load_quantized(*model, c.checkpoint);
    }
  } catch (const c10::Error& e) {
    throw std::runtime_error("fashion_mnist: cannot load the " + format + " checkpoint '" +
                             c.checkpoint + "': " + e.what_without_backtrace());
  }
  model->eval();
  const Data test = load_data(c, /*train=*/false);
  const Accuracy a = evaluate([&](const torch::Tensor& x) { return model->forward(x); }, test);
  std::printf("checkpoint=%s format=%s correct=%lld total=%lld accuracy=%.2f%%\n",
              c.checkpoint.c_str(), format.c_str(), static_cast<long long>(a.correct),
              static_cast<long long>(a.total), 100.0 * a.correct / a.total);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// The runs

void finish_run(const Config& c, RunResult& r, const std::string& format) {
  const Accuracy re = eval_in_new_process(c, r.checkpoint, format);
  r.reload_correct = re.correct;
  r.reload_total = re.total;
  std::printf(
      "%-12s test accuracy %.2f%% (%lld/%lld), reloaded in a new process %lld/%lld: %s; "
      "%s bytes in %s, trained in %.1f s\n",
      r.method.c_str(), r.accuracy(), static_cast<long long>(r.correct),
      static_cast<long long>(r.total), static_cast<long long>(r.reload_correct),
      static_cast<long long>(r.reload_total), r.reload_equal() ? "equal" : "DIFFERENT",
      with_commas(r.file_bytes).c_str(), r.checkpoint.c_str(), r.train_seconds);
  if (r.diffq || r.quantized) {
    std::printf(
        "%-12s mean bits per quantized weight %.2f (learnt %.2f), bit-packed model size "
        "%.4f MB\n",
        r.method.c_str(), r.mean_bits, r.learnt_bits, r.model_size_mb);
  }
  std::fflush(stdout);
}

/// Trains the fp32 model (`model`, a fresh `Net`, is the trained model afterwards).
RunResult run_fp32(const Config& c, Net& model, const Data& train_data, const Data& test) {
  torch::manual_seed(c.seed);
  model = Net();
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(c.lr));
  Method m;
  m.name = "fp32";
  m.forward = [&](const torch::Tensor& x) { return model->forward(x); };
  RunResult r;
  r.method = "fp32";
  r.train_seconds = train(c, *model, optimizer, m, train_data);
  model->eval();
  const Accuracy a = evaluate(m.forward, test);
  r.correct = a.correct;
  r.total = a.total;
  int64_t numel = 0;
  for (const auto& p : model->parameters()) numel += p.numel();
  r.model_size_mb = 4.0 * numel / kMB;
  r.checkpoint = c.out + "/fashion_mnist_fp32.pt";
  torch::save(model, r.checkpoint);
  r.file_bytes = file_size(r.checkpoint);
  finish_run(c, r, "fp32");
  return r;
}

RunResult run_diffq(const Config& c, double lambda, const Data& train_data, const Data& test) {
  torch::manual_seed(c.seed);
  Net model;
  // The optimizer holds the model's parameters before the quantizer adds the bit logits.
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(c.lr));
  diffq::DiffQuantizer<Net> q(model, diffq_options(c));
  q.setup_optimizer(optimizer, c.bits_lr);
  RunResult r;
  r.diffq = true;
  r.lambda = lambda;
  r.method = "DiffQ λ=" + lambda_string(lambda);
  Method m;
  m.name = "DiffQ l=" + lambda_string(lambda);
  m.forward = [&](const torch::Tensor& x) { return q.forward(x); };
  m.penalty = [&]() { return lambda * q.penalty(); };
  m.status = [&](double penalty) {
    // The penalty is λ·size; with λ = 0 show the size itself.
    const double size = lambda > 0 ? penalty / lambda : q.penalty().item<double>();
    return fmt("size %.3fMB", size) + fmt(" bits %.2f", q.mean_bits());
  };
  r.train_seconds = train(c, *model, optimizer, m, train_data);
  model->eval();
  const Accuracy a = evaluate(m.forward, test);
  r.correct = a.correct;
  r.total = a.total;
  r.mean_bits = q.mean_bits(/*rounded=*/true);
  r.learnt_bits = q.mean_bits();
  r.model_size_mb = q.true_model_size();
  r.bits_per_layer = q.mean_bits_per_param(/*rounded=*/true);
  r.checkpoint = c.out + "/fashion_mnist_diffq_l" + lambda_string(lambda) + ".dq";
  const size_t bytes = diffq::save_quantized(q, r.checkpoint);
  r.file_bytes = file_size(r.checkpoint);
  TORCH_CHECK(bytes == r.file_bytes, "fashion_mnist: save_quantized reported ", bytes,
              " bytes but '", r.checkpoint, "' has ", r.file_bytes);
  finish_run(c, r, "diffq");
  return r;
}

/// The result fields shared by the quantizer runs (any quantizer of diffq), after training: test
/// accuracy through the quantizer in eval mode, bits, size, and the checkpoint written with
/// `diffq::save_quantized` under `name`.
template <class Quantizer>
void finish_quantized(const Config& c, Quantizer& q, Net& model, const std::string& name,
                      const Data& test, RunResult& r) {
  model->eval();
  const Accuracy a = evaluate([&](const torch::Tensor& x) { return q.forward(x); }, test);
  r.correct = a.correct;
  r.total = a.total;
  r.mean_bits = q.mean_bits(/*rounded=*/true);
  r.learnt_bits = q.mean_bits();
  r.model_size_mb = q.true_model_size();
  r.bits_per_layer = q.mean_bits_per_param(/*rounded=*/true);
  r.checkpoint = c.out + "/fashion_mnist_" + name + ".dq";
  const size_t bytes = diffq::save_quantized(q, r.checkpoint);
  r.file_bytes = file_size(r.checkpoint);
  TORCH_CHECK(bytes == r.file_bytes, "fashion_mnist: save_quantized reported ", bytes,
              " bytes but '", r.checkpoint, "' has ", r.file_bytes);
  finish_run(c, r, "diffq");
}

/// Uniform post-training quantization of the trained fp32 `model` (no training); the model is
/// left unchanged.
RunResult run_uniform_ptq(const Config& c, Net& model, int64_t bits, const Data& test) {
  diffq::UniformQuantizer<Net> q(model, uniform_options(c, bits, /*qat=*/false));
  RunResult r;
  r.quantized = true;
  r.method = "uniform PTQ " + std::to_string(bits) + "-bit";
  finish_quantized(c, q, model, "uniform" + std::to_string(bits), test, r);
  q.detach();
  return r;
}

/// Trains a fresh model with quantizer `Quantizer` (built from `options`, after the optimizer) by
/// the fp32 recipe and finishes the run; `setup(q, optimizer)` may give the quantizer's own
/// parameters to the optimizer.
template <typename Quantizer, typename Options, typename Setup>
RunResult run_quantization_aware(const Config& c, const Options& options, const std::string& name,
                                 const std::string& file_stem, const Data& train_data,
                                 const Data& test, Setup setup) {
  torch::manual_seed(c.seed);
  Net model;
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(c.lr));
  Quantizer q(model, options);
  setup(q, optimizer);
  RunResult r;
  r.quantized = true;
  r.method = name;
  Method m;
  m.name = name;
  m.forward = [&](const torch::Tensor& x) { return q.forward(x); };
  r.train_seconds = train(c, *model, optimizer, m, train_data);
  finish_quantized(c, q, model, file_stem, test, r);
  return r;
}

/// QAT with the straight-through estimator: uniform quantization with `c.qat_bits`, trained with
/// the fp32 recipe.
RunResult run_qat(const Config& c, const Data& train_data, const Data& test) {
  const std::string bits = std::to_string(c.qat_bits);
  return run_quantization_aware<diffq::UniformQuantizer<Net>>(
      c, uniform_options(c, c.qat_bits, /*qat=*/true), "QAT " + bits + "-bit", "qat" + bits,
      train_data, test, [](auto&, auto&) {});
}

/// LSQ with `c.lsq_bits`, trained with the fp32 recipe; the step sizes share the weights' lr.
RunResult run_lsq(const Config& c, const Data& train_data, const Data& test) {
  const std::string bits = std::to_string(c.lsq_bits);
  return run_quantization_aware<diffq::LSQQuantizer<Net>>(
      c, lsq_options(c), "LSQ " + bits + "-bit", "lsq" + bits, train_data, test,
      [&c](auto& q, auto& optimizer) { q.setup_optimizer(optimizer, c.lr); });
}

int run_train(const Config& c) {
  diffq::check_options(diffq_options(c), "fashion_mnist");
  for (int64_t b : c.uniform_bits)
    diffq::check_options(uniform_options(c, b, false), "fashion_mnist");
  diffq::check_options(uniform_options(c, c.qat_bits, true), "fashion_mnist");
  diffq::check_options(lsq_options(c), "fashion_mnist");
  torch::set_num_threads(c.threads);
  std::filesystem::create_directories(c.out);
  const auto t0 = std::chrono::steady_clock::now();
  const Data train_data = load_data(c, /*train=*/true);
  const Data test = load_data(c, /*train=*/false);
  std::fprintf(stderr, "fashion_mnist: %lld training and %lld test images from %s (%.1f s)\n",
               static_cast<long long>(train_data.x.size(0)), static_cast<long long>(test.x.size(0)),
               c.data.c_str(),
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());

  warm_up(c, train_data);
  std::vector<RunResult> runs;
  // Uniform PTQ quantizes the trained fp32 model, so it trains (and reports) fp32 too.
  Net fp32_model{nullptr};
  if (c.fp32 || c.uniform) runs.push_back(run_fp32(c, fp32_model, train_data, test));
  if (c.diffq) {
    for (double lambda : c.penalties) runs.push_back(run_diffq(c, lambda, train_data, test));
  }
  if (c.uniform) {
    for (int64_t b : c.uniform_bits) runs.push_back(run_uniform_ptq(c, fp32_model, b, test));
  }
  if (c.qat) runs.push_back(run_qat(c, train_data, test));
  if (c.lsq) runs.push_back(run_lsq(c, train_data, test));

  const std::vector<ParamInfo> params = param_infos(*Net());
  int64_t numel = 0;
  for (const auto& p : params) numel += p.numel;
  std::vector<std::string> setup = {
      "data: " + std::to_string(train_data.x.size(0)) + " training images, " +
          std::to_string(test.x.size(0)) + " test images (`" + c.data + "`)",
      "model: conv(1→32, 3×3)-relu-maxpool-conv(32→64, 3×3)-relu-maxpool-fc(3136→128)-relu-"
      "fc(128→10), " +
          with_commas(static_cast<uint64_t>(numel)) + " parameters",
      "training: Adam lr " + fmt("%g", c.lr) + ", batch " + std::to_string(c.batch_size) + ", " +
          std::to_string(c.epochs) + " epoch(s), seed " + std::to_string(c.seed) + ", " +
          std::to_string(c.threads) + " thread(s); loss = cross-entropy + λ·model size (MB)",
      "DiffQ: group size " + std::to_string(c.group_size) + ", bits in [" + fmt("%g", c.min_bits) +
          ", " + fmt("%g", c.max_bits) + "] from " + fmt("%g", c.init_bits) + ", " + c.noise +
          " noise, logits parametrise " + c.param + ", bit logits' lr " + fmt("%g", c.bits_lr) +
          ", tensors ≤ " + fmt("%g", c.min_size_mb) + " MB kept fp32",
      "baselines: uniform PTQ = `diffq::UniformQuantizer` (fixed bits, per-tensor min/max) on the "
      "trained fp32 model, no training; QAT = the same quantizer with the straight-through "
      "estimator, trained like fp32; LSQ = `diffq::LSQQuantizer` (learnt step size per tensor), "
      "trained like fp32; tensors ≤ " +
          fmt("%g", c.min_size_mb) + " MB kept fp32",
      "file sizes: fp32 = `torch::save` of the model; quantized models = "
      "`diffq::save_quantized` (compressed). MB = 2^20 bytes",
  };
  const bool figure =
      std::any_of(runs.begin(), runs.end(), [](const auto& r) { return r.diffq || r.quantized; });
  const std::string md = markdown_report(runs, params, setup, figure ? "fashion_mnist.svg" : "");
  {
    std::ofstream f(c.out + "/report.md");
    f << md;
    TORCH_CHECK(f.good(), "fashion_mnist: cannot write '", c.out, "/report.md'");
  }
  if (figure) {
    std::ofstream f(c.out + "/fashion_mnist.svg");
    f << svg_figure(runs, params, c.max_bits);
    TORCH_CHECK(f.good(), "fashion_mnist: cannot write '", c.out, "/fashion_mnist.svg'");
  }
  std::printf("\n%s\nreport: %s/report.md%s\n", md.c_str(), c.out.c_str(),
              figure ? (", figure: " + c.out + "/fashion_mnist.svg").c_str() : "");
  bool ok = true;
  for (const auto& r : runs) ok = ok && r.reload_equal();
  if (!ok) {
    std::fprintf(stderr,
                 "fashion_mnist: the accuracy of a reloaded checkpoint differs from the "
                 "in-process accuracy\n");
    return kExitMismatch;
  }
  return 0;
}

}  // namespace
}  // namespace fmnist

int main(int argc, char** argv) {
  fmnist::Config c;
  try {
    c = fmnist::parse_args(argc, argv);
  } catch (const fmnist::UsageError& e) {
    std::fprintf(stderr, "fashion_mnist: %s\n\n%s", e.what(), fmnist::kUsage);
    return fmnist::kExitUsage;
  }
  if (c.command == "help" || c.command == "--help" || c.command == "-h") {
    std::fputs(fmnist::kUsage, stdout);
    return 0;
  }
  try {
    return c.command == "train" ? fmnist::run_train(c) : fmnist::run_eval(c);
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "%s\n", e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
  }
  return 1;
}
