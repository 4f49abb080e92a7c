#pragma once
// DiffQ's training forward written out as explicit tensor operations, for the tests: the paper's
// bit widths and noisy weights as differentiable functions of the weights and logits.
#include <diffq/options.h>

#include <torch/torch.h>

#include <cmath>

namespace diffq_test {

/// Bit widths from logits by the paper's formula (reference `_get_bits`), as explicit tensor ops.
inline torch::Tensor RefBits(const torch::Tensor& logit, const diffq::DiffQOptions& o) {
  auto t = torch::sigmoid(logit);
  if (o.param() == diffq::Param::kBits) return o.min_bits() + (o.max_bits() - o.min_bits()) * t;
  const double log_min = std::log(1.0 / (std::pow(2.0, o.max_bits()) - 1));
  const double log_max = std::log(1.0 / (std::pow(2.0, o.min_bits()) - 1));
  auto s = torch::exp(t * log_min + (1 - t) * log_max);
  return torch::log2(1 + 1 / s);
}

/// Noisy weight `w + (max w − min w)/(2^b − 1)·u` as a differentiable function of w and the logit.
inline torch::Tensor RefNoisy(const torch::Tensor& w, const torch::Tensor& logit,
                              const torch::Tensor& u, const diffq::DiffQOptions& o) {
  const int64_t n = w.numel();
  const int64_t gs = o.group_size() == 0 ? n : o.group_size();
  auto unit = 1 / (torch::pow(2.0, RefBits(logit, o)) - 1);
  auto unit_e = unit.repeat_interleave(gs).narrow(0, 0, n).view(w.sizes());
  return w + (w.max() - w.min()) * unit_e * u.to(w.scalar_type());
}

}  // namespace diffq_test
