// Data-parallel throughput: samples per second of the 10M-parameter MLP and the Fashion-MNIST CNN
// trained with 1 and with 2 processes (one intra-op thread each, batch 128 per process, Adam),
// plain LibTorch and DiffQ, both through diffq::DataParallel over Gloo on loopback. Prints per
// model and world size the medians, the ratio DiffQ/plain, and the 1 → 2 scaling of each.
//
//   ./data_parallel_bench [--steps N] [--rounds R] [--model mlp10m|cnn|all]
//                         [--allocator default|tuned|both]
//
// How it measures: each run starts `world` processes of this program (`--worker`), which build
// both models (plain and DiffQ, each with its own DataParallel on one process group) and
// alternate their training steps, so machine noise hits both alike; a step is forward, backward,
// sync_gradients() and optimizer.step(), timed on rank 0 after a barrier-like first step. The
// rounds alternate world sizes 1 and 2, and the figures are medians over rounds of the per-run
// median step times.
//
// glibc's allocator: with its default dynamic mmap threshold, LibTorch's Adam allocates its large
// temporaries with mmap and page-faults on them at every step. `--allocator tuned` runs the
// workers with MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4000000000 (what a user
// who tunes their training sets), `default` with glibc's defaults, `both` (the default) each.
#include <diffq/distributed.h>
#include <diffq/quantizer.h>
#include <torch/torch.h>

#include "bench_models.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

extern char** environ;

