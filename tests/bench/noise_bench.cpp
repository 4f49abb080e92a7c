// Throughput of diffq::fill_noise against ATen's CPU normal_ / uniform_, one thread, on a tensor of
// 10M floats (40 MB: bound by memory bandwidth for the cheap generators) and on a 64K chunk that
// stays in cache (the size noise_tensor gives each stream). Medians of 7 runs of the wall time and
// of the process CPU time (which leaves out the time other processes take the core), in ns per
// element.
//
//   ./noise_bench [numel]
#include <diffq/noise.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <functional>
#include <vector>

namespace {

struct Timing {
  double wall_ns;  // median wall time per element
  double cpu_ns;   // median process CPU time per element (insensitive to sharing the cores)
};

double median7(std::vector<double> t) {
  std::sort(t.begin(), t.end());
  return t[3];
}

// Medians over 7 runs of the time per element of `reps` calls of f on n elements.
Timing time_per_element(const std::function<void()>& f, int64_t n, int reps) {
  f();  // warm up: page faults, caches
  std::vector<double> wall, cpu;
  const double elements = static_cast<double>(n) * reps;
  for (int run = 0; run < 7; ++run) {
    const std::clock_t c0 = std::clock();
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) f();
    const auto t1 = std::chrono::steady_clock::now();
    const std::clock_t c1 = std::clock();
    wall.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count() / elements);
    cpu.push_back(static_cast<double>(c1 - c0) * 1e9 / CLOCKS_PER_SEC / elements);
  }
  return {median7(wall), median7(cpu)};
}

void report(const char* name, Timing t) {
  std::printf("  %-44s %7.3f ns/element wall  %7.3f cpu\n", name, t.wall_ns, t.cpu_ns);
}

}  // namespace

int main(int argc, char** argv) {
  at::set_num_threads(1);
  const int64_t big = argc > 1 ? std::atoll(argv[1]) : 10000000;
  const char* path = "baseline (compiled ISA)";
#if DIFFQ_NOISE_AVX2_DISPATCH
  if (diffq::detail::noise_cpu_has_avx2()) path = "AVX2 clone (runtime dispatch)";
#elif defined(__AVX2__)
  path = "baseline, compiled with AVX2";
#endif
  std::printf("diffq noise bench: 1 thread, diffq path: %s\n", path);

  for (const int64_t n : {big, diffq::kNoiseChunk}) {
    const int reps = n >= 1000000 ? 1 : static_cast<int>(std::max<int64_t>(1, 20000000 / n));
    at::Tensor t = at::empty({n}, at::kFloat);
    float* p = t.data_ptr<float>();
    std::printf("%lld floats (%s):\n", static_cast<long long>(n),
                n >= 1000000 ? "memory-bound" : "in cache");
    uint64_t seed = 0;
    const Timing gauss = time_per_element(
        [&] { diffq::fill_noise(p, n, ++seed, 0, diffq::Noise::kGaussian); }, n, reps);
    const Timing gauss_base = time_per_element(
        [&] { diffq::detail::fill_noise_baseline(p, n, ++seed, 0, /*gaussian=*/true); }, n, reps);
    const Timing normal = time_per_element([&] { t.normal_(0.0, 0.5); }, n, reps);
    const Timing unif = time_per_element(
        [&] { diffq::fill_noise(p, n, ++seed, 0, diffq::Noise::kUniform); }, n, reps);
    const Timing unif_base = time_per_element(
        [&] { diffq::detail::fill_noise_baseline(p, n, ++seed, 0, /*gaussian=*/false); }, n, reps);
    const Timing uniform = time_per_element([&] { t.uniform_(-0.5, 0.5); }, n, reps);
    report("diffq::fill_noise kGaussian", gauss);
    report("diffq::detail::fill_noise_baseline Gaussian", gauss_base);
    report("at::Tensor::normal_(0, 0.5)", normal);
    report("diffq::fill_noise kUniform", unif);
    report("diffq::detail::fill_noise_baseline uniform", unif_base);
    report("at::Tensor::uniform_(-0.5, 0.5)", uniform);
  }
  return 0;
}
