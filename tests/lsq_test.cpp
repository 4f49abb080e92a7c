// Tests of diffq::LSQQuantizer against independent computations: LSQ's formulas (Esser et al.,
// arXiv 1902.08153, Eq. 1–3) evaluated by hand element by element on small tensors, finite
// differences where the quantizer is smooth, and the checkpoint round trip.
#include <diffq/checkpoint.h>
#include <diffq/lsq.h>

#include "test_models.h"
#include "test_util.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace {

using diffq_test::BitEqual;
using diffq_test::Close;
using diffq_test::ExpectError;
using diffq_test::MLP;

namespace F = torch::nn::functional;
using diffq::LSQOptions;
using diffq::LSQQuantizer;

/// A module whose output is `Σ x ⊙ weight`: the upstream gradient of its weight is `x`.
struct DotImpl : torch::nn::Module {
  explicit DotImpl(torch::Tensor w) : weight(register_parameter("weight", std::move(w))) {}
  torch::Tensor forward(const torch::Tensor& x) { return (x * weight).sum(); }
  torch::Tensor weight;
};
TORCH_MODULE(Dot);

/// Sets the step of `name` to `s`.
template <typename Q>
void SetStep(Q& q, const std::string& name, double s) {
  torch::NoGradGuard ng;
  q.step(name).fill_(s);
}

TEST(LSQQuantizer, StepInitialisedFromMeanAbsAndRegisteredOnOwner) {
  torch::manual_seed(1);
  MLP model;
  LSQQuantizer<MLP> q(model, LSQOptions().bits(3).min_size_mb(0).exclude({"*bias"}));
  const auto w = model->fc1->weight.detach().to(torch::kDouble).contiguous();
  double sum = 0;
  for (int64_t i = 0; i < w.numel(); ++i) sum += std::abs(w.data_ptr<double>()[i]);
  const double expected = 2.0 * (sum / w.numel()) / std::sqrt(3.0);  // Qp = 2^2 − 1
  EXPECT_NEAR(q.step("fc1.weight").item<double>(), expected, 1e-6 * expected);
  EXPECT_EQ(q.step("fc1.weight").sizes(), (std::vector<int64_t>{1}));
  auto names = model->fc1->named_parameters(false).keys();
  EXPECT_NE(std::find(names.begin(), names.end(), "weight_lsq"), names.end());
  q.detach();
  names = model->fc1->named_parameters(false).keys();
  EXPECT_EQ(std::find(names.begin(), names.end(), "weight_lsq"), names.end());
}

/// One forward and backward of `Σ x ⊙ w_q` on `device` against LSQ's formulas evaluated by hand
/// element by element (Esser et al., Eq. 1–3): output, weight gradient (STE inside the range, 0
/// where clamped) and step gradient, with a step that leaves some elements inside, some clamped.
void CheckLsqAgainstThePaper(int64_t bits, const torch::Device& device) {
  torch::manual_seed(2);
  const auto w0 = torch::randn({3, 5});
  Dot model(w0.clone().to(device));
  torch::optim::SGD opt(model->parameters(), 0.0);
  LSQQuantizer<Dot> q(model, LSQOptions().bits(bits).min_size_mb(0));
  q.setup_optimizer(opt, 0.0);
  EXPECT_EQ(q.step("weight").device().type(), device.type());
  const double s = 1.1 / (std::pow(2.0, bits - 1) - 1);  // some elements inside, some clamped
  SetStep(q, "weight", s);
  const auto x = torch::randn({3, 5});
  auto y = q.forward(x.to(device));
  y.backward();

  const double qn = std::pow(2.0, bits - 1), qp = qn - 1;
  const double g = 1.0 / std::sqrt(15.0 * qp);
  auto wc = w0.contiguous();
  auto xc = x.contiguous();
  const float* wp = wc.data_ptr<float>();
  const float* xp = xc.data_ptr<float>();
  double out = 0, gstep = 0, gabs = 0;
  std::vector<float> gw(15);
  int inside_count = 0, clamped = 0;
  for (int i = 0; i < 15; ++i) {
    const double v = static_cast<double>(wp[i] / static_cast<float>(s));  // paper: v = w/s
    const double level = std::nearbyint(std::min(std::max(v, -qn), qp));
    out += xp[i] * level * s;  // w_q = round(clamp(v, −Qn, Qp))·s
    const bool inside = -qn < v && v < qp;
    inside_count += inside;
    clamped += !inside;
    gw[i] = inside ? xp[i] : 0.0f;                                                // ∂w_q/∂w
    const double dstep = inside ? std::nearbyint(v) - v : (v <= -qn ? -qn : qp);  // ∂w_q/∂s
    gstep += xp[i] * dstep;
    gabs += std::abs(xp[i] * dstep);
  }
  EXPECT_GT(inside_count, 0);
  EXPECT_GT(clamped, 0);
  EXPECT_NEAR(y.item<double>(), out, 1e-5 * std::max(1.0, std::abs(out)));
  EXPECT_TRUE(Close(model->weight.grad().cpu(), torch::from_blob(gw.data(), {3, 5}).clone(), 1e-6));
  EXPECT_NEAR(q.step("weight").grad().item<double>(), g * gstep, 1e-5 * g * gabs);
  EXPECT_TRUE(BitEqual(model->weight, w0));  // clean weights after the backward
}

