// Tests of diffq::UniformQuantizer (PTQ and QAT with the straight-through estimator) against
// independent computations: weights quantized by hand in double precision, an explicit functional
// forward whose gradient passes straight through by construction (`w + (w_q − w).detach()`), and
// the size formula computed by hand.
#include <diffq/checkpoint.h>
#include <diffq/uniform.h>

#include "test_models.h"
#include "test_util.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace {

using diffq_test::BitEqual;
using diffq_test::Close;
using diffq_test::ExpectError;
using diffq_test::MLP;
using diffq_test::NoTF32;
using diffq_test::Tied;

namespace F = torch::nn::functional;
using diffq::UniformOptions;
using diffq::UniformQuantizer;

/// Uniform quantization by hand, element by element in double precision (paper Eq. 1).
torch::Tensor HandQuantize(const torch::Tensor& w, int64_t bits) {
  auto flat = w.detach().to(torch::kDouble).contiguous().reshape(-1);
  const double* p = flat.data_ptr<double>();
  double lo = p[0], hi = p[0];
  for (int64_t i = 0; i < flat.numel(); ++i) {
    lo = std::min(lo, p[i]);
    hi = std::max(hi, p[i]);
  }
  const double levels = std::pow(2.0, static_cast<double>(bits)) - 1;
  auto out = torch::empty_like(flat);
  double* o = out.data_ptr<double>();
  for (int64_t i = 0; i < flat.numel(); ++i) {
    o[i] =
        hi == lo ? lo : lo + std::nearbyint((p[i] - lo) / (hi - lo) * levels) * (hi - lo) / levels;
  }
  return out.view(w.sizes());
}

