// Tests of diffq/budget.h: the multiplier's update rule against its formula, convergence of the
// controller on a regression where more bits always lower the loss, lower_bits_to_fit against
// hand-set logits (which groups, which bit widths, the size after by hand, the reloaded
// checkpoint), the floor, every error message, and a save/restore that reproduces the λ
// trajectory.
#include <diffq/budget.h>
#include <diffq/checkpoint.h>

#include "test_util.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace {

using diffq_test::ExpectError;

constexpr double kBitsPerMB = 8.0 * 1048576.0;

/// One bias-free linear layer `in → out`: `weight` [out, in], the only parameter.
struct LinImpl : torch::nn::Module {
  LinImpl(int64_t in, int64_t out)
      : fc(register_module("fc",
                           torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(false)))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc(x); }
  torch::nn::Linear fc;
};
TORCH_MODULE(Lin);

/// Two bias-free layers `8 → 6 → 4`, with a float bias-like parameter kept out of quantization.
struct TwoImpl : torch::nn::Module {
  TwoImpl()
      : a(register_module("a", torch::nn::Linear(torch::nn::LinearOptions(8, 6).bias(false)))),
        b(register_module("b", torch::nn::Linear(torch::nn::LinearOptions(6, 4).bias(false)))),
        offset(register_parameter("offset", torch::zeros({5}))) {}
  torch::Tensor forward(const torch::Tensor& x) { return b(torch::tanh(a(x))) + offset.sum(); }
  torch::nn::Linear a, b;
  torch::Tensor offset;
};
TORCH_MODULE(Two);

diffq::DiffQOptions AllQuantized(int64_t group_size) {
  return diffq::DiffQOptions().group_size(group_size).min_size_mb(0);
}

/// Sets the logits of tensor `name` so that its learnt bit widths are `bits` (one per group).
template <typename Q>
void SetBits(Q& q, const std::string& name, const std::vector<double>& bits) {
  torch::NoGradGuard ng;
  const auto& o = q.options();
  const torch::Tensor l = q.logit(name);
  ASSERT_EQ(l.numel(), static_cast<int64_t>(bits.size()));
  std::vector<float> values;
  for (double b : bits) {
    values.push_back(static_cast<float>(
        std::log((b - o.min_bits()) / (o.max_bits() - b))));  // sigmoid⁻¹ of (b−min)/(max−min)
  }
  l.copy_(torch::tensor(values));
}

/// The true-quantization bit widths of `name`: round(b), from the learnt bit widths.
template <typename Q>
std::vector<int64_t> Rounded(const Q& q, const std::string& name) {
  const torch::Tensor b = q.bits(name).to(torch::kDouble);
  std::vector<int64_t> out;
  for (int64_t g = 0; g < b.numel(); ++g) out.push_back(std::llround(b[g].item<double>()));
  return out;
}

TEST(BudgetTest, LambdaUpdateFollowsItsFormula) {
  const auto o =
      diffq::SizeBudgetOptions().lr(0.7).max_violation(0.2).min_lambda(1e-4).max_lambda(5);
  // Unclipped: v = (0.11 − 0.1)/0.1 = 0.1.
  EXPECT_NEAR(diffq::budget_lambda_update(0.5, 0.11, 0.1, o), 0.5 * std::exp(0.7 * 0.1), 1e-12);
  EXPECT_NEAR(diffq::budget_lambda_update(0.5, 0.095, 0.1, o), 0.5 * std::exp(0.7 * -0.05), 1e-12);
  // Clipped to ±0.2.
  EXPECT_NEAR(diffq::budget_lambda_update(0.5, 0.3, 0.1, o), 0.5 * std::exp(0.7 * 0.2), 1e-12);
  EXPECT_NEAR(diffq::budget_lambda_update(0.5, 0.01, 0.1, o), 0.5 * std::exp(0.7 * -0.2), 1e-12);
  // Bounds.
  EXPECT_EQ(diffq::budget_lambda_update(4.9, 1.0, 0.1, o), 5.0);
  EXPECT_EQ(diffq::budget_lambda_update(1e-4, 0.0, 0.1, o), 1e-4);
  // On the budget: unchanged.
  EXPECT_EQ(diffq::budget_lambda_update(0.5, 0.1, 0.1, o), 0.5);
  // The clipped violation, and the weight of the penalty: λ·exp(proportional·c)/target.
  EXPECT_NEAR(diffq::clipped_violation(0.11, 0.1, o), 0.1, 1e-12);
  EXPECT_EQ(diffq::clipped_violation(0.5, 0.1, o), 0.2);
  EXPECT_EQ(diffq::clipped_violation(0.0, 0.1, o), -0.2);
  const auto p = diffq::SizeBudgetOptions().proportional(3);
  EXPECT_NEAR(diffq::budget_penalty_weight(0.5, 0.1, 0.2, p), 0.5 * std::exp(0.3) / 0.2, 1e-12);
  EXPECT_NEAR(diffq::budget_penalty_weight(0.5, -0.05, 0.2, p), 0.5 * std::exp(-0.15) / 0.2, 1e-12);
  EXPECT_EQ(diffq::budget_penalty_weight(0.5, 0.1, 0.2, diffq::SizeBudgetOptions().proportional(0)),
            0.5 / 0.2);
}