TEST(LSQQuantizer, ForwardLevelsAndGradientsMatchThePaperByHand) {
  for (int64_t bits : {2, 3, 4}) {
    SCOPED_TRACE("bits=" + std::to_string(bits));
    CheckLsqAgainstThePaper(bits, torch::kCPU);
  }
}

TEST(LSQQuantizer, StepGradientMatchesFiniteDifferencesWhereSmooth) {
  // Every element clamped (|w/s| > Qp): w_q = ±Q·s is linear in s and constant in w, so LSQ's
  // STE gradients are the true derivatives: dL/ds = Σ x·(−Qn or Qp), scaled by g; dL/dw = 0.
  torch::manual_seed(3);
  const int64_t bits = 3;
  auto w0 = torch::randn({4, 4}, torch::kDouble).sign() * (2 + torch::rand({4, 4}, torch::kDouble));
  Dot model(w0.clone());
  LSQQuantizer<Dot> q(model, LSQOptions().bits(bits).min_size_mb(0));
  q.no_optimizer();
  const double s = 0.1;  // |v| >= 20 > Qp = 3
  SetStep(q, "weight", s);
  const auto x = torch::randn({4, 4}, torch::kDouble);
  q.forward(x).backward();
  auto loss_at = [&](double step) {
    SetStep(q, "weight", step);
    torch::NoGradGuard ng;
    model->eval();
    auto l = q.forward(x).item<double>();
    model->train();
    return l;
  };
  const double h = 1e-4;
  const double fd = (loss_at(s + h) - loss_at(s - h)) / (2 * h);
  const double g = 1.0 / std::sqrt(16.0 * 3.0);
  EXPECT_NEAR(q.step("weight").grad().item<double>(), g * fd, 1e-7);
  EXPECT_EQ(model->weight.grad().abs().max().item<double>(), 0.0);
}

TEST(LSQQuantizer, EvalWeightsAreTheLevelsOnTheStepGrid) {
  torch::manual_seed(4);
  MLP model;
  LSQQuantizer<MLP> q(model, LSQOptions().bits(4).min_size_mb(0));
  const auto w = model->fc1->weight.detach().clone();
  const double s = q.step("fc1.weight").item<double>();
  auto st = q.quantized_state();
  const auto& t = st.quantized[0];
  ASSERT_EQ(t.name, "fc1.weight");
  EXPECT_EQ(t.group_size, 0);
  EXPECT_EQ(t.bits[0].item<int>(), 4);
  EXPECT_EQ(t.min, -8 * s);
  EXPECT_EQ(t.max, 7 * s);
  // Levels by hand: round(clamp(w/s, −8, 7)) + 8.
  auto wc = w.contiguous();
  auto lv = t.levels.contiguous();
  for (int64_t i = 0; i < wc.numel(); ++i) {
    const float v = wc.data_ptr<float>()[i] / static_cast<float>(s);
    const double level = std::nearbyint(std::min(std::max<double>(v, -8.0), 7.0)) + 8;
    ASSERT_EQ(lv.data_ptr<int16_t>()[i], static_cast<int16_t>(level)) << "element " << i;
  }
  // Eval weights ≈ (level − Qn)·s.
  diffq::QuantizedGuard<LSQQuantizer<MLP>> guard(q);
  auto expected = (t.levels.to(torch::kDouble) - 8).mul(s).view(w.sizes());
  EXPECT_TRUE(Close(model->fc1->weight, expected, 1e-6));
}

