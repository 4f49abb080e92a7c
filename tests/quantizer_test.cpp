// Tests of diffq::DiffQuantizer against independent computations: an explicit functional
// computation that builds the noisy weights as non-leaf tensors from the same noise sample,
// hand-quantized weights, and the size formula computed by hand.
#include <diffq/quantizer.h>

#include "explicit_diffq.h"
#include "test_models.h"
#include "test_util.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace {

using diffq_test::BitEqual;
using diffq_test::Close;
using diffq_test::ExpectError;
using diffq_test::MLP;
using diffq_test::NoTF32;
using diffq_test::Tied;

/// Copies of a module's parameters by full dotted name (recursive).
std::map<std::string, torch::Tensor> ParamSnapshot(const torch::nn::Module& module) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : module.named_parameters()) out[p.key()] = p.value().detach().clone();
  return out;
}

/// Every parameter named in `snapshot` (see `ParamSnapshot`) is still in `module` and equal to its
/// snapshot bit for bit; the failure names the first that is not.
::testing::AssertionResult MatchesSnapshot(const torch::nn::Module& module,
                                           const std::map<std::string, torch::Tensor>& snapshot) {
  auto params = module.named_parameters();
  for (const auto& kv : snapshot) {
    if (!params.contains(kv.first)) return ::testing::AssertionFailure() << "no " << kv.first;
    if (!BitEqual(params[kv.first].detach(), kv.second)) {
      return ::testing::AssertionFailure() << kv.first << " differs from its snapshot";
    }
  }
  return ::testing::AssertionSuccess();
}

/// Sets every logit of `q` to `scale`·N(0, 1) (CPU draws, in the order of `quantized_names()`).
template <typename Quantizer>
void RandomLogits(Quantizer& q, double scale = 1.0) {
  torch::NoGradGuard ng;
  for (const auto& n : q.quantized_names()) {
    auto l = q.logit(n);
    l.copy_(torch::randn(l.sizes()) * scale);
  }
}

namespace F = torch::nn::functional;
using diffq::DiffQOptions;
using diffq::DiffQuantizer;

using diffq_test::RefBits;
using diffq_test::RefNoisy;

/// The MLP's forward (fc2(tanh(fc1(x)))) with explicit weights `w` by parameter name.
torch::Tensor ExplicitMlp(const torch::Tensor& x, std::map<std::string, torch::Tensor>& w) {
  return F::linear(torch::tanh(F::linear(x, w["fc1.weight"], w["fc1.bias"])), w["fc2.weight"],
                   w["fc2.bias"]);
}

struct ConvNetImpl : torch::nn::Module {
  ConvNetImpl()
      : conv(register_module("conv",
                             torch::nn::Conv2d(torch::nn::Conv2dOptions(2, 3, 3).padding(1)))),
        fc(register_module("fc", torch::nn::Linear(3 * 4 * 4, 5))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc(torch::relu(conv(x)).flatten(1)); }
  torch::nn::Conv2d conv;
  torch::nn::Linear fc;
};
TORCH_MODULE(ConvNet);

torch::Tensor FirstTensor(const torch::Tensor& t) {
  return t;
}
template <typename A, typename B>
torch::Tensor FirstTensor(const std::tuple<A, B>& t) {
  return std::get<0>(t);
}

struct Case {
  int64_t group_size;
  bool reference_kernels;
};

std::vector<Case> AllCases() {
  std::vector<Case> cases;
  for (int64_t gs : {0, 1, 8, 7}) {  // 7 divides none of the tensor sizes below
    for (bool ref : {false, true}) cases.push_back({gs, ref});
  }
  return cases;
}

std::string Describe(const Case& c) {
  return "group_size=" + std::to_string(c.group_size) +
         (c.reference_kernels ? " (ATen kernels)" : " (CPU kernels)");
}

/// Runs one training forward/backward through the quantizer and the same computation explicitly;
/// compares loss, weight gradients and logit gradients, and checks the weights are clean after.
template <typename Holder, typename RefForward, typename Input, typename... Extra>
void CheckGradients(Holder model, const DiffQOptions& options, bool reference_kernels,
                    const Input& input, RefForward ref_forward, const Extra&... extra) {
  auto before = ParamSnapshot(*model);
  DiffQuantizer<Holder> q(model, options);
  q.use_reference_kernels(reference_kernels);
  q.no_optimizer();
  // Logits away from their initial value, distinct per group.
  {
    torch::NoGradGuard ng;
    for (const auto& n : q.quantized_names()) {
      auto l = q.logit(n);
      l.copy_(torch::linspace(-1.5, 2.0, l.numel(), l.options()));
    }
  }
  auto out = FirstTensor(q.forward(input, extra...));
  auto loss = torch::sin(out).pow(2).sum() + out.sum();
  std::map<std::string, torch::Tensor> noise;
  for (const auto& n : q.quantized_names()) noise[n] = q.noise(n).clone();
  loss.backward();

  // Weights are bit-for-bit clean after backward().
  EXPECT_TRUE(MatchesSnapshot(*model, before));
  // The explicit computation with the same noise sample.
  std::map<std::string, torch::Tensor> w, l, noisy;
  auto params = model->named_parameters();
  for (const auto& n : q.quantized_names()) {
    w[n] = before[n].clone().requires_grad_(true);
    l[n] = params[n + options.suffix()].detach().clone().requires_grad_(true);
    noisy[n] = RefNoisy(w[n], l[n], noise[n], options);
  }
  auto ref_out = ref_forward(noisy, before);
  auto ref_loss = torch::sin(ref_out).pow(2).sum() + ref_out.sum();
  ref_loss.backward();
  EXPECT_TRUE(Close(loss, ref_loss));
  for (const auto& n : q.quantized_names()) {
    EXPECT_TRUE(Close(params[n].grad(), w[n].grad())) << "weight grad of " << n;
    EXPECT_TRUE(Close(params[n + options.suffix()].grad(), l[n].grad())) << "logit grad of " << n;
  }
}

TEST(DiffQuantizer, GradientsMatchExplicitComputationLinear) {
  for (const auto& c : AllCases()) {
    SCOPED_TRACE(Describe(c));
    torch::manual_seed(1);
    MLP model;
    auto x = torch::randn({4, 10});
    auto options = DiffQOptions().group_size(c.group_size).min_size_mb(0);
    CheckGradients(
        model, options, c.reference_kernels, x,
        [&](std::map<std::string, torch::Tensor>& nw, std::map<std::string, torch::Tensor>&) {
          auto h = torch::tanh(F::linear(x, nw["fc1.weight"], nw["fc1.bias"]));
          return F::linear(h, nw["fc2.weight"], nw["fc2.bias"]);
        });
  }
}

TEST(DiffQuantizer, GradientsMatchExplicitComputationConv2d) {
  for (const auto& c : AllCases()) {
    SCOPED_TRACE(Describe(c));
    torch::manual_seed(2);
    ConvNet model;
    auto x = torch::randn({2, 2, 4, 4});
    // Biases excluded: they stay fp32 and receive the plain gradient.
    auto options = DiffQOptions().group_size(c.group_size).min_size_mb(0).exclude({"*bias"});
    CheckGradients(
        model, options, c.reference_kernels, x,
        [&](std::map<std::string, torch::Tensor>& nw, std::map<std::string, torch::Tensor>& clean) {
          auto h = torch::relu(F::conv2d(
              x, nw["conv.weight"], F::Conv2dFuncOptions().bias(clean["conv.bias"]).padding(1)));
          return F::linear(h.flatten(1), nw["fc.weight"], clean["fc.bias"]);
        });
  }
}

TEST(DiffQuantizer, GradientsMatchExplicitComputationLSTM) {
  for (const auto& c : AllCases()) {
    SCOPED_TRACE(Describe(c));
    torch::manual_seed(3);
    torch::nn::LSTM lstm(torch::nn::LSTMOptions(4, 5));
    auto x = torch::randn({6, 2, 4});
    auto h0 = torch::randn({1, 2, 5});
    auto c0 = torch::randn({1, 2, 5});
    auto options = DiffQOptions().group_size(c.group_size).min_size_mb(0);
    auto before = ParamSnapshot(*lstm);
    DiffQuantizer<torch::nn::LSTM> q(lstm, options);
    q.use_reference_kernels(c.reference_kernels);
    q.no_optimizer();
    ASSERT_EQ(q.quantized_names().size(), 4u);
    auto out = std::get<0>(q.forward(x, std::make_tuple(h0, c0)));
    auto loss = torch::sin(out).pow(2).sum() + out.sum();
    std::map<std::string, torch::Tensor> noise;
    for (const auto& n : q.quantized_names()) noise[n] = q.noise(n).clone();
    loss.backward();
    auto params = lstm->named_parameters();
    std::map<std::string, torch::Tensor> w, l, nw;
    for (const auto& n : q.quantized_names()) {
      EXPECT_TRUE(BitEqual(params[n].detach(), before[n])) << n;
      w[n] = before[n].clone().requires_grad_(true);
      l[n] = params[n + "_diffq"].detach().clone().requires_grad_(true);
      nw[n] = RefNoisy(w[n], l[n], noise[n], options);
    }
    auto ref = std::get<0>(torch::lstm(
        x, {h0, c0}, {nw["weight_ih_l0"], nw["weight_hh_l0"], nw["bias_ih_l0"], nw["bias_hh_l0"]},
        /*has_biases=*/true, /*num_layers=*/1, /*dropout=*/0.0, /*train=*/true,
        /*bidirectional=*/false, /*batch_first=*/false));
    auto ref_loss = torch::sin(ref).pow(2).sum() + ref.sum();
    ref_loss.backward();
    EXPECT_TRUE(Close(loss, ref_loss));
    for (const auto& n : q.quantized_names()) {
      EXPECT_TRUE(Close(params[n].grad(), w[n].grad())) << n;
      EXPECT_TRUE(Close(params[n + "_diffq"].grad(), l[n].grad())) << n;
    }
  }
}

TEST(DiffQuantizer, GradientsMatchExplicitComputationGRU) {
  for (bool ref : {false, true}) {
    torch::manual_seed(22);
    torch::nn::GRU gru(torch::nn::GRUOptions(3, 4));
    auto x = torch::randn({5, 2, 3});
    auto h0 = torch::randn({1, 2, 4});
    auto options = DiffQOptions().group_size(5).min_size_mb(0);
    CheckGradients(
        gru, options, ref, x,
        [&](std::map<std::string, torch::Tensor>& nw, std::map<std::string, torch::Tensor>&) {
          return std::get<0>(torch::gru(
              x, h0, {nw["weight_ih_l0"], nw["weight_hh_l0"], nw["bias_ih_l0"], nw["bias_hh_l0"]},
              /*has_biases=*/true, /*num_layers=*/1, /*dropout=*/0.0, /*train=*/true,
              /*bidirectional=*/false, /*batch_first=*/false));
        },
        h0);
  }
}

TEST(DiffQuantizer, GradientsMatchExplicitComputationTiedWeights) {
  for (const auto& c : AllCases()) {
    SCOPED_TRACE(Describe(c));
    torch::manual_seed(4);
    Tied model;
    auto idx = torch::tensor({0, 3, 6, 2}, torch::kLong);
    auto options = DiffQOptions().group_size(c.group_size).min_size_mb(0);
    // One tensor under two names: one logit, both uses see the same noisy weight.
    {
      DiffQuantizer<Tied> probe(model, options);
      ASSERT_EQ(probe.quantized_names(), std::vector<std::string>{"emb.weight"});
      probe.detach();
    }
    CheckGradients(
        model, options, c.reference_kernels, idx,
        [&](std::map<std::string, torch::Tensor>& nw, std::map<std::string, torch::Tensor>&) {
          auto h = torch::tanh(F::embedding(idx, nw["emb.weight"]));
          return F::linear(h, nw["emb.weight"]);
        });
  }
}

TEST(DiffQuantizer, GradientsMatchForNoiseParamAndUniformNoise) {
  for (auto param : {diffq::Param::kBits, diffq::Param::kNoise}) {
    for (auto noise : {diffq::Noise::kGaussian, diffq::Noise::kUniform}) {
      for (bool ref : {false, true}) {
        torch::manual_seed(5);
        MLP model;
        auto x = torch::randn({4, 10});
        auto options = DiffQOptions().group_size(8).min_size_mb(0).param(param).noise(noise);
        CheckGradients(
            model, options, ref, x,
            [&](std::map<std::string, torch::Tensor>& nw, std::map<std::string, torch::Tensor>&) {
              auto h = torch::tanh(F::linear(x, nw["fc1.weight"], nw["fc1.bias"]));
              return F::linear(h, nw["fc2.weight"], nw["fc2.bias"]);
            });
      }
    }
  }
}

