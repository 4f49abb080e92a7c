// A C++ port of the Python reference package's own test suite: diffq/tests/ (base.py,
// test_diffq.py, test_uniform.py, test_lsq.py) of facebookresearch/diffq, read at commit
// f6182abaa84dc25843a61bbb5383dadcab589025 (package version 0.2.4). Same models, same assertions,
// one GoogleTest per Python test, named after it. unittest's assertAlmostEqual(x, 0) is
// `round(x, 7) == 0` (`AlmostZero`). Where this library documents a deliberate difference (README,
// "Limitations"), the test runs what works, asserts the documented behaviour, and skips naming the
// bullet. Python defaults that differ from this library's are passed explicitly: DiffQ's
// group_size (1 in the reference, 8 here) and LSQ's bits (8 in the reference, 4 here).
// Counterparts where the reference calls what this library has not: `get_quantized_state` /
// `restore_quantized_state` are the checkpoint (`save_quantized`, `restore_quantized`,
// `load_quantized`); `compressed_model_size(2, n)` is the checkpoint's size written with `n`
// threads; `packed_model_size()` is the quantized state bit-packed by `diffq::detail::pack_bits`
// (`PackedModelSize`); `torch_pack=True` (test_restore) becomes a file; resnet18
// (test_torchscript_export) becomes a small CNN; test_delta's bits=9.6 is left out (integer bits).
#include <diffq/diffq.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

#include "test_util.h"