TEST(BudgetTest, FloorIsEveryGroupAtMinBitsPlusTheFloats) {
  torch::manual_seed(0);
  Two model;
  // a.weight 48 elements (groups of 16: 3), b.weight 24 (2 groups, the last of 8); offset stays
  // float: it is at or below min_size_mb.
  diffq::DiffQuantizer<Two> q(model, diffq::DiffQOptions().group_size(16).min_size_mb(5e-5));
  ASSERT_EQ(q.quantized_names(), (std::vector<std::string>{"a.weight", "b.weight"}));
  // Each tensor: n·2 bits + 64 + 8 + bits_bits·groups, bits_bits = ceil(log2(1 + 2 − 2)) = 0.
  const double bits = (48 * 2 + 72) + (24 * 2 + 72) + 5 * 32;
  EXPECT_DOUBLE_EQ(q.min_true_model_size(), bits / kBitsPerMB);
  // extra_bits 1: every group at least round(2 + 1) = 3 bits, and bits_bits = ceil(log2(1 + 3 −
  // 2)) = 1 per group (5 groups).
  diffq::DiffQuantizer<Two> q3(
      Two(), diffq::DiffQOptions().group_size(16).min_size_mb(5e-5).extra_bits(1));
  EXPECT_DOUBLE_EQ(q3.min_true_model_size(),
                   ((48 * 3 + 72) + (24 * 3 + 72) + 5 * 1 + 5 * 32) / kBitsPerMB);
  // The floor is reachable: logits far down give it.
  SetBits(q, "a.weight", {2.01, 2.01, 2.01});
  SetBits(q, "b.weight", {2.01, 2.01});
  EXPECT_DOUBLE_EQ(q.true_model_size(), q.min_true_model_size());
}