TEST(DiffQuantizer, GradientsMatchExplicitComputation_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  for (int64_t gs : {0, 1, 8, 7}) {
    SCOPED_TRACE(gs);
    torch::manual_seed(21);
    MLP model;
    model->to(torch::kCUDA);
    auto x = torch::randn({4, 10}, torch::kCUDA);
    CheckGradients(
        model, DiffQOptions().group_size(gs).min_size_mb(0), false, x,
        [&](std::map<std::string, torch::Tensor>& nw, std::map<std::string, torch::Tensor>&) {
          auto h = torch::tanh(F::linear(x, nw["fc1.weight"], nw["fc1.bias"]));
          return F::linear(h, nw["fc2.weight"], nw["fc2.bias"]);
        });
  }
}

TEST(DiffQuantizer, GradientsMatchInFloat64) {
  torch::manual_seed(6);
  MLP model;
  model->to(torch::kDouble);
  auto x = torch::randn({4, 10}, torch::kDouble);
  auto options = DiffQOptions().group_size(7).min_size_mb(0);
  CheckGradients(
      model, options, false, x,
      [&](std::map<std::string, torch::Tensor>& nw, std::map<std::string, torch::Tensor>&) {
        auto h = torch::tanh(F::linear(x, nw["fc1.weight"], nw["fc1.bias"]));
        return F::linear(h, nw["fc2.weight"], nw["fc2.bias"]);
      });
}

/// Two parameters summed: autograd hands both the same gradient tensor.
struct SumImpl : torch::nn::Module {
  SumImpl()
      : a(register_parameter("a", torch::randn({6, 5}))),
        b(register_parameter("b", torch::randn({6, 5}))) {}
  torch::Tensor forward(const torch::Tensor& x) { return torch::mm(x, a + b); }
  torch::Tensor a, b;
};
TORCH_MODULE(Sum);

TEST(DiffQuantizer, GradientsMatchWhenParametersShareAGradientTensor) {
  for (bool ref : {false, true}) {
    torch::manual_seed(20);
    Sum model;
    auto x = torch::randn({3, 6});
    CheckGradients(
        model, DiffQOptions().group_size(4).min_size_mb(0), ref, x,
        [&](std::map<std::string, torch::Tensor>& nw, std::map<std::string, torch::Tensor>&) {
          return torch::mm(x, nw["a"] + nw["b"]);
        });
  }
}

/// The weight's gradient arrives expanded (stride 0): `y = x · Σ w`.
struct ExpandedGradImpl : torch::nn::Module {
  ExpandedGradImpl() : w(register_parameter("w", torch::randn({4, 5}))) {}
  torch::Tensor forward(const torch::Tensor& x) { return x * w.sum(); }
  torch::Tensor w;
};
TORCH_MODULE(ExpandedGrad);

TEST(DiffQuantizer, GradientsMatchForAnExpandedWeightGradient) {
  for (bool ref : {false, true}) {
    torch::manual_seed(23);
    ExpandedGrad model;
    auto x = torch::randn({3});
    CheckGradients(model, DiffQOptions().group_size(3).min_size_mb(0), ref, x,
                   [&](std::map<std::string, torch::Tensor>& nw,
                       std::map<std::string, torch::Tensor>&) { return x * nw["w"].sum(); });
  }
}

struct HalfHolderImpl : torch::nn::Module {
  HalfHolderImpl() : h(register_parameter("h", torch::zeros({100}, torch::kHalf))) {}
  torch::Tensor h;
};
TORCH_MODULE(HalfHolder);

struct MixedImpl : torch::nn::Module {
  MixedImpl()
      : fc(register_module("fc", torch::nn::Linear(10, 6))),
        half(register_module("half", HalfHolder())) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc(x); }
  torch::nn::Linear fc;
  HalfHolder half;
};
TORCH_MODULE(Mixed);

TEST(DiffQuantizer, FailedConstructionLeavesTheModelAsItWas) {
  Mixed model;
  const auto names = model->named_parameters().keys();
  ExpectError([&] { DiffQuantizer<Mixed> q(model, DiffQOptions().min_size_mb(0)); },
              "parameter 'half.h' has dtype Half; expected float32 or float64");
  EXPECT_EQ(model->named_parameters().keys(), names);  // no logit left behind on fc
  DiffQuantizer<Mixed> q(model, DiffQOptions().min_size_mb(0).exclude({"half.*"}));
  EXPECT_EQ(q.quantized_names().size(), 2u);
}

TEST(DiffQuantizer, TiesAtMaxAndMinShareTheirGradientEvenly) {
  // Constant-initialised rows create ties at the max and min: the gradient through max − min is
  // spread over them as ATen's max()/min() backward does.
  for (bool ref : {false, true}) {
    torch::manual_seed(7);
    MLP model;
    {
      torch::NoGradGuard ng;
      model->fc1->weight.narrow(0, 0, 2).fill_(0.7);
      model->fc1->weight.narrow(0, 4, 2).fill_(-0.7);
    }
    auto x = torch::randn({4, 10});
    CheckGradients(
        model, DiffQOptions().group_size(8).min_size_mb(0), ref, x,
        [&](std::map<std::string, torch::Tensor>& nw, std::map<std::string, torch::Tensor>&) {
          auto h = torch::tanh(F::linear(x, nw["fc1.weight"], nw["fc1.bias"]));
          return F::linear(h, nw["fc2.weight"], nw["fc2.bias"]);
        });
  }
}

TEST(DiffQuantizer, GradientsMatchAcrossNoiseChunks) {
  // A weight of 75,000 elements spans two noise chunks (kNoiseChunk = 65,536); group size 7 puts
  // a group across the chunk boundary (element-wise path), group size 16 takes the vector path;
  // ties at the max and min sit in both chunks.
  static_assert(diffq::kNoiseChunk < 300 * 250, "the weight must span two chunks");
  for (bool ref : {false, true}) {
    for (int64_t gs : {7, 16}) {
      torch::manual_seed(11);
      auto fc = torch::nn::Linear(300, 250);
      {
        torch::NoGradGuard ng;
        auto w = fc->weight.view(-1);
        w.mul_(0.5);
        for (int64_t i : {int64_t{5}, int64_t{70000}}) w[i] = 0.9f;       // max, in both chunks
        for (int64_t i : {int64_t{65535}, int64_t{74999}}) w[i] = -0.9f;  // min, in both chunks
      }
      auto x = torch::randn({3, 300});
      CheckGradients(
          fc, DiffQOptions().group_size(gs).min_size_mb(0), ref, x,
          [&](std::map<std::string, torch::Tensor>& nw, std::map<std::string, torch::Tensor>&) {
            return F::linear(x, nw["weight"], nw["bias"]);
          });
    }
  }
}

TEST(DiffQuantizer, SeveralForwardsBeforeOneBackwardShareTheNoise) {
  torch::manual_seed(8);
  MLP model;
  auto options = DiffQOptions().group_size(8).min_size_mb(0);
  auto before = ParamSnapshot(*model);
  DiffQuantizer<MLP> q(model, options);
  q.no_optimizer();
  auto x1 = torch::randn({3, 10}), x2 = torch::randn({5, 10});
  auto y1 = q.forward(x1);
  auto u = q.noise("fc1.weight").clone();
  auto y2 = q.forward(x2);
  EXPECT_TRUE(BitEqual(q.noise("fc1.weight"), u));
  auto loss = y1.pow(2).sum() + y2.sin().sum();
  auto noise1 = q.noise("fc1.weight").clone(), noise2 = q.noise("fc2.weight").clone();
  loss.backward();
  auto params = model->named_parameters();
  std::map<std::string, torch::Tensor> u_all{{"fc1.weight", noise1},
                                             {"fc2.weight", noise2},
                                             {"fc1.bias", q.noise("fc1.bias").clone()},
                                             {"fc2.bias", q.noise("fc2.bias").clone()}};
  std::map<std::string, torch::Tensor> w, l, nw;
  for (const auto& n : q.quantized_names()) {
    w[n] = before[n].clone().requires_grad_(true);
    l[n] = params[n + "_diffq"].detach().clone().requires_grad_(true);
    nw[n] = RefNoisy(w[n], l[n], u_all[n], options);
  }
  auto ref = ExplicitMlp(x1, nw).pow(2).sum() + ExplicitMlp(x2, nw).sin().sum();
  ref.backward();
  EXPECT_TRUE(Close(loss, ref));
  for (const auto& n : q.quantized_names()) {
    EXPECT_TRUE(Close(params[n].grad(), w[n].grad())) << n;
    EXPECT_TRUE(Close(params[n + "_diffq"].grad(), l[n].grad())) << n;
    EXPECT_TRUE(BitEqual(params[n].detach(), before[n])) << n;
  }
}

TEST(DiffQuantizer, WeightsCleanAfterNoGradForward) {
  torch::manual_seed(9);
  MLP model;
  auto before = ParamSnapshot(*model);
  DiffQuantizer<MLP> q(model, DiffQOptions().min_size_mb(0));
  q.no_optimizer();
  auto x = torch::randn({2, 10});
  torch::Tensor y;
  {
    torch::NoGradGuard ng;
    y = q.forward(x);
  }
  // The forward saw the noisy weights built from the drawn sample...
  std::map<std::string, torch::Tensor> nw;
  for (const auto& n : q.quantized_names()) {
    nw[n] = RefNoisy(before[n], model->named_parameters()[n + "_diffq"].detach(), q.noise(n),
                     q.options());
  }
  auto ref = ExplicitMlp(x, nw);
  EXPECT_TRUE(Close(y, ref));
  // ...and left the clean ones.
  EXPECT_TRUE(MatchesSnapshot(*model, before));
}

TEST(DiffQuantizer, RestoreCleanWeightsEndsASubstitution) {
  torch::manual_seed(19);
  MLP model;
  auto before = ParamSnapshot(*model);
  DiffQuantizer<MLP> q(model, DiffQOptions().min_size_mb(0));
  q.no_optimizer();
  auto x = torch::randn({2, 10});
  auto clean = [&] { return MatchesSnapshot(*model, before); };
  // A training forward leaves the noisy weights in place until its backward.
  auto loss = q.forward(x).pow(2).sum();
  ASSERT_FALSE(clean());
  q.restore_clean_weights();
  EXPECT_TRUE(clean());
  // The backward then still runs; the hook adds no logit gradient.
  loss.backward();
  EXPECT_FALSE(model->named_parameters()["fc1.weight_diffq"].grad().defined());
  EXPECT_TRUE(clean());
  // An eval forward with grad mode on leaves the quantized weights until its graph is released.
  model->eval();
  auto y = q.forward(x);
  ASSERT_FALSE(clean());
  q.restore_clean_weights();
  EXPECT_TRUE(clean());
  // Under quantize() it refuses and leaves the quantized weights.
  q.quantize();
  ExpectError([&] { q.restore_clean_weights(); },
              "diffq::DiffQuantizer::restore_clean_weights: the weights are quantized by "
              "quantize() or a QuantizedGuard; call unquantize() (or leave the guard) first");
  EXPECT_FALSE(clean());
  q.unquantize();
  EXPECT_TRUE(clean());
}

struct PartlyUsedImpl : torch::nn::Module {
  PartlyUsedImpl()
      : a(register_module("a", torch::nn::Linear(4, 4))),
        b(register_module("b", torch::nn::Linear(4, 4))) {}
  torch::Tensor forward(const torch::Tensor& x) { return a(x); }  // b is unused
  torch::nn::Linear a, b;
};
TORCH_MODULE(PartlyUsed);

TEST(DiffQuantizer, UnusedParametersAreRestoredAfterForward) {
  torch::manual_seed(10);
  PartlyUsed model;
  auto b_before = model->b->weight.detach().clone();
  auto a_before = model->a->weight.detach().clone();
  DiffQuantizer<PartlyUsed> q(model, DiffQOptions().min_size_mb(0));
  q.no_optimizer();
  auto y = q.forward(torch::randn({3, 4}));
  EXPECT_TRUE(BitEqual(model->b->weight.detach(), b_before));   // unused: clean already
  EXPECT_FALSE(BitEqual(model->a->weight.detach(), a_before));  // used: noisy until backward
  y.sum().backward();
  EXPECT_TRUE(BitEqual(model->a->weight.detach(), a_before));
  EXPECT_TRUE(BitEqual(model->b->weight.detach(), b_before));
}

