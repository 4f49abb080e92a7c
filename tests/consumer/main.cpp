// A program built against the installed diffq package (find_package(DiffQ)), and against diffq's
// source tree added with add_subdirectory() (tests/subproject).
//   diffq_consumer [--distributed yes|no]
// checks whether diffq/diffq.h brought diffq/distributed.h (DIFFQ_HAS_DISTRIBUTED); with it, the
// DiffQ step also runs through a DataParallel of one process.
#include <diffq/diffq.h>
#include <torch/torch.h>

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <iostream>
#include <string>

int main(int argc, char** argv) {
#ifdef DIFFQ_HAS_DISTRIBUTED
  const bool distributed = true;
#else
  const bool distributed = false;
#endif
  if (argc == 3 && std::string(argv[1]) == "--distributed" &&
      (std::string(argv[2]) == "yes") != distributed) {
    std::cout << "diffq consumer: distributed.h " << (distributed ? "present" : "absent")
              << ", expected " << argv[2] << " FAILED\n";
    return 1;
  }
  torch::manual_seed(0);
  auto model = torch::nn::Linear(64, 32);
  diffq::DiffQuantizer<torch::nn::Linear> quantizer(model, diffq::DiffQOptions().group_size(8));
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-3));
  quantizer.setup_optimizer(optimizer);
#ifdef DIFFQ_HAS_DISTRIBUTED
  const std::string store = "/tmp/diffq_consumer_store_" + std::to_string(getpid());
  std::remove(store.c_str());
  diffq::DataParallel parallel(diffq::gloo_group_from_file(store, 0, 1), quantizer);
#endif
  auto loss = quantizer.forward(torch::randn({4, 64})).pow(2).mean() + quantizer.penalty();
  loss.backward();
#ifdef DIFFQ_HAS_DISTRIBUTED
  parallel.sync_gradients();
  std::remove(store.c_str());
#endif
  optimizer.step();
  const double size_mb = quantizer.true_model_size();
  // 2048 weights at 8 bits + 32 fp32 biases: about 2 KiB.
  const bool ok = std::isfinite(loss.item<double>()) && size_mb > 0.001 && size_mb < 0.01;
  std::cout << "diffq consumer: loss=" << loss.item<double>() << " true_model_size_mb=" << size_mb
            << " distributed=" << (distributed ? "yes" : "no") << (ok ? " OK" : " FAILED") << "\n";
  return ok ? 0 : 1;
}