TEST(BudgetTest, LowerBitsToFitLowersTheGroupsClosestToRoundingDown) {
  torch::manual_seed(0);
  Lin model(16, 4);  // fc.weight: 64 elements, groups of 16: 4 groups
  diffq::DiffQuantizer<Lin> q(model, AllQuantized(16));
  // Rounded 6, 6, 5, 7; distances above r − ½: 0.3, 0.05, 0.4, 0.1.
  SetBits(q, "fc.weight", {5.8, 5.55, 4.9, 6.6});
  ASSERT_EQ(Rounded(q, "fc.weight"), (std::vector<int64_t>{6, 6, 5, 7}));
  // Size by hand: 16·(6+6+5+7) + 72 + bits_bits·4, bits_bits = ceil(log2(1 + 7 − 2)) = 3.
  const double before_bits = 16 * 24 + 72 + 3 * 4;
  ASSERT_DOUBLE_EQ(q.true_model_size(), before_bits / kBitsPerMB);
  // A target 40 bits under: lowering one group saves 16 bits (bits_bits unchanged, max 7 or 6:
  // ceil(log2(6)) = ceil(log2(5)) = 3), so three lowerings are needed. By distance: group 1
  // (0.05), group 3 (0.1), then group 0 (0.3), before group 2 (0.4) and before group 1 again
  // (a lowered group moves to the middle of its new interval: distance 0.5).
  const double target = (before_bits - 40) / kBitsPerMB;
  const diffq::FitReport report = diffq::lower_bits_to_fit(q, target);
  EXPECT_EQ(Rounded(q, "fc.weight"), (std::vector<int64_t>{5, 5, 5, 6}));
  ASSERT_EQ(report.lowered.size(), 3u);
  EXPECT_EQ(report.lowered[0].group, 0);
  EXPECT_EQ(report.lowered[0].bits_before, 6);
  EXPECT_EQ(report.lowered[0].bits_after, 5);
  EXPECT_EQ(report.lowered[1].group, 1);
  EXPECT_EQ(report.lowered[2].group, 3);
  EXPECT_EQ(report.lowered[2].bits_before, 7);
  EXPECT_EQ(report.lowered[2].bits_after, 6);
  // After: 16·(5+5+5+6) + 72 + ceil(log2(1 + 6 − 2))·4 = 336 + 72 + 12 bits.
  const double after_bits = 16 * 21 + 72 + 3 * 4;
  EXPECT_DOUBLE_EQ(report.size_before_mb, before_bits / kBitsPerMB);
  EXPECT_DOUBLE_EQ(report.size_after_mb, after_bits / kBitsPerMB);
  EXPECT_DOUBLE_EQ(q.true_model_size(), after_bits / kBitsPerMB);
  EXPECT_LE(q.true_model_size(), target);
  // The lowered groups sit in the middle of their new interval: b = r (no extra bits).
  auto b = q.bits("fc.weight").to(torch::kDouble);
  EXPECT_NEAR(b[0].item<double>(), 5.0, 1e-5);
  EXPECT_NEAR(b[1].item<double>(), 5.0, 1e-5);
  EXPECT_NEAR(b[2].item<double>(), 4.9, 1e-5);  // untouched
  EXPECT_NEAR(b[3].item<double>(), 6.0, 1e-5);
  // Already fitting: nothing changes.
  const auto again = diffq::lower_bits_to_fit(q, target);
  EXPECT_TRUE(again.lowered.empty());
  EXPECT_EQ(Rounded(q, "fc.weight"), (std::vector<int64_t>{5, 5, 5, 6}));
}

TEST(BudgetTest, LowerBitsToFitStopsWhenTheModelFitsExactly) {
  torch::manual_seed(0);
  Lin model(16, 4);
  diffq::DiffQuantizer<Lin> q(model, AllQuantized(16));
  SetBits(q, "fc.weight", {5.8, 5.55, 4.9, 6.6});  // as above: distances 0.3, 0.05, 0.4, 0.1
  const double before_bits = 16 * 24 + 72 + 3 * 4;
  // 32 bits under: exactly two lowerings (16 bits each), groups 1 and 3; the size then equals
  // the target, and a third lowering would be one too many.
  const double target = (before_bits - 32) / kBitsPerMB;
  const diffq::FitReport report = diffq::lower_bits_to_fit(q, target);
  EXPECT_EQ(Rounded(q, "fc.weight"), (std::vector<int64_t>{6, 5, 5, 6}));
  ASSERT_EQ(report.lowered.size(), 2u);
  EXPECT_EQ(report.lowered[0].group, 1);
  EXPECT_EQ(report.lowered[1].group, 3);
  EXPECT_DOUBLE_EQ(q.true_model_size(), target);
}