/// The MLP's loss `Σ out²` with the noisy weights built explicitly from `before` (clean weights),
/// the logits of `model` and the noise samples `noise` (by name), over each input of `xs`;
/// its gradients are compared with what the quantizer's backward left in `model`'s parameters,
/// and the quantized weights must be clean again.
void ExpectMlpGradientsMatchExplicit(MLP& model, const DiffQOptions& options,
                                     const std::map<std::string, torch::Tensor>& before,
                                     const std::map<std::string, torch::Tensor>& noise,
                                     const std::vector<torch::Tensor>& xs) {
  auto params = model->named_parameters();
  std::map<std::string, torch::Tensor> w, l, nw;
  for (const auto& kv : noise) {
    const auto& n = kv.first;
    w[n] = before.at(n).clone().requires_grad_(true);
    l[n] = params[n + options.suffix()].detach().clone().requires_grad_(true);
    nw[n] = RefNoisy(w[n], l[n], kv.second, options);
  }
  torch::Tensor ref;
  for (const auto& x : xs) {
    auto out = ExplicitMlp(x, nw);
    ref = ref.defined() ? ref + out.pow(2).sum() : out.pow(2).sum();
  }
  ref.backward();
  for (const auto& kv : noise) {
    const auto& n = kv.first;
    EXPECT_TRUE(Close(params[n].grad(), w[n].grad())) << n;
    EXPECT_TRUE(Close(params[n + options.suffix()].grad(), l[n].grad())) << n;
    EXPECT_TRUE(BitEqual(params[n].detach(), before.at(n))) << n;
  }
}

/// Copies of the noise samples of every quantized parameter of `q`.
template <typename Quantizer>
std::map<std::string, torch::Tensor> NoiseSnapshot(Quantizer& q) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& n : q.quantized_names()) out[n] = q.noise(n).clone();
  return out;
}

MLP SeededMlp(uint64_t seed) {
  torch::manual_seed(seed);
  return MLP();
}

/// An MLP wrapped with group size 4 and random logits (no optimizer), after one training forward
/// whose backward is still to come: its loss `Σ out²`, input, clean weights and noise samples.
struct PendingMlpForward {
  explicit PendingMlpForward(uint64_t seed, bool reference_kernels = false)
      : model(SeededMlp(seed)), before(ParamSnapshot(*model)), q(model, options) {
    q.use_reference_kernels(reference_kernels);
    q.no_optimizer();
    RandomLogits(q);
    x = torch::randn({3, 10});
    loss = q.forward(x).pow(2).sum();
    noise = NoiseSnapshot(q);
  }
  /// Backpropagates the loss; its gradients must match the explicit computation.
  void BackwardMatchesExplicit() {
    loss.backward();
    ExpectMlpGradientsMatchExplicit(model, options, before, noise, {x});
  }

  MLP model;
  DiffQOptions options = DiffQOptions().group_size(4).min_size_mb(0);
  std::map<std::string, torch::Tensor> before;
  DiffQuantizer<MLP> q;
  torch::Tensor x, loss;
  std::map<std::string, torch::Tensor> noise;
};

TEST(DiffQuantizer, NoGradEvalForwardBeforeTheBackwardKeepsTheGradientsExact) {
  for (bool ref_kernels : {false, true}) {
    SCOPED_TRACE(ref_kernels);
    PendingMlpForward p(20, ref_kernels);
    auto x_eval = torch::randn({2, 10});
    p.model->eval();
    torch::Tensor y_eval;
    {
      torch::NoGradGuard ng;
      y_eval = p.q.forward(x_eval);  // sees the quantized weights; the noisy ones wait aside
    }
    p.model->train();
    p.BackwardMatchesExplicit();
    p.model->eval();
    torch::NoGradGuard ng;
    EXPECT_TRUE(BitEqual(y_eval, p.q.forward(x_eval)));  // the same eval weights after backward
  }
}

TEST(DiffQuantizer, EvalForwardWithGradModeBeforeTheBackwardThrows) {
  PendingMlpForward p(21);
  p.model->eval();
  ExpectError([&] { p.q.forward(p.x); },
              "diffq::DiffQuantizer::forward: an eval forward with grad mode on while parameter "
              "'fc1.weight' holds the substitute of a training forward whose backward is still to "
              "come; run the eval forward under torch::NoGradGuard, call backward() first, or "
              "restore_clean_weights() to drop that training forward");
  p.model->train();
  p.BackwardMatchesExplicit();  // unharmed by the refused forward
}

TEST(DiffQuantizer, QuantizeBeforeTheBackwardThrows) {
  PendingMlpForward p(37);
  ExpectError([&] { diffq::QuantizedGuard<DiffQuantizer<MLP>> guard(p.q); },
              "diffq::DiffQuantizer::quantize: parameter 'fc1.weight' holds the substitute of a "
              "training forward whose backward is still to come; call backward() first, evaluate "
              "in between with model->eval() under torch::NoGradGuard instead, or "
              "restore_clean_weights() to drop that training forward");
  EXPECT_FALSE(p.q.is_quantized());
  p.BackwardMatchesExplicit();  // unharmed by the refused quantize()
  EXPECT_NO_THROW(diffq::QuantizedGuard<DiffQuantizer<MLP>> guard(p.q));
}

TEST(DiffQuantizer, ForwardThatThrowsLeavesThePendingForwardItsNoise) {
  PendingMlpForward p(22);
  EXPECT_THROW(p.q.forward(torch::randn({3, 11})), c10::Error);  // 11 inputs for 10: fc1 throws
  p.BackwardMatchesExplicit();
  // A failed forward with no pending one before it leaves the weights clean.
  EXPECT_THROW(p.q.forward(torch::randn({3, 11})), c10::Error);
  EXPECT_TRUE(MatchesSnapshot(*p.model, p.before));
}

TEST(DiffQuantizer, SecondBackwardThroughOneForwardThrows) {
  torch::manual_seed(23);
  MLP model;
  DiffQuantizer<MLP> q(model, DiffQOptions().min_size_mb(0));
  q.no_optimizer();
  // The first hook to fire names its parameter (the order is the engine's).
  auto expect_refused = [](const std::function<void()>& backward) {
    ExpectError(backward, "diffq::DiffQuantizer::backward: a gradient reached parameter 'fc");
    ExpectError(backward,
                "' after an earlier backward had restored its clean weights: this backward would "
                "see them instead of the forward's substitute, and give the logit no gradient. A "
                "second backward through the same forward (retain_graph), or through a second "
                "forward that shared the substitute, is not supported: add the losses and call "
                "backward() once");
  };
  auto x = torch::randn({3, 10});
  auto loss = q.forward(x).pow(2).sum();
  loss.backward({}, /*retain_graph=*/true);
  expect_refused([&] { loss.backward({}, /*retain_graph=*/true); });
  // Two forwards sharing one noise sample, then a backward each.
  auto y1 = q.forward(x), y2 = q.forward(x);
  y1.sum().backward();
  expect_refused([&] { y2.sum().backward({}, /*retain_graph=*/true); });
  // The sum of the losses, backpropagated once, is what works.
  auto z1 = q.forward(x), z2 = q.forward(x);
  EXPECT_NO_THROW((z1.sum() + z2.pow(2).sum()).backward());
}

struct BranchImpl : torch::nn::Module {
  BranchImpl()
      : a(register_module("a", torch::nn::Linear(4, 4))),
        b(register_module("b", torch::nn::Linear(4, 4))) {}
  torch::Tensor forward(const torch::Tensor& x, bool use_b) { return use_b ? b(a(x)) : a(x); }
  torch::nn::Linear a, b;
};
TORCH_MODULE(Branch);

TEST(DiffQuantizer, ParameterUnusedWhileAnOlderGraphLivesIsRestoredByTheBackward) {
  torch::manual_seed(24);
  Branch model;
  const auto before = ParamSnapshot(*model);
  DiffQuantizer<Branch> q(model, DiffQOptions().min_size_mb(0));
  q.no_optimizer();
  torch::Tensor loss;  // held across steps: its graph keeps b's gradient accumulator alive
  loss = q.forward(torch::randn({2, 4}), true).sum();
  loss.backward();
  loss = q.forward(torch::randn({2, 4}), false).sum();  // b unused, yet in a live graph
  loss.backward();
  EXPECT_TRUE(MatchesSnapshot(*model, before));
}

struct TwoHeadsImpl : torch::nn::Module {
  TwoHeadsImpl()
      : a(register_module("a", torch::nn::Linear(4, 3))),
        b(register_module("b", torch::nn::Linear(4, 3))) {}
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x) { return {a(x), b(x)}; }
  torch::nn::Linear a, b;
};
TORCH_MODULE(TwoHeads);

TEST(DiffQuantizer, OutputsOfOneForwardBackpropagatedOneByOne) {
  // Disjoint parameters: each backward ends its own substitutes; the first backward's sweep
  // leaves b (surely used by the forward) to the second.
  torch::manual_seed(33);
  TwoHeads model;
  const auto options = DiffQOptions().group_size(4).min_size_mb(0).exclude({"*bias"});
  const auto before = ParamSnapshot(*model);
  DiffQuantizer<TwoHeads> q(model, options);
  q.no_optimizer();
  RandomLogits(q);
  auto x = torch::randn({2, 4});
  auto out = q.forward(x);
  std::map<std::string, torch::Tensor> noise = NoiseSnapshot(q);
  std::get<0>(out).pow(2).sum().backward();
  std::get<1>(out).sin().sum().backward();
  auto params = model->named_parameters();
  std::map<std::string, torch::Tensor> w, l, nw;
  for (const auto& n : q.quantized_names()) {
    w[n] = before.at(n).clone().requires_grad_(true);
    l[n] = params[n + "_diffq"].detach().clone().requires_grad_(true);
    nw[n] = RefNoisy(w[n], l[n], noise[n], options);
  }
  (F::linear(x, nw["a.weight"], before.at("a.bias")).pow(2).sum() +
   F::linear(x, nw["b.weight"], before.at("b.bias")).sin().sum())
      .backward();
  for (const auto& n : q.quantized_names()) {
    EXPECT_TRUE(Close(params[n].grad(), w[n].grad())) << n;
    EXPECT_TRUE(Close(params[n + "_diffq"].grad(), l[n].grad())) << n;
    EXPECT_TRUE(BitEqual(params[n].detach(), before.at(n))) << n;
  }
}

TEST(DiffQuantizer, SeparateBackwardOfANewGraphAfterTheTrainingBackward) {
  // A regularizer on the clean weights, backpropagated on its own while the training loss (and
  // its graph) is still alive, is a new graph: allowed, and its gradient adds up.
  torch::manual_seed(34);
  MLP model;
  DiffQuantizer<MLP> q(model, DiffQOptions().min_size_mb(0));
  q.no_optimizer();
  auto loss = q.forward(torch::randn({3, 10})).pow(2).sum();
  loss.backward();
  const auto g = model->fc1->weight.grad().clone();
  const auto w = model->fc1->weight.detach().clone();
  EXPECT_NO_THROW((1e-2 * model->fc1->weight.pow(2).sum()).backward());
  EXPECT_TRUE(Close(model->fc1->weight.grad(), g + 2e-2 * w));
  // Also after the training loss is gone.
  loss = torch::Tensor();
  EXPECT_NO_THROW((1e-2 * model->fc1->weight.pow(2).sum()).backward());
}

TEST(DiffQuantizer, FrozenQuantizedBackboneStaysCleanUnderATrainedHead) {
  // No hook of the quantizer fires (the only quantized weight is frozen, the head is not
  // quantized): the frozen weight is restored right after each forward.
  torch::manual_seed(35);
  MLP model;
  model->fc1->weight.set_requires_grad(false);
  const auto before = ParamSnapshot(*model);
  DiffQuantizer<MLP> q(model, DiffQOptions().min_size_mb(0).exclude({"fc2.*", "*bias"}));
  q.no_optimizer();
  ASSERT_EQ(q.quantized_names(), std::vector<std::string>{"fc1.weight"});
  q.forward(torch::randn({3, 10})).pow(2).sum().backward();
  EXPECT_TRUE(BitEqual(model->fc1->weight.detach(), before.at("fc1.weight")));
  model->eval();
  {
    torch::NoGradGuard ng;
    q.forward(torch::randn({3, 10}));
  }
  EXPECT_TRUE(BitEqual(model->fc1->weight.detach(), before.at("fc1.weight")));
}

