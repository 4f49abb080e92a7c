// One rank of the multi-process tests of diffq/distributed.h (tests/distributed_test.cpp starts
// several of these and checks what they write).
//
//   distributed_worker SCENARIO [METHOD]
// Environment: RANK, WORLD_SIZE; DIFFQ_TEST_STORE (a FileStore path) or MASTER_ADDR and
// MASTER_PORT (a TCPStore, through gloo_group_from_env); DIFFQ_TEST_OUT, the folder the results
// go to (`<name>_<rank>.pt` archives); DIFFQ_TEST_TIMEOUT_MS, the process group's timeout.
// Exit status: 0 done, 3 a c10::Error (its message on stderr), 4 another exception.
#include <diffq/checkpoint.h>
#include <diffq/distributed.h>
#include <diffq/lsq.h>
#include <diffq/quantizer.h>
#include <diffq/uniform.h>

#include "test_models.h"

#include <torch/torch.h>

#include <csignal>
#include <cstdlib>
#include <iostream>
#include <string>

namespace {

using diffq_test::MLP;

int rank_ = 0;
std::string out_dir;

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : fallback;
}

c10::intrusive_ptr<c10d::ProcessGroupGloo> make_group() {
  auto options = diffq::ProcessGroupOptions().timeout(
      std::chrono::milliseconds(env_int("DIFFQ_TEST_TIMEOUT_MS", 20000)));
  if (const char* store = std::getenv("DIFFQ_TEST_STORE")) {
    return diffq::gloo_group_from_file(store, env_int("RANK", 0), env_int("WORLD_SIZE", 1),
                                       options);
  }
  return diffq::gloo_group_from_env(options);
}

/// Writes `tensors` (name → tensor; undefined ones are skipped) to `<out>/<name>_<rank>.pt`.
void save(const std::string& name, const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  torch::serialize::OutputArchive archive;
  for (const auto& kv : tensors) {
    if (kv.second.defined()) archive.write(kv.first, kv.second.detach().clone());
  }
  archive.save_to(out_dir + "/" + name + "_" + std::to_string(rank_) + ".pt");
}

std::vector<std::pair<std::string, at::Tensor>> params_of(const torch::nn::Module& m) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& kv : m.named_parameters()) out.emplace_back(kv.key(), kv.value());
  for (const auto& kv : m.named_buffers()) out.emplace_back(kv.key(), kv.value());
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> grads_of(const torch::nn::Module& m) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& kv : m.named_parameters()) out.emplace_back(kv.key(), kv.value().grad());
  return out;
}

/// The shard of this rank: rows [4·rank, 4·rank + 4) of a batch of 4·world_size rows drawn with
/// seed 7 (every rank draws the whole batch).
std::pair<at::Tensor, at::Tensor> shard(int world_size) {
  torch::manual_seed(7);
  auto x = torch::randn({4 * world_size, 10});
  auto y = torch::randn({4 * world_size, 3});
  return {x.narrow(0, 4 * rank_, 4), y.narrow(0, 4 * rank_, 4)};
}

/// Exactness: one training forward of DiffQ on this rank's shard, its own noise.
void exact(const std::string& method) {
  auto group = make_group();
  torch::manual_seed(10 + rank_);  // different initial weights: the wrapper broadcasts rank 0's
  MLP model;
  diffq::DiffQuantizer<MLP> q(model, diffq::DiffQOptions().group_size(4).min_size_mb(0));
  q.use_reference_kernels(method == "aten");
  q.no_optimizer();
  {
    torch::NoGradGuard ng;
    for (const auto& n : q.quantized_names()) {
      auto l = q.logit(n);
      l.copy_(torch::linspace(-1.5, 2.0, l.numel()));
    }
  }
  diffq::DataParallel parallel(group, q);
  save("init", params_of(*model));
  auto data = shard(group->getSize());
  torch::manual_seed(100);  // the seeds of the noise are drawn from here
  auto out = q.forward(data.first);
  auto loss = (out - data.second).pow(2).mean();
  std::vector<std::pair<std::string, at::Tensor>> noise;
  for (const auto& n : q.quantized_names()) noise.emplace_back(n, q.noise(n));
  save("noise", noise);
  loss.backward();
  save("local", grads_of(*model));
  parallel.sync_gradients();
  save("synced", grads_of(*model));
}