TEST(BudgetTest, LowerBitsToFitWithExtraBits) {
  torch::manual_seed(0);
  Lin model(16, 4);
  diffq::DiffQuantizer<Lin> q(model, AllQuantized(16).extra_bits(1));
  SetBits(q, "fc.weight", {5.8, 5.55, 4.9, 6.6});
  // round(b + 1): 7, 7, 6, 8; distances b + 1 − (r − ½): 0.3, 0.05, 0.4, 0.1. Size by hand:
  // 16·28 + 72 + ceil(log2(1 + 8 − 2))·4 = 448 + 72 + 12 bits.
  const double before_bits = 16 * 28 + 72 + 3 * 4;
  ASSERT_DOUBLE_EQ(q.true_model_size(), before_bits / kBitsPerMB);
  const diffq::FitReport report = diffq::lower_bits_to_fit(q, (before_bits - 40) / kBitsPerMB);
  // Groups 1, 3, 0 lose a bit: 6, 6, 6, 7; bits_bits ceil(log2(1 + 7 − 2)) = 3.
  ASSERT_EQ(report.lowered.size(), 3u);
  EXPECT_EQ(report.lowered[0].group, 0);
  EXPECT_EQ(report.lowered[0].bits_before, 7);
  EXPECT_EQ(report.lowered[0].bits_after, 6);
  EXPECT_EQ(report.lowered[2].group, 3);
  EXPECT_EQ(report.lowered[2].bits_after, 7);
  EXPECT_DOUBLE_EQ(q.true_model_size(), (16 * 25 + 72 + 3 * 4) / kBitsPerMB);
  // The new learnt bit widths are the middles of [r − ½ − 1, r + ½ − 1]: 5 for r = 6, 6 for 7.
  auto b = q.bits("fc.weight").to(torch::kDouble);
  EXPECT_NEAR(b[0].item<double>(), 5.0, 1e-5);
  EXPECT_NEAR(b[1].item<double>(), 5.0, 1e-5);
  EXPECT_NEAR(b[2].item<double>(), 4.9, 1e-5);
  EXPECT_NEAR(b[3].item<double>(), 6.0, 1e-5);
}

TEST(BudgetTest, LowerBitsToFit_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(0);
  Lin model(16, 4);
  model->to(torch::kCUDA);
  diffq::DiffQuantizer<Lin> q(model, AllQuantized(16));
  SetBits(q, "fc.weight", {5.8, 5.55, 4.9, 6.6});
  const double before_bits = 16 * 24 + 72 + 3 * 4;
  const diffq::FitReport report = diffq::lower_bits_to_fit(q, (before_bits - 40) / kBitsPerMB);
  EXPECT_EQ(Rounded(q, "fc.weight"), (std::vector<int64_t>{5, 5, 5, 6}));
  EXPECT_EQ(report.lowered.size(), 3u);
  EXPECT_DOUBLE_EQ(q.true_model_size(), (16 * 21 + 72 + 3 * 4) / kBitsPerMB);
}

TEST(BudgetTest, LowerBitsToFitStopsAtTheFloorAndKeepsTheCheckpointExact) {
  torch::manual_seed(1);
  Two model;
  diffq::DiffQuantizer<Two> q(model, diffq::DiffQOptions().group_size(16).min_size_mb(5e-5));
  SetBits(q, "a.weight", {2.2, 3.4, 9.7});
  SetBits(q, "b.weight", {2.6, 4.45});
  // The floor itself as the target: every group ends at 2 bits. Lowerings: a: 0 + 1 + 8 = 9,
  // b: 1 + 2 = 3 (a group at 2 bits is never lowered).
  const double floor_mb = q.min_true_model_size();
  const auto report = diffq::lower_bits_to_fit(q, floor_mb);
  EXPECT_EQ(Rounded(q, "a.weight"), (std::vector<int64_t>{2, 2, 2}));
  EXPECT_EQ(Rounded(q, "b.weight"), (std::vector<int64_t>{2, 2}));
  EXPECT_DOUBLE_EQ(q.true_model_size(), floor_mb);
  ASSERT_EQ(report.lowered.size(), 4u);  // one entry per changed group
  EXPECT_EQ(report.lowered[0].name, "a.weight");
  EXPECT_EQ(report.lowered[0].group, 1);
  EXPECT_EQ(report.lowered[1].group, 2);
  EXPECT_EQ(report.lowered[1].bits_before, 10);
  EXPECT_EQ(report.lowered[1].bits_after, 2);
  EXPECT_EQ(report.lowered[2].name, "b.weight");
  EXPECT_EQ(report.lowered[2].group, 0);
  EXPECT_EQ(report.lowered[3].bits_before, 4);
  // The eval forward uses the new bit widths (2 bits: 4 levels per tensor), and the checkpoint
  // reloads to the same outputs bit for bit.
  model->eval();
  torch::NoGradGuard ng;
  auto x = torch::randn({3, 8});
  auto y = q.forward(x);
  const std::string path = ::testing::TempDir() + "budget_floor.dq";
  diffq::save_quantized(q, path);
  Two fresh;
  diffq::load_quantized(*fresh, path);
  fresh->eval();
  EXPECT_TRUE(torch::equal(fresh->forward(x), y));
  EXPECT_LE(
      std::get<0>(torch::unique_consecutive(std::get<0>(torch::sort(fresh->a->weight.flatten()))))
          .numel(),
      4);
  std::remove(path.c_str());
}