TEST(DiffQuantizer, WritesIntoASubstituteAreReportedNotLostSilently) {
  torch::manual_seed(25);
  MLP model;
  // Adam's step moves the version counters (LibTorch's SGD writes through .data(): unseen).
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(0.1));
  DiffQuantizer<MLP> q(model, DiffQOptions().min_size_mb(0));
  q.setup_optimizer(optimizer);
  auto x = torch::randn({3, 10});
  auto params = model->named_parameters();
  const std::string what =
      " written in place while holding a substitute (the noisy or quantized weights of a "
      "training forward awaiting its backward, the quantized weights of an eval forward run with "
      "grad mode on, or of quantize()); ";
  // An eval forward with grad mode on whose output is dropped leaves the quantized weights; an
  // optimizer step then writes into them.
  auto step_into_quantized_weights = [&] {
    model->train();
    optimizer.zero_grad();
    q.forward(x).pow(2).sum().backward();
    model->eval();
    q.forward(x);
    optimizer.step();
  };
  step_into_quantized_weights();
  auto clean = ParamSnapshot(*model);
  ExpectError([&] { q.quantized_state(); },
              "diffq::DiffQuantizer::quantized_state: parameters 'fc1.weight', 'fc1.bias', "
              "'fc2.weight', 'fc2.bias' were" +
                  what + "the clean weights do not hold the write");
  ExpectError([&] { q.forward(x); },
              "diffq::DiffQuantizer::forward: parameters 'fc1.weight', "
              "'fc1.bias', 'fc2.weight', 'fc2.bias' were" +
                  what +
                  "the write is lost: the clean weights were "
                  "restored. Run eval forwards under "
                  "torch::NoGradGuard, call "
                  "restore_clean_weights() before writing into the parameters "
                  "(optimizer.step(), loading), and take the gradients of training forwards "
                  "with backward() (torch::autograd::grad does not run the quantizer's gradient "
                  "hooks)");
  // `clean` was read while the parameters held the (stepped) quantized weights: they differ.
  for (const auto& kv : clean) {
    if (kv.first.find("_diffq") != std::string::npos) continue;
    EXPECT_FALSE(BitEqual(params[kv.first].detach(), kv.second)) << kv.first;
  }
  step_into_quantized_weights();
  ExpectError([&] { q.restore_clean_weights(); },
              "diffq::DiffQuantizer::restore_clean_weights: parameters");
  step_into_quantized_weights();
  ExpectError([&] { q.quantize(); }, "diffq::DiffQuantizer::quantize: parameters");
  EXPECT_FALSE(q.is_quantized());
  // The remedy: give the clean weights back before stepping; the step then lands on them.
  model->train();
  optimizer.zero_grad();
  q.forward(x).pow(2).sum().backward();
  model->eval();
  q.forward(x);
  q.restore_clean_weights();
  const auto w = params["fc1.weight"].detach().clone();
  optimizer.step();
  const auto stepped = params["fc1.weight"].detach().clone();
  EXPECT_FALSE(BitEqual(stepped, w));
  EXPECT_NO_THROW(q.forward(x));
  q.restore_clean_weights();
  EXPECT_TRUE(BitEqual(params["fc1.weight"].detach(), stepped));  // the step was kept
}

TEST(DiffQuantizer, ModuleToWhileSubstitutedConvertsTheCleanWeights) {
  torch::manual_seed(26);
  MLP model;
  const auto before = ParamSnapshot(*model);
  DiffQuantizer<MLP> q(model, DiffQOptions().min_size_mb(0));
  q.no_optimizer();
  model->eval();
  auto x = torch::randn({3, 10});
  q.forward(x);  // grad mode on, output dropped: the quantized weights stay
  model->to(torch::kDouble);
  auto y = q.forward(x.to(torch::kDouble));
  EXPECT_EQ(y.scalar_type(), torch::kDouble);
  q.restore_clean_weights();
  for (const auto& kv : before) {
    EXPECT_TRUE(
        BitEqual(model->named_parameters()[kv.first].detach(), kv.second.to(torch::kDouble)))
        << kv.first;
  }
}

/// An MLP whose fc2.weight is frozen, wrapped with group size 4 and random logits (no optimizer).
struct FrozenFc2Mlp {
  explicit FrozenFc2Mlp(uint64_t seed)
      : model(Frozen(SeededMlp(seed))), before(ParamSnapshot(*model)), q(model, options) {
    q.no_optimizer();
    RandomLogits(q);
  }
  static MLP Frozen(MLP m) {
    m->fc2->weight.set_requires_grad(false);
    return m;
  }

  DiffQOptions options = DiffQOptions().group_size(4).min_size_mb(0);
  MLP model;
  std::map<std::string, torch::Tensor> before;
  DiffQuantizer<MLP> q;
};

TEST(DiffQuantizer, FrozenParameters) {
  const auto options = DiffQOptions().group_size(4).min_size_mb(0);
  // With trained logits, a frozen quantized weight is refused: its logit cannot learn.
  {
    torch::manual_seed(27);
    MLP model;
    torch::optim::Adam optimizer(model->parameters());
    DiffQuantizer<MLP> q(model, options);
    q.setup_optimizer(optimizer);
    model->fc1->weight.set_requires_grad(false);
    const auto before = ParamSnapshot(*model);
    ExpectError(
        [&] {
          q.forward(torch::randn({3, 10}));
        },
        "diffq::DiffQuantizer::forward: parameter 'fc1.weight' does not require grad, so "
        "its logit cannot learn (its gradient comes from the parameter's); set "
        "requires_grad(true) and leave the parameter out of the optimizer to keep it "
        "fixed, exclude it from quantization, or run the forward under "
        "torch::NoGradGuard");
    EXPECT_TRUE(MatchesSnapshot(*model, before));
    torch::NoGradGuard ng;
    EXPECT_NO_THROW(q.forward(torch::randn({3, 10})));
  }
  // Without trained logits it keeps its noisy weights for the backward: the input gradient
  // matches the explicit computation, and the weight is clean after the backward.
  {
    FrozenFc2Mlp f(28);
    auto x = torch::randn({3, 10}).requires_grad_(true);
    f.q.forward(x).pow(2).sum().backward();
    auto params = f.model->named_parameters();
    std::map<std::string, torch::Tensor> nw;
    for (const auto& n : f.q.quantized_names()) {
      nw[n] = RefNoisy(f.before.at(n), params[n + "_diffq"].detach(), f.q.noise(n), options);
    }
    auto xr = x.detach().clone().requires_grad_(true);
    ExplicitMlp(xr, nw).pow(2).sum().backward();
    EXPECT_TRUE(Close(x.grad(), xr.grad()));
    EXPECT_TRUE(BitEqual(params["fc2.weight"].detach(), f.before.at("fc2.weight")));
  }
  // Frozen when wrapped, unfrozen later: its logit learns like the others'.
  {
    FrozenFc2Mlp f(29);
    f.model->fc2->weight.set_requires_grad(true);
    auto x = torch::randn({3, 10});
    f.q.forward(x).pow(2).sum().backward();
    ExpectMlpGradientsMatchExplicit(f.model, options, f.before, NoiseSnapshot(f.q), {x});
  }
}

TEST(DiffQuantizer, FrozenParameterSharesTheNoiseOfSeveralForwards) {
  // Two forwards before one backward: the frozen weight keeps one noise sample for both, so the
  // gradients of the first forward's inputs (and of fc1) match the explicit computation.
  FrozenFc2Mlp frozen(36);
  auto& model = frozen.model;
  auto& q = frozen.q;
  const auto& before = frozen.before;
  const auto& options = frozen.options;
  auto x1 = torch::randn({3, 10}).requires_grad_(true);
  auto x2 = torch::randn({2, 10}).requires_grad_(true);
  auto y1 = q.forward(x1);
  const auto noise = NoiseSnapshot(q);
  auto y2 = q.forward(x2);
  for (const auto& kv : noise) EXPECT_TRUE(BitEqual(q.noise(kv.first), kv.second)) << kv.first;
  auto loss = y1.pow(2).sum() + y2.sin().sum();
  loss.backward();
  auto params = model->named_parameters();
  std::map<std::string, torch::Tensor> w, nw;
  for (const auto& n : q.quantized_names()) {
    w[n] = before.at(n).clone().requires_grad_(true);
    nw[n] = RefNoisy(w[n], params[n + "_diffq"].detach(), noise.at(n), options);
  }
  auto r1 = x1.detach().clone().requires_grad_(true);
  auto r2 = x2.detach().clone().requires_grad_(true);
  auto ref = ExplicitMlp(r1, nw).pow(2).sum() + ExplicitMlp(r2, nw).sin().sum();
  ref.backward();
  EXPECT_TRUE(Close(loss, ref));
  EXPECT_TRUE(Close(x1.grad(), r1.grad()));
  EXPECT_TRUE(Close(x2.grad(), r2.grad()));
  EXPECT_TRUE(Close(params["fc1.weight"].grad(), w["fc1.weight"].grad()));
  EXPECT_TRUE(MatchesSnapshot(*model, before));
  // Once no graph awaits a backward (the forward's output dropped, the older graphs gone), the
  // next forward draws a new sample for the frozen weight as for the others.
  y1 = y2 = loss = ref = torch::Tensor();
  { auto dropped = q.forward(x1).sum(); }
  const auto dropped_noise = NoiseSnapshot(q);
  q.forward(x1).sum().backward();
  for (const auto& kv : dropped_noise) {
    EXPECT_FALSE(BitEqual(q.noise(kv.first), kv.second)) << kv.first;
  }
  EXPECT_TRUE(MatchesSnapshot(*model, before));
}

/// A linear map whose weight is registered non-contiguous (the transpose of a [6, 10] tensor).
struct StridedWeightImpl : torch::nn::Module {
  StridedWeightImpl() : w(register_parameter("w", torch::randn({6, 10}).t())) {}
  torch::Tensor forward(const torch::Tensor& x) { return x.matmul(w); }
  torch::Tensor w;
};
TORCH_MODULE(StridedWeight);

TEST(DiffQuantizer, NonContiguousParameterGradientsMatchExplicitComputation) {
  for (bool ref_kernels : {false, true}) {
    SCOPED_TRACE(ref_kernels);
    torch::manual_seed(38);
    StridedWeight model;
    ASSERT_FALSE(model->w.is_contiguous());
    const auto strides = model->w.strides().vec();
    const auto clean = model->w.detach().clone();
    const auto options = DiffQOptions().group_size(7).min_size_mb(0);
    DiffQuantizer<StridedWeight> q(model, options);
    q.use_reference_kernels(ref_kernels);
    q.no_optimizer();
    RandomLogits(q);
    auto x = torch::randn({4, 10});
    auto loss = q.forward(x).sin().sum();
    const auto u = q.noise("w").clone();
    loss.backward();
    auto w = clean.clone().requires_grad_(true);
    auto l = model->named_parameters()["w_diffq"].detach().clone().requires_grad_(true);
    auto ref = x.matmul(RefNoisy(w, l, u, options)).sin().sum();
    ref.backward();
    EXPECT_TRUE(Close(loss, ref));
    EXPECT_TRUE(Close(model->w.grad(), w.grad()));
    EXPECT_TRUE(Close(model->named_parameters()["w_diffq"].grad(), l.grad()));
    EXPECT_TRUE(BitEqual(model->w.detach(), clean));
    EXPECT_EQ(model->w.strides().vec(), strides);  // the clean weight is the original tensor
  }
}

struct SparseEmbeddingImpl : torch::nn::Module {
  SparseEmbeddingImpl()
      : emb(register_module("emb",
                            torch::nn::Embedding(torch::nn::EmbeddingOptions(20, 6).sparse(true)))),
        fc(register_module("fc", torch::nn::Linear(6, 3))) {}
  torch::Tensor forward(const torch::Tensor& idx) { return fc(torch::tanh(emb(idx))); }
  torch::nn::Embedding emb;
  torch::nn::Linear fc;
};
TORCH_MODULE(SparseEmbedding);

