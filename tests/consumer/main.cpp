// A program built against the installed diffq package (find_package(DiffQ)), and against diffq's
// source tree added with add_subdirectory() (tests/subproject).
#include <diffq/diffq.h>
#include <torch/torch.h>

#include <cmath>
#include <iostream>

int main() {
  torch::manual_seed(0);
  auto model = torch::nn::Linear(64, 32);
  diffq::DiffQuantizer<torch::nn::Linear> quantizer(model, diffq::DiffQOptions().group_size(8));
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-3));
  quantizer.setup_optimizer(optimizer);
  auto loss = quantizer.forward(torch::randn({4, 64})).pow(2).mean() + quantizer.penalty();
  loss.backward();
  optimizer.step();
  const double size_mb = quantizer.true_model_size();
  // 2048 weights at 8 bits + 32 fp32 biases: about 2 KiB.
  const bool ok = std::isfinite(loss.item<double>()) && size_mb > 0.001 && size_mb < 0.01;
  std::cout << "diffq consumer: loss=" << loss.item<double>() << " true_model_size_mb=" << size_mb
            << (ok ? " OK" : " FAILED") << "\n";
  return ok ? 0 : 1;
}
