// Tests of diffq/noise.h: the samples follow the documented laws (moments, bounds,
// Kolmogorov-Smirnov against the exact CDF), are uncorrelated across positions, lanes, streams and
// seeds, are deterministic, and the polynomial approximations meet their stated error bounds
// (checked exhaustively against libm in double precision).
//
// Tolerances are 6 standard deviations of the estimator under the tested law, computed from that
// law's exact moments; with fixed seeds the outcome is deterministic anyway.
#include <diffq/noise.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace {

using diffq::Noise;

constexpr int64_t kN = int64_t{1} << 20;  // samples per statistical test
constexpr double kSqrtN = 1024.0;
constexpr double kPi = 3.14159265358979323846;

std::vector<float> draw(int64_t n, uint64_t seed, uint64_t stream, Noise kind) {
  std::vector<float> v(static_cast<size_t>(n));
  diffq::fill_noise(v.data(), n, seed, stream, kind);
  return v;
}

// Mean of x^k over the samples (raw moment about 0).
double raw_moment(const std::vector<float>& v, int k) {
  double s = 0;
  for (float x : v) s += std::pow(static_cast<double>(x), k);
  return s / static_cast<double>(v.size());
}

// Pearson correlation of x[0..n) and y[0..n), optionally of their squares.
double correlation(const float* x, const float* y, int64_t n, bool squares = false) {
  double sx = 0, sy = 0, sxx = 0, syy = 0, sxy = 0;
  for (int64_t i = 0; i < n; ++i) {
    double a = x[i], b = y[i];
    if (squares) {
      a *= a;
      b *= b;
    }
    sx += a;
    sy += b;
    sxx += a * a;
    syy += b * b;
    sxy += a * b;
  }
  const double m = static_cast<double>(n);
  const double cov = sxy / m - (sx / m) * (sy / m);
  const double vx = sxx / m - (sx / m) * (sx / m);
  const double vy = syy / m - (sy / m) * (sy / m);
  return cov / std::sqrt(vx * vy);
}

// Kolmogorov-Smirnov statistic sup |F_n - F| of the samples against the CDF `cdf`.
double ks_statistic(std::vector<float> v, const std::function<double(double)>& cdf) {
  std::sort(v.begin(), v.end());
  const double n = static_cast<double>(v.size());
  double d = 0;
  for (size_t i = 0; i < v.size(); ++i) {
    const double f = cdf(v[i]);
    d = std::max({d, f - static_cast<double>(i) / n, static_cast<double>(i + 1) / n - f});
  }
  return d;
}

// Critical value of the KS statistic at level 1e-3 for n samples (asymptotic Kolmogorov law):
// sqrt(-ln(alpha / 2) / 2) / sqrt(n) = 1.9495 / sqrt(n).
double ks_critical_1e3(double n) {
  return std::sqrt(-std::log(1e-3 / 2) / 2) / std::sqrt(n);
}

// CDF of u = z/2, z ~ N(0, 1): Phi(2x) = erfc(-sqrt(2) x) / 2.
double half_normal_cdf(double x) {
  return 0.5 * std::erfc(-std::sqrt(2.0) * x);
}

// Message of the c10::Error thrown by f, or "" if none is thrown.
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what();
  }
  return "";
}

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// ---------------------------------------------------------------------------------------------
// Laws.

TEST(Noise, UniformMeanAndVarianceMatchUniformHalf) {
  const auto v = draw(kN, 1, 0, Noise::kUniform);
  // U[-1/2, 1/2): mean 0, E[u^2] = 1/12, E[u^4] = 1/80, E[u^8] = 1/2304.
  EXPECT_NEAR(raw_moment(v, 1), 0.0, 6 * std::sqrt(1.0 / 12) / kSqrtN);
  EXPECT_NEAR(raw_moment(v, 2), 1.0 / 12, 6 * std::sqrt(1.0 / 80 - 1.0 / 144) / kSqrtN);
  EXPECT_NEAR(raw_moment(v, 4), 1.0 / 80, 6 * std::sqrt(1.0 / 2304 - 1.0 / 6400) / kSqrtN);
}

TEST(Noise, UniformSamplesLieOnTheDocumentedGridInsideHalfOpenInterval) {
  const auto v = draw(kN, 2, 0, Noise::kUniform);
  float lo = 1, hi = -1;
  for (float x : v) {
    ASSERT_GE(x, -0.5f);
    ASSERT_LT(x, 0.5f);
    const double k = static_cast<double>(x) * 16777216.0;  // x·2^24 must be an integer
    ASSERT_EQ(k, std::floor(k)) << x;
    lo = std::min(lo, x);
    hi = std::max(hi, x);
  }
  // With 2^20 samples the extremes come within 1e-3 of the ends (P(miss) = (1 - 1e-3)^(2^20)).
  EXPECT_LT(lo, -0.499f);
  EXPECT_GT(hi, 0.499f);
}