/// Consistency: 20 Adam steps on per-rank data, with each quantizer; the parameters and the
/// checkpoint of every rank are written.
template <typename Quantizer, typename Options>
void train(const Options& options) {
  auto group = make_group();
  torch::manual_seed(20 + rank_);
  MLP model;
  torch::optim::Adam optimizer(model->parameters(), 1e-2);
  Quantizer q(model, options);
  if constexpr (std::is_same<Quantizer, diffq::DiffQuantizer<MLP>>::value) {
    q.setup_optimizer(optimizer, 5e-2);
  } else if constexpr (std::is_same<Quantizer, diffq::LSQQuantizer<MLP>>::value) {
    q.setup_optimizer(optimizer, 1e-3);
  }
  diffq::DataParallel parallel(group, q);
  torch::manual_seed(30 + rank_);  // each rank its own data
  for (int step = 0; step < 20; ++step) {
    auto x = torch::randn({4, 10});
    auto loss = q.forward(x).pow(2).mean();
    if constexpr (std::is_same<Quantizer, diffq::DiffQuantizer<MLP>>::value) {
      loss = loss + 0.1 * q.penalty();
    }
    optimizer.zero_grad();
    loss.backward();
    if (step == 0) save("local", grads_of(*model));
    parallel.sync_gradients();
    if (step == 0) save("synced", grads_of(*model));
    optimizer.step();
  }
  save("final", params_of(*model));
  model->eval();
  diffq::save_quantized(q, out_dir + "/model_" + std::to_string(rank_) + ".dq");
}

/// Broadcast: different initial weights and BatchNorm statistics are rank 0's after
/// construction, and the buffers after a sync.
void broadcast() {
  auto group = make_group();
  torch::manual_seed(40 + rank_);
  torch::nn::Sequential model(torch::nn::Linear(10, 6), torch::nn::BatchNorm1d(6),
                              torch::nn::Linear(6, 3));
  save("before", params_of(*model));
  diffq::DataParallel parallel(group, model.ptr());
  save("after", params_of(*model));
  torch::manual_seed(50 + rank_);
  model->forward(torch::randn({8, 10})).sum().backward();
  save("local", params_of(*model));
  parallel.sync_gradients();
  save("synced", params_of(*model));
}

/// A data-dependent branch: `b` is used by rank 0 only, `c` by no rank.
struct BranchyImpl : torch::nn::Module {
  BranchyImpl()
      : a(register_module("a", torch::nn::Linear(10, 6))),
        b(register_module("b", torch::nn::Linear(6, 3))),
        c(register_module("c", torch::nn::Linear(6, 3))) {}
  torch::Tensor forward(const torch::Tensor& x, bool use_b) {
    auto h = torch::tanh(a(x));
    return use_b ? b(h) : h.narrow(1, 0, 3);
  }
  torch::nn::Linear a, b, c;
};
TORCH_MODULE(Branchy);

void unused() {
  auto group = make_group();
  torch::manual_seed(60);
  Branchy model;
  torch::optim::Adam optimizer(model->parameters(), 1e-2);
  diffq::DiffQuantizer<Branchy> q(model, diffq::DiffQOptions().group_size(4).min_size_mb(0));
  q.setup_optimizer(optimizer, 5e-2);
  diffq::DataParallel parallel(group, q);
  torch::manual_seed(70 + rank_);
  for (int step = 0; step < 3; ++step) {
    auto loss = q.forward(torch::randn({4, 10}), rank_ == 0).pow(2).mean();
    optimizer.zero_grad();
    loss.backward();
    if (step == 0) save("local", grads_of(*model));
    parallel.sync_gradients();
    if (step == 0) save("synced", grads_of(*model));
    optimizer.step();
  }
  save("final", params_of(*model));
}