/// A regression where more bits always lower the loss: y = x·W*ᵀ, the model a bias-free linear
/// layer trained from W*'s neighbourhood, so the quantization noise is what the loss measures.
struct Regression {
  torch::Tensor w_star, x, y;
  explicit Regression(int64_t in, int64_t out) {
    w_star = torch::randn({out, in}) * 0.5;
    x = torch::randn({512, in});
    y = torch::matmul(x, w_star.t());
  }
};

/// Trains `steps` steps with the controller (Adam, lr 1e-2 on weights, 5e-2 on logits),
/// reseeding the noise at every step from `seed + step`, from `first` on.
template <typename Q, typename B>
void TrainSteps(Q& q, torch::nn::Module& model, torch::optim::Optimizer& opt, B& budget,
                const Regression& data, int64_t first, int64_t steps) {
  model.train();
  for (int64_t s = first; s < first + steps; ++s) {
    torch::manual_seed(1000 + s);
    opt.zero_grad();
    auto pred = q.forward(data.x);
    auto loss = torch::mse_loss(pred, data.y) + budget.loss_term();
    loss.backward();
    opt.step();
    budget.step();
  }
}

/// Trains the regression with a controller from `initial_lambda` for 1500 steps (a measurement
/// every 5), checks the multiplier's direction at every measurement and the convergence, and
/// returns the numbers of measurements over and under the budget.
std::pair<int, int> CheckConvergence(double initial_lambda) {
  torch::manual_seed(3);
  const Regression data(64, 32);
  Lin model(64, 32);  // 2048 weights, groups of 16: 128 groups
  {
    torch::NoGradGuard ng;
    model->fc->weight.copy_(data.w_star);
  }
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-2));
  diffq::DiffQuantizer<Lin> q(model, AllQuantized(16));
  q.setup_optimizer(opt, 5e-2);
  // A budget of 4 bits per weight: 2048·4 + 72 + 2·128 bits (bits_bits of max 5: 2).
  const double target = (2048 * 4 + 72 + 2 * 128) / kBitsPerMB;
  diffq::SizeBudget<Lin> budget(
      q, target, diffq::SizeBudgetOptions().measure_every(5).initial_lambda(initial_lambda));
  TrainSteps(q, *model, opt, budget, data, 0, 1500);
  const auto& h = budget.history();
  EXPECT_EQ(h.size(), 300u);
  // λ stays positive; it rises after a measurement over the budget and falls after one under
  // (or stays at its bounds).
  double previous = initial_lambda;
  int over = 0, under = 0;
  for (const auto& r : h) {
    EXPECT_GT(r.lambda, 0);
    EXPECT_DOUBLE_EQ(r.violation, (r.size_mb - target) / target);
    const double c = std::min(std::max(r.violation, -0.1), 0.1);  // max_violation 0.1
    EXPECT_NEAR(r.penalty_weight, r.lambda * std::exp(20 * c) / target, 1e-9 * r.penalty_weight);
    if (r.size_mb > target) {
      EXPECT_TRUE(r.lambda > previous || r.lambda == budget.options().max_lambda()) << r.step;
      ++over;
    } else if (r.size_mb < target) {
      EXPECT_TRUE(r.lambda < previous || r.lambda == budget.options().min_lambda()) << r.step;
      ++under;
    }
    previous = r.lambda;
  }
  // Converged: the last 40 measurements (200 steps) within 2 % of the budget.
  for (std::size_t i = h.size() - 40; i < h.size(); ++i) {
    EXPECT_LE(std::abs(h[i].violation), 0.02) << "step " << h[i].step << " size " << h[i].size_mb;
  }
  // More bits lower the loss here, so the budget binds: λ is well above its floor.
  EXPECT_GT(budget.lambda(), 10 * budget.options().min_lambda());
  // finalize() makes it fit.
  budget.finalize();
  EXPECT_LE(q.true_model_size(), target);
  return {over, under};
}