TEST(DiffQuantizer, SparseEmbeddingGradientsMatchExplicitComputation) {
  for (bool ref_kernels : {false, true}) {
    SCOPED_TRACE(ref_kernels);
    torch::manual_seed(30);
    SparseEmbedding model;
    const auto options = DiffQOptions().group_size(7).min_size_mb(0).exclude({"*bias"});
    const auto before = ParamSnapshot(*model);
    DiffQuantizer<SparseEmbedding> q(model, options);
    q.use_reference_kernels(ref_kernels);
    q.no_optimizer();
    RandomLogits(q);
    // Rows 0 and 19 hold the extremes of emb.weight, so that the gradient through max − min
    // lands inside and outside the rows the batch uses (a row outside gets it alone).
    {
      torch::NoGradGuard ng;
      model->emb->weight[0][2] = 5.0;
      model->emb->weight[19][4] = -5.0;
    }
    const auto clean = ParamSnapshot(*model);
    auto idx = torch::tensor({{0, 3, 3}, {7, 1, 0}}, torch::kLong);
    auto loss = q.forward(idx).pow(2).sum();
    const auto noise = NoiseSnapshot(q);
    loss.backward();
    auto params = model->named_parameters();
    ASSERT_TRUE(params["emb.weight"].grad().is_sparse());
    std::map<std::string, torch::Tensor> w, l, nw;
    for (const auto& n : q.quantized_names()) {
      w[n] = clean.at(n).clone().requires_grad_(true);
      l[n] = params[n + "_diffq"].detach().clone().requires_grad_(true);
      nw[n] = RefNoisy(w[n], l[n], noise.at(n), options);
    }
    F::linear(torch::tanh(F::embedding(idx, nw["emb.weight"])), nw["fc.weight"],
              clean.at("fc.bias"))
        .pow(2)
        .sum()
        .backward();
    for (const auto& n : q.quantized_names()) {
      auto g = params[n].grad();
      EXPECT_TRUE(Close(g.is_sparse() ? g.to_dense() : g, w[n].grad())) << n;
      EXPECT_TRUE(Close(params[n + "_diffq"].grad(), l[n].grad())) << n;
      EXPECT_TRUE(BitEqual(params[n].detach(), clean.at(n))) << n;
    }
    EXPECT_NE(w["emb.weight"].grad()[19][4].item<double>(), 0.0);  // the lone extreme's row
  }
}

/// Hand quantization: b = clamp(round(bits + extra), 1, 15); levels = round((w − min)/(max −
/// min)·(2^b − 1)); w_q = min + levels·(max − min)/(2^b − 1), element by element in double.
torch::Tensor HandQuantize(const torch::Tensor& w, const torch::Tensor& bits, int64_t group_size,
                           double extra_bits) {
  auto flat = w.detach().to(torch::kDouble).reshape(-1).contiguous();
  auto b = bits.detach().to(torch::kDouble).contiguous();
  const int64_t n = flat.numel();
  const int64_t gs = group_size == 0 ? n : group_size;
  const double lo = flat.min().item<double>(), hi = flat.max().item<double>();
  auto out = torch::empty({n}, torch::kDouble);
  for (int64_t i = 0; i < n; ++i) {
    const double bi =
        std::min(15.0, std::max(1.0, std::nearbyint(b[i / gs].item<double>() + extra_bits)));
    const double L = std::pow(2.0, bi) - 1;
    const double level = std::nearbyint((flat[i].item<double>() - lo) / (hi - lo) * L);
    out[i] = lo + level * (hi - lo) / L;
  }
  return out.view(w.sizes());
}

/// The eval forward on `device` equals a forward with hand-quantized weights; the clean weights
/// are back after it and after a later (no-grad) training forward.
void CheckEvalForwardUsesHandQuantizedWeights(const torch::Device& device) {
  for (int64_t gs : {0, 1, 8, 7}) {
    SCOPED_TRACE(gs);
    torch::manual_seed(11);
    MLP model;
    model->to(device);
    auto options = DiffQOptions().group_size(gs).min_size_mb(0).extra_bits(0.4);
    auto before = ParamSnapshot(*model);
    DiffQuantizer<MLP> q(model, options);
    {
      torch::NoGradGuard ng;
      for (const auto& n : q.quantized_names()) {
        auto l = q.logit(n);
        l.copy_(torch::linspace(-6, 6, l.numel(), l.options()));  // 2..15 bits
      }
    }
    std::map<std::string, torch::Tensor> wq;
    for (const auto& n : q.quantized_names()) {
      wq[n] = HandQuantize(before[n].cpu(), RefBits(q.logit(n).cpu(), options), gs, 0.4)
                  .to(torch::kFloat)
                  .to(device);
    }
    model->eval();
    torch::NoGradGuard ng;
    auto x = torch::randn({5, 10}).to(device);
    auto y = q.forward(x);
    EXPECT_EQ(y.device().type(), device.type());
    auto ref = ExplicitMlp(x, wq);
    EXPECT_TRUE(Close(y, ref, 1e-6));
    // The quantized weights are exactly representable: the eval weights equal them to float
    // rounding.
    {
      diffq::QuantizedGuard<DiffQuantizer<MLP>> guard(q);
      for (const auto& n : q.quantized_names()) {
        EXPECT_TRUE(Close(model->named_parameters()[n], wq[n], 1e-6)) << n;
        EXPECT_EQ(model->named_parameters()[n].device().type(), device.type()) << n;
      }
    }
    EXPECT_TRUE(MatchesSnapshot(*model, before));
    // Back in training, the exact clean weights are used.
    model->train();
    q.no_optimizer();
    auto yt = q.forward(x);
    EXPECT_TRUE(MatchesSnapshot(*model, before));
  }
}

TEST(DiffQuantizer, EvalForwardUsesHandQuantizedWeights) {
  CheckEvalForwardUsesHandQuantizedWeights(torch::kCPU);
}

TEST(DiffQuantizer, ConstantTensorQuantizesToItself) {
  torch::manual_seed(12);
  MLP model;
  {
    torch::NoGradGuard ng;
    model->fc1->weight.fill_(0.25);
  }
  DiffQuantizer<MLP> q(model, DiffQOptions().min_size_mb(0));
  model->eval();
  diffq::QuantizedGuard<DiffQuantizer<MLP>> guard(q);
  auto w = model->fc1->weight.detach();
  EXPECT_TRUE(torch::all(w == 0.25).item<bool>());
}

/// The size formula by hand, in double: Σ_g n_g·b_g + 72 + ceil(log2(1 + round(max b) − min_bits))
/// · num_groups per quantized tensor, 32 bits per other element; divided by 8·2^20.
double HandSizeMB(torch::nn::Module& model, const DiffQuantizer<MLP>& q, const DiffQOptions& o,
                  bool exact) {
  double bits = 0;
  auto params = model.named_parameters();
  for (const auto& item : params) {
    const auto& name = item.key();
    if (name.size() > 6 && name.substr(name.size() - 6) == "_diffq") continue;
    const auto names = q.quantized_names();
    if (std::find(names.begin(), names.end(), name) == names.end()) {
      bits += 32.0 * item.value().numel();
      continue;
    }
    auto b = RefBits(params[name + "_diffq"].detach(), o).to(torch::kDouble) + o.extra_bits();
    const int64_t n = item.value().numel();
    const int64_t gs = o.group_size() == 0 ? n : o.group_size();
    double maxb = -1e9;
    for (int64_t g = 0; g < b.numel(); ++g) {
      double bg = b[g].item<double>();
      if (exact) bg = std::min(15.0, std::max(1.0, std::nearbyint(bg)));
      const int64_t count = std::min(gs, n - g * gs);
      bits += count * bg;
      maxb = std::max(maxb, bg);
    }
    bits +=
        64 + 8 +
        std::ceil(std::log2(std::max(1.0, 1 + std::nearbyint(maxb) - o.min_bits()))) * b.numel();
  }
  return bits / (8.0 * 1048576.0);
}

/// d size / d logit in MB per unit of logit, by autograd through the size formula in double:
/// `Σ_g n_g·(b_g(l_g) + extra_bits) / (8·2^20)` for a tensor of `numel` elements in groups of
/// `group_size` (0: one group), the last group holding the rest.
torch::Tensor HandPenaltyGradient(const torch::Tensor& logit, int64_t numel, int64_t group_size,
                                  const DiffQOptions& o) {
  auto l = logit.detach().to(torch::kDouble).requires_grad_(true);
  const int64_t g = l.numel();
  const int64_t egs = group_size == 0 ? numel : group_size;
  auto counts = torch::full({g}, static_cast<double>(egs), torch::kDouble);
  counts[g - 1] = static_cast<double>(numel - (g - 1) * egs);
  (((RefBits(l, o) + o.extra_bits()) * counts).sum() / (8.0 * 1048576.0)).backward();
  return l.grad();
}

TEST(DiffQuantizer, PenaltyEqualsFormulaByHand) {
  // Float32 logits: the fused CPU penalty and (use_reference_kernels) the ATen-op one.
  for (int64_t gs : {0, 1, 8, 7}) {
    for (double extra : {0.0, 0.6}) {
      for (auto param : {diffq::Param::kBits, diffq::Param::kNoise}) {
        for (bool ref : {false, true}) {
          SCOPED_TRACE(std::to_string(gs) + " extra " + std::to_string(extra) +
                       (param == diffq::Param::kBits ? " bits" : " noise") + (ref ? " ATen" : ""));
          torch::manual_seed(13);
          MLP model;
          // fc2.bias (3 elements) stays fp32: min_size between 3 and 6 elements of fp32.
          auto o = DiffQOptions()
                       .group_size(gs)
                       .min_size_mb(4.0 * 4 / 1048576.0)
                       .extra_bits(extra)
                       .param(param);
          DiffQuantizer<MLP> q(model, o);
          q.use_reference_kernels(ref);
          EXPECT_EQ(q.quantized_names().size(), 3u);
          RandomLogits(q, 2.0);
          EXPECT_NEAR(q.penalty().item<double>(), HandSizeMB(*model, q, o, false),
                      1e-6 * HandSizeMB(*model, q, o, false));
          EXPECT_NEAR(q.true_model_size(), HandSizeMB(*model, q, o, true),
                      1e-9 + 1e-7 * HandSizeMB(*model, q, o, true));
        }
      }
    }
  }
}

TEST(DiffQuantizer, FusedPenaltyGradientMatchesExplicitAutograd) {
  // The fused CPU penalty's logit gradients against autograd through the formula written out in
  // double precision: d/dl Σ_g n_g·b_g(l_g) / (8·2^20).
  for (auto param : {diffq::Param::kBits, diffq::Param::kNoise}) {
    for (int64_t gs : {0, 7}) {
      torch::manual_seed(16);
      MLP model;
      auto o = DiffQOptions().group_size(gs).min_size_mb(0).param(param).extra_bits(0.3);
      DiffQuantizer<MLP> q(model, o);
      RandomLogits(q);
      (3.0 * q.penalty()).backward();
      auto params = model->named_parameters();
      for (const auto& n : q.quantized_names()) {
        auto ref = 3.0 * HandPenaltyGradient(q.logit(n), params[n].numel(), gs, o);
        EXPECT_TRUE(Close(q.logit(n).grad().to(torch::kDouble), ref, 1e-5))
            << n << (param == diffq::Param::kBits ? " bits" : " noise") << " gs " << gs;
      }
    }
  }
}

TEST(DiffQuantizer, PenaltyReusesTheForwardPassOverTheLogitsOnlyWhileTheyAreUnchanged) {
  // The training forward computes the penalty's terms with the noise's units; penalty() reuses
  // them while the logits keep their version and storage. Its value and gradient must not depend
  // on whether a forward ran first, and must follow every change of the logits.
  for (int64_t gs : {0, 7}) {
    SCOPED_TRACE("group size " + std::to_string(gs));
    torch::manual_seed(17);
    MLP model;
    auto o = DiffQOptions().group_size(gs).min_size_mb(0).extra_bits(0.3);
    DiffQuantizer<MLP> q(model, o);
    q.no_optimizer();
    RandomLogits(q);
    auto logit_grads = [&] {
      std::vector<torch::Tensor> g;
      for (const auto& n : q.quantized_names()) g.push_back(q.logit(n).grad().clone());
      return g;
    };
    auto zero_logit_grads = [&] {
      for (const auto& n : q.quantized_names()) q.logit(n).mutable_grad() = torch::Tensor();
    };
    auto before = q.penalty();  // no forward yet: computed by penalty() itself
    before.backward();
    const auto grads_before = logit_grads();
    zero_logit_grads();
    auto x = torch::randn({4, 10});
    q.forward(x).sum().backward();  // computes the terms with the units
    zero_logit_grads();
    auto after = q.penalty();
    EXPECT_EQ(before.item<double>(), after.item<double>());
    after.backward();
    const auto grads_after = logit_grads();
    for (size_t k = 0; k < grads_before.size(); ++k) {
      EXPECT_TRUE(BitEqual(grads_before[k], grads_after[k])) << q.quantized_names()[k];
    }
    // An in-place change (as an optimizer step) and a new storage (set_data) are both seen.
    {
      torch::NoGradGuard ng;
      q.logit("fc1.weight").add_(1.5);
    }
    EXPECT_NEAR(q.penalty().item<double>(), HandSizeMB(*model, q, o, false),
                1e-6 * HandSizeMB(*model, q, o, false));
    q.logit("fc2.weight").set_data(torch::full_like(q.logit("fc2.weight"), -2.0));
    EXPECT_NEAR(q.penalty().item<double>(), HandSizeMB(*model, q, o, false),
                1e-6 * HandSizeMB(*model, q, o, false));
    // Changed logits, then a training forward (which recomputes the terms), then the penalty:
    // value by hand, gradient by autograd through the formula in double.
    {
      torch::NoGradGuard ng;
      for (const auto& n : q.quantized_names()) q.logit(n).sub_(torch::rand(q.logit(n).sizes()));
    }
    q.forward(x);
    zero_logit_grads();
    auto changed = q.penalty();
    EXPECT_NEAR(changed.item<double>(), HandSizeMB(*model, q, o, false),
                1e-6 * HandSizeMB(*model, q, o, false));
    changed.backward();
    auto params = model->named_parameters();
    for (const auto& n : q.quantized_names()) {
      auto ref = HandPenaltyGradient(q.logit(n), params[n].numel(), gs, o);
      EXPECT_TRUE(Close(q.logit(n).grad().to(torch::kDouble), ref, 1e-5)) << n;
    }
  }
}