/// 10 → 6 → `out` MLP.
struct WidthImpl : torch::nn::Module {
  explicit WidthImpl(int64_t out)
      : fc1(register_module("fc1", torch::nn::Linear(10, 6))),
        fc2(register_module("fc2", torch::nn::Linear(6, out))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::tanh(fc1(x))); }
  torch::nn::Linear fc1, fc2;
};
TORCH_MODULE(Width);

/// Models that differ: rank 1's fc2 has 4 outputs.
void mismatch() {
  auto group = make_group();
  Width model(rank_ == 1 ? 4 : 3);
  diffq::DiffQuantizer<Width> q(model, diffq::DiffQOptions().min_size_mb(0));
  diffq::DataParallel parallel(group, q);
}

/// A refusal on rank 1 only (a float64 gradient for a float32 weight) at the second sync.
void refuse() {
  auto group = make_group();
  torch::manual_seed(90);
  MLP model;
  diffq::DiffQuantizer<MLP> q(model, diffq::DiffQOptions().min_size_mb(0));
  q.no_optimizer();
  diffq::DataParallel parallel(group, q);
  for (int step = 0; step < 2; ++step) {
    q.forward(torch::randn({4, 10})).pow(2).sum().backward();
    if (rank_ == 1 && step == 1)
      model->fc1->weight.mutable_grad() = torch::zeros({6, 10}, torch::kDouble);
    parallel.sync_gradients();
  }
}

/// A rank killed mid-training: rank 1 kills itself (SIGKILL) at step 3; rank 0 goes on.
void killed() {
  auto group = make_group();
  torch::manual_seed(80);
  MLP model;
  torch::optim::Adam optimizer(model->parameters(), 1e-2);
  diffq::DiffQuantizer<MLP> q(model, diffq::DiffQOptions().min_size_mb(0));
  q.setup_optimizer(optimizer, 5e-2);
  diffq::DataParallel parallel(group, q);
  for (int step = 0; step < 100000; ++step) {
    if (rank_ == 1 && step == 3) std::raise(SIGKILL);
    auto loss = q.forward(torch::randn({4, 10})).pow(2).mean();
    optimizer.zero_grad();
    loss.backward();
    parallel.sync_gradients();
    optimizer.step();
  }
}

}  // namespace

int main(int argc, char** argv) {
  try {
    torch::set_num_threads(1);
    rank_ = env_int("RANK", 0);
    const char* out = std::getenv("DIFFQ_TEST_OUT");
    out_dir = out ? out : ".";
    const std::string scenario = argc > 1 ? argv[1] : "";
    const std::string method = argc > 2 ? argv[2] : "";
    if (scenario == "exact") {
      exact(method);
    } else if (scenario == "train" && method == "diffq") {
      train<diffq::DiffQuantizer<MLP>>(diffq::DiffQOptions().group_size(4).min_size_mb(0));
    } else if (scenario == "train" && method == "qat") {
      train<diffq::UniformQuantizer<MLP>>(diffq::UniformOptions().bits(4).qat(true).min_size_mb(0));
    } else if (scenario == "train" && method == "lsq") {
      train<diffq::LSQQuantizer<MLP>>(diffq::LSQOptions().bits(4).min_size_mb(0));
    } else if (scenario == "broadcast") {
      broadcast();
    } else if (scenario == "unused") {
      unused();
    } else if (scenario == "mismatch") {
      mismatch();
    } else if (scenario == "refuse") {
      refuse();
    } else if (scenario == "killed") {
      killed();
    } else {
      std::cerr << "distributed_worker: unknown scenario '" << scenario << " " << method << "'\n";
      return 2;
    }
  } catch (const c10::Error& e) {
    std::cerr << e.what_without_backtrace() << "\n";
    return 3;
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return 4;
  }
  return 0;
}
