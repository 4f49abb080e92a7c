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

#include "../common/child_process.h"
#include "../common/progress.h"
#include "cli.h"
#include "idx.h"
#include "report.h"

#include <diffq/checkpoint.h>
#include <diffq/diffq.h>
#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

extern char** environ;

namespace fmnist {
namespace {

using diffq_examples::ProgressBar;

constexpr int kEvalBatch = 1000;
constexpr double kMean = 0.2860;
constexpr double kStd = 0.3530;

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
  /// Called after each optimizer step (the size budget's controller); may be null.
  std::function<void()> after_step;
};

/// This process's place in a data-parallel run (`--world-size`); one process: no process group.
struct Parallel {
  int rank = 0, world_size = 1;
#ifdef USE_C10D_GLOO
  c10::intrusive_ptr<c10d::ProcessGroupGloo> group;
#endif
  /// Rank 0 evaluates, writes the checkpoints and the report, and shows progress.
  bool leader() const {
    return rank == 0;
  }
};

/// Averages the gradients across the ranks (`diffq::DataParallel` over the model or the
/// quantizer, its logits or step sizes included); nothing with one process.
class GradientSync {
 public:
  template <typename ModelOrQuantizer>
  GradientSync(const Parallel& p, ModelOrQuantizer& m) {
#ifdef USE_C10D_GLOO
    if (p.group) parallel_ = std::make_unique<diffq::DataParallel>(p.group, m);
#else
    (void)p;
    (void)m;
#endif
  }
  void operator()() {
#ifdef USE_C10D_GLOO
    if (parallel_) parallel_->sync_gradients();
#endif
  }

