// Tests of diffq/distributed.h. The multi-process tests start tests/distributed_worker once per
// rank (posix_spawn, over loopback: FileStore, or TCPStore through torchrun's variables), bound
// each run's time (the ranks are killed past it, and the test fails), and check what the ranks
// wrote against computations made here: the explicit functional forward of every rank's shard
// with that rank's noise, and averages of the ranks' own gradients.
#include <diffq/checkpoint.h>
#include <diffq/distributed.h>
#include <diffq/quantizer.h>

#include "explicit_diffq.h"
#include "test_models.h"
#include "test_util.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace {

using diffq_test::BitEqual;
using diffq_test::Close;
using diffq_test::ExpectError;
using diffq_test::MLP;
using Clock = std::chrono::steady_clock;

/// A fresh folder under the system's temporary directory, removed at the end of the test.
class TempDir {
 public:
  TempDir() {
    std::string templ = ::testing::TempDir() + "diffq_dist_XXXXXX";
    std::vector<char> buf(templ.begin(), templ.end());
    buf.push_back('\0');
    TORCH_CHECK(::mkdtemp(buf.data()) != nullptr, "mkdtemp failed");
    path_ = buf.data();
  }
  ~TempDir() { diffq_test::RemoveTree(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

/// What the ranks of one run did.
struct RunResult {
  std::vector<int> status;       ///< exit status per rank (-signal if killed by one)
  std::vector<std::string> err;  ///< stderr per rank
  double seconds = 0;            ///< until the last rank ended
  bool timed_out = false;        ///< killed by the harness
};

/// A TCP port that was free a moment ago (bound to port 0 on loopback, then closed).
int FreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  TORCH_CHECK(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0,
              "no free port");
  ::close(fd);
  return ntohs(addr.sin_port);
}

enum class Store { kFile, kTcp };

/// Starts `ranks` of a world of `world_size` (all of them by default) running
/// `distributed_worker args...`, and waits at most `limit_s`; ranks still running then are killed.
RunResult RunRanks(const TempDir& dir, std::vector<std::string> args, int world_size,
                   Store store = Store::kFile, int timeout_ms = 20000, double limit_s = 50,
                   std::vector<int> ranks = {}) {
  if (ranks.empty()) {
    for (int r = 0; r < world_size; ++r) ranks.push_back(r);
  }
  const std::string port = std::to_string(FreePort());
  std::vector<pid_t> pids;
  const auto start = Clock::now();
  for (int r : ranks) {
    std::vector<std::string> env;
    for (char** e = environ; *e; ++e) {
      const std::string kv = *e;
      if (kv.rfind("RANK=", 0) == 0 || kv.rfind("WORLD_SIZE=", 0) == 0 ||
          kv.rfind("MASTER_", 0) == 0 || kv.rfind("DIFFQ_TEST_", 0) == 0) {
        continue;
      }
      env.push_back(kv);
    }
    env.push_back("RANK=" + std::to_string(r));
    env.push_back("WORLD_SIZE=" + std::to_string(world_size));
    env.push_back("DIFFQ_TEST_OUT=" + dir.path());
    env.push_back("DIFFQ_TEST_TIMEOUT_MS=" + std::to_string(timeout_ms));
    if (store == Store::kFile) {
      env.push_back("DIFFQ_TEST_STORE=" + dir.path() + "/store");
    } else {
      env.push_back("MASTER_ADDR=127.0.0.1");
      env.push_back("MASTER_PORT=" + port);
    }
    std::vector<std::string> argv_s{DIFFQ_DISTRIBUTED_WORKER};
    argv_s.insert(argv_s.end(), args.begin(), args.end());
    std::vector<char*> argv, envp;
    for (auto& a : argv_s) argv.push_back(a.data());
    argv.push_back(nullptr);
    for (auto& e : env) envp.push_back(e.data());
    envp.push_back(nullptr);
    const std::string err = dir.path() + "/stderr_" + std::to_string(r);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
    pid_t pid = 0;
    const int rc = posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), envp.data());
    posix_spawn_file_actions_destroy(&actions);
    TORCH_CHECK(rc == 0, "posix_spawn failed: ", rc);
    pids.push_back(pid);
  }
  RunResult res;
  res.status.assign(ranks.size(), 0);
  std::vector<bool> done(ranks.size(), false);
  size_t left = ranks.size();
  while (left > 0) {
    for (size_t i = 0; i < pids.size(); ++i) {
      if (done[i]) continue;
      int st = 0;
      if (::waitpid(pids[i], &st, WNOHANG) == pids[i]) {
        done[i] = true;
        --left;
        res.status[i] = WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
      }
    }
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    if (left > 0 && elapsed > limit_s) {
      res.timed_out = true;
      for (size_t i = 0; i < pids.size(); ++i) {
        if (!done[i]) {
          ::kill(pids[i], SIGKILL);
          ::waitpid(pids[i], nullptr, 0);
          res.status[i] = -SIGKILL;
        }
      }
      break;
    }
    if (left > 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  res.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  for (int r : ranks) {
    std::ifstream in(dir.path() + "/stderr_" + std::to_string(r));
    std::stringstream s;
    s << in.rdbuf();
    res.err.push_back(s.str());
  }
  return res;
}

/// All ranks exited 0 in time; otherwise the failure shows what each rank said.
::testing::AssertionResult AllOk(const RunResult& r) {
  bool ok = !r.timed_out;
  for (int s : r.status) ok = ok && s == 0;
  if (ok) return ::testing::AssertionSuccess();
  auto f = ::testing::AssertionFailure();
  if (r.timed_out) f << "timed out after " << r.seconds << " s; ";
  for (size_t i = 0; i < r.status.size(); ++i) {
    f << "rank " << i << " status " << r.status[i] << ": " << r.err[i] << "\n";
  }
  return f;
}

/// Tensors of `<dir>/<name>_<rank>.pt` by name (those the worker wrote).
std::map<std::string, at::Tensor> Load(const TempDir& dir, const std::string& name, int rank,
                                       const std::vector<std::string>& keys) {
  torch::serialize::InputArchive archive;
  archive.load_from(dir.path() + "/" + name + "_" + std::to_string(rank) + ".pt");
  std::map<std::string, at::Tensor> out;
  for (const auto& k : keys) {
    at::Tensor t;
    if (archive.try_read(k, t)) out[k] = t;
  }
  return out;
}

std::vector<std::string> Names(const torch::nn::Module& m, bool buffers = false) {
  std::vector<std::string> out;
  for (const auto& kv : m.named_parameters()) out.push_back(kv.key());
  if (buffers) {
    for (const auto& kv : m.named_buffers()) out.push_back(kv.key());
  }
  return out;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

namespace F = torch::nn::functional;

/// The same model and quantizer as the worker's `exact` scenario, for the names.
struct ExactSetup {
  MLP model;
  diffq::DiffQOptions options = diffq::DiffQOptions().group_size(4).min_size_mb(0);
  diffq::DiffQuantizer<MLP> q{model, options};
};

/// Two ranks, each half a batch and its own noise: after sync_gradients(), both hold the average
/// of the two shards' gradients, computed here by the explicit functional forward of each shard
/// with that rank's noise (regenerated from the seeds the quantizer draws and the rank).
void CheckExact(const std::string& kernels) {
  TempDir dir;
  auto run = RunRanks(dir, {"exact", kernels}, 2);
  ASSERT_TRUE(AllOk(run));
  ExactSetup setup;
  const auto qnames = setup.q.quantized_names();
  const auto names = Names(*setup.model);
  const auto init = Load(dir, "init", 0, names);
  ASSERT_EQ(init.size(), names.size());
  // Broadcast: rank 1 started from other weights and holds rank 0's.
  const auto init1 = Load(dir, "init", 1, names);
  for (const auto& n : names) EXPECT_TRUE(BitEqual(init.at(n), init1.at(n))) << n;

  torch::manual_seed(7);
  auto x = torch::randn({8, 10});
  auto y = torch::randn({8, 3});
  std::map<std::string, at::Tensor> w, l;
  for (const auto& n : qnames) {
    w[n] = init.at(n).clone().requires_grad_(true);
    l[n] = init.at(n + "_diffq").clone().requires_grad_(true);
  }
  at::Tensor total;
  std::map<std::string, at::Tensor> noise_of[2];
  for (int r = 0; r < 2; ++r) {
    const auto noise = Load(dir, "noise", r, qnames);
    ASSERT_EQ(noise.size(), qnames.size());
    // The quantizer draws one seed per tensor, in order, from the default CPU generator; the
    // CPU kernels sample with diffq's generator, the ATen path with a CPU generator so seeded.
    torch::manual_seed(100);
    auto gen = at::detail::getDefaultCPUGenerator();
    for (const auto& n : qnames) {
      const uint64_t seed =
          diffq::rank_noise_seed(at::check_generator<at::CPUGeneratorImpl>(gen)->random64(), r);
      at::Tensor expected;
      if (kernels == "aten") {
        expected = torch::empty(w[n].sizes())
                       .normal_(0, 0.5, at::make_generator<at::CPUGeneratorImpl>(seed));
      } else {
        expected = diffq::noise_tensor(w[n].sizes(), seed, diffq::Noise::kGaussian);
      }
      EXPECT_TRUE(BitEqual(noise.at(n), expected)) << "rank " << r << " noise of " << n;
    }
    std::map<std::string, at::Tensor> nw;
    for (const auto& n : qnames)
      nw[n] = diffq_test::RefNoisy(w[n], l[n], noise.at(n), setup.options);
    noise_of[r] = noise;
    auto out =
        F::linear(torch::tanh(F::linear(x.narrow(0, 4 * r, 4), nw["fc1.weight"], nw["fc1.bias"])),
                  nw["fc2.weight"], nw["fc2.bias"]);
    auto loss = (out - y.narrow(0, 4 * r, 4)).pow(2).mean() / 2;
    total = total.defined() ? total + loss : loss;
  }
  // The two ranks' noise samples differ.
  for (const auto& n : qnames) EXPECT_FALSE(BitEqual(noise_of[0][n], noise_of[1][n])) << n;
  total.backward();
  for (int r = 0; r < 2; ++r) {
    const auto g = Load(dir, "synced", r, names);
    for (const auto& n : qnames) {
      EXPECT_TRUE(Close(g.at(n), w[n].grad())) << "rank " << r << " weight grad of " << n;
      EXPECT_TRUE(Close(g.at(n + "_diffq"), l[n].grad())) << "rank " << r << " logit grad of " << n;
    }
  }
}

TEST(DataParallel, TwoRanksAverageTheExplicitGradientsOfTheirShardsAndNoise) {
  CheckExact("fused");
}

TEST(DataParallel, TwoRanksAverageTheExplicitGradientsAtenKernels) {
  CheckExact("aten");
}

/// 20 Adam steps on per-rank data: bit-identical parameters and checkpoints on both ranks, and
/// the first step's synchronised gradients are the mean of the two ranks' own.
void CheckConsistent(const std::string& method, Store store) {
  TempDir dir;
  auto run = RunRanks(dir, {"train", method}, 2, store);
  ASSERT_TRUE(AllOk(run));
  // Parameter names of the worker's model under this method: read from rank 0's archive.
  MLP model;
  std::vector<std::string> names = Names(*model);
  for (const auto& n : Names(*model)) {
    names.push_back(n + "_diffq");
    names.push_back(n + "_lsq");
  }
  const auto f0 = Load(dir, "final", 0, names), f1 = Load(dir, "final", 1, names);
  // MLP's 4 parameters, and a logit or step size each (none for QAT).
  ASSERT_EQ(f0.size(), method == "qat" ? 4u : 8u);
  ASSERT_EQ(f0.size(), f1.size());
  for (const auto& kv : f0) EXPECT_TRUE(BitEqual(kv.second, f1.at(kv.first))) << kv.first;
  const std::string c0 = ReadFile(dir.path() + "/model_0.dq");
  EXPECT_FALSE(c0.empty());
  EXPECT_TRUE(c0 == ReadFile(dir.path() + "/model_1.dq")) << "checkpoints differ";
  const auto l0 = Load(dir, "local", 0, names), l1 = Load(dir, "local", 1, names);
  const auto s0 = Load(dir, "synced", 0, names), s1 = Load(dir, "synced", 1, names);
  ASSERT_EQ(l0.size(), f0.size());  // every parameter had a gradient, the aux tensors included
  for (const auto& kv : l0) {
    auto mean = (kv.second.to(torch::kDouble) + l1.at(kv.first).to(torch::kDouble)) / 2;
    EXPECT_TRUE(Close(s0.at(kv.first), mean)) << kv.first;
    EXPECT_TRUE(BitEqual(s0.at(kv.first), s1.at(kv.first))) << kv.first;
    EXPECT_FALSE(BitEqual(kv.second, l1.at(kv.first))) << kv.first << ": same data on both ranks?";
  }
}

TEST(DataParallel, DiffQRanksStayBitIdenticalOverAdamSteps) {
  CheckConsistent("diffq", Store::kTcp);  // through torchrun's variables and a TCPStore
}

TEST(DataParallel, QatRanksStayBitIdenticalOverAdamSteps) {
  CheckConsistent("qat", Store::kFile);
}

TEST(DataParallel, LsqRanksStayBitIdenticalOverAdamStepsStepSizesIncluded) {
  CheckConsistent("lsq", Store::kFile);
}

TEST(DataParallel, BroadcastsParametersAtConstructionAndBuffersAtSync) {
  TempDir dir;
  auto run = RunRanks(dir, {"broadcast"}, 2);
  ASSERT_TRUE(AllOk(run));
  torch::nn::Sequential model(torch::nn::Linear(10, 6), torch::nn::BatchNorm1d(6),
                              torch::nn::Linear(6, 3));
  const auto names = Names(*model, /*buffers=*/true);
  const auto b0 = Load(dir, "before", 0, names), b1 = Load(dir, "before", 1, names);
  const auto a1 = Load(dir, "after", 1, names);
  EXPECT_FALSE(BitEqual(b0.at("0.weight"), b1.at("0.weight")));  // initialised differently
  for (const auto& n : names) EXPECT_TRUE(BitEqual(a1.at(n), b0.at(n))) << n;
  const auto l0 = Load(dir, "local", 0, names), l1 = Load(dir, "local", 1, names);
  const auto s1 = Load(dir, "synced", 1, names);
  EXPECT_FALSE(BitEqual(l0.at("1.running_mean"), l1.at("1.running_mean")));  // other data
  for (const char* n : {"1.running_mean", "1.running_var", "1.num_batches_tracked"}) {
    EXPECT_TRUE(BitEqual(s1.at(n), l0.at(n))) << n;
  }
}

TEST(DataParallel, ParameterUnusedOnOneRankGetsTheAverageWithoutDeadlock) {
  TempDir dir;
  auto run = RunRanks(dir, {"unused"}, 2);
  ASSERT_TRUE(AllOk(run));
  std::vector<std::string> names;
  for (const char* m : {"a", "b", "c"}) {
    for (const char* p : {".weight", ".bias", ".weight_diffq", ".bias_diffq"}) {
      names.push_back(std::string(m) + p);
    }
  }
  const auto l0 = Load(dir, "local", 0, names), l1 = Load(dir, "local", 1, names);
  const auto s0 = Load(dir, "synced", 0, names), s1 = Load(dir, "synced", 1, names);
  for (const char* n : {"b.weight", "b.bias", "b.weight_diffq", "b.bias_diffq"}) {
    ASSERT_TRUE(l0.count(n)) << n;
    EXPECT_FALSE(l1.count(n)) << n << ": rank 1 did not use it";
    EXPECT_TRUE(Close(s0.at(n), l0.at(n) / 2)) << n;
    EXPECT_TRUE(BitEqual(s1.at(n), s0.at(n))) << n;
  }
  for (const char* n : {"c.weight", "c.bias", "c.weight_diffq", "c.bias_diffq"}) {
    EXPECT_FALSE(s0.count(n) || s1.count(n)) << n << ": no rank used it";
  }
  for (const char* n : {"a.weight", "a.weight_diffq"}) {
    EXPECT_TRUE(Close(s0.at(n), (l0.at(n) + l1.at(n)) / 2)) << n;
  }
  const auto f0 = Load(dir, "final", 0, names), f1 = Load(dir, "final", 1, names);
  ASSERT_EQ(f0.size(), names.size());
  for (const auto& n : names) EXPECT_TRUE(BitEqual(f0.at(n), f1.at(n))) << n;
}

TEST(DataParallel, ModelsThatDifferAreAnErrorOnEveryRank) {
  TempDir dir;
  auto run = RunRanks(dir, {"mismatch"}, 2);
  ASSERT_FALSE(run.timed_out);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(run.status[r], 3) << run.err[r];
    EXPECT_NE(run.err[r].find("the ranks' models differ"), std::string::npos) << run.err[r];
    EXPECT_NE(run.err[r].find("rank 0 has parameter 'fc2.weight' [3, 6] Float"), std::string::npos)
        << run.err[r];
    EXPECT_NE(run.err[r].find("rank 1 has parameter 'fc2.weight' [4, 6] Float"), std::string::npos)
        << run.err[r];
  }
}

TEST(DataParallel, RefusalOnOneRankStopsEveryRankAtTheSameSync) {
  TempDir dir;
  auto run = RunRanks(dir, {"refuse"}, 2);
  ASSERT_FALSE(run.timed_out);
  EXPECT_EQ(run.status[1], 3) << run.err[1];
  EXPECT_NE(run.err[1].find("the gradient of parameter 'fc1.weight' is Double on cpu with 60 "
                            "elements, expected Float on cpu with 60 (rank 1 of 2"),
            std::string::npos)
      << run.err[1];
  EXPECT_EQ(run.status[0], 3) << run.err[0];
  EXPECT_NE(run.err[0].find("sync_gradients() was refused on 1 of 2 ranks (their error says why); "
                            "seen on rank 0"),
            std::string::npos)
      << run.err[0];
}

TEST(DataParallel, KilledRankIsAnErrorOnTheOtherWithinTheTimeout) {
  TempDir dir;
  const int timeout_ms = 5000;
  auto run = RunRanks(dir, {"killed"}, 2, Store::kFile, timeout_ms);
  ASSERT_FALSE(run.timed_out);
  EXPECT_EQ(run.status[1], -SIGKILL);
  EXPECT_EQ(run.status[0], 3) << run.err[0];
  EXPECT_NE(run.err[0].find("diffq::DataParallel: the allreduce of gradient bucket 0 failed on "
                            "rank 0 of 2"),
            std::string::npos)
      << run.err[0];
  EXPECT_LT(run.seconds, timeout_ms / 1000.0 + 15);
}

TEST(DataParallel, RankThatNeverJoinsIsAnErrorWithinTheTimeout) {
  for (Store store : {Store::kFile, Store::kTcp}) {
    TempDir dir;
    auto run = RunRanks(dir, {"exact", "fused"}, 2, store, 2000, 50, /*ranks=*/{0});
    ASSERT_FALSE(run.timed_out);
    EXPECT_EQ(run.status[0], 3) << run.err[0];
    EXPECT_NE(run.err[0].find("rank 0 of 2 waited 2000 ms for the other ranks to join; "
                              "missing: rank 1"),
              std::string::npos)
        << run.err[0];
    EXPECT_LT(run.seconds, 15);
  }
}

// ---- one process ----

/// A world of one, through a FileStore in `dir`.
c10::intrusive_ptr<c10d::ProcessGroupGloo> SoloGroup(const TempDir& dir) {
  return diffq::gloo_group_from_file(
      dir.path() + "/store", 0, 1, diffq::ProcessGroupOptions().timeout(std::chrono::seconds(10)));
}

/// DiffQ training through a world-size-1 DataParallel equals plain training bit for bit.
TEST(DataParallel, WorldSizeOneEqualsPlainTrainingBitForBit) {
  auto train = [](bool parallel) {
    TempDir dir;
    torch::manual_seed(5);
    torch::nn::Sequential model(torch::nn::Linear(10, 8), torch::nn::BatchNorm1d(8),
                                torch::nn::Functional(torch::tanh), torch::nn::Linear(8, 3));
    torch::optim::Adam optimizer(model->parameters(), 1e-2);
    diffq::DiffQuantizer<torch::nn::Sequential> q(
        model, diffq::DiffQOptions().group_size(4).min_size_mb(0));
    q.setup_optimizer(optimizer, 5e-2);
    std::unique_ptr<diffq::DataParallel> dp;
    if (parallel) dp = std::make_unique<diffq::DataParallel>(SoloGroup(dir), q);
    for (int step = 0; step < 10; ++step) {
      auto loss = q.forward(torch::randn({6, 10})).pow(2).mean() + 0.1 * q.penalty();
      optimizer.zero_grad();
      loss.backward();
      if (dp) dp->sync_gradients();
      optimizer.step();
    }
    std::vector<at::Tensor> out;
    for (const auto& t : model->parameters()) out.push_back(t.detach().clone());
    for (const auto& t : model->buffers()) out.push_back(t.detach().clone());
    return out;
  };
  const auto plain = train(false), parallel = train(true);
  ASSERT_EQ(plain.size(), parallel.size());
  for (size_t i = 0; i < plain.size(); ++i) EXPECT_TRUE(BitEqual(plain[i], parallel[i])) << i;
}

TEST(DataParallel, SmallBucketsSplitByDtypeAndSize) {
  TempDir dir;
  torch::nn::Sequential model(torch::nn::Linear(100, 100), torch::nn::Linear(100, 10));
  model[1]->to(torch::kDouble);
  // 40,000 float32 bytes (over the 20,971-byte cap: alone), 400 float32 bytes, then float64.
  diffq::DataParallel dp(SoloGroup(dir), model.ptr(),
                         diffq::DataParallelOptions().bucket_size_mb(0.02));
  EXPECT_EQ(dp.num_buckets(), 3);  // [0.weight], [0.bias], [1.weight, 1.bias]
  EXPECT_EQ(dp.world_size(), 1);
  EXPECT_EQ(dp.rank(), 0);
  auto h = model[0]->as<torch::nn::Linear>()->forward(torch::randn({2, 100}));
  model[1]->as<torch::nn::Linear>()->forward(h.to(torch::kDouble)).sum().backward();
  std::vector<at::Tensor> before;
  for (const auto& p : model->parameters()) before.push_back(p.grad().clone());
  dp.sync_gradients();
  const auto after = model->parameters();
  for (size_t i = 0; i < before.size(); ++i) EXPECT_TRUE(BitEqual(after[i].grad(), before[i])) << i;
}

TEST(DataParallel, BucketRangesFollowDtypeAndCap) {
  std::vector<at::Tensor> t{torch::zeros({10}), torch::zeros({10}), torch::zeros({30}),
                            torch::zeros({5}, torch::kDouble), torch::zeros({1})};
  const auto r = diffq::detail::bucket_ranges(t, 100);  // 40 + 40 fit; 120 alone; dtype; dtype
  ASSERT_EQ(r.size(), 4u);
  EXPECT_EQ(r[0], std::make_pair(size_t{0}, size_t{2}));
  EXPECT_EQ(r[1], std::make_pair(size_t{2}, size_t{3}));
  EXPECT_EQ(r[2], std::make_pair(size_t{3}, size_t{4}));
  EXPECT_EQ(r[3], std::make_pair(size_t{4}, size_t{5}));
}

TEST(DataParallel, RankNoiseSeedIsTheSeedOnRankZeroAndDiffersElsewhere) {
  EXPECT_EQ(diffq::rank_noise_seed(12345, 0), 12345u);
  EXPECT_NE(diffq::rank_noise_seed(12345, 1), 12345u);
  EXPECT_NE(diffq::rank_noise_seed(12345, 1), diffq::rank_noise_seed(12345, 2));
  // splitmix64's finaliser of 12345 + 0x9E3779B97F4A7C15, computed by hand in Python.
  uint64_t z = 12345ULL + 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  EXPECT_EQ(diffq::rank_noise_seed(12345, 1), z ^ (z >> 31));
  ExpectError([] { diffq::rank_noise_seed(1, -1); }, "rank must be >= 0, got -1");
}

TEST(DataParallel, ErrorsNameWhatIsWrong) {
  TempDir dir;
  auto group = SoloGroup(dir);
  MLP model;
  ExpectError(
      [&] { diffq::DataParallel(group, model, diffq::DataParallelOptions().bucket_size_mb(0)); },
      "diffq::DataParallel: bucket_size_mb must be > 0, got 0");
  // A quantizer built after the wrapper: its logits would not be synchronised.
  diffq::DataParallel early(group, model);
  diffq::DiffQuantizer<MLP> q(model, diffq::DiffQOptions().min_size_mb(0));
  q.no_optimizer();
  q.forward(torch::randn({2, 10})).sum().backward();
  ExpectError([&] { early.sync_gradients(); }, "build it after anything that registers parameters");
  // Sparse gradients.
  torch::nn::Embedding emb(torch::nn::EmbeddingOptions(5, 3).sparse(true));
  diffq::DataParallel sparse(group, emb);
  emb->forward(torch::tensor({1, 2})).sum().backward();
  ExpectError([&] { sparse.sync_gradients(); }, "parameter 'weight' has a sparse gradient");
  ExpectError([&] { q.set_noise_rank(-2); }, "noise rank must be >= 0, got -2");
}

#ifdef USE_C10D_NCCL
/// One NCCL rank on the GPU (NCCL cannot put two ranks on one GPU): DiffQ on CUDA weights,
/// sync_gradients() leaves a world of one's gradients bit for bit as they were, and the model
/// check and broadcast run over NCCL.
TEST(DataParallel, NcclOneRankSyncsCudaGradients_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  TempDir dir;
  auto group = diffq::nccl_group_from_file(
      dir.path() + "/store", 0, 1, diffq::ProcessGroupOptions().timeout(std::chrono::seconds(60)));
  torch::manual_seed(3);
  MLP model;
  model->to(torch::kCUDA);
  diffq::DiffQuantizer<MLP> q(model, diffq::DiffQOptions().group_size(4).min_size_mb(0));
  q.no_optimizer();
  diffq::DataParallel dp(group, q);
  q.forward(torch::randn({4, 10}, torch::kCUDA)).pow(2).sum().backward();
  std::vector<at::Tensor> before;
  for (const auto& p : model->parameters()) before.push_back(p.grad().clone());
  dp.sync_gradients();
  const auto after = model->parameters();
  ASSERT_EQ(after.size(), 8u);
  for (size_t i = 0; i < after.size(); ++i) {
    EXPECT_TRUE(after[i].grad().is_cuda());
    EXPECT_TRUE(BitEqual(after[i].grad(), before[i])) << i;
  }
}
#endif

/// Sets an environment variable for the scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old, had_ = true;
    if (value) {
      ::setenv(name, value, 1);
    } else {
      ::unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (had_) {
      ::setenv(name_.c_str(), old_.c_str(), 1);
    } else {
      ::unsetenv(name_.c_str());
    }
  }

 private:
  std::string name_, old_;
  bool had_ = false;
};

TEST(ProcessGroup, EnvironmentErrorsNameTheVariable) {
  {
    ScopedEnv a("WORLD_SIZE", nullptr);
    ExpectError([] { diffq::gloo_group_from_env(); },
                "diffq::gloo_group_from_env: environment variable WORLD_SIZE is not set");
  }
  ScopedEnv ws("WORLD_SIZE", "2");
  {
    ScopedEnv r("RANK", "2");
    ExpectError([] { diffq::gloo_group_from_env(); },
                "RANK (< WORLD_SIZE) must be an integer in [0, 1], got '2'");
  }
  ScopedEnv r("RANK", "0");
  ScopedEnv addr("MASTER_ADDR", "127.0.0.1");
  {
    ScopedEnv p("MASTER_PORT", "80x");
    ExpectError([] { diffq::gloo_group_from_env(); },
                "MASTER_PORT must be an integer in [1, 65535], got '80x'");
  }
  {
    ScopedEnv p("MASTER_PORT", nullptr);
    ExpectError([] { diffq::gloo_group_from_env(); }, "environment variable MASTER_PORT");
  }
  ScopedEnv p("MASTER_PORT", "29500");
  ExpectError(
      [] {
        diffq::gloo_group_from_env(
            diffq::ProcessGroupOptions().timeout(std::chrono::milliseconds(0)));
      },
      "timeout must be > 0 ms, got 0");
}

TEST(ProcessGroup, FileStoreErrors) {
  TempDir dir;
  ExpectError([&] { diffq::gloo_group_from_file(dir.path() + "/s", 1, 1); },
              "diffq::gloo_group_from_file: rank must be in [0, 1), got 1");
  ExpectError([&] { diffq::gloo_group_from_file(dir.path() + "/s", 0, 0); },
              "world_size must be >= 1, got 0");
  ExpectError([&] { diffq::gloo_group_from_file("", 0, 1); }, "the store path is empty");
  ExpectError(
      [&] {
        diffq::gloo_group_from_file(
            dir.path() + "/s", 0, 1,
            diffq::ProcessGroupOptions().timeout(std::chrono::milliseconds(-1)));
      },
      "diffq::gloo_group_from_file: timeout must be > 0 ms, got -1");
}

}  // namespace
