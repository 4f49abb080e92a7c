#pragma once
// Small models shared by the quantizer tests (DiffQ, uniform/QAT, LSQ).
#include <torch/torch.h>

namespace diffq_test {

/// 10 → 6 → 3 with tanh between: fc1.weight [6, 10], fc1.bias [6], fc2.weight [3, 6], fc2.bias [3].
struct MLPImpl : torch::nn::Module {
  MLPImpl()
      : fc1(register_module("fc1", torch::nn::Linear(10, 6))),
        fc2(register_module("fc2", torch::nn::Linear(6, 3))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::tanh(fc1(x))); }
  torch::nn::Linear fc1, fc2;
};
TORCH_MODULE(MLP);

/// Output projection reusing a given weight tensor.
struct ProjImpl : torch::nn::Module {
  explicit ProjImpl(const torch::Tensor& w) : weight(register_parameter("weight", w)) {}
  torch::Tensor forward(const torch::Tensor& x) { return torch::nn::functional::linear(x, weight); }
  torch::Tensor weight;
};
TORCH_MODULE(Proj);

/// Embedding(7, 5) whose weight is tied to the output projection: one tensor under the names
/// `emb.weight` and `out.weight`.
struct TiedImpl : torch::nn::Module {
  TiedImpl()
      : emb(register_module("emb", torch::nn::Embedding(7, 5))),
        out(register_module("out", Proj(emb->weight))) {}
  torch::Tensor forward(const torch::Tensor& idx) { return out(torch::tanh(emb(idx))); }
  torch::nn::Embedding emb;
  Proj out;
};
TORCH_MODULE(Tied);

}  // namespace diffq_test
