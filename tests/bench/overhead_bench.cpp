// Training-step overhead of DiffQ: median step time with and without the quantizer (Adam, batch
// 128, one thread, cross-entropy + λ·penalty, group size 16, min_size_mb 0.01), interleaving the
// two so machine noise hits both alike. Prints `ratio=` (DiffQ / plain) per model, and the size
// budget's cost, `budget_ratio=` (DiffQ with diffq::SizeBudget / DiffQ with a fixed λ).
//
//   ./overhead_bench [--steps N] [--warmup N] [--threads N] [--model mlp|cnn|mlp10m|all]
//                    [--budget-blocks N] [--allocator default|tuned]
#include <diffq/diffq.h>

#include <torch/torch.h>
#include "../../examples/char_lm/model.h"
#include "bench_models.h"

#include <malloc.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace {

using diffq_bench::CNN;
using diffq_bench::MLP;

template <typename Holder>
void bench(const std::string& name, std::function<Holder()> make, const torch::Tensor& x,
           const torch::Tensor& y, int steps, int warmup) {
  torch::manual_seed(0);
  Holder plain = make();
  Holder quant = make();
  torch::optim::Adam plain_opt(plain->parameters(), torch::optim::AdamOptions(1e-3));
  torch::optim::Adam quant_opt(quant->parameters(), torch::optim::AdamOptions(1e-3));
  diffq::DiffQuantizer<Holder> q(quant, diffq::DiffQOptions().group_size(16).min_size_mb(0.01));
  q.setup_optimizer(quant_opt, 1e-2);
  const double lambda = 1.0;
  // Logits [N, C] (the classifiers) or [B, T, C] (the language model): classes last.
  auto ce = [&y](const torch::Tensor& logits) {
    return torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}),
                                                y.reshape({-1}));
  };
  auto plain_step = [&] {
    auto loss = ce(plain->forward(x));
    plain_opt.zero_grad();
    loss.backward();
    plain_opt.step();
  };
  auto quant_step = [&] {
    auto loss = ce(q.forward(x)) + lambda * q.penalty();
    quant_opt.zero_grad();
    loss.backward();
    quant_opt.step();
  };
  const auto t = diffq_bench::interleaved_medians(plain_step, quant_step, warmup, steps);
  const double mp = t.first, mq = t.second;
  int64_t numel = 0;
  for (const auto& p : plain->parameters()) numel += p.numel();
  std::printf("%-8s params=%-9lld plain_ms=%8.2f diffq_ms=%8.2f ratio=%.3f\n", name.c_str(),
              static_cast<long long>(numel), mp * 1e3, mq * 1e3, mq / mp);
  std::fflush(stdout);
}