TEST(LSQQuantizer, TrainExportLoadIsBitExact) {
  torch::manual_seed(5);
  MLP model;
  torch::optim::Adam opt(model->parameters(), 1e-2);
  LSQQuantizer<MLP> q(model, LSQOptions().bits(3).min_size_mb(0).exclude({"*bias"}));
  q.setup_optimizer(opt, 1e-2);
  ASSERT_EQ(opt.param_groups().size(), 2u);
  EXPECT_EQ(static_cast<torch::optim::AdamOptions&>(opt.param_groups()[1].options()).weight_decay(),
            0.0);
  const double s0 = q.step("fc1.weight").item<double>();
  auto x = torch::randn({16, 10});
  auto target = torch::randn({16, 3});
  for (int i = 0; i < 5; ++i) {
    opt.zero_grad();
    (q.forward(x) - target).pow(2).mean().backward();
    opt.step();
  }
  EXPECT_NE(q.step("fc1.weight").item<double>(), s0);  // the step is learnt
  std::vector<uint8_t> bytes;
  diffq::save_quantized(q, bytes);
  MLP fresh;
  diffq::load_quantized(fresh, bytes);
  model->eval();
  torch::NoGradGuard ng;
  auto expected = q.forward(x);
  EXPECT_TRUE(BitEqual(fresh->forward(x), expected));
  // With the step sizes stored, a model wrapped by a new LSQ quantizer gets them back.
  std::vector<uint8_t> with_steps;
  diffq::save_quantized(q, with_steps, /*include_logits=*/true);
  torch::manual_seed(6);
  MLP again;
  LSQQuantizer<MLP> q2(again, LSQOptions().bits(3).min_size_mb(0).exclude({"*bias"}));
  EXPECT_FALSE(BitEqual(q2.step("fc1.weight"), q.step("fc1.weight")));
  // Without them, the error says why (an LSQ checkpoint records no options with the suffix).
  ExpectError([&] { diffq::restore_quantized(q2, bytes); },
              "missing from the checkpoint (2): 'fc1.weight_lsq', 'fc2.weight_lsq'; the model "
              "carries a quantizer's logits or step sizes ('*_lsq'), which the checkpoint does not "
              "store: load into a model without a quantizer, or save with include_logits = true;");
  diffq::restore_quantized(q2, with_steps);
  for (const auto& name : {"fc1.weight", "fc2.weight"}) {
    EXPECT_TRUE(BitEqual(q2.step(name), q.step(name))) << name;
  }
  EXPECT_TRUE(BitEqual(again->forward(x), expected));
  diffq::QuantizedGuard<LSQQuantizer<MLP>> guard(q);
  EXPECT_TRUE(BitEqual(fresh->fc1->weight, model->fc1->weight));
  EXPECT_TRUE(BitEqual(fresh->fc2->weight, model->fc2->weight));
}

TEST(LSQQuantizer, ModelSizeEqualsFormulaByHand) {
  MLP model;
  LSQQuantizer<MLP> q(model, LSQOptions().bits(4).min_size_mb(0).exclude({"*bias"}).float16(true));
  const double bits = 4.0 * 60 + 64 + 4.0 * 18 + 64 + 16.0 * (6 + 3);  // steps not counted
  EXPECT_NEAR(q.model_size().item<double>(), bits / (8.0 * 1048576.0), 1e-15);
  EXPECT_NEAR(q.true_model_size(), bits / (8.0 * 1048576.0), 1e-15);
  EXPECT_DOUBLE_EQ(q.mean_bits(), 4.0);
}

TEST(LSQQuantizer, ErrorPaths) {
  MLP model;
  ExpectError([&] { LSQQuantizer<MLP> q(model, LSQOptions().bits(1)); },
              "diffq::LSQQuantizer: bits must be in [2, 15], got 1");
  ExpectError([&] { LSQQuantizer<MLP> q(model, LSQOptions().bits(16)); },
              "diffq::LSQQuantizer: bits must be in [2, 15], got 16");
  ExpectError([&] { LSQQuantizer<MLP> q(model, LSQOptions().min_size_mb(-1)); },
              "diffq::LSQQuantizer: min_size_mb must be >= 0, got -1");
  ExpectError([&] { LSQQuantizer<MLP> q(model, LSQOptions().suffix("")); },
              "diffq::LSQQuantizer: suffix must be non-empty");
  LSQQuantizer<MLP> q(model, LSQOptions().min_size_mb(0));
  ExpectError([&] { LSQQuantizer<MLP> again(model, LSQOptions()); },
              "the model already carries a LSQ step size ('fc1.weight_lsq')");
  ExpectError(
      [&] {
        q.forward(torch::randn({1, 10}));
      },
      "diffq::LSQQuantizer::forward: call setup_optimizer(optimizer)");
  torch::optim::Adam late(model->parameters());
  ExpectError([&] { q.setup_optimizer(late); },
              "already holds the step size 'fc1.weight_lsq'; create the optimizer");
  ExpectError([&] { q.step("nope"); }, "diffq::LSQQuantizer: no quantized parameter named 'nope'");
  SetStep(q, "fc1.weight", -0.5);
  model->eval();
  ExpectError(
      [&] {
        q.forward(torch::randn({1, 10}));
      },
      "diffq::LSQQuantizer: the step size of 'fc1.weight' must be > 0 and finite, got -0.5");
  // A step whose range (2^15 − 1)·step overflows float: a c10::Error naming the parameter (was a
  // std::runtime_error from ATen's scalar conversion), at eval and at export.
  LSQQuantizer<MLP> wide(MLP(), LSQOptions().bits(15).min_size_mb(0));
  SetStep(wide, "fc2.weight", 1e35);
  wide.model()->eval();
  const std::string overflow =
      "diffq::LSQQuantizer: the step size of 'fc2.weight' is 1e+35: its range (2^bits - 1)*step = "
      "3.2767e+39 overflows Float";
  ExpectError([&] { wide.forward(torch::randn({1, 10})); }, overflow);
  ExpectError([&] { wide.quantized_state(); }, overflow);
}