TEST(BudgetTest, ControllerConvergesToTheBudgetFromBelowTheMultiplier) {
  // λ starts low: the model starts over the budget (every group at 8 bits) and λ rises.
  const auto counts = CheckConvergence(1e-2);
  EXPECT_GT(counts.first, 100);
}

TEST(BudgetTest, ControllerConvergesToTheBudgetFromAboveTheMultiplier) {
  // λ starts far too high: the size falls under the budget, then λ falls and it comes back.
  const auto counts = CheckConvergence(50);
  EXPECT_GT(counts.second, 10);
}

/// One training of the resume test: model (seeded like every other), Adam, quantizer, controller.
struct Trainee {
  Lin model{nullptr};
  std::unique_ptr<torch::optim::Adam> opt;
  std::unique_ptr<diffq::DiffQuantizer<Lin>> q;
  std::unique_ptr<diffq::SizeBudget<Lin>> budget;
  Trainee(double target, const diffq::SizeBudgetOptions& options) {
    torch::manual_seed(5);
    model = Lin(32, 16);
    opt =
        std::make_unique<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(1e-2));
    q = std::make_unique<diffq::DiffQuantizer<Lin>>(model, AllQuantized(16));
    q->setup_optimizer(*opt, 5e-2);
    budget = std::make_unique<diffq::SizeBudget<Lin>>(*q, target, options);
  }
  void Train(const Regression& data, int64_t first, int64_t steps) {
    TrainSteps(*q, *model, *opt, *budget, data, first, steps);
  }
};