TEST(Noise, UniformPassesKolmogorovSmirnov) {
  const auto v = draw(kN, 3, 7, Noise::kUniform);
  const double d = ks_statistic(v, [](double x) { return std::clamp(x + 0.5, 0.0, 1.0); });
  EXPECT_LT(d, ks_critical_1e3(kN));
}

TEST(Noise, GaussianMomentsMatchHalfStandardNormal) {
  const auto v = draw(kN, 5, 0, Noise::kGaussian);
  // u = z/2: E[u] = E[u^3] = 0, E[u^2] = 1/4, E[u^4] = 3/16, E[u^6] = 15/64, E[u^8] = 105/256.
  EXPECT_NEAR(raw_moment(v, 1), 0.0, 6 * 0.5 / kSqrtN);
  EXPECT_NEAR(raw_moment(v, 2), 0.25, 6 * std::sqrt(3.0 / 16 - 1.0 / 16) / kSqrtN);
  EXPECT_NEAR(raw_moment(v, 3), 0.0, 6 * std::sqrt(15.0 / 64) / kSqrtN);
  EXPECT_NEAR(raw_moment(v, 4), 3.0 / 16, 6 * std::sqrt(105.0 / 256 - 9.0 / 256) / kSqrtN);
  // Kurtosis E[u^4]/E[u^2]^2 = 3, standard error sqrt(24/n).
  const double m2 = raw_moment(v, 2);
  EXPECT_NEAR(raw_moment(v, 4) / (m2 * m2), 3.0, 6 * std::sqrt(24.0) / kSqrtN);
}

TEST(Noise, GaussianIsFiniteAndBoundedByTheTruncation) {
  const auto v = draw(kN, 6, 0, Noise::kGaussian);
  // |z| <= sqrt(-2 ln 2^-24) = 5.7681 so |u| <= 2.8841 (plus 1.1e-6 relative approximation error).
  const double bound = std::sqrt(-2 * std::log(std::ldexp(1.0, -24))) / 2 * (1 + 1.1e-6);
  for (float x : v) {
    ASSERT_TRUE(std::isfinite(x));
    ASSERT_LE(std::fabs(x), bound);
    ASSERT_LE(std::fabs(x), 2.9f);
  }
}

TEST(Noise, GaussianTailFrequenciesMatchNormal) {
  const auto v = draw(kN, 8, 3, Noise::kGaussian);
  // P(|z| > 3) and P(|z| > 4) for z ~ N(0, 1), i.e. |u| > 1.5 and |u| > 2.
  for (double t : {3.0, 4.0}) {
    const double p = std::erfc(t / std::sqrt(2.0));
    const auto count =
        std::count_if(v.begin(), v.end(), [&](float x) { return std::fabs(x) > t / 2; });
    const double expect = p * kN;
    EXPECT_NEAR(static_cast<double>(count), expect, 6 * std::sqrt(expect * (1 - p))) << "t " << t;
  }
}

TEST(Noise, GaussianPassesKolmogorovSmirnov) {
  const auto v = draw(kN, 9, 0, Noise::kGaussian);
  EXPECT_LT(ks_statistic(v, half_normal_cdf), ks_critical_1e3(kN));
}

// ---------------------------------------------------------------------------------------------
// Independence.

// Lags 1..64, 65, 127 and 128 cover neighbouring lanes, every pair of lanes of a block, the later
// steps of one lane, the two members of a Box-Muller pair, and neighbouring blocks. For the
// Gaussian, squares too: the two members of a pair share their radius, so only independence makes
// these vanish.
TEST(Noise, ConsecutiveSamplesAreUncorrelated) {
  for (Noise kind : {Noise::kUniform, Noise::kGaussian}) {
    const auto v = draw(kN, 11, 0, kind);
    std::vector<int64_t> lags;
    for (int64_t lag = 1; lag <= diffq::detail::kNoiseBlock; ++lag) lags.push_back(lag);
    for (int64_t lag : {65, 127, 128}) lags.push_back(lag);
    for (int64_t lag : lags) {
      const int64_t m = kN - lag;
      const double tol = 6 / std::sqrt(static_cast<double>(m));
      EXPECT_LT(std::fabs(correlation(v.data(), v.data() + lag, m)), tol) << "lag " << lag;
      if (kind == Noise::kGaussian) {
        EXPECT_LT(std::fabs(correlation(v.data(), v.data() + lag, m, true)), tol) << "lag " << lag;
      }
    }
  }
}