TEST(DiffQuantizer, PenaltyBackwardUsesTheLogitsOfItsForward) {
  // A penalty awaiting its backward keeps the slopes of the logits it was computed from, even when
  // the logits change and a training forward recomputes the terms in between.
  torch::manual_seed(18);
  MLP model;
  auto o = DiffQOptions().group_size(7).min_size_mb(0);  // 60 weights: the last group holds 4
  DiffQuantizer<MLP> q(model, o);
  q.no_optimizer();
  auto l = q.logit("fc1.weight");
  {
    torch::NoGradGuard ng;
    l.copy_(torch::randn(l.sizes()));
  }
  const auto original = l.detach().clone();
  auto p = q.penalty();
  {
    torch::NoGradGuard ng;
    l.add_(torch::randn(l.sizes()));
  }
  q.forward(torch::randn({2, 10}));  // a training forward on the new logits
  for (const auto& n : q.quantized_names()) q.logit(n).mutable_grad() = torch::Tensor();
  p.backward();
  // d size / d l_g = n_g·db/dl(original l_g) / (8·2^20), by autograd through the formula.
  auto ref = HandPenaltyGradient(original, model->fc1->weight.numel(), 7, o);
  EXPECT_TRUE(Close(l.grad().to(torch::kDouble), ref, 1e-5));
}

TEST(DiffQuantizer, PenaltyGradientMatchesFiniteDifferences) {
  torch::manual_seed(14);
  MLP model;
  model->to(torch::kDouble);  // logits follow the parameters' dtype: float64 finite differences
  auto o = DiffQOptions().group_size(7).min_size_mb(0);
  DiffQuantizer<MLP> q(model, o);
  RandomLogits(q);
  q.penalty().backward();
  const double h = 1e-6;
  for (const auto& n : q.quantized_names()) {
    auto l = q.logit(n);
    auto g = l.grad().clone();
    ASSERT_EQ(l.scalar_type(), torch::kDouble);
    for (int64_t i = 0; i < l.numel(); ++i) {
      torch::NoGradGuard ng;
      const double orig = l[i].item<double>();
      l[i].fill_(orig + h);
      const double up = q.penalty().item<double>();
      l[i].fill_(orig - h);
      const double down = q.penalty().item<double>();
      l[i].fill_(orig);
      const double fd = (up - down) / (2 * h);
      EXPECT_NEAR(g[i].item<double>(), fd, 1e-6 * std::abs(fd) + 1e-12) << n << "[" << i << "]";
    }
  }
}

TEST(DiffQuantizer, PenaltyCountsTiedParametersOnce) {
  torch::manual_seed(15);
  Tied model;
  auto o = DiffQOptions().group_size(5).min_size_mb(0);
  DiffQuantizer<Tied> q(model, o);
  // emb.weight (35 elements, 7 groups at 8 bits) once; no other parameters.
  const double bits = 35 * 8.0 + 72 + std::ceil(std::log2(1 + 8 - 2)) * 7;
  EXPECT_NEAR(q.penalty().item<double>(), bits / (8.0 * 1048576.0),
              1e-6 * bits / (8.0 * 1048576.0));
}

TEST(DiffQuantizer, LogitsInitialisedAtInitBitsAndRegisteredOnOwner) {
  for (auto param : {diffq::Param::kBits, diffq::Param::kNoise}) {
    MLP model;
    DiffQuantizer<MLP> q(model,
                         DiffQOptions().init_bits(5).min_size_mb(0).param(param).group_size(4));
    auto fc1 = model->fc1->named_parameters(false);
    ASSERT_TRUE(fc1.contains("weight_diffq"));
    EXPECT_EQ(fc1["weight_diffq"].sizes(), torch::IntArrayRef({15}));         // ceil(60 / 4)
    EXPECT_EQ(model->fc1->named_parameters(false)["bias_diffq"].numel(), 2);  // ceil(6 / 4)
    EXPECT_TRUE(Close(q.bits("fc1.weight"), torch::full({15}, 5.0), 1e-6));
    // The logits are model parameters: in parameters() and in the saved state.
    EXPECT_EQ(model->parameters().size(), 8u);
  }
}

TEST(DiffQuantizer, MinSizeAndExcludeSelectQuantizedTensors) {
  MLP model;
  // 4 bytes × 60 = 240 B for fc1.weight: a min size of exactly 240 B keeps it fp32 ("at or below").
  DiffQuantizer<MLP> q(model, DiffQOptions().min_size_mb(18 * 4 / 1048576.0).exclude({"fc2.*"}));
  EXPECT_EQ(q.quantized_names(), std::vector<std::string>{"fc1.weight"});
  MLP model2;
  DiffQuantizer<MLP> q2(model2, DiffQOptions().min_size_mb(0).exclude({"bias"}));
  EXPECT_EQ(q2.quantized_names(), (std::vector<std::string>{"fc1.weight", "fc2.weight"}));
}

TEST(DiffQuantizer, ExcludeMatchesAnyNameOfATiedParameter) {
  // One tensor under the names emb.weight and out.weight: excluding either name excludes it.
  for (const std::string& name : {"emb.weight", "out.weight", "out.*"}) {
    Tied model;
    DiffQuantizer<Tied> q(model, DiffQOptions().min_size_mb(0).exclude({name}));
    EXPECT_TRUE(q.quantized_names().empty()) << name;
    EXPECT_EQ(model->named_parameters().size(), 2u) << name;  // its two names, no logit
  }
  Tied model;
  DiffQuantizer<Tied> q(model, DiffQOptions().min_size_mb(0));
  EXPECT_EQ(q.quantized_names(), std::vector<std::string>{"emb.weight"});
}

TEST(DiffQuantizer, ExcludePatternMatchingNothingWarns) {
  MLP model;
  testing::internal::CaptureStderr();
  DiffQuantizer<MLP> q(model, DiffQOptions().min_size_mb(0).exclude({"fc1.weights", "*bias"}));
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("diffq::DiffQuantizer: exclude pattern 'fc1.weights' matches no parameter "
                     "(patterns match full dotted names such as 'fc1.weight' and leaf names "
                     "such as 'weight')"),
            std::string::npos)
      << err;
  EXPECT_EQ(err.find("'*bias'"), std::string::npos) << err;
  EXPECT_EQ(q.quantized_names(), (std::vector<std::string>{"fc1.weight", "fc2.weight"}));
}

/// Change of the mean bit width over 30 Adam steps on `device` with penalty weight `lambda`.
double MeanBitsChangeAfterAdam(double lambda, const torch::Device& device) {
  torch::manual_seed(16);
  MLP model;
  model->to(device);
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-2));
  DiffQuantizer<MLP> q(model, DiffQOptions().group_size(4).min_size_mb(0));
  q.setup_optimizer(opt, 5e-2);
  EXPECT_EQ(q.logit("fc1.weight").device().type(), device.type());
  const double start = q.mean_bits();
  auto x = torch::randn({64, 10}).to(device);
  auto y = torch::randn({64, 3}).to(device);
  for (int step = 0; step < 30; ++step) {
    auto loss = (q.forward(x) - y).pow(2).mean() * 100 + lambda * q.penalty();
    opt.zero_grad();
    loss.backward();
    opt.step();
  }
  return q.mean_bits() - start;
}

TEST(DiffQuantizer, AdamWithLargePenaltyLowersBitsAndWithoutDoesNot) {
  EXPECT_LT(MeanBitsChangeAfterAdam(1e5, torch::kCPU), -0.5);
  EXPECT_GE(MeanBitsChangeAfterAdam(0.0, torch::kCPU), 0.0);
}

TEST(DiffQuantizer, SetupOptimizerAddsLogitGroupWithoutWeightDecay) {
  MLP model;
  torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(1e-3).weight_decay(0.1));
  DiffQuantizer<MLP> q(model, DiffQOptions().min_size_mb(0));
  q.setup_optimizer(opt, 0.02);
  ASSERT_EQ(opt.param_groups().size(), 2u);
  auto& g = opt.param_groups()[1];
  EXPECT_EQ(g.params().size(), 4u);
  auto& o = static_cast<torch::optim::AdamWOptions&>(g.options());
  EXPECT_DOUBLE_EQ(o.lr(), 0.02);
  EXPECT_DOUBLE_EQ(o.weight_decay(), 0.0);
  MLP model2;
  torch::optim::SGD sgd(model2->parameters(), torch::optim::SGDOptions(0.1).weight_decay(0.5));
  DiffQuantizer<MLP> q2(model2, DiffQOptions().min_size_mb(0));
  q2.setup_optimizer(sgd);
  EXPECT_DOUBLE_EQ(
      static_cast<torch::optim::SGDOptions&>(sgd.param_groups()[1].options()).weight_decay(), 0.0);
}

TEST(DiffQuantizer, DetachLeavesTheModelAsItWas) {
  torch::manual_seed(17);
  MLP model;
  const auto names_before = model->named_parameters().keys();
  auto w = model->fc1->weight.detach().clone();
  DiffQuantizer<MLP> q(model, DiffQOptions().min_size_mb(0));
  q.no_optimizer();
  auto y = q.forward(torch::randn({2, 10}));
  q.detach();
  EXPECT_EQ(model->named_parameters().keys(), names_before);
  EXPECT_TRUE(BitEqual(model->fc1->weight.detach(), w));
  // A new quantizer can wrap the model again.
  DiffQuantizer<MLP> again(model, DiffQOptions().min_size_mb(0));
  EXPECT_EQ(again.quantized_names().size(), 4u);
}