namespace {

using diffq_test::ExpectError;
namespace nn = torch::nn;

constexpr double kMB = 1048576.0;

// ---- unittest's assertions ----

/// `assertAlmostEqual(v, 0, places)`: `round(v, places) == 0` (round half to even, as Python's).
::testing::AssertionResult AlmostZero(double v, int places = 7) {
  if (std::nearbyint(v * std::pow(10.0, places)) == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << v << " is not almost 0 (places=" << places << ")";
}

/// `assertNotAlmostEqual(v, 0)`.
::testing::AssertionResult NotAlmostZero(double v, int places = 7) {
  if (std::nearbyint(v * std::pow(10.0, places)) != 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << v << " is almost 0 (places=" << places << ")";
}

double Norm(const torch::Tensor& t) {
  return t.detach().to(torch::kDouble).norm().item<double>();
}

std::vector<torch::Tensor> Clones(const std::vector<torch::Tensor>& params) {
  std::vector<torch::Tensor> out;
  for (const auto& p : params) out.push_back(p.detach().clone());
  return out;
}

// ---- the models of base.py's `_cached_setup` ----
// The reference builds model_small and model_big once and deep-copies them; here each is rebuilt
// from its own seed, which gives the same values every time.

nn::Sequential ModelSmall() {
  torch::manual_seed(1);
  return nn::Sequential(nn::Conv1d(nn::Conv1dOptions(4, 4, 8).bias(false)), nn::ReLU(),
                        nn::Conv1d(nn::Conv1dOptions(4, 4, 1).bias(false)));
}

nn::LSTM ModelBig() {
  torch::manual_seed(2);
  return nn::LSTM(nn::LSTMOptions(256, 256).num_layers(2));
}

nn::ModuleList ModelSmallBig() {
  nn::ModuleList list;
  list->push_back(ModelSmall());
  list->push_back(ModelBig());
  return list;
}

/// `for model in self.models:` (model_small, model_big, model_small_big): `f(make)` with the
/// function that builds the model (call it twice for a `deepcopy`).
template <class F>
void ForEachModel(F&& f) {
  f(&ModelSmall);
  f(&ModelBig);
  f(&ModelSmallBig);
}

/// `nn.Sequential(nn.Linear(16, 1024), nn.Linear(1024, 16))`.
nn::Sequential Mlp16() {
  return nn::Sequential(nn::Linear(16, 1024), nn::Linear(1024, 16));
}

/// A Linear whose weight and bias are given tensors (C++ modules cannot reassign a registered
/// parameter, as `self.b.weight = self.a.weight` does in Python).
struct SharedLinearImpl : nn::Module {
  SharedLinearImpl(const torch::Tensor& w, const torch::Tensor& b)
      : weight(register_parameter("weight", w)), bias(register_parameter("bias", b)) {}
  torch::Tensor forward(const torch::Tensor& x) { return nn::functional::linear(x, weight, bias); }
  torch::Tensor weight, bias;
};
TORCH_MODULE(SharedLinear);

/// test_diffq.py's `_TestBound`: `a` and `b` share their weight and bias.
struct TestBoundImpl : nn::Module {
  TestBoundImpl()
      : a(register_module("a", nn::Linear(16, 16))),
        b(register_module("b", SharedLinear(a->weight, a->bias))) {}
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x) { return {a(x), b(x)}; }
  nn::Linear a;
  SharedLinear b;
};
TORCH_MODULE(TestBound);

// ---- counterparts of the reference quantizers' size functions ----

/// `packed_model_size()`: the quantized state bit-packed as the reference's `get_quantized_state(
/// packed=True)` packs it (each width's levels at that width, DiffQ's bit widths minus min_bits at
/// `ceil(log2(1 + max))` bits, two floats of scale per tensor, the other parameters in fp16 or
/// fp32), without pickle's overhead or any entropy coding. `store_bits`: DiffQ (per-group widths).
double PackedModelSize(const diffq::QuantizedState& state, bool store_bits, int64_t min_bits) {
  double bytes = 0;
  for (const auto& t : state.quantized) {
    const int64_t numel = t.levels.numel();
    const int64_t gs = t.group_size == 0 ? numel : t.group_size;
    auto width = t.bits.to(torch::kLong).repeat_interleave(gs).narrow(0, 0, numel);
    auto levels = t.levels.to(torch::kInt);
    for (int64_t b = 1; b <= 15; ++b) {
      auto sub = levels.masked_select(width == b).contiguous();
      if (sub.numel() == 0) continue;
      std::vector<uint16_t> v(sub.data_ptr<int32_t>(), sub.data_ptr<int32_t>() + sub.numel());
      bytes += static_cast<double>(diffq::detail::pack_bits(v, static_cast<int>(b)).size());
    }
    if (store_bits) {
      auto rel = (t.bits.to(torch::kInt) - min_bits).contiguous();
      const int nbits = static_cast<int>(std::ceil(std::log2(1.0 + rel.max().item<int32_t>())));
      if (nbits > 0) {
        std::vector<uint16_t> v(rel.data_ptr<int32_t>(), rel.data_ptr<int32_t>() + rel.numel());
        bytes += static_cast<double>(diffq::detail::pack_bits(v, nbits).size());
      }
    }
    bytes += 2 * 8;  // (min, max)
  }
  for (const auto& f : state.floats) {
    if (f.is_buffer) continue;
    bytes += static_cast<double>(f.value.numel()) * (f.float16 ? 2 : 4);
  }
  return bytes / kMB;
}

/// `compressed_model_size(num_workers=n)`: the size in MB of the compressed checkpoint (the
/// library's export, entropy coded), written with `n` intra-op threads.
template <class Q>
double CheckpointSize(const Q& q, int threads) {
  const int before = at::get_num_threads();
  at::set_num_threads(threads);
  std::vector<uint8_t> bytes;
  const double mb = static_cast<double>(diffq::save_quantized(q, bytes)) / kMB;
  at::set_num_threads(before);
  return mb;
}

// ---- base.py's shared test bodies ----

/// `QuantizeTest._test_save_restore_state(factory)`: `get_quantized_state` is the checkpoint
/// (`save_quantized`, with the logits or step sizes, which the wrapped `zeroed` model has as
/// parameters too), `restore_quantized_state` is `diffq::restore_quantized`.
template <template <class> class Q, class Options>
void TestSaveRestoreState(const Options& options) {
  ForEachModel([&](auto make) {
    auto model = make();
    auto params = model->parameters();
    auto zeroed = make();
    auto other_params = zeroed->parameters();
    {
      torch::NoGradGuard no_grad;
      for (auto& p : other_params) p.zero_();
    }
    Q<decltype(model)> quantizer(model, options);
    quantizer.quantize();
    std::vector<uint8_t> state;
    diffq::save_quantized(quantizer, state, /*include_logits=*/true);
    ASSERT_EQ(params.size(), other_params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      EXPECT_TRUE(NotAlmostZero(Norm(params[i] - other_params[i])));
    }
    Q<decltype(zeroed)> restored(zeroed, options);
    diffq::restore_quantized(restored, state);
    for (size_t i = 0; i < params.size(); ++i) {
      EXPECT_TRUE(AlmostZero(Norm(params[i] - other_params[i])));
    }
  });
}

/// `QuantizeTest._test_true_model_size(factory)`. `compressed_model_size(2, n)` is the compressed
/// checkpoint written with `n` threads (the library has no zlib level to choose),
/// `packed_model_size()` is `PackedModelSize` of the quantized state.
template <template <class> class Q, class Options>
void TestTrueModelSize(const Options& options, bool store_bits, int64_t min_bits,
                       const std::string& factory) {
  auto run = [&](auto model) {
    Q<decltype(model)> quantizer(model, options);
    const double compressed = CheckpointSize(quantizer, 1);
    const double true_size = quantizer.true_model_size();
    const double packed = PackedModelSize(quantizer.quantized_state(), store_bits, min_bits);
    const double estimate = quantizer.model_size().template item<double>();
    SCOPED_TRACE(factory + ": compressed " + std::to_string(compressed) + ", true " +
                 std::to_string(true_size) + ", packed " + std::to_string(packed) + ", estimate " +
                 std::to_string(estimate));
    EXPECT_LE(compressed, 1.5 * true_size);
    EXPECT_LE(compressed, 1.5 * estimate);
    EXPECT_LE(estimate, 1.5 * true_size);
    EXPECT_LE(true_size, 1.5 * estimate);
    EXPECT_LE(true_size, 1.1 * packed);
    EXPECT_LE(packed, 1.1 * true_size);
    for (int num_workers : {1, 2}) {
      const double other = CheckpointSize(quantizer, num_workers);
      EXPECT_LE(compressed, 1.1 * other);
      EXPECT_LE(other, 1.1 * compressed);
    }
  };
  run(ModelBig());
  run(ModelSmallBig());
}

/// `QuantizeTest._test_exclude(factory)`; `len(quantizer._qparams)` is `quantized_names().size()`.
template <template <class> class Q, class Options>
void TestExclude(Options options) {
  options.min_size_mb(0);
  {
    nn::Conv1d model(nn::Conv1dOptions(3, 64, 4).stride(1));
    Q<nn::Conv1d> quantizer(model, Options(options).exclude({"bias"}));
    EXPECT_EQ(quantizer.quantized_names().size(), 1u);
  }
  {
    nn::Conv1d model(nn::Conv1dOptions(3, 64, 4).stride(1));
    Q<nn::Conv1d> quantizer(model, Options(options).exclude({"bias", "weight"}));
    EXPECT_EQ(quantizer.quantized_names().size(), 0u);
  }
  {
    nn::Sequential model;
    for (int i = 0; i < 6; ++i) model->push_back(nn::Conv1d(nn::Conv1dOptions(32, 32, 4)));
    Q<nn::Sequential> quantizer(model, Options(options).exclude({"[024].*"}));
    EXPECT_EQ(quantizer.quantized_names().size(), 6u);
  }
}

/// `for p, ref in zip(params, refs): assert(Not)AlmostEqual(norm(p.data - ref), 0)`.
::testing::AssertionResult AllAlmostEqual(const std::vector<torch::Tensor>& params,
                                          const std::vector<torch::Tensor>& refs) {
  for (size_t i = 0; i < params.size(); ++i) {
    auto r = AlmostZero(Norm(params[i] - refs[i]));
    if (!r) return r << " (parameter " << i << ")";
  }
  return ::testing::AssertionSuccess();
}
::testing::AssertionResult AllNotAlmostEqual(const std::vector<torch::Tensor>& params,
                                             const std::vector<torch::Tensor>& refs) {
  for (size_t i = 0; i < params.size(); ++i) {
    auto r = NotAlmostZero(Norm(params[i] - refs[i]));
    if (!r) return r << " (parameter " << i << ")";
  }
  return ::testing::AssertionSuccess();
}

/// `test_float16` of every quantizer: nothing quantized (min_size 100000), every parameter
/// stored in fp16, so `quantize()` gives each its fp16-rounded value.
template <template <class> class Q, class Options>
void TestFloat16(Options options) {
  ForEachModel([&](auto make) {
    auto model = make();
    Q<decltype(model)> quantizer(model, options.min_size_mb(100000).float16(true));
    auto params = model->parameters();
    auto refs = Clones(params);
    quantizer.quantize();
    for (size_t i = 0; i < params.size(); ++i) {
      EXPECT_TRUE(AlmostZero(Norm(refs[i].to(torch::kHalf).to(torch::kFloat) - params[i])));
    }
  });
}

diffq::DiffQOptions DiffQ() {
  return diffq::DiffQOptions().group_size(1);
}  // reference defaults
diffq::LSQOptions Lsq() {
  return diffq::LSQOptions().bits(8);
}  // reference defaults

template <class M>
using DiffQuantizer = diffq::DiffQuantizer<M>;
template <class M>
using UniformQuantizer = diffq::UniformQuantizer<M>;
template <class M>
using LSQ = diffq::LSQQuantizer<M>;

// =================================================================================================
// test_diffq.py: TestDiffQ

TEST(ReferenceDiffQ, test_save_restore_state) {
  torch::manual_seed(0);
  TestSaveRestoreState<DiffQuantizer>(DiffQ().min_size_mb(0));
  TestSaveRestoreState<DiffQuantizer>(DiffQ().min_size_mb(0.1));
  TestSaveRestoreState<DiffQuantizer>(DiffQ().min_size_mb(0.1).float16(true));
}

TEST(ReferenceDiffQ, test_float16) {
  torch::manual_seed(0);
  TestFloat16<DiffQuantizer>(DiffQ());
}

TEST(ReferenceDiffQ, test_init) {
  torch::manual_seed(0);
  auto model = ModelSmall();
  DiffQuantizer<nn::Sequential> quantizer(model, DiffQ().init_bits(5).min_size_mb(0));
  auto bits = quantizer.bits(quantizer.quantized_names()[0]);
  EXPECT_TRUE((bits == 5).all().item<bool>()) << bits;
}

TEST(ReferenceDiffQ, test_does_something) {
  torch::manual_seed(0);
  ForEachModel([&](auto make) {
    for (int64_t group_size : {0, 1, 4, 8}) {
      auto model = make();
      auto params = model->parameters();
      auto refs = Clones(params);
      DiffQuantizer<decltype(model)> quantizer(model,
                                               DiffQ().group_size(group_size).min_size_mb(0));
      quantizer.quantize();
      EXPECT_TRUE(AllNotAlmostEqual(params, refs)) << "group_size " << group_size;
    }
  });
}

TEST(ReferenceDiffQ, test_detach) {
  torch::manual_seed(0);
  auto model = ModelSmall();
  DiffQuantizer<nn::Sequential> quantizer(model, DiffQ().min_size_mb(0));
  // assertRaises(RuntimeError): a second quantizer on the same model.
  ExpectError([&] { DiffQuantizer<nn::Sequential> again(model, DiffQ().min_size_mb(0)); },
              "wrap a model only once, or detach() the previous quantizer");
  quantizer.detach();
  DiffQuantizer<nn::Sequential> again(model, DiffQ().min_size_mb(0));
}

TEST(ReferenceDiffQ, test_setup_optimizer) {
  torch::manual_seed(0);
  nn::Linear model(36, 4);
  {
    DiffQuantizer<nn::Linear> quantizer(model, DiffQ().min_size_mb(0));
    torch::optim::Adam opt(model->parameters());
    ExpectError([&] { quantizer.setup_optimizer(opt); }, "the optimizer already holds the logit");
    quantizer.detach();
  }
  torch::optim::Adam opt(model->parameters());
  DiffQuantizer<nn::Linear> quantizer(model, DiffQ().init_bits(9).min_size_mb(0));
  quantizer.setup_optimizer(opt);

  auto x = torch::randn({4, 36});
  quantizer.forward(x).sum().backward();
  opt.step();
  auto bits = quantizer.bits(quantizer.quantized_names()[0]);
  EXPECT_TRUE(NotAlmostZero(Norm(bits - 9)));
}

TEST(ReferenceDiffQ, test_quantize_on_eval) {
  torch::manual_seed(0);
  auto x = torch::randn({1, 16});
  auto model = Mlp16();

  auto params = model->parameters();
  auto refs = Clones(params);
  DiffQuantizer<nn::Sequential> quant(model, DiffQ().min_size_mb(0));
  quant.no_optimizer();

  EXPECT_TRUE(AllAlmostEqual(params, refs));
  // The reference's forward hooks put the original parameters back right after each forward.
  // Here a forward with grad mode on that is never backpropagated keeps its substitute (noisy or
  // quantized weights) until the quantizer's next call (README, Limitations, No forward hooks);
  // restore_clean_weights() ends it.
  quant.forward(x);
  EXPECT_TRUE(AllNotAlmostEqual(params, refs));  // the noisy substitute
  quant.restore_clean_weights();
  // At train time, nothing should happen on the original param.
  EXPECT_TRUE(AllAlmostEqual(params, refs));
  model->eval();
  quant.forward(x);
  EXPECT_TRUE(AllNotAlmostEqual(params, refs));  // the quantized substitute
  quant.restore_clean_weights();
  EXPECT_TRUE(AllAlmostEqual(params, refs));
  quant.quantize();
  EXPECT_TRUE(AllNotAlmostEqual(params, refs));
  model->train();
  quant.forward(x);
  EXPECT_FALSE(quant.is_quantized());  // a training forward ends quantize(), as the reference's
  EXPECT_TRUE(AllNotAlmostEqual(params, refs));  // the noisy substitute
  quant.restore_clean_weights();
  // Back to train, going back to the same params
  EXPECT_TRUE(AllAlmostEqual(params, refs));

  // Forwards that no backward follows (grad mode off) restore the clean weights at once: there
  // the reference's sequence holds as it is.
  {
    torch::NoGradGuard no_grad;
    quant.forward(x);
    EXPECT_TRUE(AllAlmostEqual(params, refs));
    model->eval();
    quant.forward(x);
    EXPECT_TRUE(AllAlmostEqual(params, refs));
    quant.quantize();
    EXPECT_TRUE(AllNotAlmostEqual(params, refs));
    model->train();
    quant.forward(x);
    EXPECT_TRUE(AllAlmostEqual(params, refs));
  }
  GTEST_SKIP() << "documented difference: README, Limitations, No forward hooks";
}

TEST(ReferenceDiffQ, test_forward) {
  torch::manual_seed(0);
  auto x = torch::randn({1, 16});
  auto model = Mlp16();

  auto y = model->forward(x);
  auto y2 = model->forward(x);
  EXPECT_TRUE(AlmostZero(Norm(y - y2)));

  DiffQuantizer<nn::Sequential> quant(model, DiffQ().min_size_mb(0));
  quant.no_optimizer();
  model->train();
  // In training mode, two evals will be different because of the injected noise. Here several
  // training forwards before one backward share one noise sample (README, Limitations, No forward
  // hooks): a new sample comes with the next step.
  y = quant.forward(x);
  y2 = quant.forward(x);
  EXPECT_TRUE(AlmostZero(Norm(y - y2)));  // one sample
  (y + y2).sum().backward();
  y2 = quant.forward(x);
  EXPECT_TRUE(NotAlmostZero(Norm(y - y2)));  // the next step's sample
  y2.sum().backward();

  model->eval();
  // But at eval, no noise is injected.
  y = quant.forward(x);
  y2 = quant.forward(x);
  EXPECT_TRUE(AlmostZero(Norm(y - y2)));

  // Training forwards that no backward follows (grad mode off) each draw their own sample: there
  // the reference's assertion holds as it is.
  {
    torch::NoGradGuard no_grad;
    model->train();
    y = quant.forward(x);
    y2 = quant.forward(x);
    EXPECT_TRUE(NotAlmostZero(Norm(y - y2)));
  }
  GTEST_SKIP() << "documented difference: README, Limitations, No forward hooks";
}

TEST(ReferenceDiffQ, test_lstm) {
  torch::manual_seed(0);
  auto x = torch::randn({4, 5, 16});
  nn::LSTM lstm(nn::LSTMOptions(16, 32).num_layers(2));
  auto ref_y = std::get<0>(lstm->forward(x));
  DiffQuantizer<nn::LSTM> quant(lstm, DiffQ().min_size_mb(0));
  quant.no_optimizer();
  auto y = std::get<0>(quant.forward(x));
  EXPECT_TRUE(NotAlmostZero(Norm(y - ref_y)));
}

TEST(ReferenceDiffQ, test_model_size) {
  torch::manual_seed(0);
  ForEachModel([&](auto make) {
    auto model = make();
    DiffQuantizer<decltype(model)> quantizer(model, DiffQ().min_size_mb(0));
    auto model_size = quantizer.model_size();
    model_size.backward();
  });
}

TEST(ReferenceDiffQ, test_true_model_size) {
  torch::manual_seed(0);
  auto base = DiffQ().init_bits(9).float16(false).min_size_mb(0);
  TestTrueModelSize<DiffQuantizer>(diffq::DiffQOptions(base).group_size(8), true, 2,
                                   "init_bits=9, group_size=8");
  TestTrueModelSize<DiffQuantizer>(diffq::DiffQOptions(base).group_size(0), true, 2,
                                   "init_bits=9, group_size=0");
  TestTrueModelSize<DiffQuantizer>(base, true, 2, "init_bits=9");
  TestTrueModelSize<DiffQuantizer>(diffq::DiffQOptions(base).init_bits(5), true, 2, "init_bits=5");
}

TEST(ReferenceDiffQ, test_exclude) {
  torch::manual_seed(0);
  TestExclude<DiffQuantizer>(DiffQ());
}

TEST(ReferenceDiffQ, test_bound) {
  torch::manual_seed(0);
  nn::Linear one(16, 16);
  TestBound two;
  TestBound two_detect;

  DiffQuantizer<nn::Linear> quant_one(one, DiffQ().min_size_mb(0).detect_bound(false));
  // quant_two = DiffQuantizer(two, detect_bound=False): refused here (README, Limitations).
  ExpectError(
      [&] { DiffQuantizer<TestBound> quant_two(two, DiffQ().min_size_mb(0).detect_bound(false)); },
      "tied parameters need detect_bound(true)");
  DiffQuantizer<TestBound> quant_two_detect(two_detect, DiffQ().min_size_mb(0).detect_bound(true));

  EXPECT_EQ(quant_one.true_model_size(), quant_two_detect.true_model_size());

  // qps[0].logit is qps[2].logit: a.weight and b.weight share one logit.
  EXPECT_TRUE(quant_two_detect.logit("a.weight").is_same(quant_two_detect.logit("b.weight")));
  EXPECT_TRUE(quant_two_detect.logit("a.bias").is_same(quant_two_detect.logit("b.bias")));

  auto x = torch::randn({1, 16});
  quant_two_detect.no_optimizer();
  torch::Tensor ya, yb;
  std::tie(ya, yb) = quant_two_detect.forward(x);
  EXPECT_TRUE(AlmostZero(Norm(ya - yb)));
  (ya + yb).sum().backward();

  // Not run: quant_two.true_model_size() == 2 * quant_one.true_model_size(), qps[0].logit is not
  // qps[2].logit, and the two outputs of `two` differing (each name quantized separately).
  GTEST_SKIP() << "documented difference: README, Limitations, Tied parameters";
}

TEST(ReferenceDiffQ, test_restore) {
  torch::manual_seed(0);
  nn::Linear model(nn::LinearOptions(53, 8).bias(false));
  DiffQuantizer<nn::Linear> quant(model, DiffQ().min_size_mb(0).group_size(8));
  {
    torch::NoGradGuard no_grad;
    for (auto& item : model->named_parameters()) {
      const auto& n = item.key();
      if (n.size() >= quant.aux_suffix().size() &&
          n.compare(n.size() - quant.aux_suffix().size(), std::string::npos, quant.aux_suffix()) ==
              0) {
        item.value().uniform_(-2, 2);
      }
    }
  }
  std::vector<uint8_t> state;
  diffq::save_quantized(quant, state);

  auto compare = [&](const nn::Linear& model2) {
    diffq::QuantizedGuard<DiffQuantizer<nn::Linear>> guard(quant);
    auto p1 = model->parameters(), p2 = model2->parameters();
    for (size_t i = 0; i < std::min(p1.size(), p2.size()); ++i) {
      EXPECT_TRUE(AlmostZero(Norm(p1[i] - p2[i])));
    }
  };
  nn::Linear model2(nn::LinearOptions(53, 8).bias(false));
  diffq::load_quantized(model2, state);  // diffq.restore_quantized_state(model2, state)
  compare(model2);

  // The reference's second half restores from `get_quantized_state(torch_pack=True)`, a
  // TorchScript-compatible bit packing this library does not have (one checkpoint format); the
  // other path to that format, a file, takes its place.
  char path[] = "/tmp/diffq_reference_restore_XXXXXX";
  const int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  close(fd);
  diffq::save_quantized(quant, std::string(path));
  nn::Linear model3(nn::LinearOptions(53, 8).bias(false));
  diffq::load_quantized(model3, std::string(path));
  std::remove(path);
  compare(model3);
}

TEST(ReferenceDiffQ, test_repr) {
  torch::manual_seed(0);
  nn::Linear model(nn::LinearOptions(53, 8).bias(false));
  DiffQuantizer<nn::Linear> quant(model, DiffQ().min_size_mb(0).group_size(8));
  // What the repr shows ("min_size=0", "group_size=8") is in the options.
  EXPECT_EQ(quant.options().min_size_mb(), 0);
  EXPECT_EQ(quant.options().group_size(), 8);
  GTEST_SKIP() << "documented difference: README, Limitations, No Python object model";
}

/// A small stand-in for torchvision's resnet18 (convolutions, BatchNorm, a Linear head), so that
/// the export check stays fast: some tensors above the default min_size, some below.
struct SmallConvNetImpl : nn::Module {
  SmallConvNetImpl()
      : conv1(register_module("conv1", nn::Conv2d(nn::Conv2dOptions(3, 32, 3).padding(1)))),
        bn1(register_module("bn1", nn::BatchNorm2d(32))),
        conv2(register_module("conv2", nn::Conv2d(nn::Conv2dOptions(32, 64, 3).padding(1)))),
        bn2(register_module("bn2", nn::BatchNorm2d(64))),
        conv3(register_module("conv3", nn::Conv2d(nn::Conv2dOptions(64, 64, 3).padding(1)))),
        fc(register_module("fc", nn::Linear(64, 10))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = torch::relu(bn1(conv1(x)));
    h = torch::max_pool2d(torch::relu(bn2(conv2(h))), 2);
    h = torch::relu(conv3(h)).mean({2, 3});
    return fc(h);
  }
  nn::Conv2d conv1;
  nn::BatchNorm2d bn1;
  nn::Conv2d conv2;
  nn::BatchNorm2d bn2;
  nn::Conv2d conv3;
  nn::Linear fc;
};
TORCH_MODULE(SmallConvNet);

TEST(ReferenceDiffQ, test_torchscript_export) {
  torch::manual_seed(0);
  SmallConvNet model;
  DiffQuantizer<SmallConvNet> quant(model, DiffQ());
  {
    torch::NoGradGuard no_grad;
    for (const auto& name : quant.quantized_names()) quant.logit(name).uniform_(-1, 1);
  }
  const double ms = quant.true_model_size();
  model->eval();
  torch::NoGradGuard no_grad;
  auto x = torch::randn({1, 3, 32, 32});
  auto y = quant.forward(x);
  // The checkpoint is this library's export: its size against true_model_size, and the model it
  // reloads (without a quantizer) against the quantized model, as the reference checks its
  // TorchScript file.
  char path[] = "/tmp/diffq_reference_export_XXXXXX";
  const int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  close(fd);
  diffq::save_quantized(quant, std::string(path));
  FILE* f = std::fopen(path, "rb");
  ASSERT_NE(f, nullptr);
  std::fseek(f, 0, SEEK_END);
  const double size = static_cast<double>(std::ftell(f)) / kMB;
  std::fclose(f);
  EXPECT_LE(size, 1.2 * ms) << size << " " << ms;
  SmallConvNet ts;
  diffq::load_quantized(ts, std::string(path));
  std::remove(path);
  ts->eval();
  auto y2 = ts->forward(x);
  EXPECT_TRUE(AlmostZero(Norm(y - y2)));
  GTEST_SKIP() << "documented difference: README, Limitations, No Python object model";
}

// =================================================================================================
// test_uniform.py: TestUniform

TEST(ReferenceUniform, test_save_restore_state) {
  torch::manual_seed(0);
  TestSaveRestoreState<UniformQuantizer>(diffq::UniformOptions().min_size_mb(0));
  TestSaveRestoreState<UniformQuantizer>(diffq::UniformOptions().min_size_mb(0.1));
  TestSaveRestoreState<UniformQuantizer>(diffq::UniformOptions().min_size_mb(0.1).float16(true));
}

TEST(ReferenceUniform, test_float16) {
  torch::manual_seed(0);
  TestFloat16<UniformQuantizer>(diffq::UniformOptions());
}

TEST(ReferenceUniform, test_delta) {
  torch::manual_seed(0);
  ForEachModel([&](auto make) {
    auto model = make();
    // The reference also runs bits=9.6; UniformOptions::bits is an integer here.
    for (int64_t bits : {1, 4, 8, 15}) {
      auto params = model->parameters();
      auto refs = Clones(params);
      UniformQuantizer<decltype(model)> quantizer(
          model, diffq::UniformOptions().bits(bits).min_size_mb(0));
      quantizer.quantize();
      for (size_t i = 0; i < params.size(); ++i) {
        const double scale = (refs[i].max() - refs[i].min()).template item<double>();
        const double delta = scale / (std::exp2(static_cast<double>(bits)) - 1);
        EXPECT_LE((refs[i] - params[i]).abs().max().template item<double>(), delta)
            << "bits " << bits;
      }
    }
  });
}

TEST(ReferenceUniform, test_qat) {
  torch::manual_seed(0);
  auto x = torch::randn({1, 16});

  auto model = Mlp16();
  auto params = model->parameters();
  auto refs = Clones(params);
  auto ref_y = model->forward(x);

  UniformQuantizer<nn::Sequential> quant(model, diffq::UniformOptions().min_size_mb(0).qat(true));
  EXPECT_TRUE(AllAlmostEqual(params, refs));
  auto y = quant.forward(x);
  EXPECT_TRUE(NotAlmostZero(Norm(y - ref_y)));
  // The reference's forward hook puts the original parameters back right after the forward; here
  // the quantized weights stay until the backward (README, Limitations, No forward hooks).
  EXPECT_TRUE(AllNotAlmostEqual(params, refs));
  y.sum().backward();
  EXPECT_TRUE(AllAlmostEqual(params, refs));
  // A forward that no backward follows (grad mode off) restores them at once, as the reference.
  {
    torch::NoGradGuard no_grad;
    y = quant.forward(x);
    EXPECT_TRUE(NotAlmostZero(Norm(y - ref_y)));
    EXPECT_TRUE(AllAlmostEqual(params, refs));
  }
  GTEST_SKIP() << "documented difference: README, Limitations, No forward hooks";
}

TEST(ReferenceUniform, test_lstm) {
  torch::manual_seed(0);
  auto x = torch::randn({4, 5, 16});
  nn::LSTM lstm(nn::LSTMOptions(16, 32).num_layers(2));
  auto ref_y = std::get<0>(lstm->forward(x));
  UniformQuantizer<nn::LSTM> quant(lstm, diffq::UniformOptions().min_size_mb(0).qat(true));
  auto y = std::get<0>(quant.forward(x));
  EXPECT_TRUE(NotAlmostZero(Norm(y - ref_y)));
}

TEST(ReferenceUniform, test_true_model_size) {
  torch::manual_seed(0);
  using O = diffq::UniformOptions;
  TestTrueModelSize<UniformQuantizer>(O().bits(15).float16(false).min_size_mb(0), false, 0,
                                      "bits=15");
  TestTrueModelSize<UniformQuantizer>(O().bits(8).float16(false).min_size_mb(0), false, 0,
                                      "bits=8");
  TestTrueModelSize<UniformQuantizer>(O().bits(5).float16(false).min_size_mb(0), false, 0,
                                      "bits=5");
  TestTrueModelSize<UniformQuantizer>(O().bits(8).float16(false).min_size_mb(0), false, 0,
                                      "bits=8");
  TestTrueModelSize<UniformQuantizer>(O().bits(8).float16(false).min_size_mb(0.5), false, 0,
                                      "bits=8, min_size=0.5");
  TestTrueModelSize<UniformQuantizer>(O().bits(8).float16(true).min_size_mb(0.5), false, 0,
                                      "bits=8, min_size=0.5, float16");
}

TEST(ReferenceUniform, test_resume_training) {
  torch::manual_seed(0);
  nn::Linear m(16, 32);
  auto x = torch::randn({4, 16});
  UniformQuantizer<nn::Linear> quant(m, diffq::UniformOptions().min_size_mb(0));

  auto y_train = quant.forward(x);
  m->eval();
  auto y_test = quant.forward(x);
  m->train();
  auto y_train_post = quant.forward(x);

  EXPECT_TRUE(NotAlmostZero(Norm(y_train - y_test)));
  EXPECT_TRUE(AlmostZero(Norm(y_train - y_train_post)));
}

TEST(ReferenceUniform, test_exclude) {
  torch::manual_seed(0);
  TestExclude<UniformQuantizer>(diffq::UniformOptions());
}

TEST(ReferenceUniform, test_bound) {
  torch::manual_seed(0);
  nn::Linear one(16, 16);
  nn::ModuleList two;
  nn::Linear first(16, 16);
  two->push_back(first);
  two->push_back(SharedLinear(first->weight, first->bias));

  UniformQuantizer<nn::Linear> quant_one(
      one, diffq::UniformOptions().min_size_mb(0).detect_bound(false));
  ExpectError(
      [&] {
        UniformQuantizer<nn::ModuleList> quant_two(
            two, diffq::UniformOptions().min_size_mb(0).detect_bound(false));
      },
      "tied parameters need detect_bound(true)");
  UniformQuantizer<nn::ModuleList> quant_two_detect(
      two, diffq::UniformOptions().min_size_mb(0).detect_bound(true));

  EXPECT_EQ(quant_one.true_model_size(), quant_two_detect.true_model_size());
  // Not run: quant_two.true_model_size() == 2 * quant_one.true_model_size().
  GTEST_SKIP() << "documented difference: README, Limitations, Tied parameters";
}

// =================================================================================================
// test_lsq.py: TestLSQ

TEST(ReferenceLSQ, test_save_restore_state) {
  torch::manual_seed(0);
  TestSaveRestoreState<LSQ>(Lsq().min_size_mb(0));
  TestSaveRestoreState<LSQ>(Lsq().min_size_mb(0.1));
  TestSaveRestoreState<LSQ>(Lsq().min_size_mb(0.1).float16(true));
}

TEST(ReferenceLSQ, test_float16) {
  torch::manual_seed(0);
  TestFloat16<LSQ>(Lsq());
}

TEST(ReferenceLSQ, test_true_model_size) {
  torch::manual_seed(0);
  using O = diffq::LSQOptions;
  TestTrueModelSize<LSQ>(O().bits(15).float16(false).min_size_mb(0), false, 0, "bits=15");
  TestTrueModelSize<LSQ>(O().bits(8).float16(false).min_size_mb(0), false, 0, "bits=8");
  TestTrueModelSize<LSQ>(O().bits(5).float16(false).min_size_mb(0), false, 0, "bits=5");
  TestTrueModelSize<LSQ>(O().bits(8).float16(false).min_size_mb(0), false, 0, "bits=8");
  TestTrueModelSize<LSQ>(O().bits(8).float16(false).min_size_mb(0.5), false, 0,
                         "bits=8, min_size=0.5");
  TestTrueModelSize<LSQ>(O().bits(8).float16(true).min_size_mb(0.5), false, 0,
                         "bits=8, min_size=0.5, float16");
}

TEST(ReferenceLSQ, test_exclude) {
  torch::manual_seed(0);
  TestExclude<LSQ>(Lsq());
}

TEST(ReferenceLSQ, test_forward) {
  torch::manual_seed(0);
  nn::Linear model(nn::LinearOptions(16, 16).bias(false));
  auto x = torch::randn({4, 16});
  auto y = model->forward(x);

  LSQ<nn::Linear> quant(model, Lsq().min_size_mb(0));
  // assertRaises(RuntimeError): a training forward before setup_optimizer / no_optimizer.
  ExpectError([&] { quant.forward(x); }, "before a training forward");

  quant.no_optimizer();
  auto y2 = quant.forward(x);
  model->eval();
  // Between a training forward (y2, whose graph is alive) and its backward, an eval forward must
  // run under torch::NoGradGuard (README, Limitations, No forward hooks): with grad mode on it is
  // refused.
  ExpectError([&] { quant.forward(x); }, "an eval forward with grad mode on while");
  torch::Tensor y3;
  {
    torch::NoGradGuard no_grad;
    y3 = quant.forward(x);
  }

  EXPECT_TRUE(NotAlmostZero(Norm(y - y2)));
  EXPECT_TRUE(AlmostZero(Norm(y2 - y3), 6));
  GTEST_SKIP() << "documented difference: README, Limitations, No forward hooks";
}

}  // namespace