/// The size budget's cost: blocks of `block` DiffQ training steps (one measurement of the true
/// size per block, `SizeBudgetOptions::measure_every` = block), with `SizeBudget` (loss_term() and
/// step()) against a fixed λ (λ·penalty()), interleaved; a median over blocks, not over steps,
/// since only one step in `block` measures. Prints `budget_ratio=` (budget / λ), and the mean
/// time inside `SizeBudget::step()` per step as a share of the step (timed around each call:
/// the ratio alone cannot resolve 1 % on this machine).
template <typename Holder>
void bench_budget(const std::string& name, std::function<Holder()> make, const torch::Tensor& x,
                  const torch::Tensor& y, int blocks, int warmup) {
  const int64_t block = diffq::SizeBudgetOptions().measure_every();
  torch::manual_seed(0);
  Holder a = make();
  Holder b = make();
  torch::optim::Adam a_opt(a->parameters(), torch::optim::AdamOptions(1e-3));
  torch::optim::Adam b_opt(b->parameters(), torch::optim::AdamOptions(1e-3));
  diffq::DiffQuantizer<Holder> qa(a, diffq::DiffQOptions().group_size(16).min_size_mb(0.01));
  diffq::DiffQuantizer<Holder> qb(b, diffq::DiffQOptions().group_size(16).min_size_mb(0.01));
  qa.setup_optimizer(a_opt, 1e-2);
  qb.setup_optimizer(b_opt, 1e-2);
  // A budget of half the initial size: the model is over it throughout, λ rises.
  diffq::SizeBudget<Holder> budget(qb, 0.5 * qb.true_model_size());
  const double lambda = 1.0;
  double in_step_seconds = 0;  // inside SizeBudget::step(), over every budget step
  int64_t budget_steps = 0;
  auto lambda_block = [&] {
    for (int64_t i = 0; i < block; ++i) {
      auto loss = torch::nn::functional::cross_entropy(qa.forward(x), y) + lambda * qa.penalty();
      a_opt.zero_grad();
      loss.backward();
      a_opt.step();
    }
  };
  auto budget_block = [&] {
    for (int64_t i = 0; i < block; ++i) {
      auto loss = torch::nn::functional::cross_entropy(qb.forward(x), y) + budget.loss_term();
      b_opt.zero_grad();
      loss.backward();
      b_opt.step();
      const auto t0 = std::chrono::steady_clock::now();
      budget.step();
      in_step_seconds += diffq_bench::seconds_since(t0);
      ++budget_steps;
    }
  };
  const auto t = diffq_bench::interleaved_medians(lambda_block, budget_block, warmup, blocks);
  TORCH_CHECK(!budget.history().empty(), "overhead_bench: the budget never measured");
  const double step_ms = in_step_seconds * 1e3 / budget_steps;  // mean, measurements included
  std::printf(
      "%-8s budget: lambda_loop_ms=%8.2f budget_loop_ms=%8.2f per step, "
      "budget_ratio=%.4f (blocks of %lld steps, one size measurement each); "
      "SizeBudget::step() %.4f ms per step = %.3f %% of the step\n",
      name.c_str(), t.first * 1e3 / block, t.second * 1e3 / block, t.second / t.first,
      static_cast<long long>(block), step_ms, 100 * step_ms / (t.second * 1e3 / block));
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 30, warmup = 3, threads = 1, budget_blocks = 9;
  std::string which = "all";
  std::string allocator = "default";
  for (int i = 1; i < argc; ++i) {
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "missing value after %s\n", argv[i]);
        std::exit(2);
      }
      return argv[++i];
    };
    if (!std::strcmp(argv[i], "--steps"))
      steps = std::atoi(next());
    else if (!std::strcmp(argv[i], "--warmup"))
      warmup = std::atoi(next());
    else if (!std::strcmp(argv[i], "--threads"))
      threads = std::atoi(next());
    else if (!std::strcmp(argv[i], "--model"))
      which = next();
    else if (!std::strcmp(argv[i], "--budget-blocks"))
      budget_blocks = std::atoi(next());
    else if (!std::strcmp(argv[i], "--allocator"))
      allocator = next();
    else {
      std::fprintf(
          stderr,
          "usage: %s [--steps N] [--warmup N] [--threads N] [--model mlp|cnn|mlp10m|lm|all] "
          "[--budget-blocks N] [--allocator default|tuned]\n",
          argv[0]);
      return 2;
    }
  }
  if (allocator != "default" && allocator != "tuned") {
    std::fprintf(stderr, "--allocator expects default or tuned, got '%s'\n", allocator.c_str());
    return 2;
  }
  // glibc's allocator. By default its mmap threshold is dynamic: LibTorch's Adam then gets its
  // large temporaries from fresh mmap'd pages and page-faults on them at every step, which slows
  // the plain step as much as the DiffQ one and lowers the ratios. `tuned` fixes the thresholds
  // here, before any tensor exists, as a user tuning their training would: the effect of
  // MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4000000000 in the environment (mallopt
  // takes an int: a trim threshold of 2e9, larger than any heap here, too).
  const char* env_mmap = std::getenv("MALLOC_MMAP_THRESHOLD_");
  if (allocator == "tuned") {
    if (mallopt(M_MMAP_THRESHOLD, 33554432) != 1 || mallopt(M_TRIM_THRESHOLD, 2000000000) != 1) {
      std::fprintf(stderr, "overhead_bench: mallopt failed\n");
      return 1;
    }
  }
  const std::string allocator_text =
      allocator == "tuned" ? "tuned (mallopt: mmap threshold 32 MiB, trim threshold 2e9)"
      : env_mmap != nullptr
          ? std::string("from the environment (MALLOC_MMAP_THRESHOLD_=") + env_mmap + ")"
          : "default (glibc's dynamic mmap threshold)";
  torch::set_num_threads(threads);
  std::printf(
      "diffq overhead bench: Adam, batch 128 (lm: the char_lm example's batch and context), "
      "threads=%d, group_size=16, min_size_mb=0.01, median of %d interleaved steps, "
      "allocator=%s\n",
      threads, steps, allocator_text.c_str());
  torch::manual_seed(0);
  auto x_flat = torch::randn({128, 784});
  auto x_img = torch::randn({128, 1, 28, 28});
  auto y = torch::randint(0, 10, {128}, torch::kLong);
  if (which == "all" || which == "mlp") {
    bench<MLP>(
        "mlp",
        [] {
          return MLP(std::vector<int64_t>{784, 512, 512, 10});
        },
        x_flat, y, steps, warmup);
  }
  if (which == "all" || which == "cnn") {
    bench<CNN>(
        "cnn", [] { return CNN(); }, x_img, y, steps, warmup);
  }
  // The size budget's controller against a fixed λ (the MLP and the Fashion-MNIST CNN);
  // --budget-blocks 0 skips it.
  if (budget_blocks > 0 && (which == "all" || which == "mlp")) {
    bench_budget<MLP>(
        "mlp",
        [] {
          return MLP(std::vector<int64_t>{784, 512, 512, 10});
        },
        x_flat, y, budget_blocks, 1);
  }
  if (budget_blocks > 0 && (which == "all" || which == "cnn")) {
    bench_budget<CNN>(
        "cnn", [] { return CNN(); }, x_img, y, budget_blocks, 1);
  }
  if (which == "all" || which == "mlp10m") {
    bench<MLP>(
        "mlp10m",
        [] {
          return MLP(std::vector<int64_t>{784, 2048, 2048, 2048, 10});
        },
        x_flat, y, std::max(5, steps / 3), std::min(warmup, 2));
  }
  // The char_lm example's Transformer LM (its default model), at its batch and context: tokens
  // [B, T], next-byte targets [B, T].
  if (which == "all" || which == "lm") {
    const char_lm::ModelOptions lm;
    auto tokens =
        torch::randint(0, char_lm::kVocab, {char_lm::kDefaultBatch, lm.context()}, torch::kLong);
    auto next =
        torch::randint(0, char_lm::kVocab, {char_lm::kDefaultBatch, lm.context()}, torch::kLong);
    bench<char_lm::CharLM>(
        "lm", [lm] { return char_lm::CharLM(lm); }, tokens, next, std::max(9, steps / 2),
        std::min(warmup, 2));
  }
  return 0;
}