TEST(Noise, LanesAreUncorrelated) {
  // Lane j of block b writes out[b·64 + k·L + j] (uniform: step k; Gaussian: pair member k).
  constexpr int L = diffq::detail::kNoiseLanes;
  for (Noise kind : {Noise::kUniform, Noise::kGaussian}) {
    const auto v = draw(kN, 12, 0, kind);
    std::vector<std::vector<float>> lanes(L);
    for (int64_t i = 0; i < kN; ++i) lanes[i % L].push_back(v[i]);
    const int64_t m = static_cast<int64_t>(lanes[0].size());
    for (int a = 0; a < L; ++a) {
      for (int b = a + 1; b < L; ++b) {
        const double r = correlation(lanes[a].data(), lanes[b].data(), m);
        EXPECT_LT(std::fabs(r), 6 / std::sqrt(static_cast<double>(m))) << a << " " << b;
      }
    }
  }
}

TEST(Noise, StreamsAreUncorrelated) {
  const double tol = 6 / kSqrtN;
  for (Noise kind : {Noise::kUniform, Noise::kGaussian}) {
    const std::vector<uint64_t> streams = {0, 1, 2, uint64_t{1} << 40, ~uint64_t{0}};
    std::vector<std::vector<float>> v;
    for (uint64_t s : streams) v.push_back(draw(kN, 13, s, kind));
    for (size_t a = 0; a < v.size(); ++a) {
      for (size_t b = a + 1; b < v.size(); ++b) {
        EXPECT_LT(std::fabs(correlation(v[a].data(), v[b].data(), kN)), tol)
            << streams[a] << " " << streams[b];
        EXPECT_LT(std::fabs(correlation(v[a].data(), v[b].data(), kN, true)), tol)
            << streams[a] << " " << streams[b];
      }
    }
  }
}

TEST(Noise, SeedsAreUncorrelated) {
  const double tol = 6 / kSqrtN;
  for (Noise kind : {Noise::kUniform, Noise::kGaussian}) {
    const std::vector<uint64_t> seeds = {0, 1, uint64_t{1} << 32, 0x9e3779b97f4a7c15ULL,
                                         ~uint64_t{0}};
    std::vector<std::vector<float>> v;
    for (uint64_t s : seeds) v.push_back(draw(kN, s, 0, kind));
    for (size_t a = 0; a < v.size(); ++a) {
      for (size_t b = a + 1; b < v.size(); ++b) {
        EXPECT_LT(std::fabs(correlation(v[a].data(), v[b].data(), kN)), tol)
            << seeds[a] << " " << seeds[b];
        EXPECT_LT(std::fabs(correlation(v[a].data(), v[b].data(), kN, true)), tol)
            << seeds[a] << " " << seeds[b];
      }
    }
  }
}