TEST(BudgetTest, SaveAndLoadReproduceTheLambdaTrajectory) {
  const std::string dir = ::testing::TempDir();
  torch::manual_seed(4);
  const Regression data(32, 16);
  const double target = (512 * 4 + 72 + 2 * 32) / kBitsPerMB;
  const auto options = diffq::SizeBudgetOptions().measure_every(3).warmup_steps(7);
  // Straight through: 200 steps.
  Trainee a(target, options);
  a.Train(data, 0, 200);
  // 90 steps, save model, optimizer and controller; a new process' worth of objects; 110 steps.
  Trainee b(target, options);
  b.Train(data, 0, 90);
  const std::string model_path = dir + "budget_model.pt", opt_path = dir + "budget_opt.pt",
                    state_path = dir + "budget_state.pt";
  torch::save(b.model, model_path);
  torch::save(*b.opt, opt_path);
  {
    torch::serialize::OutputArchive archive;
    b.budget->save(archive);
    archive.save_to(state_path);
  }
  Trainee c(target, options);  // registers the logits, so that the saved model loads into it
  torch::load(c.model, model_path);
  torch::load(*c.opt, opt_path);
  {
    torch::serialize::InputArchive archive;
    archive.load_from(state_path);
    c.budget->load(archive);
  }
  auto& budget_c = *c.budget;
  EXPECT_EQ(budget_c.steps(), 90);
  EXPECT_EQ(budget_c.lambda(), b.budget->lambda());
  c.Train(data, 90, 110);
  const auto& ha = a.budget->history();
  const auto& hc = budget_c.history();
  // Measurements at steps 10, 13, ..., 199: (200 − 7)/3 = 64.
  ASSERT_EQ(ha.size(), 64u);
  ASSERT_EQ(hc.size(), ha.size());
  for (std::size_t i = 0; i < ha.size(); ++i) {
    EXPECT_EQ(hc[i].step, ha[i].step);
    EXPECT_EQ(hc[i].size_mb, ha[i].size_mb) << i;
    EXPECT_EQ(hc[i].lambda, ha[i].lambda) << i;
    EXPECT_EQ(hc[i].penalty_weight, ha[i].penalty_weight) << i;
  }
  EXPECT_EQ(budget_c.penalty_weight(), a.budget->penalty_weight());
  EXPECT_EQ(ha.front().step, 10);
  // A state saved for another budget is refused.
  diffq::SizeBudget<Lin> other(*c.q, 2 * target, options);
  torch::serialize::InputArchive archive;
  archive.load_from(state_path);
  ExpectError([&] { other.load(archive); },
              c10::str("diffq::SizeBudget::load: target_mb must be ", 2 * target,
                       " MB (this controller's), got ", target, " MB (the saved state's)"));
  // Malformed states, each refused with its own message, the controller unchanged.
  auto write_state = [&](double lambda, const torch::Tensor& step, const torch::Tensor& history) {
    torch::serialize::OutputArchive out;
    const auto d = torch::TensorOptions().dtype(torch::kDouble);
    out.write("diffq_budget_target_mb", torch::scalar_tensor(target, d));
    out.write("diffq_budget_lambda", torch::scalar_tensor(lambda, d));
    out.write("diffq_budget_step", step);
    out.write("diffq_budget_history", history);
    out.save_to(dir + "budget_bad.pt");
    torch::serialize::InputArchive in;
    in.load_from(dir + "budget_bad.pt");
    return in;
  };
  const auto long_step = torch::scalar_tensor(20, torch::TensorOptions().dtype(torch::kLong));
  auto rows = [](std::vector<double> v) {
    return torch::tensor(v, torch::TensorOptions().dtype(torch::kDouble)).reshape({-1, 5}).clone();
  };
  const auto good = rows({10, 1e-3, 0.1, 0.5, 2.0, 20, 1e-3, 0.1, 0.6, 2.0});
  const double before = budget_c.lambda();
  const std::size_t history_before = budget_c.history().size();
  const auto expect_refused = [&](torch::serialize::InputArchive in, const std::string& what) {
    ExpectError([&] { budget_c.load(in); }, what);
    EXPECT_EQ(budget_c.lambda(), before);
    EXPECT_EQ(budget_c.history().size(), history_before);
  };
  {
    diffq::SizeBudget<Lin> fresh(*c.q, target, options);
    auto in = write_state(0.6, long_step, good);
    fresh.load(in);  // well-formed: accepted
    EXPECT_EQ(fresh.lambda(), 0.6);
    EXPECT_EQ(fresh.history().size(), 2u);
  }
  expect_refused(write_state(0.6, torch::scalar_tensor(20.0), good),
                 "'diffq_budget_step' must be one Long value, got 1 Float value(s)");
  expect_refused(write_state(0.6, long_step, good.to(torch::kFloat)),
                 "'diffq_budget_history' must be a [n, 5] Double tensor, got [2, 5] Float");
  expect_refused(write_state(NAN, long_step, good),
                 "lambda must be in [min_lambda, max_lambda] = [1e-06, 1000], got nan");
  expect_refused(write_state(0.6, long_step, rows({10, NAN, 0.1, 0.5, 2.0})),
                 "history row 0: expected a finite size > 0");
  expect_refused(
      write_state(0.6, long_step, rows({10, 1e-3, 0.1, 0.5, 2.0, 10, 1e-3, 0.1, 0.5, 2.0})),
      "history row 1: step must be an integer in (10, 20], got 10");
  expect_refused(write_state(0.6, long_step, rows({30, 1e-3, 0.1, 0.5, 2.0})),
                 "history row 0: step must be an integer in (0, 20], got 30");
  torch::serialize::InputArchive empty_archive;
  torch::serialize::OutputArchive nothing;
  nothing.write("x", torch::zeros({1}));
  nothing.save_to(dir + "budget_nothing.pt");
  empty_archive.load_from(dir + "budget_nothing.pt");
  ExpectError([&] { other.load(empty_archive); },
              "diffq::SizeBudget::load: the archive has no 'diffq_budget_target_mb'");
  for (const auto& p :
       {model_path, opt_path, state_path, dir + "budget_nothing.pt", dir + "budget_bad.pt"}) {
    std::remove(p.c_str());
  }
}