TEST(DiffQuantizer, ErrorPaths) {
  MLP model;
  ExpectError([&] { DiffQuantizer<MLP> q(model, DiffQOptions().group_size(-3)); },
              "diffq::DiffQuantizer: group_size must be >= 0, got -3");
  ExpectError([&] { DiffQuantizer<MLP> q(model, DiffQOptions().min_bits(8).init_bits(8)); },
              "min_bits must be < init_bits, got min_bits=8 and init_bits=8");
  ExpectError([&] { DiffQuantizer<MLP> q(model, DiffQOptions().init_bits(15).max_bits(15)); },
              "init_bits must be < max_bits, got init_bits=15 and max_bits=15");
  ExpectError([&] { DiffQuantizer<MLP> q(model, DiffQOptions().max_bits(16)); },
              "max_bits must be <= 15, got 16");
  ExpectError([&] { DiffQuantizer<MLP> q(model, DiffQOptions().min_bits(0).init_bits(3)); },
              "min_bits must be >= 1, got 0");
  ExpectError([&] { DiffQuantizer<MLP> q(model, DiffQOptions().min_size_mb(-1)); },
              "min_size_mb must be >= 0, got -1");
  ExpectError([&] { DiffQuantizer<MLP> q(model, DiffQOptions().suffix("a.b")); },
              "suffix must be non-empty and contain no '.'");
  {
    DiffQuantizer<MLP> q(model, DiffQOptions().min_size_mb(0));
    ExpectError([&] { DiffQuantizer<MLP> again(model, DiffQOptions()); },
                "the model already carries a DiffQ logit ('fc1.weight_diffq')");
    ExpectError(
        [&] {
          q.forward(torch::randn({1, 10}));
        },
        "call setup_optimizer(optimizer) (or no_optimizer()) before a training forward");
    torch::optim::Adam late(model->parameters());
    ExpectError([&] { q.setup_optimizer(late); },
                "already holds the logit 'fc1.weight_diffq'; create the optimizer");
    // Called twice on one optimizer: the same refusal, which names that cause too.
    torch::optim::SGD first(std::vector<torch::Tensor>{model->fc1->bias}, 0.1);
    q.setup_optimizer(first);
    ExpectError([&] { q.setup_optimizer(first); },
                "already holds the logit 'fc1.weight_diffq'; create the optimizer (on "
                "model->parameters()) before the quantizer, and call setup_optimizer once per "
                "optimizer");
    ExpectError([&] { q.logit("nope"); }, "no quantized parameter named 'nope'");
    // NaN weights at quantization.
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
    model->train();
    q.no_optimizer();
    ExpectError(
        [&] {
          q.forward(torch::randn({1, 10}));
        },
        "parameter 'fc2.weight' holds non-finite values");
    {
      // A NaN past the first element (min/max comparisons alone would skip it).
      torch::NoGradGuard ng;
      model->fc2->weight[0][0] = 0.5f;
      model->fc2->weight.view(-1)[model->fc2->weight.numel() - 3] = std::nan("");
    }
    ExpectError(
        [&] {
          q.forward(torch::randn({1, 10}));
        },
        "parameter 'fc2.weight' holds non-finite values");
    {
      torch::NoGradGuard ng;
      model->fc2->weight[0][0] = std::numeric_limits<float>::infinity();
    }
    ExpectError([&] { q.quantized_state(); }, "holds non-finite values (min=");
    q.detach();
    ExpectError([&] { q.quantize(); },
                "diffq::DiffQuantizer::quantize: the quantizer was detached");
  }
  Tied tied;
  ExpectError(
      [&] { DiffQuantizer<Tied> q(tied, DiffQOptions().detect_bound(false).min_size_mb(0)); },
      "parameter 'out.weight' is tied to 'emb.weight'; tied parameters need detect_bound(true)");
}

TEST(DiffQuantizer, QuantizedStateDescribesTheEvalWeights) {
  torch::manual_seed(18);
  Tied model;
  DiffQuantizer<Tied> q(model, DiffQOptions().group_size(6).min_size_mb(0));
  auto st = q.quantized_state(/*include_logits=*/true);
  ASSERT_EQ(st.quantized.size(), 1u);
  const auto& t = st.quantized[0];
  EXPECT_EQ(t.name, "emb.weight");
  EXPECT_EQ(t.shape, (std::vector<int64_t>{7, 5}));
  EXPECT_EQ(t.bits.numel(), 6);  // ceil(35 / 6)
  EXPECT_EQ(t.min, model->emb->weight.min().item<double>());
  ASSERT_EQ(st.tied.size(), 1u);
  EXPECT_EQ(st.tied[0].name, "out.weight");
  EXPECT_EQ(st.tied[0].target, "emb.weight");
  EXPECT_EQ(st.logits.size(), 1u);
  // Dequantized levels equal the eval-mode weights bit for bit.
  auto w =
      diffq::dequantize_levels(t.levels, t.bits, t.group_size, t.min, t.max, t.dtype).view(t.shape);
  model->eval();
  diffq::QuantizedGuard<DiffQuantizer<Tied>> guard(q);
  EXPECT_TRUE(BitEqual(model->emb->weight.detach(), w));
  EXPECT_TRUE(BitEqual(model->out->weight.detach(), w));
}

/// In eval mode, the forward of `x` against the MLP with weights quantized by hand from the model's
/// current weights and logits (group size 4), and the penalty against the size formula by hand;
/// returns the forward's output.
torch::Tensor ExpectEvalAndPenaltyByHand(MLP& model, DiffQuantizer<MLP>& q,
                                         const DiffQOptions& options, const torch::Tensor& x) {
  model->eval();
  torch::NoGradGuard ng;
  auto y = q.forward(x);
  auto params = model->named_parameters();
  std::map<std::string, torch::Tensor> wq;
  for (const auto& n : q.quantized_names()) {
    wq[n] = HandQuantize(params[n], RefBits(params[n + "_diffq"], options), 4, 0).to(torch::kFloat);
  }
  EXPECT_TRUE(Close(y, ExplicitMlp(x, wq), 1e-6));
  const double by_hand = HandSizeMB(*model, q, options, false);
  EXPECT_NEAR(q.penalty().item<double>(), by_hand, 1e-6 * by_hand);
  return y;
}

TEST(DiffQuantizer, EvalWeightsAndPenaltyFollowSgdSteps) {
  // LibTorch's SGD writes through `.data()`: the version counters do not move.
  torch::manual_seed(31);
  MLP model;
  torch::optim::SGD optimizer(model->parameters(), 0.5);
  const auto options = DiffQOptions().min_size_mb(0).group_size(4);
  DiffQuantizer<MLP> q(model, options);
  q.setup_optimizer(optimizer, /*lr=*/5.0);
  auto x = torch::randn({2, 10});
  model->eval();
  {
    torch::NoGradGuard ng;
    q.forward(x);  // fills the eval cache
  }
  model->train();
  auto loss = q.forward(x).pow(2).sum() + q.penalty();
  model->eval();
  {
    torch::NoGradGuard ng;
    q.forward(x);  // refills the eval cache (the noisy weights set aside)
  }
  model->train();
  optimizer.zero_grad();
  loss.backward();
  optimizer.step();
  // The eval forward and the penalty use the stepped weights and logits.
  ExpectEvalAndPenaltyByHand(model, q, options, x);
}

TEST(DiffQuantizer, NanLogitIsReportedNotPropagated) {
  for (auto param : {diffq::Param::kBits, diffq::Param::kNoise}) {
    SCOPED_TRACE(param == diffq::Param::kBits ? "bits" : "noise");
    torch::manual_seed(32);
    MLP model;
    const auto before = ParamSnapshot(*model);
    DiffQuantizer<MLP> q(model, DiffQOptions().min_size_mb(0).group_size(4).param(param));
    q.no_optimizer();
    {
      torch::NoGradGuard ng;
      q.logit("fc2.weight")[3] = std::nan("");
    }
    auto x = torch::randn({2, 10});
    ExpectError([&] { q.forward(x); },
                "diffq::DiffQuantizer: the logit of parameter 'fc2.weight' holds NaN (did the "
                "training diverge?)");
    EXPECT_TRUE(MatchesSnapshot(*model, before));  // the failed forward left them clean
    const std::string rounded =
        "diffq::rounded_bits: the bit width of group 3 of 'fc2.weight' is NaN";
    ExpectError([&] { q.true_model_size(); }, rounded);
    ExpectError([&] { q.quantized_state(); }, rounded);
    model->eval();
    torch::NoGradGuard ng;
    ExpectError([&] { q.forward(x); }, rounded);
  }
}

TEST(DiffQuantizer, EvalCacheFollowsWeightUpdates) {
  torch::manual_seed(19);
  MLP model;
  DiffQuantizer<MLP> q(model, DiffQOptions().min_size_mb(0).group_size(4));
  model->eval();
  torch::NoGradGuard ng;
  auto x = torch::randn({2, 10});
  auto y1 = q.forward(x);
  model->fc1->weight.add_(0.5);  // an optimizer-like in-place update
  auto y2 = q.forward(x);
  auto wq = HandQuantize(model->fc1->weight, RefBits(q.logit("fc1.weight"), q.options()), 4, 0);
  diffq::QuantizedGuard<DiffQuantizer<MLP>> guard(q);
  EXPECT_TRUE(Close(model->fc1->weight, wq.to(torch::kFloat), 1e-6));
  EXPECT_FALSE(torch::equal(y1, y2));
}

TEST(DiffQuantizer, EvalCacheFollowsSgdStepsAfterBackwardsOutsideTheQuantizer) {
  // LibTorch's SGD writes through `.data()`, so the version counters do not move; the backwards
  // here do not come from a quantizer forward: a plain model forward (it reaches the weights),
  // and the penalty alone (it reaches the logits).
  for (bool penalty_only : {false, true}) {
    SCOPED_TRACE(penalty_only ? "penalty alone" : "plain model forward");
    torch::manual_seed(33);
    MLP model;
    torch::optim::SGD optimizer(model->parameters(), 0.5);
    const auto options = DiffQOptions().min_size_mb(0).group_size(4);
    DiffQuantizer<MLP> q(model, options);
    q.setup_optimizer(optimizer, /*lr=*/1e6);  // the penalty moves the bits from 8 to ~4
    auto x = torch::randn({2, 10});
    model->eval();
    torch::Tensor y1;
    {
      torch::NoGradGuard ng;
      y1 = q.forward(x);  // fills the eval cache
    }
    model->train();
    optimizer.zero_grad();
    if (penalty_only) {
      q.penalty().backward();
    } else {
      model->forward(x).pow(2).sum().backward();
    }
    const auto before = ParamSnapshot(*model);
    optimizer.step();
    const auto after = ParamSnapshot(*model);
    const std::string changed = penalty_only ? "fc1.weight_diffq" : "fc1.weight";
    ASSERT_FALSE(torch::equal(before.at(changed), after.at(changed)));
    // The eval forward and the penalty use the stepped weights and logits.
    auto y = ExpectEvalAndPenaltyByHand(model, q, options, x);
    EXPECT_FALSE(torch::equal(y, y1));
  }
}

TEST(DiffQuantizer, FrozenLogitGetsNoGradientAndKeepsItsBits) {
  // Fixed bit widths for fc1.weight (its logit set to requires_grad false, after a first step that
  // gave it a gradient and Adam moments) while its weights and the other logits train: an
  // optimizer steps any tensor whose `.grad` is defined, and LibTorch 1.13's zero_grad() zeroes
  // gradients without undefining them.
  for (bool ref : {false, true}) {
    SCOPED_TRACE(ref ? "ATen kernels" : "CPU kernels");
    torch::manual_seed(34);
    MLP model;
    torch::optim::Adam optimizer(model->parameters(), 1e-2);
    const auto options = DiffQOptions().min_size_mb(0).group_size(4);
    DiffQuantizer<MLP> q(model, options);
    q.use_reference_kernels(ref);
    q.setup_optimizer(optimizer, 0.1);
    RandomLogits(q);
    auto x = torch::randn({3, 10});
    optimizer.zero_grad();
    (q.forward(x).pow(2).sum() + q.penalty()).backward();
    optimizer.step();
    ASSERT_TRUE(q.logit("fc1.weight").grad().defined());
    q.logit("fc1.weight").requires_grad_(false);
    const auto frozen = q.logit("fc1.weight").detach().clone();
    const auto before = ParamSnapshot(*model);
    auto out = q.forward(x);
    std::map<std::string, torch::Tensor> noise;
    for (const auto& n : q.quantized_names()) noise[n] = q.noise(n).clone();
    optimizer.zero_grad();
    (out.pow(2).sum() + q.penalty()).backward();
    EXPECT_FALSE(q.logit("fc1.weight").grad().defined());
    // The explicit computation with the same noise, fc1's logit a constant.
    std::map<std::string, torch::Tensor> w, l, noisy;
    auto params = model->named_parameters();
    for (const auto& n : q.quantized_names()) {
      w[n] = before.at(n).clone().requires_grad_(true);
      l[n] = params[n + "_diffq"].detach().clone().requires_grad_(n != "fc1.weight");
      noisy[n] = RefNoisy(w[n], l[n], noise[n], options);
    }
    ExplicitMlp(x, noisy).pow(2).sum().backward();
    for (const auto& n : q.quantized_names()) {
      EXPECT_TRUE(Close(params[n].grad(), w[n].grad())) << "weight grad of " << n;
    }
    // The other logits still learn (their values are checked against the explicit computation
    // in the tests above).
    EXPECT_TRUE(q.logit("fc2.weight").grad().defined());
    optimizer.step();
    EXPECT_TRUE(BitEqual(q.logit("fc1.weight").detach(), frozen));
    EXPECT_FALSE(torch::equal(model->fc1->weight.detach(), before.at("fc1.weight")));
  }
}

// ---- CUDA: the ATen-op implementation on the device, against the same independent computations.

