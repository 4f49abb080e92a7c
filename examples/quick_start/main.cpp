// Quick start: wrap a model in diffq::DiffQuantizer, train a few steps on synthetic data with a
// model-size penalty, and print the model size before and after.
#include <diffq/diffq.h>
#include <torch/torch.h>

#include <cstdio>

struct NetImpl : torch::nn::Module {
  NetImpl()
      : fc1(register_module("fc1", torch::nn::Linear(64, 256))),
        fc2(register_module("fc2", torch::nn::Linear(256, 10))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::relu(fc1(x))); }
  torch::nn::Linear fc1, fc2;
};
TORCH_MODULE(Net);

int main() {
  torch::manual_seed(0);
  Net model;
  // 1. The optimizer first, on the model's own parameters.
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-3));
  // 2. The quantizer: one learnable bit width per group of 16 weights; tiny tensors stay fp32.
  diffq::DiffQuantizer<Net> quantizer(model,
                                      diffq::DiffQOptions().group_size(16).min_size_mb(0.01));
  // 3. The bit-width logits get their own param group.
  quantizer.setup_optimizer(optimizer, /*lr=*/1e-2);

  const double lambda = 1.0;  // trades model size (MB) for accuracy
  auto x = torch::randn({512, 64});
  auto y = (x.narrow(1, 0, 10).argmax(1));  // a learnable synthetic task
  std::printf("start: true model size %.4f MB, mean bits %.2f\n", quantizer.true_model_size(),
              quantizer.mean_bits());
  for (int step = 0; step < 200; ++step) {
    auto loss = torch::nn::functional::cross_entropy(quantizer.forward(x), y) +
                lambda * quantizer.penalty();
    optimizer.zero_grad();
    loss.backward();
    optimizer.step();
    if (step % 50 == 0) std::printf("step %3d loss %.4f\n", step, loss.item<double>());
  }
  model->eval();
  torch::NoGradGuard no_grad;
  const double acc = quantizer.forward(x).argmax(1).eq(y).to(torch::kDouble).mean().item<double>();
  std::printf("end: true model size %.4f MB (fp32: %.4f MB), mean bits %.2f, accuracy %.3f\n",
              quantizer.true_model_size(), (64 * 256 + 256 + 256 * 10 + 10) * 4 / 1048576.0,
              quantizer.mean_bits(true), acc);
  return 0;
}
