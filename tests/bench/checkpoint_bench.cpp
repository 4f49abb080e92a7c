// Compressed checkpoint benchmark: export and load throughput, and file size against plain
// bit-packing, on a 10M-parameter MLP (784-2048-2048-2048-10), group size 16, bit widths
// b = round(2 + 13·sigmoid(l)) with logits l ~ U[-1, 1] (6..11 bits).
//
// Usage: checkpoint_bench [runs=5] [dir=/tmp]
// Prints, for weights ~ N(0, 0.02²) and for LibTorch's default Linear init, with 1 and 2 threads,
// the median over `runs` of:
//   quantize  building the QuantizedState with bits.h (finite_min_max + quantize_levels)
//   export    QuantizedState -> bytes -> file (save_quantized_state to a path, atomic write)
//   load      file -> read + parse + decode + dequantize -> fill a fresh model (load_quantized)
// Throughput: MB/s of fp32 weights (numel·4 / 2^20 per second). Reference Python DiffQ (1
// thread, package 0.2.4 with its Cython bitpack, Debian's python3-torch): export ~178 MB/s,
// restore ~132 MB/s.
#include <diffq/bits.h>
#include <diffq/checkpoint.h>
#include <diffq/state.h>

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

/// Process CPU time in seconds (all threads): less sensitive than wall time to other processes
/// sharing the cores.
double cpu_seconds() {
  return static_cast<double>(std::clock()) / CLOCKS_PER_SEC;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

torch::nn::Sequential make_mlp() {
  return torch::nn::Sequential(torch::nn::Linear(784, 2048), torch::nn::ReLU(),
                               torch::nn::Linear(2048, 2048), torch::nn::ReLU(),
                               torch::nn::Linear(2048, 2048), torch::nn::ReLU(),
                               torch::nn::Linear(2048, 10));
}

constexpr int64_t kGroupSize = 16;
constexpr double kMinSizeMb = 0.01;

/// The quantized state of `model` as DiffQ builds it (weights above min_size quantized, the rest
/// fp32), with bit widths from uniform logits.
diffq::QuantizedState build_state(torch::nn::Sequential& model,
                                  const std::vector<at::Tensor>& logits) {
  diffq::QuantizedState st;
  size_t li = 0;
  for (const auto& p : model->named_parameters()) {
    const at::Tensor& w = p.value();
    if (w.numel() * 4.0 / 1048576.0 <= kMinSizeMb) {
      st.floats.push_back({p.key(), w.detach().clone(), false, false});
      continue;
    }
    auto bits =
        diffq::rounded_bits(diffq::bits_from_logit(logits[li++], 2, 15, diffq::Param::kBits), 0);
    auto mm = diffq::finite_min_max(w, p.key());
    diffq::QuantizedTensor q;
    q.name = p.key();
    q.shape = w.sizes().vec();
    q.dtype = w.scalar_type();
    q.group_size = kGroupSize;
    q.bits = bits;
    q.min = mm.first;
    q.max = mm.second;
    q.levels = diffq::quantize_levels(w, bits, kGroupSize, mm.first, mm.second);
    st.quantized.push_back(std::move(q));
  }
  return st;
}

void run_variant(const char* title, bool gaussian, int runs, const std::string& dir) {
  torch::manual_seed(0);
  auto model = make_mlp();
  int64_t numel = 0;
  {
    torch::NoGradGuard ng;
    for (auto& p : model->named_parameters()) {
      if (gaussian && p.key().find("weight") != std::string::npos) p.value().normal_(0, 0.02);
      numel += p.value().numel();
    }
  }
  std::vector<at::Tensor> logits;
  for (auto& p : model->named_parameters()) {
    if (p.value().numel() * 4.0 / 1048576.0 > kMinSizeMb) {
      logits.push_back(torch::rand({diffq::num_groups(p.value().numel(), kGroupSize)}) * 2 - 1);
    }
  }
  const double mb = numel * 4.0 / 1048576.0;
  const std::string path = dir + "/diffq_checkpoint_bench.ckpt";

  // Plain bit-packed size: levels at their width, min/max (2·8 bytes) and 4-bit widths per
  // quantized tensor, fp32 for the rest.
  diffq::QuantizedState st0 = build_state(model, logits);
  double packed_bits = 0, mean_bits = 0;
  for (const auto& q : st0.quantized) {
    auto b = q.bits.to(at::kDouble);
    const int64_t n = q.levels.numel();
    double s = b.sum().item<double>() * kGroupSize;
    const int64_t g = b.size(0);
    s -= b[g - 1].item<double>() * (g * kGroupSize - n);
    packed_bits += s + 128 + 4.0 * g;
    mean_bits += s;
  }
  int64_t qnumel = 0;
  for (const auto& q : st0.quantized) qnumel += q.levels.numel();
  for (const auto& f : st0.floats) packed_bits += 32.0 * f.value.numel();
  const double packed_bytes = packed_bits / 8;

  std::printf("\n== %s: %lld parameters (%.2f MB fp32), mean %.3f bits/quantized weight ==\n",
              title, static_cast<long long>(numel), mb, mean_bits / qnumel);
  for (int threads : {1, 2}) {
    at::set_num_threads(threads);
    std::vector<double> tq, te, tl, cq, ce, cl;
    size_t file_bytes = 0;
    bool exact = true;
    for (int r = 0; r < runs; ++r) {
      auto t0 = Clock::now();
      double c0 = cpu_seconds();
      diffq::QuantizedState st = build_state(model, logits);
      tq.push_back(seconds_since(t0));
      cq.push_back(cpu_seconds() - c0);
      t0 = Clock::now();
      c0 = cpu_seconds();
      file_bytes = diffq::save_quantized_state(st, path);
      te.push_back(seconds_since(t0));
      ce.push_back(cpu_seconds() - c0);
      auto fresh = make_mlp();
      t0 = Clock::now();
      c0 = cpu_seconds();
      diffq::load_quantized(fresh, path);
      tl.push_back(seconds_since(t0));
      cl.push_back(cpu_seconds() - c0);
      if (r == 0) {
        // Loaded weights equal dequantize_levels bit for bit.
        auto params = fresh->named_parameters();
        for (const auto& q : st.quantized) {
          auto ref = diffq::dequantize_levels(q.levels, q.bits, q.group_size, q.min, q.max, q.dtype)
                         .view(q.shape);
          exact = exact && torch::equal(ref, params[q.name]);
        }
      }
    }
    const double q = median(tq), e = median(te), l = median(tl);
    std::printf(
        "threads=%d  quantize %7.1f ms (%6.0f MB/s)  export %7.1f ms (%6.0f MB/s)  "
        "quantize+export %6.0f MB/s  load %7.1f ms (%6.0f MB/s)  bit-exact=%s\n",
        threads, q * 1e3, mb / q, e * 1e3, mb / e, mb / (q + e), l * 1e3, mb / l,
        exact ? "yes" : "NO");
    std::printf(
        "           CPU time (all threads): quantize %7.1f ms  export %7.1f ms  load %7.1f ms\n",
        median(cq) * 1e3, median(ce) * 1e3, median(cl) * 1e3);
    if (threads == 1) {
      std::printf("size: file %zu bytes, bit-packed %.0f bytes, ratio %.4f\n", file_bytes,
                  packed_bytes, file_bytes / packed_bytes);
      auto info = diffq::read_checkpoint_info(path);
      for (const auto& t : info.tensors) {
        std::printf("  %-10s %-9s %9lld bytes  %s\n", t.name.c_str(), t.kind.c_str(),
                    static_cast<long long>(t.stored_bytes), t.encoding.c_str());
      }
    }
  }
  std::filesystem::remove(path);
}

}  // namespace

int main(int argc, char** argv) {
  const int runs = argc > 1 ? std::max(1, std::atoi(argv[1])) : 5;
  const std::string dir = argc > 2 ? argv[2] : "/tmp";
  run_variant("weights ~ N(0, 0.02^2)", true, runs, dir);
  run_variant("default Linear init (uniform)", false, runs, dir);
  return 0;
}