TEST(BudgetTest, WarmUpHoldsLambdaAndMeasurementsComeEveryK) {
  torch::manual_seed(6);
  Lin model(16, 4);
  diffq::DiffQuantizer<Lin> q(model, AllQuantized(16));
  q.no_optimizer();
  const double size = q.true_model_size();  // the logits do not move here
  const auto o = diffq::SizeBudgetOptions().warmup_steps(4).measure_every(3).initial_lambda(0.2);
  diffq::SizeBudget<Lin> budget(q, size / 2, o);
  for (int i = 0; i < 4; ++i) budget.step();
  EXPECT_TRUE(budget.history().empty());
  EXPECT_EQ(budget.lambda(), 0.2);
  for (int i = 0; i < 6; ++i) budget.step();  // steps 7 and 10
  ASSERT_EQ(budget.history().size(), 2u);
  EXPECT_EQ(budget.history()[0].step, 7);
  EXPECT_EQ(budget.history()[1].step, 10);
  EXPECT_DOUBLE_EQ(budget.history()[0].violation, 1.0);
  // Violation 1, clipped to 0.1 (max_violation): λ·exp(0.5·0.1) twice (lr 0.5).
  EXPECT_NEAR(budget.history()[0].lambda, 0.2 * std::exp(0.05), 1e-12);
  EXPECT_NEAR(budget.lambda(), 0.2 * std::exp(0.1), 1e-12);
  // The loss term is λ·exp(proportional·c)·penalty()/target, proportional 20, c 0.1.
  const double weight = 0.2 * std::exp(0.1) * std::exp(20 * 0.1) / (size / 2);
  EXPECT_NEAR(budget.penalty_weight(), weight, 1e-9 * weight);
  EXPECT_NEAR(budget.loss_term().item<double>(), weight * q.penalty().item<double>(),
              1e-6 * weight * q.penalty().item<double>());
}

TEST(BudgetTest, ErrorsNameTheProblem) {
  torch::manual_seed(7);
  Two model;
  diffq::DiffQuantizer<Two> q(model, diffq::DiffQOptions().group_size(16).min_size_mb(5e-5));
  const double floor_mb = q.min_true_model_size();
  using O = diffq::SizeBudgetOptions;
  auto build = [&](double target, O o = O()) { diffq::SizeBudget<Two> b(q, target, o); };
  ExpectError([&] { build(floor_mb * 0.9); },
              c10::str("diffq::SizeBudget: target_mb must be >= ", floor_mb,
                       " MB, the smallest size the model can have (every group at 2 bits, plus "
                       "the tensors kept in floating point), got ",
                       floor_mb * 0.9, " MB"));
  ExpectError([&] { build(0); }, "diffq::SizeBudget: target_mb must be finite and > 0, got 0");
  ExpectError([&] { build(-1); }, "target_mb must be finite and > 0, got -1");
  ExpectError([&] { build(std::nan("")); }, "target_mb must be finite and > 0, got nan");
  ExpectError([&] { build(INFINITY); }, "target_mb must be finite and > 0, got inf");
  const double ok = floor_mb * 2;
  ExpectError([&] { build(ok, O().lr(0)); }, "lr must be finite and > 0, got 0");
  ExpectError([&] { build(ok, O().lr(NAN)); }, "lr must be finite and > 0, got nan");
  ExpectError([&] { build(ok, O().proportional(-1)); },
              "proportional must be finite and >= 0, got -1");
  ExpectError([&] { build(ok, O().min_lambda(0)); }, "min_lambda must be finite and > 0, got 0");
  ExpectError([&] { build(ok, O().max_lambda(1e-7)); },
              "max_lambda must be finite and >= min_lambda (1e-06), got 1e-07");
  ExpectError([&] { build(ok, O().initial_lambda(1e4)); },
              "initial_lambda must be in [min_lambda, max_lambda] = [1e-06, 1000], got 10000");
  ExpectError([&] { build(ok, O().max_violation(0)); },
              "max_violation must be finite and > 0, got 0");
  ExpectError([&] { build(ok, O().warmup_steps(-1)); }, "warmup_steps must be >= 0, got -1");
  ExpectError([&] { build(ok, O().measure_every(0)); }, "measure_every must be >= 1, got 0");
  ExpectError([&] { diffq::lower_bits_to_fit(q, floor_mb / 2); },
              "diffq::lower_bits_to_fit: target_mb must be >= ");
  ExpectError([&] { diffq::lower_bits_to_fit(q, 0); },
              "diffq::lower_bits_to_fit: target_mb must be finite and > 0, got 0");
  // A NaN logit: the bit widths cannot be read.
  {
    torch::NoGradGuard ng;
    q.logit("a.weight")[0] = NAN;
  }
  ExpectError([&] { diffq::lower_bits_to_fit(q, ok); }, "is NaN");
}

}  // namespace
