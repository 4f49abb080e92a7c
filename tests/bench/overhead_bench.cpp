// Training-step overhead of DiffQ: median step time with and without the quantizer (Adam, batch
// 128, one thread, cross-entropy + λ·penalty, group size 16, min_size_mb 0.01), interleaving the
// two so machine noise hits both alike. Prints `ratio=` (DiffQ / plain) per model.
//
//   ./overhead_bench [--steps N] [--warmup N] [--threads N] [--model mlp|cnn|mlp10m|all]
#include <diffq/diffq.h>

#include <torch/torch.h>
#include "bench_models.h"

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
  auto plain_step = [&] {
    auto loss = torch::nn::functional::cross_entropy(plain->forward(x), y);
    plain_opt.zero_grad();
    loss.backward();
    plain_opt.step();
  };
  auto quant_step = [&] {
    auto loss = torch::nn::functional::cross_entropy(q.forward(x), y) + lambda * q.penalty();
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

}  // namespace

int main(int argc, char** argv) {
  int steps = 30, warmup = 3, threads = 1;
  std::string which = "all";
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
    else {
      std::fprintf(
          stderr, "usage: %s [--steps N] [--warmup N] [--threads N] [--model mlp|cnn|mlp10m|all]\n",
          argv[0]);
      return 2;
    }
  }
  torch::set_num_threads(threads);
  std::printf(
      "diffq overhead bench: Adam, batch 128, threads=%d, group_size=16, min_size_mb=0.01, "
      "median of %d interleaved steps\n",
      threads, steps);
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
  if (which == "all" || which == "mlp10m") {
    bench<MLP>(
        "mlp10m",
        [] {
          return MLP(std::vector<int64_t>{784, 2048, 2048, 2048, 10});
        },
        x_flat, y, std::max(5, steps / 3), std::min(warmup, 2));
  }
  return 0;
}