TEST(Noise, DifferentStreamsAndSeedsGiveDifferentSamples) {
  for (Noise kind : {Noise::kUniform, Noise::kGaussian}) {
    const auto base = draw(4096, 21, 5, kind);
    for (const auto& other : {draw(4096, 21, 6, kind), draw(4096, 22, 5, kind)}) {
      // Two independent samples coincide with probability 2^-24 (uniform) or less.
      int64_t same = 0;
      for (size_t i = 0; i < base.size(); ++i) same += bits(base[i]) == bits(other[i]);
      EXPECT_LE(same, 1);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Determinism. out[i] is a function of (seed, stream, kind, i) only.

TEST(Noise, SameArgumentsGiveSameBits) {
  for (Noise kind : {Noise::kUniform, Noise::kGaussian}) {
    const auto a = draw(100003, 31, 4, kind);
    const auto b = draw(100003, 31, 4, kind);
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0);
  }
}

TEST(Noise, ShorterFillIsPrefixOfLongerAndWritesNothingBeyondN) {
  const float sentinel = -12345.0f;
  for (Noise kind : {Noise::kUniform, Noise::kGaussian}) {
    const auto full = draw(10000, 32, 9, kind);
    for (int64_t n : {0, 1, 7, 63, 64, 65, 127, 128, 1000, 4097, 9999}) {
      std::vector<float> v(static_cast<size_t>(n) + 3, sentinel);
      diffq::fill_noise(v.data(), n, 32, 9, kind);
      EXPECT_EQ(std::memcmp(v.data(), full.data(), static_cast<size_t>(n) * sizeof(float)), 0)
          << "n " << n;
      for (size_t i = static_cast<size_t>(n); i < v.size(); ++i) EXPECT_EQ(v[i], sentinel);
    }
  }
}

TEST(Noise, UnalignedOutputGivesSameSamples) {
  const auto ref = draw(1000, 33, 0, Noise::kGaussian);
  std::vector<float> v(1001);
  diffq::fill_noise(v.data() + 1, 1000, 33, 0, Noise::kGaussian);
  EXPECT_EQ(std::memcmp(v.data() + 1, ref.data(), 1000 * sizeof(float)), 0);
}

TEST(Noise, NoiseTensorIsOneStreamPerChunkOfTwoToTheSixteen) {
  EXPECT_EQ(diffq::kNoiseChunk, 65536);
  for (Noise kind : {Noise::kUniform, Noise::kGaussian}) {
    const at::Tensor t = diffq::noise_tensor({3, 50001}, 34, kind);  // chunks 65536, 65536, 18931
    ASSERT_EQ(t.scalar_type(), at::kFloat);
    ASSERT_TRUE(t.is_contiguous());
    ASSERT_EQ(t.sizes().vec(), std::vector<int64_t>({3, 50001}));
    const int64_t n = t.numel();
    std::vector<float> expect(static_cast<size_t>(n));
    for (int64_t start = 0, c = 0; start < n; start += diffq::kNoiseChunk, ++c) {
      diffq::fill_noise(expect.data() + start, std::min(diffq::kNoiseChunk, n - start), 34,
                        static_cast<uint64_t>(c), kind);
    }
    EXPECT_EQ(std::memcmp(t.data_ptr<float>(), expect.data(), expect.size() * sizeof(float)), 0);
  }
}

TEST(Noise, NoiseTensorDoesNotDependOnThreadCount) {
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const at::Tensor one = diffq::noise_tensor({1000, 700}, 35, Noise::kGaussian);
  at::set_num_threads(4);
  const at::Tensor four = diffq::noise_tensor({1000, 700}, 35, Noise::kGaussian);
  at::set_num_threads(threads);
  EXPECT_TRUE(at::equal(one, four));
}

TEST(Noise, NoiseTensorHandlesEmptyAndScalarShapes) {
  EXPECT_EQ(diffq::noise_tensor({0, 5}, 1, Noise::kUniform).numel(), 0);
  const at::Tensor s = diffq::noise_tensor({}, 1, Noise::kUniform);
  EXPECT_EQ(s.dim(), 0);
  EXPECT_EQ(s.item<float>(), draw(1, 1, 0, Noise::kUniform)[0]);
}

TEST(Noise, DispatchPathsAreBitIdentical) {
  for (bool gaussian : {false, true}) {
    const Noise kind = gaussian ? Noise::kGaussian : Noise::kUniform;
    const auto ref = draw(100003, 36, 2, kind);
    std::vector<float> base(ref.size());
    diffq::detail::fill_noise_baseline(base.data(), static_cast<int64_t>(base.size()), 36, 2,
                                       gaussian);
    EXPECT_EQ(std::memcmp(base.data(), ref.data(), ref.size() * sizeof(float)), 0);
#if DIFFQ_NOISE_AVX2_DISPATCH
    if (diffq::detail::noise_cpu_has_avx2()) {
      std::vector<float> avx(ref.size());
      diffq::detail::fill_noise_avx2(avx.data(), static_cast<int64_t>(avx.size()), 36, 2, gaussian);
      EXPECT_EQ(std::memcmp(avx.data(), base.data(), ref.size() * sizeof(float)), 0);
    }
#endif
  }
}

// ---------------------------------------------------------------------------------------------
// Argument checks.

TEST(Noise, FillNoiseRejectsNegativeLength) {
  float x = 0;
  EXPECT_THROW(diffq::fill_noise(&x, -3, 0, 0, Noise::kGaussian), c10::Error);
  const std::string msg = error_of([&] { diffq::fill_noise(&x, -3, 0, 0, Noise::kGaussian); });
  EXPECT_NE(msg.find("diffq::fill_noise: n must be >= 0, got -3"), std::string::npos) << msg;
}

TEST(Noise, FillNoiseRejectsNullOutputUnlessEmpty) {
  EXPECT_THROW(diffq::fill_noise(nullptr, 5, 0, 0, Noise::kUniform), c10::Error);
  const std::string msg = error_of([] { diffq::fill_noise(nullptr, 5, 0, 0, Noise::kUniform); });
  EXPECT_NE(msg.find("diffq::fill_noise: out must not be null when n > 0, got n = 5"),
            std::string::npos)
      << msg;
  EXPECT_NO_THROW(diffq::fill_noise(nullptr, 0, 0, 0, Noise::kUniform));
}

TEST(Noise, FillNoiseRejectsUnknownKind) {
  float x = 0;
  const Noise bad = static_cast<Noise>(7);
  EXPECT_THROW(diffq::fill_noise(&x, 1, 0, 0, bad), c10::Error);
  const std::string msg = error_of([&] { diffq::fill_noise(&x, 1, 0, 0, bad); });
  EXPECT_NE(msg.find("diffq::fill_noise: kind must be Noise::kGaussian or Noise::kUniform, got 7"),
            std::string::npos)
      << msg;
}

TEST(Noise, NoiseTensorRejectsNegativeSizeAndUnknownKind) {
  EXPECT_THROW(diffq::noise_tensor({2, -1}, 0, Noise::kUniform), c10::Error);
  std::string msg = error_of([] { diffq::noise_tensor({2, -1}, 0, Noise::kUniform); });
  EXPECT_NE(msg.find("diffq::noise_tensor: sizes must be >= 0, got [2, -1]"), std::string::npos)
      << msg;
  const Noise bad = static_cast<Noise>(-1);
  EXPECT_THROW(diffq::noise_tensor({2}, 0, bad), c10::Error);
  msg = error_of([&] { diffq::noise_tensor({2}, 0, bad); });
  EXPECT_NE(
      msg.find("diffq::noise_tensor: kind must be Noise::kGaussian or Noise::kUniform, got -1"),
      std::string::npos)
      << msg;
}

// ---------------------------------------------------------------------------------------------
// Approximation error of the kernel's polynomials, over every possible input, against libm in
// double precision. The generator output r enters through its upper 24 bits only.

TEST(NoiseKernel, LogTermAndRadiusAccuracy) {
  // neg_quarter_log_uniform(r) = h = -ln(u)/4 with u = ((r >> 8) + 1)·2^-24, and
  // half_root_half(h) = sqrt(h/2) = sqrt(-ln(u)/8), the Box-Muller radius sqrt(-2 ln u) over 4.
  double worst_log = 0, worst_radius = 0;
  for (uint32_t k = 0; k < (1u << 24); ++k) {
    const double h_exact = -std::log((k + 1.0) * 0x1p-24) / 4;
    const float h = diffq::detail::neg_quarter_log_uniform((k << 8) | (k & 0xff));
    const float r = diffq::detail::half_root_half(h);
    if (h_exact == 0) {
      ASSERT_EQ(h, 0.0f);
      ASSERT_EQ(r, 0.0f);
      continue;
    }
    const double r_exact = std::sqrt(h_exact / 2);
    worst_log = std::max(worst_log, std::fabs(h - h_exact) / h_exact);
    worst_radius = std::max(worst_radius, std::fabs(r - r_exact) / r_exact);
  }
  EXPECT_LE(worst_log, 2.2e-7);
  EXPECT_LE(worst_radius, 8.5e-7);
}

TEST(NoiseKernel, AngleIsABijectionOntoTheHalfStepGrid) {
  // twice_cos_sin(r) = (2 cos θ, 2 sin θ) with θ = (m + 1/2)·2π/2^24: every grid point m must be
  // hit by exactly one of the 2^24 inputs. The distance of (c2, s2)/2 to (cos θ, sin θ), the
  // hypotenuse of its radial and angular errors, must stay below 1.2e-7.
  const double step = 2 * kPi / 16777216.0;
  std::vector<uint8_t> hits(1u << 24, 0);
  double worst = 0, worst_offset = 0;
  for (uint32_t k = 0; k < (1u << 24); ++k) {
    float c2, s2;
    diffq::detail::twice_cos_sin((k << 8) | (k & 0xff), c2, s2);
    const double c = c2 / 2.0, s = s2 / 2.0;
    const double pos = std::atan2(s, c) / step - 0.5;  // m, up to the approximation error
    const double m = std::nearbyint(pos);
    const double offset = std::fabs(pos - m);
    worst_offset = std::max(worst_offset, offset);
    worst = std::max(worst, std::hypot(std::sqrt(c * c + s * s) - 1, offset * step));
    const auto idx = static_cast<uint32_t>(static_cast<int64_t>(m) & 0xffffff);
    ASSERT_EQ(hits[idx], 0) << "grid point " << idx << " hit twice (input " << k << ")";
    hits[idx] = 1;
  }
  EXPECT_LE(worst, 1.2e-7);
  EXPECT_LT(worst_offset, 0.4);  // far from an ambiguous rounding at 0.5
}

}  // namespace