namespace {

using diffq_bench::CNN;
using diffq_bench::median;
using diffq_bench::MLP;

constexpr int64_t kBatch = 128;

/// One rank: both models, alternating steps; rank 0 prints `step plain_s diffq_s`.
template <typename Holder, typename Make>
void worker_bench(const c10::intrusive_ptr<c10d::ProcessGroupGloo>& group, Make make,
                  const torch::Tensor& x, const torch::Tensor& y, int steps) {
  torch::manual_seed(0);
  Holder plain = make();
  Holder quant = make();
  torch::optim::Adam plain_opt(plain->parameters(), torch::optim::AdamOptions(1e-3));
  torch::optim::Adam quant_opt(quant->parameters(), torch::optim::AdamOptions(1e-3));
  diffq::DiffQuantizer<Holder> q(quant, diffq::DiffQOptions().group_size(16).min_size_mb(0.01));
  q.setup_optimizer(quant_opt, 1e-2);
  diffq::DataParallel plain_dp(group, plain);
  diffq::DataParallel quant_dp(group, q);
  auto plain_step = [&] {
    auto loss = torch::nn::functional::cross_entropy(plain->forward(x), y);
    plain_opt.zero_grad();
    loss.backward();
    plain_dp.sync_gradients();
    plain_opt.step();
  };
  auto quant_step = [&] {
    auto loss = torch::nn::functional::cross_entropy(q.forward(x), y) + q.penalty();
    quant_opt.zero_grad();
    loss.backward();
    quant_dp.sync_gradients();
    quant_opt.step();
  };
  // 2 warm-up steps each (the first also lines the ranks up).
  const auto t = diffq_bench::interleaved_medians(plain_step, quant_step, 2, steps);
  if (group->getRank() == 0) std::printf("step %.6f %.6f\n", t.first, t.second);
}

int worker(const std::string& model, int steps) {
  torch::set_num_threads(1);
  const int rank = std::atoi(std::getenv("RANK"));
  const int world = std::atoi(std::getenv("WORLD_SIZE"));
  auto group =
      diffq::gloo_group_from_file(std::getenv("DIFFQ_BENCH_STORE"), rank, world,
                                  diffq::ProcessGroupOptions().timeout(std::chrono::seconds(120)));
  torch::manual_seed(100 + rank);  // each rank its own batch
  auto y = torch::randint(0, 10, {kBatch}, torch::kLong);
  if (model == "mlp10m") {
    worker_bench<MLP>(
        group,
        [] {
          return MLP(std::vector<int64_t>{784, 2048, 2048, 2048, 10});
        },
        torch::randn({kBatch, 784}), y, steps);
  } else {
    worker_bench<CNN>(
        group, [] { return CNN(); }, torch::randn({kBatch, 1, 28, 28}), y, steps);
  }
  return 0;
}

std::string self_exe() {
  std::vector<char> buf(4096);
  const ssize_t len = readlink("/proc/self/exe", buf.data(), buf.size() - 1);
  if (len <= 0) {
    std::perror("readlink /proc/self/exe");
    std::exit(1);
  }
  return std::string(buf.data(), static_cast<size_t>(len));
}

/// Runs `world` workers on `model`; returns rank 0's median step times (plain, DiffQ).
std::pair<double, double> run(const std::string& model, int world, int steps, bool tuned) {
  char dir_template[] = "/tmp/diffq_dp_bench_XXXXXX";
  const std::string dir = mkdtemp(dir_template);
  const std::string store = dir + "/store", out = dir + "/out";
  const std::string exe = self_exe();
  std::vector<pid_t> pids;
  for (int r = 0; r < world; ++r) {
    std::vector<std::string> env;
    for (char** e = environ; *e; ++e) {
      const std::string kv = *e;
      if (kv.rfind("MALLOC_", 0) == 0 || kv.rfind("RANK=", 0) == 0 ||
          kv.rfind("WORLD_SIZE=", 0) == 0) {
        continue;
      }
      env.push_back(kv);
    }
    env.push_back("RANK=" + std::to_string(r));
    env.push_back("WORLD_SIZE=" + std::to_string(world));
    env.push_back("DIFFQ_BENCH_STORE=" + store);
    env.push_back("OMP_NUM_THREADS=1");
    env.push_back("OPENBLAS_NUM_THREADS=1");
    if (tuned) {
      env.push_back("MALLOC_MMAP_THRESHOLD_=33554432");
      env.push_back("MALLOC_TRIM_THRESHOLD_=4000000000");
    }
    std::vector<std::string> args{exe, "--worker", model, "--steps", std::to_string(steps)};
    std::vector<char*> argv, envp;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    for (auto& e : env) envp.push_back(e.data());
    envp.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, r == 0 ? out.c_str() : "/dev/null",
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
    pid_t pid = 0;
    if (posix_spawn(&pid, exe.c_str(), &actions, nullptr, argv.data(), envp.data()) != 0) {
      std::perror("posix_spawn");
      std::exit(1);
    }
    posix_spawn_file_actions_destroy(&actions);
    pids.push_back(pid);
  }
  bool ok = true;
  for (pid_t pid : pids) {
    int st = 0;
    waitpid(pid, &st, 0);
    ok = ok && WIFEXITED(st) && WEXITSTATUS(st) == 0;
  }
  std::ifstream in(out);
  std::string tag;
  double plain = 0, quant = 0;
  in >> tag >> plain >> quant;
  std::remove(out.c_str());
  std::remove(store.c_str());
  rmdir(dir.c_str());
  if (!ok || tag != "step") {
    std::fprintf(stderr, "data_parallel_bench: a worker failed (%s, world %d)\n", model.c_str(),
                 world);
    std::exit(1);
  }
  return {plain, quant};
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 20, rounds = 3;
  std::string which = "all", allocator = "both";
  bool is_worker = false;
  std::string worker_model;
  for (int i = 1; i < argc; ++i) {
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "missing value after %s\n", argv[i]);
        std::exit(2);
      }
      return argv[++i];
    };
    const std::string a = argv[i];
    if (a == "--steps") {
      steps = std::atoi(next().c_str());
    } else if (a == "--rounds") {
      rounds = std::atoi(next().c_str());
    } else if (a == "--model") {
      which = next();
    } else if (a == "--allocator") {
      allocator = next();
    } else if (a == "--worker") {
      is_worker = true;
      worker_model = next();
    } else {
      std::fprintf(stderr,
                   "usage: %s [--steps N] [--rounds R] [--model mlp10m|cnn|all] "
                   "[--allocator default|tuned|both]\n",
                   argv[0]);
      return 2;
    }
  }
  if (is_worker) return worker(worker_model, steps);
  if (steps < 1 || rounds < 1 ||
      (allocator != "default" && allocator != "tuned" && allocator != "both") ||
      (which != "all" && which != "mlp10m" && which != "cnn")) {
    std::fprintf(stderr, "data_parallel_bench: bad --steps, --rounds, --model or --allocator\n");
    return 2;
  }
  std::printf(
      "diffq data-parallel bench: Adam, batch %lld per process, 1 thread per process, Gloo over "
      "loopback (FileStore), group_size=16, min_size_mb=0.01; medians of %d rounds of %d "
      "interleaved steps\n",
      static_cast<long long>(kBatch), rounds, steps);
  std::vector<std::string> models;
  if (which == "all" || which == "mlp10m") models.push_back("mlp10m");
  if (which == "all" || which == "cnn") models.push_back("cnn");
  std::vector<bool> allocs;
  if (allocator != "tuned") allocs.push_back(false);
  if (allocator != "default") allocs.push_back(true);
  for (bool tuned : allocs) {
    for (const auto& m : models) {
      std::map<int, std::vector<double>> plain, quant;
      for (int r = 0; r < rounds; ++r) {
        for (int world : {1, 2}) {
          const auto t = run(m, world, steps, tuned);
          plain[world].push_back(t.first);
          quant[world].push_back(t.second);
        }
      }
      double sps[2][3] = {};  // [plain|diffq][world]
      for (int world : {1, 2}) {
        sps[0][world] = world * kBatch / median(plain[world]);
        sps[1][world] = world * kBatch / median(quant[world]);
        std::printf(
            "%-7s allocator=%-7s world=%d plain_samples_per_s=%8.1f diffq_samples_per_s=%8.1f "
            "ratio=%.3f\n",
            m.c_str(), tuned ? "tuned" : "default", world, sps[0][world], sps[1][world],
            sps[1][world] / sps[0][world]);
      }
      std::printf("%-7s allocator=%-7s scaling_1_to_2 plain=%.3f diffq=%.3f\n", m.c_str(),
                  tuned ? "tuned" : "default", sps[0][2] / sps[0][1], sps[1][2] / sps[1][1]);
      std::fflush(stdout);
    }
  }
  return 0;
}
