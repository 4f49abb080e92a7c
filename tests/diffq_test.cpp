// End-to-end through the umbrella header: train a few steps with DiffQ, export the compressed
// checkpoint, load it into a fresh model without a quantizer, and compare eval outputs bit for bit.
#include <diffq/diffq.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstring>
#include <vector>

namespace {

struct NetImpl : torch::nn::Module {
  NetImpl()
      : conv(register_module("conv",
                             torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3).padding(1)))),
        bn(register_module("bn", torch::nn::BatchNorm2d(4))),
        fc(register_module("fc", torch::nn::Linear(4 * 6 * 6, 5))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc(torch::relu(bn(conv(x))).flatten(1)); }
  torch::nn::Conv2d conv;
  torch::nn::BatchNorm2d bn;
  torch::nn::Linear fc;
};
TORCH_MODULE(Net);

TEST(DiffQ, TrainExportLoadGivesTheQuantizerEvalOutputsBitForBit) {
  torch::manual_seed(0);
  Net model;
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-2));
  diffq::DiffQuantizer<Net> q(model,
                              diffq::DiffQOptions().group_size(7).min_size_mb(0).exclude({"bn.*"}));
  q.setup_optimizer(opt, 0.1);
  auto x = torch::randn({16, 1, 6, 6});
  auto y = torch::randint(0, 5, {16}, torch::kLong);
  const double start_bits = q.mean_bits();
  for (int step = 0; step < 10; ++step) {
    auto loss = torch::nn::functional::cross_entropy(q.forward(x), y) + 1000.0 * q.penalty();
    opt.zero_grad();
    loss.backward();
    opt.step();
  }
  EXPECT_LT(q.mean_bits(), start_bits);  // the penalty pulled the bit widths down
  model->eval();
  torch::NoGradGuard no_grad;
  auto expected = q.forward(x);

  std::vector<uint8_t> bytes;
  const std::size_t size = diffq::save_quantized(q, bytes);
  EXPECT_EQ(size, bytes.size());
  Net fresh;
  fresh->eval();
  diffq::load_quantized(fresh, bytes);
  auto actual = fresh->forward(x);
  ASSERT_EQ(actual.sizes(), expected.sizes());
  EXPECT_EQ(std::memcmp(actual.data_ptr(), expected.data_ptr(), actual.numel() * sizeof(float)), 0);
  // The checkpoint is smaller than the fp32 parameters.
  int64_t fp32_bytes = 0;
  for (const auto& p : fresh->parameters()) fp32_bytes += p.numel() * 4;
  EXPECT_LT(static_cast<int64_t>(size), fp32_bytes);
}

}  // namespace
