#pragma once
// What the benchmarks share: the 10M-parameter MLP and the Fashion-MNIST CNN, and timing helpers.
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <utility>
#include <vector>

namespace diffq_bench {

struct MLPImpl : torch::nn::Module {
  explicit MLPImpl(const std::vector<int64_t>& sizes) {
    for (size_t i = 0; i + 1 < sizes.size(); ++i) {
      layers.push_back(
          register_module("fc" + std::to_string(i + 1), torch::nn::Linear(sizes[i], sizes[i + 1])));
    }
  }
  torch::Tensor forward(torch::Tensor x) {
    x = x.flatten(1);
    for (size_t i = 0; i < layers.size(); ++i) {
      x = layers[i]->forward(x);
      if (i + 1 < layers.size()) x = torch::relu(x);
    }
    return x;
  }
  std::vector<torch::nn::Linear> layers;
};
TORCH_MODULE(MLP);

struct CNNImpl : torch::nn::Module {
  CNNImpl()
      : conv1(register_module("conv1",
                              torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 32, 3).padding(1)))),
        conv2(register_module("conv2",
                              torch::nn::Conv2d(torch::nn::Conv2dOptions(32, 64, 3).padding(1)))),
        fc1(register_module("fc1", torch::nn::Linear(3136, 128))),
        fc2(register_module("fc2", torch::nn::Linear(128, 10))) {}
  torch::Tensor forward(torch::Tensor x) {
    x = torch::max_pool2d(torch::relu(conv1(x)), 2);
    x = torch::max_pool2d(torch::relu(conv2(x)), 2);
    return fc2(torch::relu(fc1(x.flatten(1))));
  }
  torch::nn::Conv2d conv1, conv2;
  torch::nn::Linear fc1, fc2;
};
TORCH_MODULE(CNN);

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/// `warmup` untimed steps of each, then `steps` rounds of `plain()` then `quant()`, each timed
/// (interleaved, so that machine noise hits both alike); returns their median times in seconds.
template <typename Plain, typename Quant>
std::pair<double, double> interleaved_medians(Plain&& plain, Quant&& quant, int warmup, int steps) {
  for (int i = 0; i < warmup; ++i) {
    plain();
    quant();
  }
  std::vector<double> tp, tq;
  for (int i = 0; i < steps; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    plain();
    tp.push_back(seconds_since(t0));
    t0 = std::chrono::steady_clock::now();
    quant();
    tq.push_back(seconds_since(t0));
  }
  return {median(tp), median(tq)};
}

}  // namespace diffq_bench