TEST(LSQQuantizer, LargeFiniteWeightsInitialiseTheStep) {
  // mean|w| of 1e35: a float sum overflowed to inf and the weights were called non-finite. The
  // step is 2·mean|w|/sqrt(Qp) (Qp = 7 at 4 bits), and the eval weights round(clamp(w/s))·s.
  auto w0 = torch::full({100, 100}, 1e35f);
  Dot model(w0.clone());
  LSQQuantizer<Dot> q(model, LSQOptions().bits(4).min_size_mb(0));
  const double expected = 2.0 * static_cast<double>(1e35f) / std::sqrt(7.0);
  EXPECT_NEAR(q.step("weight").item<double>(), expected, 1e-6 * expected);
  const float s = q.step("weight").item<float>();
  const float level = std::nearbyint(1e35f / s);  // 1.32… rounds to 1
  EXPECT_EQ(level, 1.0f);
  diffq::QuantizedGuard<LSQQuantizer<Dot>> guard(q);
  EXPECT_TRUE(Close(model->weight.detach(), torch::full({100, 100}, level * s), 1e-6));
  // Weights so small that 2·mean|w|/sqrt(Qp) rounds to 0 in float: step 1, like zero weights, and
  // the eval weights are 0 (the first forward failed with "must be > 0").
  Dot tiny(torch::full({4}, 1.4e-45f));
  LSQQuantizer<Dot> qt(tiny, LSQOptions().bits(15).min_size_mb(0));
  EXPECT_EQ(qt.step("weight").item<double>(), 1.0);
  {
    diffq::QuantizedGuard<LSQQuantizer<Dot>> zero(qt);
    EXPECT_TRUE(BitEqual(tiny->weight.detach(), torch::zeros({4})));
  }
  // A range that overflows float refuses the initialisation with a message.
  ExpectError(
      [&] {
        LSQQuantizer<Dot> big(Dot(torch::full({4}, 3e38f)), LSQOptions().bits(15).min_size_mb(0));
      },
      "overflows Float");
}

TEST(LSQQuantizer, FrozenStepGetsNoGradientAndStaysFixed) {
  // The step of fc1.weight set to requires_grad false after a first Adam step: an optimizer steps
  // any tensor whose `.grad` is defined, and LibTorch 1.13's zero_grad() zeroes gradients without
  // undefining them, so the hook must drop it.
  torch::manual_seed(6);
  MLP model;
  torch::optim::Adam optimizer(model->parameters(), 1e-2);
  LSQQuantizer<MLP> q(model, LSQOptions().bits(3).min_size_mb(0));
  q.setup_optimizer(optimizer, 0.1);
  auto x = torch::randn({4, 10});
  optimizer.zero_grad();
  q.forward(x).pow(2).sum().backward();
  optimizer.step();
  ASSERT_TRUE(q.step("fc1.weight").grad().defined());
  q.step("fc1.weight").requires_grad_(false);
  const auto frozen = q.step("fc1.weight").detach().clone();
  optimizer.zero_grad();
  q.forward(x).pow(2).sum().backward();
  EXPECT_FALSE(q.step("fc1.weight").grad().defined());
  EXPECT_TRUE(q.step("fc2.weight").grad().defined());
  EXPECT_TRUE(model->fc1->weight.grad().defined());
  optimizer.step();
  EXPECT_TRUE(BitEqual(q.step("fc1.weight").detach(), frozen));
}

TEST(LSQQuantizer, ForwardLevelsAndGradientsMatchThePaperByHand_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  for (int64_t bits : {2, 3, 4}) {
    SCOPED_TRACE("bits=" + std::to_string(bits));
    CheckLsqAgainstThePaper(bits, torch::kCUDA);
  }
}

TEST(LSQQuantizer, LevelsOnTheDeviceEqualTheCpuLevels_CUDA) {
  // `w/step` on the device by true division, as on the CPU (CUDA turns a division by a CPU scalar
  // into a product with its reciprocal): a checkpoint exported from a CUDA model reloads to its
  // eval weights.
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(7);
  auto w = torch::randn({1 << 20});
  for (int64_t bits : {4, 8, 15}) {
    const double step = 3.3 / std::pow(2.0, bits - 1);
    EXPECT_TRUE(
        BitEqual(diffq::lsq_levels(w.cuda(), step, bits).cpu(), diffq::lsq_levels(w, step, bits)))
        << bits;
  }
}

}  // namespace