 private:
#ifdef USE_C10D_GLOO
  std::unique_ptr<diffq::DataParallel> parallel_;
#endif
};

/// Trains for `c.epochs` epochs; returns the training time in seconds (batches only). With
/// several ranks, each takes its contiguous part of every batch (the permutation is the same on
/// every rank), its loss is its part's summed cross-entropy over the batch size times the number
/// of ranks, so that the averaged gradient is the gradient of the whole batch's mean loss; `sync`
/// averages after each backward.
double train(const Config& c, const Parallel& par, torch::nn::Module& model,
             torch::optim::Optimizer& optimizer, const Method& m, const Data& train_data,
             GradientSync& sync) {
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
      const int64_t len = std::min(c.batch_size, n - start);
      auto idx = perm.narrow(0, start, len);
      if (par.world_size > 1) {  // this rank's part of the batch
        const int64_t lo = len * par.rank / par.world_size;
        idx = idx.narrow(0, lo, len * (par.rank + 1) / par.world_size - lo);
      }
      auto x = train_data.x.index_select(0, idx);
      auto y = train_data.y.index_select(0, idx);
      auto logits = m.forward(x);
      torch::Tensor ce_sum, loss;
      if (par.world_size == 1) {
        loss = torch::nn::functional::cross_entropy(logits, y);
        ce_sum = loss.detach() * x.size(0);
      } else {
        ce_sum = torch::nn::functional::cross_entropy(
            logits, y, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
        loss = ce_sum * (static_cast<double>(par.world_size) / static_cast<double>(len));
      }
      if (m.penalty) {
        last_penalty = m.penalty();
        loss = loss + last_penalty;
      }
      optimizer.zero_grad();
      loss.backward();
      sync();
      optimizer.step();
      if (m.after_step) m.after_step();
      loss_sum += ce_sum.item<double>();
      correct += logits.argmax(1).eq(y).sum().item<int64_t>();
      seen += x.size(0);
      if (par.leader() && seen > 0 && bar.due(b + 1)) {
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

std::string detect_format(const std::string& path) {
  return diffq_examples::detect_checkpoint_format(path, "fashion_mnist");
}

std::string self_exe() {
  return diffq_examples::self_exe("fashion_mnist");
}

/// Runs `self eval --checkpoint path ...` in a new process and reads its accuracy from its stdout.
Accuracy eval_in_new_process(const Config& c, const std::string& checkpoint,
                             const std::string& format) {
  std::vector<std::string> args = {
      self_exe(), "eval",   "--checkpoint", checkpoint,  "--format",
      format,     "--data", c.data,         "--threads", std::to_string(c.threads)};
  if (c.test_limit > 0) {
    args.push_back("--test-limit");
    args.push_back(std::to_string(c.test_limit));
  }
  return parse_eval_output(diffq_examples::run_and_capture_stdout(args, "fashion_mnist"));
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
  // The counts on a line of their own, the last one: the parent reads only that line, whatever the
  // path holds.
  std::printf("checkpoint=%s format=%s\n", c.checkpoint.c_str(), format.c_str());
  std::printf("correct=%lld total=%lld accuracy=%.2f%%\n", static_cast<long long>(a.correct),
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
RunResult run_fp32(const Config& c, const Parallel& par, Net& model, const Data& train_data,
                   const Data& test) {
  torch::manual_seed(c.seed);
  model = Net();
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(c.lr));
  GradientSync sync(par, model);
  Method m;
  m.name = "fp32";
  m.forward = [&](const torch::Tensor& x) { return model->forward(x); };
  RunResult r;
  r.method = "fp32";
  r.train_seconds = train(c, par, *model, optimizer, m, train_data, sync);
  model->eval();
  if (!par.leader()) return r;
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

/// One DiffQ run: a fixed penalty weight λ (`target_mb == 0`), or a size budget of `target_mb` MB
/// reached by `diffq::SizeBudget` (λ adjusted during training, `finalize()` after it).
struct DiffQRun {
  double lambda = 0;
  double target_mb = 0;
};

/// The size budget's controller of a run (its options from the command line).
diffq::SizeBudget<Net> make_budget(const Config& c, diffq::DiffQuantizer<Net>& q,
                                   double target_mb) {
  return diffq::SizeBudget<Net>(
      q, target_mb,
      diffq::SizeBudgetOptions().lr(c.budget_lr).measure_every(c.budget_measure_every));
}

RunResult run_diffq(const Config& c, const Parallel& par, const DiffQRun& run,
                    const Data& train_data, const Data& test) {
  torch::manual_seed(c.seed);
  Net model;
  // The optimizer holds the model's parameters before the quantizer adds the bit logits.
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(c.lr));
  diffq::DiffQuantizer<Net> q(model, diffq_options(c));
  q.setup_optimizer(optimizer, c.bits_lr);
  GradientSync sync(par, q);  // after the quantizer: the logits are averaged too
  std::optional<diffq::SizeBudget<Net>> budget;
  if (run.target_mb > 0) budget.emplace(make_budget(c, q, run.target_mb));
  RunResult r;
  r.diffq = true;
  r.lambda = run.lambda;
  r.target_mb = run.target_mb;
  r.method = budget ? "DiffQ ≤" + budget_string(run.target_mb) + " MB"
                    : "DiffQ λ=" + lambda_string(run.lambda);
  Method m;
  m.name = budget ? "DiffQ <=" + budget_string(run.target_mb) + "MB"
                  : "DiffQ l=" + lambda_string(run.lambda);
  m.forward = [&](const torch::Tensor& x) { return q.forward(x); };
  if (budget) {
    m.penalty = [&]() { return budget->loss_term(); };
    m.after_step = [&]() { budget->step(); };
    m.status = [&](double) {
      const auto& h = budget->history();
      const double size = h.empty() ? q.true_model_size() : h.back().size_mb;
      return fmt("size %.3fMB", size) + fmt(" weight %.3g", budget->penalty_weight());
    };
  } else {
    const double lambda = run.lambda;
    m.penalty = [&, lambda]() { return lambda * q.penalty(); };
    m.status = [&, lambda](double penalty) {
      // The penalty is λ·size; with λ = 0 show the size itself.
      const double size = lambda > 0 ? penalty / lambda : q.penalty().item<double>();
      return fmt("size %.3fMB", size) + fmt(" bits %.2f", q.mean_bits());
    };
  }
  r.train_seconds = train(c, par, *model, optimizer, m, train_data, sync);
  if (budget) {
    // Every rank holds the same logits (averaged gradients): each lowers the same groups.
    const diffq::FitReport fit = budget->finalize();
    r.lambda = budget->penalty_weight();  // comparable to a λ run's λ
    r.size_before_fit_mb = fit.size_before_mb;
    r.lowered_groups = static_cast<int64_t>(fit.lowered.size());
  }
  model->eval();
  if (!par.leader()) return r;
  const Accuracy a = evaluate(m.forward, test);
  r.correct = a.correct;
  r.total = a.total;
  r.mean_bits = q.mean_bits(/*rounded=*/true);
  r.learnt_bits = q.mean_bits();
  r.model_size_mb = q.true_model_size();
  r.bits_per_layer = q.mean_bits_per_param(/*rounded=*/true);
  r.checkpoint =
      c.out + "/" +
      (budget ? diffq_budget_checkpoint_name(run.target_mb) : diffq_checkpoint_name(run.lambda));
  const size_t bytes = diffq::save_quantized(q, r.checkpoint);
  r.file_bytes = file_size(r.checkpoint);
  TORCH_CHECK(bytes == r.file_bytes, "fashion_mnist: save_quantized reported ", bytes,
              " bytes but '", r.checkpoint, "' has ", r.file_bytes);
  if (budget) {
    // The controller's trajectory, one row per measurement.
    const std::string csv = r.checkpoint.substr(0, r.checkpoint.size() - 3) + "_lambda.csv";
    std::ofstream out(csv);
    out << "step,size_mb,violation,lambda,penalty_weight\n";
    for (const auto& h : budget->history()) {
      out << h.step << ',' << fmt("%.6f", h.size_mb) << ',' << fmt("%.6f", h.violation) << ','
          << fmt("%.6g", h.lambda) << ',' << fmt("%.6g", h.penalty_weight) << '\n';
    }
    TORCH_CHECK(out.good(), "fashion_mnist: cannot write '", csv, "'");
    std::printf(
        "%-12s budget %.4f MB: final penalty weight %.4g (λ %.4g), size %.4f MB before "
        "finalize(), %lld group(s) lowered\n",
        r.method.c_str(), run.target_mb, r.lambda, budget->lambda(), r.size_before_fit_mb,
        static_cast<long long>(r.lowered_groups));
  }
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
RunResult run_quantization_aware(const Config& c, const Parallel& par, const Options& options,
                                 const std::string& name, const std::string& file_stem,
                                 const Data& train_data, const Data& test, Setup setup) {
  torch::manual_seed(c.seed);
  Net model;
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(c.lr));
  Quantizer q(model, options);
  setup(q, optimizer);
  GradientSync sync(par, q);  // after the quantizer: LSQ's step sizes are averaged too
  RunResult r;
  r.quantized = true;
  r.method = name;
  Method m;
  m.name = name;
  m.forward = [&](const torch::Tensor& x) { return q.forward(x); };
  r.train_seconds = train(c, par, *model, optimizer, m, train_data, sync);
  if (par.leader()) finish_quantized(c, q, model, file_stem, test, r);
  return r;
}

/// QAT with the straight-through estimator: uniform quantization with `c.qat_bits`, trained with
/// the fp32 recipe.
RunResult run_qat(const Config& c, const Parallel& par, const Data& train_data, const Data& test) {
  const std::string bits = std::to_string(c.qat_bits);
  return run_quantization_aware<diffq::UniformQuantizer<Net>>(
      c, par, uniform_options(c, c.qat_bits, /*qat=*/true), "QAT " + bits + "-bit", "qat" + bits,
      train_data, test, [](auto&, auto&) {});
}

/// LSQ with `c.lsq_bits`, trained with the fp32 recipe; the step sizes share the weights' lr.
RunResult run_lsq(const Config& c, const Parallel& par, const Data& train_data, const Data& test) {
  const std::string bits = std::to_string(c.lsq_bits);
  return run_quantization_aware<diffq::LSQQuantizer<Net>>(
      c, par, lsq_options(c), "LSQ " + bits + "-bit", "lsq" + bits, train_data, test,
      [&c](auto& q, auto& optimizer) { q.setup_optimizer(optimizer, c.lr); });
}

/// A TCP port on loopback that was free a moment ago (bound to port 0, then closed).
int free_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  TORCH_CHECK(fd >= 0, "fashion_mnist: socket failed: ", std::strerror(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  const bool ok = bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
                  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  const int err = errno;
  close(fd);
  TORCH_CHECK(ok, "fashion_mnist: cannot find a free port on 127.0.0.1: ", std::strerror(err));
  return ntohs(addr.sin_port);
}

/// `--world-size N` without `--rank`: starts this program N times (`--rank r`, a free port on
/// loopback), ranks > 0 with their stdout discarded, and waits for them. When one fails, the others
/// are stopped (a rank that failed before joining would leave them waiting until the timeout).
/// Returns the first failure's exit status, else 0.
volatile std::sig_atomic_t launcher_signal = 0;
extern "C" void on_launcher_signal(int sig) {
  launcher_signal = sig;
}

int launch_ranks(const Config& c, int argc, char** argv) {
  // SIGINT, SIGTERM and SIGHUP reach the ranks too (no SA_RESTART: wait() returns to forward it).
  struct sigaction sa {};
  sa.sa_handler = on_launcher_signal;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaction(sig, &sa, nullptr);
  const std::string exe = self_exe();
  const std::string port = std::to_string(c.master_port > 0 ? c.master_port : free_port());
  std::vector<pid_t> pids;
  for (int r = 0; r < c.world_size; ++r) {
    std::vector<std::string> args(argv, argv + argc);
    args[0] = exe;
    for (const std::string& a :
         {std::string("--rank"), std::to_string(r), std::string("--master-addr"), c.master_addr,
          std::string("--master-port"), port}) {
      args.push_back(a);
    }
    std::vector<char*> cargv;
    for (auto& a : args) cargv.push_back(a.data());
    cargv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    if (r > 0) posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
    pid_t pid = 0;
    const int rc = posix_spawn(&pid, exe.c_str(), &actions, nullptr, cargv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    if (rc != 0) {
      for (pid_t p : pids) kill(p, SIGTERM);
      for (pid_t p : pids) waitpid(p, nullptr, 0);
      TORCH_CHECK(false, "fashion_mnist: cannot start rank ", r, " ('", exe,
                  "'): ", std::strerror(rc));
    }
    pids.push_back(pid);
  }
  std::fprintf(stderr, "fashion_mnist: %d ranks started (data parallel over %s:%s)\n", c.world_size,
               c.master_addr.c_str(), port.c_str());
  int result = 0;
  size_t left = pids.size();
  while (left > 0) {
    int status = 0;
    const pid_t pid = wait(&status);
    if (pid < 0) {
      if (errno != EINTR) break;
      if (launcher_signal != 0) {
        const int sig = launcher_signal;
        launcher_signal = 0;
        for (pid_t p : pids) {
          if (p > 0) kill(p, sig);
        }
        if (result == 0) result = 128 + sig;
      }
      continue;
    }
    const auto it = std::find(pids.begin(), pids.end(), pid);
    if (it == pids.end()) continue;
    --left;
    const int rank = static_cast<int>(it - pids.begin());
    *it = -1;
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (code != 0 && result == 0) {
      result = code;
      std::fprintf(stderr, "fashion_mnist: rank %d failed (%s); stopping the other ranks\n", rank,
                   WIFEXITED(status) ? ("exit status " + std::to_string(code)).c_str()
                                     : ("signal " + std::to_string(WTERMSIG(status))).c_str());
      for (pid_t p : pids) {
        if (p > 0) kill(p, SIGTERM);
      }
    }
  }
  return result;
}

/// This process's rank in the process group of `--world-size` (`--rank`, `--master-addr`,
/// `--master-port`), or a single process.
Parallel connect(const Config& c) {
  Parallel par;
  if (c.world_size == 1) return par;
  par.rank = c.rank;
  par.world_size = c.world_size;
#ifdef USE_C10D_GLOO
  par.group = diffq::gloo_group_from_tcp(c.master_addr, c.master_port, c.rank, c.world_size);
#else
  TORCH_CHECK(false,
              "fashion_mnist: --world-size > 1 needs diffq/distributed.h, and this build has no "
              "data parallelism (configure with DIFFQ_WITH_DISTRIBUTED=ON; Debian: libgloo-dev)");
#endif
  return par;
}

int run_train(const Config& c, int argc, char** argv) {
  // The options were checked by parse_args (those of the selected methods only).
  // An impossible budget is refused before anything runs (the message gives the floor).
  if (c.diffq && !c.target_sizes_mb.empty()) {
    Net probe;
    diffq::DiffQuantizer<Net> q(probe, diffq_options(c));
    for (double target : c.target_sizes_mb) {
      try {
        (void)make_budget(c, q, target);
      } catch (const c10::Error& e) {
        throw UsageError("--target-size-mb " + budget_string(target) + ": " +
                         e.what_without_backtrace());
      }
    }
  }
  if (c.world_size > 1 && c.rank < 0) return launch_ranks(c, argc, argv);
  torch::set_num_threads(c.threads);
  const Parallel par = connect(c);
  // Rank 0 writes; it fails now, not after the first training, on a bad --out.
  if (par.leader()) prepare_out_dir(c.out);
  const auto t0 = std::chrono::steady_clock::now();
  const Data train_data = load_data(c, /*train=*/true);
  const Data test = load_data(c, /*train=*/false);
  if (par.leader()) {
    std::fprintf(stderr, "fashion_mnist: %lld training and %lld test images from %s (%.1f s)\n",
                 static_cast<long long>(train_data.x.size(0)),
                 static_cast<long long>(test.x.size(0)), c.data.c_str(),
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }

  warm_up(c, train_data);
  std::vector<RunResult> runs;
  // Uniform PTQ quantizes the trained fp32 model, so it trains (and reports) fp32 too. With
  // several ranks, rank 0 alone evaluates and writes (the others return empty results).
  auto add = [&](RunResult r) {
    if (par.leader()) runs.push_back(std::move(r));
  };
  Net fp32_model{nullptr};
  if (c.fp32 || c.uniform) add(run_fp32(c, par, fp32_model, train_data, test));
  if (c.diffq) {
    for (double lambda : c.penalties) add(run_diffq(c, par, {lambda, 0}, train_data, test));
    for (double target : c.target_sizes_mb) add(run_diffq(c, par, {0, target}, train_data, test));
  }
  if (c.uniform && par.leader()) {
    for (int64_t b : c.uniform_bits) add(run_uniform_ptq(c, fp32_model, b, test));
  }
  if (c.qat) add(run_qat(c, par, train_data, test));
  if (c.lsq) add(run_lsq(c, par, train_data, test));
  if (!par.leader()) return 0;

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
          std::to_string(c.threads) +
          " thread(s) per process; loss = cross-entropy + λ·model "
          "size (MB)",
      c.world_size == 1
          ? std::string("processes: 1 (no data parallelism)")
          : "processes: " + std::to_string(c.world_size) +
                " trained data-parallel (`diffq::DataParallel` over Gloo, master " + c.master_addr +
                "), each on its part of every batch (about " +
                std::to_string(c.batch_size / c.world_size) +
                " images), gradients averaged before each step, its own pseudo quantization "
                "noise; train times are rank 0's; rank 0 evaluated and wrote the checkpoints",
  };
  // Only the selected methods' options (the others were not checked, and not used).
  if (c.diffq) {
    setup.push_back("DiffQ: group size " + std::to_string(c.group_size) + ", bits in [" +
                    fmt("%g", c.min_bits) + ", " + fmt("%g", c.max_bits) + "] from " +
                    fmt("%g", c.init_bits) + ", " + c.noise + " noise, logits parametrise " +
                    c.param + ", bit logits' lr " + fmt("%g", c.bits_lr) + ", tensors ≤ " +
                    fmt("%g", c.min_size_mb) + " MB kept fp32");
  }
  if (c.uniform || c.qat || c.lsq) {
    setup.push_back(
        "baselines: uniform PTQ = `diffq::UniformQuantizer` (fixed bits, per-tensor min/max) on "
        "the trained fp32 model, no training; QAT = the same quantizer with the straight-through "
        "estimator, trained like fp32; LSQ = `diffq::LSQQuantizer` (learnt step size per tensor), "
        "trained like fp32; tensors ≤ " +
        fmt("%g", c.min_size_mb) + " MB kept fp32");
  }
  setup.push_back(
      "file sizes: fp32 = `torch::save` of the model; quantized models = "
      "`diffq::save_quantized` (compressed). MB = 2^20 bytes");
  const bool figure =
      std::any_of(runs.begin(), runs.end(), [](const auto& r) { return r.diffq || r.quantized; });
  const std::string md = markdown_report(runs, params, setup, figure ? "fashion_mnist.svg" : "");
  auto write_text = [](const std::string& path, const std::string& text) {
    errno = 0;
    std::ofstream f(path);
    f << text;
    f.close();
    TORCH_CHECK(f.good(), "fashion_mnist: cannot write '", path,
                "': ", errno != 0 ? std::strerror(errno) : "write failed");
  };
  write_text(c.out + "/report.md", md);
  // The bits axis stops at --max-bits only when DiffQ ran (otherwise at the largest bits shown).
  if (figure) {
    write_text(c.out + "/fashion_mnist.svg", svg_figure(runs, params, c.diffq ? c.max_bits : 0));
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
    return c.command == "train" ? fmnist::run_train(c, argc, argv) : fmnist::run_eval(c);
  } catch (const fmnist::UsageError& e) {  // an option found wrong once the model exists
    std::fprintf(stderr, "fashion_mnist: %s\n", e.what());
    return fmnist::kExitUsage;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "%s\n", e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
  }
  return 1;
}