TEST(UniformQuantizer, EvalForwardUsesHandQuantizedWeights) {
  for (int64_t bits : {1, 3, 8, 15}) {
    SCOPED_TRACE("bits=" + std::to_string(bits));
    torch::manual_seed(1);
    MLP model;
    UniformQuantizer<MLP> q(model, UniformOptions().bits(bits).min_size_mb(0));
    EXPECT_EQ(q.quantized_names(),
              (std::vector<std::string>{"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}));
    auto x = torch::randn({4, 10});
    std::vector<torch::Tensor> hand;
    for (const auto& p : model->parameters()) hand.push_back(HandQuantize(p, bits));
    const auto clean = model->fc1->weight.detach().clone();
    model->eval();
    torch::NoGradGuard ng;
    auto y = q.forward(x);
    EXPECT_TRUE(BitEqual(model->fc1->weight, clean));  // restored after the forward
    auto expected =
        F::linear(torch::tanh(F::linear(x.to(torch::kDouble), hand[0], hand[1])), hand[2], hand[3]);
    EXPECT_TRUE(Close(y, expected, 1e-5));
    diffq::QuantizedGuard<UniformQuantizer<MLP>> guard(q);
    EXPECT_TRUE(Close(model->fc1->weight, hand[0], 1e-6));
    EXPECT_TRUE(Close(model->fc2->bias, hand[3], 1e-6));
  }
}

TEST(UniformQuantizer, PtqTrainingForwardSeesCleanWeights) {
  torch::manual_seed(2);
  MLP model;
  auto x = torch::randn({3, 10});
  // The explicit forward with the clean weights, computed before the quantizer exists, and the one
  // with 2-bit weights (which the PTQ training forward must not use).
  std::vector<torch::Tensor> clean, hand;
  for (const auto& p : model->parameters()) {
    clean.push_back(p.detach().clone());
    hand.push_back(HandQuantize(p, 2).to(torch::kFloat));
  }
  auto expected = F::linear(torch::tanh(F::linear(x, clean[0], clean[1])), clean[2], clean[3]);
  auto quantized = F::linear(torch::tanh(F::linear(x, hand[0], hand[1])), hand[2], hand[3]);
  ASSERT_FALSE(Close(expected, quantized, 1e-3));
  UniformQuantizer<MLP> q(model, UniformOptions().bits(2).min_size_mb(0));
  auto y = q.forward(x);  // training mode, no optimizer needed
  EXPECT_TRUE(BitEqual(y, expected));
  EXPECT_TRUE(BitEqual(model->fc1->weight, clean[0]));
}

TEST(UniformQuantizer, EvalCacheFollowsAnSgdStepAfterAPlainBackward) {
  // Evaluating between epochs of training done without the quantizer: LibTorch's SGD writes
  // through `.data()`, so the version counter does not show its step. Also with fc1.weight frozen
  // when the quantizer is built (so no gradient hook then) and made trainable afterwards.
  for (bool frozen_at_construction : {false, true}) {
    SCOPED_TRACE(frozen_at_construction ? "fc1.weight frozen at construction" : "all trainable");
    torch::manual_seed(4);
    MLP model;
    model->fc1->weight.requires_grad_(!frozen_at_construction);
    torch::optim::SGD optimizer(model->parameters(), 0.5);
    UniformQuantizer<MLP> q(model, UniformOptions().bits(4).min_size_mb(0));
    auto x = torch::randn({3, 10});
    model->eval();
    torch::Tensor y1;
    {
      torch::NoGradGuard ng;
      y1 = q.forward(x);  // fills the eval cache
    }
    model->fc1->weight.requires_grad_(true);
    model->train();
    optimizer.zero_grad();
    model->forward(x).pow(2).sum().backward();
    optimizer.step();
    std::vector<torch::Tensor> hand;
    for (const auto& p : model->parameters()) hand.push_back(HandQuantize(p, 4));
    model->eval();
    torch::NoGradGuard ng;
    auto y = q.forward(x);
    auto expected =
        F::linear(torch::tanh(F::linear(x.to(torch::kDouble), hand[0], hand[1])), hand[2], hand[3]);
    EXPECT_TRUE(Close(y, expected, 1e-5));
    EXPECT_FALSE(torch::equal(y, y1));
    diffq::QuantizedGuard<UniformQuantizer<MLP>> guard(q);
    EXPECT_TRUE(Close(model->fc1->weight, hand[0], 1e-6));
  }
}

/// QAT on `device` against the explicit computation `w + (w_q − w).detach()` with hand-quantized
/// `w_q` (w_q − w is a constant, so autograd passes the gradient straight through): the training
/// output, the weight and bias gradients, the clean weights after the backward, and the eval
/// weights under a QuantizedGuard.
void CheckQatAgainstHandQuantization(int64_t bits, const torch::Device& device) {
  torch::manual_seed(3);
  MLP model;
  model->to(device);
  UniformQuantizer<MLP> q(model,
                          UniformOptions().bits(bits).min_size_mb(0).exclude({"*bias"}).qat(true));
  ASSERT_EQ(q.quantized_names(), (std::vector<std::string>{"fc1.weight", "fc2.weight"}));
  auto x = torch::randn({5, 10}).to(device);
  auto c = torch::randn({5, 3}).to(device);
  auto w1 = model->fc1->weight.detach().clone().requires_grad_(true);
  auto w2 = model->fc2->weight.detach().clone().requires_grad_(true);
  // Clones of the biases: the reference's backward leaves the model's gradients alone.
  auto b1 = model->fc1->bias.detach().clone().requires_grad_(true);
  auto b2 = model->fc2->bias.detach().clone().requires_grad_(true);
  auto h1 = HandQuantize(w1.cpu(), bits).to(torch::kFloat).to(device);
  auto h2 = HandQuantize(w2.cpu(), bits).to(torch::kFloat).to(device);
  auto ref_y = F::linear(torch::tanh(F::linear(x, w1 + (h1 - w1).detach(), b1)),
                         w2 + (h2 - w2).detach(), b2);
  (ref_y * c).sum().backward();

  const auto clean1 = model->fc1->weight.detach().clone();
  auto y = q.forward(x);
  EXPECT_EQ(y.device().type(), device.type());
  EXPECT_TRUE(Close(y, ref_y, 1e-5));
  (y * c).sum().backward();
  EXPECT_TRUE(BitEqual(model->fc1->weight, clean1));  // clean weights back after the backward
  EXPECT_TRUE(Close(model->fc1->weight.grad(), w1.grad(), 1e-5));
  EXPECT_TRUE(Close(model->fc2->weight.grad(), w2.grad(), 1e-5));
  EXPECT_TRUE(Close(model->fc1->bias.grad(), b1.grad(), 1e-5));
  EXPECT_TRUE(Close(model->fc2->bias.grad(), b2.grad(), 1e-5));
  model->eval();
  diffq::QuantizedGuard<UniformQuantizer<MLP>> guard(q);
  EXPECT_TRUE(Close(model->fc1->weight, h1, 1e-6));
  EXPECT_TRUE(Close(model->fc2->weight, h2, 1e-6));
  EXPECT_EQ(model->fc1->weight.device().type(), device.type());
}

TEST(UniformQuantizer, QatForwardIsQuantizedAndGradientPassesStraightThrough) {
  for (int64_t bits : {2, 4}) {
    SCOPED_TRACE("bits=" + std::to_string(bits));
    CheckQatAgainstHandQuantization(bits, torch::kCPU);
  }
}

TEST(UniformQuantizer, QatTrainingStepUpdatesTheCleanWeights) {
  torch::manual_seed(4);
  MLP model;
  torch::optim::SGD opt(model->parameters(), 0.1);
  UniformQuantizer<MLP> q(model, UniformOptions().bits(3).min_size_mb(0).qat(true));
  auto x = torch::randn({8, 10});
  auto before = model->fc1->weight.detach().clone();
  opt.zero_grad();
  q.forward(x).pow(2).sum().backward();
  auto grad = model->fc1->weight.grad().clone();
  opt.step();
  EXPECT_TRUE(Close(model->fc1->weight, before - 0.1 * grad, 1e-6));
  // The eval forward quantizes the stepped weights (LibTorch's SGD writes through .data(), so
  // the version counters did not move; the training forward's cached quantization is stale).
  model->eval();
  torch::NoGradGuard ng;
  std::vector<torch::Tensor> hand;
  for (const auto& p : model->parameters()) hand.push_back(HandQuantize(p, 3));
  auto expected =
      F::linear(torch::tanh(F::linear(x.to(torch::kDouble), hand[0], hand[1])), hand[2], hand[3]);
  EXPECT_TRUE(Close(q.forward(x), expected, 1e-5));
}

TEST(UniformQuantizer, ModelSizeEqualsFormulaByHand) {
  for (bool f16 : {false, true}) {
    MLP model;
    UniformQuantizer<MLP> q(
        model, UniformOptions().bits(5).min_size_mb(0).exclude({"fc2.*"}).float16(f16));
    const double fbits = f16 ? 16 : 32;
    const double bits = 5.0 * 60 + 64 + 5.0 * 6 + 64 + fbits * (18 + 3);
    const double mb = bits / (8.0 * 1048576.0);
    EXPECT_NEAR(q.model_size().item<double>(), mb, 1e-15);
    EXPECT_NEAR(q.true_model_size(), mb, 1e-15);
    EXPECT_DOUBLE_EQ(q.mean_bits(), 5.0);
  }
}

TEST(UniformQuantizer, QuantizedStateHasOneGroupPerTensor) {
  torch::manual_seed(5);
  MLP model;
  UniformQuantizer<MLP> q(model, UniformOptions().bits(6).min_size_mb(0));
  auto st = q.quantized_state();
  ASSERT_EQ(st.quantized.size(), 4u);
  const auto& t = st.quantized[0];
  EXPECT_EQ(t.name, "fc1.weight");
  EXPECT_EQ(t.group_size, 0);
  ASSERT_EQ(t.bits.numel(), 1);
  EXPECT_EQ(t.bits[0].item<int>(), 6);
  EXPECT_EQ(t.min, model->fc1->weight.min().item<double>());
  EXPECT_EQ(t.max, model->fc1->weight.max().item<double>());
  EXPECT_EQ(t.levels.min().item<int>(), 0);
  EXPECT_EQ(t.levels.max().item<int>(), 63);
  EXPECT_TRUE(st.floats.empty());
}

TEST(UniformQuantizer, CheckpointRoundTripIsBitExact) {
  for (int64_t bits : {1, 4, 8, 15}) {
    SCOPED_TRACE("bits=" + std::to_string(bits));
    torch::manual_seed(6);
    MLP model;
    UniformQuantizer<MLP> q(model, UniformOptions().bits(bits).exclude({"*bias"}).min_size_mb(0));
    std::vector<uint8_t> bytes;
    diffq::save_quantized(q, bytes);
    MLP fresh;
    diffq::load_quantized(fresh, bytes);
    model->eval();
    torch::NoGradGuard ng;
    auto x = torch::randn({3, 10});
    auto expected = q.forward(x);
    EXPECT_TRUE(BitEqual(fresh->forward(x), expected));
    diffq::QuantizedGuard<UniformQuantizer<MLP>> guard(q);
    EXPECT_TRUE(BitEqual(fresh->fc1->weight, model->fc1->weight));
    EXPECT_TRUE(BitEqual(fresh->fc2->weight, model->fc2->weight));
    EXPECT_TRUE(BitEqual(fresh->fc2->bias, model->fc2->bias));  // fp32, unquantized
  }
}

TEST(UniformQuantizer, TiedWeightsQuantizedOnceAndRoundTrip) {
  torch::manual_seed(7);
  Tied model;
  UniformQuantizer<Tied> q(model, UniformOptions().bits(4).min_size_mb(0));
  EXPECT_EQ(q.quantized_names(), (std::vector<std::string>{"emb.weight"}));
  EXPECT_NEAR(q.true_model_size(), (4.0 * 35 + 64) / (8.0 * 1048576.0), 1e-15);
  std::vector<uint8_t> bytes;
  diffq::save_quantized(q, bytes);
  Tied fresh;
  diffq::load_quantized(fresh, bytes);
  const auto hand = HandQuantize(model->emb->weight, 4);
  diffq::QuantizedGuard<UniformQuantizer<Tied>> guard(q);
  EXPECT_TRUE(BitEqual(fresh->emb->weight, model->emb->weight));
  EXPECT_TRUE(BitEqual(fresh->out->weight, model->emb->weight));
  EXPECT_TRUE(Close(model->out->weight, hand, 1e-6));
}

TEST(UniformQuantizer, ErrorPaths) {
  MLP model;
  ExpectError([&] { UniformQuantizer<MLP> q(model, UniformOptions().bits(16)); },
              "diffq::UniformQuantizer: bits must be in [1, 15], got 16");
  ExpectError([&] { UniformQuantizer<MLP> q(model, UniformOptions().bits(0)); },
              "diffq::UniformQuantizer: bits must be in [1, 15], got 0");
  ExpectError([&] { UniformQuantizer<MLP> q(model, UniformOptions().min_size_mb(-1)); },
              "diffq::UniformQuantizer: min_size_mb must be >= 0, got -1");
  Tied tied;
  ExpectError(
      [&] { UniformQuantizer<Tied> q(tied, UniformOptions().detect_bound(false).min_size_mb(0)); },
      "diffq::UniformQuantizer: parameter 'out.weight' is tied to 'emb.weight'");
  {
    UniformQuantizer<MLP> q(model, UniformOptions().min_size_mb(0));
    {
      torch::NoGradGuard ng;
      model->fc2->weight[0][0] = std::nan("");
    }
    model->eval();
    ExpectError(
        [&] {
          q.forward(torch::randn({1, 10}));
        },
        "diffq: tensor 'fc2.weight' holds non-finite values");
    ExpectError([&] { q.quantized_state(); }, "holds non-finite values");
    q.detach();
    ExpectError([&] { q.quantize(); },
                "diffq::UniformQuantizer::quantize: the quantizer was detached");
  }
}

TEST(UniformQuantizer, QatOnCudaMatchesHandQuantization_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  NoTF32 no_tf32;  // float32 products, as the reference's
  CheckQatAgainstHandQuantization(4, torch::kCUDA);
}

}  // namespace