TEST(DiffQuantizer, GradientsMatchForConvLstmTiedAndFloat64_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  NoTF32 no_tf32;
  const torch::Device cuda(torch::kCUDA);
  for (int64_t gs : {0, 8, 7}) {
    SCOPED_TRACE("group size " + std::to_string(gs));
    {
      SCOPED_TRACE("Conv2d");
      torch::manual_seed(2);
      ConvNet model;
      model->to(cuda);
      auto x = torch::randn({2, 2, 4, 4}, cuda);
      auto options = DiffQOptions().group_size(gs).min_size_mb(0).exclude({"*bias"});
      CheckGradients(
          model, options, false, x,
          [&](std::map<std::string, torch::Tensor>& nw,
              std::map<std::string, torch::Tensor>& clean) {
            auto h = torch::relu(F::conv2d(
                x, nw["conv.weight"], F::Conv2dFuncOptions().bias(clean["conv.bias"]).padding(1)));
            return F::linear(h.flatten(1), nw["fc.weight"], clean["fc.bias"]);
          });
    }
    {
      // cuDNN reads the LSTM's weights from one packed buffer: the noise must reach it.
      SCOPED_TRACE("LSTM");
      torch::manual_seed(3);
      torch::nn::LSTM lstm(torch::nn::LSTMOptions(4, 5));
      lstm->to(cuda);
      auto x = torch::randn({6, 2, 4}, cuda);
      auto h0 = torch::randn({1, 2, 5}, cuda);
      auto c0 = torch::randn({1, 2, 5}, cuda);
      CheckGradients(
          lstm, DiffQOptions().group_size(gs).min_size_mb(0), false, x,
          [&](std::map<std::string, torch::Tensor>& nw, std::map<std::string, torch::Tensor>&) {
            return std::get<0>(torch::lstm(
                x, {h0, c0},
                {nw["weight_ih_l0"], nw["weight_hh_l0"], nw["bias_ih_l0"], nw["bias_hh_l0"]},
                /*has_biases=*/true, /*num_layers=*/1, /*dropout=*/0.0, /*train=*/true,
                /*bidirectional=*/false, /*batch_first=*/false));
          },
          std::make_tuple(h0, c0));
    }
    {
      SCOPED_TRACE("tied weights");
      torch::manual_seed(4);
      Tied model;
      model->to(cuda);
      auto idx = torch::tensor({0, 3, 6, 2}, torch::TensorOptions(torch::kLong).device(cuda));
      CheckGradients(
          model, DiffQOptions().group_size(gs).min_size_mb(0), false, idx,
          [&](std::map<std::string, torch::Tensor>& nw, std::map<std::string, torch::Tensor>&) {
            return F::linear(torch::tanh(F::embedding(idx, nw["emb.weight"])), nw["emb.weight"]);
          });
    }
    {
      SCOPED_TRACE("float64");
      torch::manual_seed(6);
      MLP model;
      model->to(cuda, torch::kDouble);
      auto x = torch::randn({4, 10}, torch::TensorOptions(torch::kDouble).device(cuda));
      CheckGradients(
          model, DiffQOptions().group_size(gs).min_size_mb(0).noise(diffq::Noise::kUniform), false,
          x, [&](std::map<std::string, torch::Tensor>& nw, std::map<std::string, torch::Tensor>&) {
            auto h = torch::tanh(F::linear(x, nw["fc1.weight"], nw["fc1.bias"]));
            return F::linear(h, nw["fc2.weight"], nw["fc2.bias"]);
          });
    }
  }
}

TEST(DiffQuantizer, EvalForwardUsesHandQuantizedWeights_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  NoTF32 no_tf32;
  CheckEvalForwardUsesHandQuantizedWeights(torch::kCUDA);
}

TEST(DiffQuantizer, PenaltyEqualsFormulaByHandAndItsGradient_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  for (auto param : {diffq::Param::kBits, diffq::Param::kNoise}) {
    for (int64_t gs : {0, 7}) {
      SCOPED_TRACE(std::to_string(gs) + (param == diffq::Param::kBits ? " bits" : " noise"));
      torch::manual_seed(13);
      MLP model;
      model->to(torch::kCUDA);
      auto o = DiffQOptions()
                   .group_size(gs)
                   .min_size_mb(4.0 * 4 / 1048576.0)  // fc2.bias (3 elements) stays fp32
                   .extra_bits(0.6)
                   .param(param);
      DiffQuantizer<MLP> q(model, o);
      EXPECT_EQ(q.quantized_names().size(), 3u);
      RandomLogits(q, 2.0);
      auto p = q.penalty();
      EXPECT_TRUE(p.is_cuda());
      const double hand = HandSizeMB(*model, q, o, false);
      EXPECT_NEAR(p.item<double>(), hand, 1e-6 * hand);
      EXPECT_NEAR(q.true_model_size(), HandSizeMB(*model, q, o, true),
                  1e-9 + 1e-7 * HandSizeMB(*model, q, o, true));
      (3.0 * p).backward();
      auto params = model->named_parameters();
      for (const auto& n : q.quantized_names()) {
        auto ref = 3.0 * HandPenaltyGradient(q.logit(n).cpu(), params[n].numel(), gs, o);
        EXPECT_TRUE(Close(q.logit(n).grad().cpu().to(torch::kDouble), ref, 1e-5)) << n;
      }
    }
  }
}

TEST(DiffQuantizer, NoiseHasItsDistributionAndChangesEveryStep_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  for (auto kind : {diffq::Noise::kGaussian, diffq::Noise::kUniform}) {
    SCOPED_TRACE(kind == diffq::Noise::kGaussian ? "gaussian" : "uniform");
    torch::manual_seed(23);
    torch::nn::Linear model(1000, 1000);
    model->to(torch::kCUDA);
    DiffQuantizer<torch::nn::Linear> q(model, DiffQOptions().noise(kind).exclude({"*bias"}));
    q.no_optimizer();
    auto x = torch::randn({2, 1000}, torch::kCUDA);
    q.forward(x).sum().backward();
    auto u1 = q.noise("weight").cpu().to(torch::kDouble).reshape(-1);
    q.forward(x).sum().backward();
    auto u2 = q.noise("weight").cpu().to(torch::kDouble).reshape(-1);
    const double n = static_cast<double>(u1.numel());
    // u = N(0, 1)/2 or U[−1/2, 1/2]: mean 0, variance 1/4 or 1/12; bounds of the uniform.
    const double var = kind == diffq::Noise::kGaussian ? 0.25 : 1.0 / 12;
    for (const auto& u : {u1, u2}) {
      EXPECT_LT(std::abs(u.mean().item<double>()), 5 * std::sqrt(var / n));
      // Var of the sample variance: (μ4 − σ⁴)/n, μ4 = 3σ⁴ (normal) or 9σ⁴/5 (uniform).
      const double mu4 = (kind == diffq::Noise::kGaussian ? 3.0 : 1.8) * var * var;
      EXPECT_NEAR(u.var().item<double>(), var, 5 * std::sqrt((mu4 - var * var) / n));
      // Shape: E[(u/σ)^4] = 3 (normal) or 9/5 (uniform), standard error √((E[(u/σ)^8] −
      // E[(u/σ)^4]²)/n) with E[(u/σ)^8] = 105 or 9. Tells the two apart, which mean and variance
      // cannot.
      const double m4 = kind == diffq::Noise::kGaussian ? 3.0 : 1.8;
      const double m8 = kind == diffq::Noise::kGaussian ? 105.0 : 9.0;
      EXPECT_NEAR((u.pow(4).mean() / (var * var)).item<double>(), m4,
                  5 * std::sqrt((m8 - m4 * m4) / n));
      if (kind == diffq::Noise::kUniform) {
        EXPECT_GE(u.min().item<double>(), -0.5);
        EXPECT_LE(u.max().item<double>(), 0.5);
      }
    }
    // A new sample each step, independent of the last.
    const double corr = ((u1 - u1.mean()) * (u2 - u2.mean())).mean().item<double>() / var;
    EXPECT_LT(std::abs(corr), 5 / std::sqrt(n));
  }
}

TEST(DiffQuantizer, AdamWithLargePenaltyLowersBitsAndWithoutDoesNot_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  EXPECT_LT(MeanBitsChangeAfterAdam(1e5, torch::kCUDA), -0.5);
  EXPECT_GE(MeanBitsChangeAfterAdam(0.0, torch::kCUDA), 0.0);
}

}  // namespace

namespace {

/// Embedding(20, 8) with `max_norm` 1, then a Linear(8, 3).
struct RenormEmbeddingImpl : torch::nn::Module {
  RenormEmbeddingImpl()
      : emb(register_module(
            "emb", torch::nn::Embedding(torch::nn::EmbeddingOptions(20, 8).max_norm(1.0)))),
        fc(register_module("fc", torch::nn::Linear(8, 3))) {}
  torch::Tensor forward(const torch::Tensor& idx) { return fc(emb(idx)); }
  torch::nn::Embedding emb;
  torch::nn::Linear fc;
};
TORCH_MODULE(RenormEmbedding);

}  // namespace

TEST(DiffQuantizer, EmbeddingWithMaxNormIsRefusedUnlessExcluded) {
  torch::manual_seed(41);
  RenormEmbedding model;
  ExpectError([&] { DiffQuantizer<RenormEmbedding> q(model, DiffQOptions().min_size_mb(0)); },
              "diffq::DiffQuantizer: parameter 'emb.weight' is the weight of the Embedding 'emb' "
              "with max_norm, whose forward renormalises it in place; that write would go into "
              "the quantizer's substitute and be lost. Keep it in floating point with "
              "exclude({\"emb.weight\"}), or build the Embedding without max_norm");
  EXPECT_EQ(model->named_parameters().size(), 3u) << "the refused quantizer registered nothing";
  // Excluded, it trains as without the quantizer: the forward renormalises the clean rows.
  DiffQuantizer<RenormEmbedding> q(
      model, DiffQOptions().min_size_mb(0).exclude({"emb.weight", "*bias"}).float16(true));
  EXPECT_EQ(q.quantized_names(), (std::vector<std::string>{"fc.weight"}));
  q.no_optimizer();
  {
    torch::NoGradGuard ng;
    model->emb->weight.mul_(3.0);  // rows of norm > 1
  }
  auto idx = torch::tensor({{1, 4, 4}}, torch::kLong);
  const auto norms_before = model->emb->weight.detach().norm(2, 1);
  ASSERT_GT(norms_before[1].item<double>(), 1.0);
  q.forward(idx).sum().backward();
  const auto norms = model->emb->weight.detach().norm(2, 1);
  EXPECT_NEAR(norms[1].item<double>(), 1.0, 1e-5) << "row 1 renormalised in place";
  EXPECT_NEAR(norms[4].item<double>(), 1.0, 1e-5);
  EXPECT_TRUE(BitEqual(norms[2], norms_before[2])) << "an unused row is left alone";
  // The eval forward too (float16: the weight is not rounded, so the renormalisation stays).
  model->eval();
  torch::NoGradGuard ng;
  EXPECT_NO_THROW(q.forward(torch::tensor({{2}}, torch::kLong)));
  EXPECT_NEAR(model->emb->weight.detach().norm(2, 1)[2].item<double>(), 1.0, 1e-5);
  EXPECT_NO_THROW(q.forward(idx));
}

TEST(DiffQuantizer, TrainingForwardEndsQuantize) {
  // The reference's training pre-forward unquantizes first: the forward sees the clean weights
  // plus noise, the same noise sample as without quantize() for the same seed.
  torch::manual_seed(42);
  MLP model;
  DiffQuantizer<MLP> q(model, DiffQOptions().min_size_mb(0).group_size(4));
  q.no_optimizer();
  RandomLogits(q);
  const auto clean = ParamSnapshot(*model);
  const auto x = torch::randn({3, 10});
  torch::manual_seed(7);
  const auto expected = q.forward(x);
  expected.sum().backward();
  ASSERT_TRUE(MatchesSnapshot(*model, clean));
  q.quantize();
  ASSERT_TRUE(q.is_quantized());
  EXPECT_FALSE(BitEqual(model->fc1->weight, clean.at("fc1.weight")));
  torch::manual_seed(7);
  auto y = q.forward(x);
  EXPECT_FALSE(q.is_quantized());
  EXPECT_TRUE(BitEqual(y, expected));
  y.sum().backward();
  EXPECT_TRUE(MatchesSnapshot(*model, clean));
  q.unquantize();  // nothing left to end: no warning, the clean weights stay
  EXPECT_TRUE(MatchesSnapshot(*model, clean));
  // A write into the quantized weights before the training forward is refused, not lost.
  q.quantize();
  {
    torch::NoGradGuard ng;
    model->fc1->weight.add_(1.0);
  }
  ExpectError([&] { q.forward(x); },
              "diffq::DiffQuantizer::forward: parameter 'fc1.weight' was written in place while "
              "holding a substitute");
  EXPECT_FALSE(q.is_quantized());
  EXPECT_TRUE(MatchesSnapshot(*model, clean));
}
