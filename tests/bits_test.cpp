// Tests of the pure math in diffq/bits.h against hand-computed values and finite differences.
#include <diffq/bits.h>
#include <diffq/detail/glob.h>
#include <diffq/detail/pqn_kernels.h>

#include "test_util.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace {

using diffq_test::BitEqual;
using diffq_test::Close;
using diffq_test::ExpectError;

using diffq::Param;

TEST(Bits, NumGroupsCountsPartialLastGroup) {
  EXPECT_EQ(diffq::num_groups(60, 8), 8);  // 7 full groups + 4 elements
  EXPECT_EQ(diffq::num_groups(64, 8), 8);
  EXPECT_EQ(diffq::num_groups(10, 16), 1);  // a bias smaller than one group
  EXPECT_EQ(diffq::num_groups(10, 0), 1);   // 0: one group per tensor
  EXPECT_EQ(diffq::num_groups(0, 8), 0);
  EXPECT_EQ(diffq::effective_group_size(10, 0), 10);
  ExpectError([] { diffq::num_groups(5, -3); },
              "diffq::num_groups: group_size must be >= 0, got -3");
  ExpectError([] { diffq::num_groups(-1, 3); }, "numel must be >= 0, got -1");
}

TEST(Bits, BitsFromLogitFollowsTheFormula) {
  auto logit = torch::tensor({-3.0, -0.5, 0.0, 0.7, 4.0}, torch::kDouble);
  auto b = diffq::bits_from_logit(logit, 2, 15, Param::kBits);
  for (int64_t i = 0; i < logit.numel(); ++i) {
    const double l = logit[i].item<double>();
    EXPECT_NEAR(b[i].item<double>(), 2 + 13 / (1 + std::exp(-l)), 1e-12);
  }
  // kNoise: b = log2(1 + 1/s), s = exp(t log(1/(2^15−1)) + (1−t) log(1/(2^2−1))).
  auto bn = diffq::bits_from_logit(logit, 2, 15, Param::kNoise);
  for (int64_t i = 0; i < logit.numel(); ++i) {
    const double t = 1 / (1 + std::exp(-logit[i].item<double>()));
    const double s = std::exp(t * std::log(1.0 / 32767) + (1 - t) * std::log(1.0 / 3));
    EXPECT_NEAR(bn[i].item<double>(), std::log2(1 + 1 / s), 1e-10);
  }
  // Extremes of the parametrisation.
  EXPECT_NEAR(diffq::bits_from_logit(torch::tensor({-50.0}, torch::kDouble), 2, 15, Param::kNoise)
                  .item<double>(),
              2.0, 1e-9);
  EXPECT_NEAR(diffq::bits_from_logit(torch::tensor({50.0}, torch::kDouble), 2, 15, Param::kNoise)
                  .item<double>(),
              15.0, 1e-9);
}

TEST(Bits, LogitForBitsInvertsBitsFromLogit) {
  for (auto param : {Param::kBits, Param::kNoise}) {
    for (double bits : {2.5, 4.0, 8.0, 11.3, 14.9}) {
      const double l = diffq::logit_for_bits(bits, 2, 15, param);
      auto b = diffq::bits_from_logit(torch::tensor({l}, torch::kDouble), 2, 15, param);
      EXPECT_NEAR(b.item<double>(), bits, 1e-10);
    }
  }
  EXPECT_NEAR(diffq::logit_for_bits(8.5, 2, 15, Param::kBits), 0.0, 1e-12);  // the midpoint
  ExpectError([] { diffq::logit_for_bits(15, 2, 15, Param::kBits); },
              "diffq::logit_for_bits: bits must be in (2, 15), got 15");
}

TEST(Bits, UnitDerivativeMatchesFiniteDifferences) {
  for (auto param : {Param::kBits, Param::kNoise}) {
    for (double l : {-4.0, -1.0, 0.0, 0.3, 2.5}) {
      auto unit_at = [&](double x) {
        const double b =
            diffq::bits_from_logit(torch::tensor({x}, torch::kDouble), 2, 15, param).item<double>();
        return 1 / (std::exp2(b) - 1);
      };
      const auto ug = diffq::unit_from_logit(l, 2, 15, param);
      EXPECT_NEAR(ug.unit, unit_at(l), 1e-12 + 1e-10 * unit_at(l));
      const double h = 1e-6;
      const double fd = (unit_at(l + h) - unit_at(l - h)) / (2 * h);
      EXPECT_NEAR(ug.dunit_dlogit, fd, 1e-6 * std::abs(fd) + 1e-14) << l;
      // The tensor form agrees with the scalar one.
      auto t = diffq::unit_from_logit(torch::tensor({l}, torch::kDouble), 2, 15, param);
      EXPECT_NEAR(t.first.item<double>(), ug.unit, 1e-12 * ug.unit);
      EXPECT_NEAR(t.second.item<double>(), ug.dunit_dlogit, 1e-10 * std::abs(ug.dunit_dlogit));
    }
  }
}

TEST(Bits, BitsTermsKernelMatchesDoubleFormula) {
  // bits_terms_cpu: per group db/dl, the units, and Σ b and max b, against the double formulas;
  // with the units it writes the same terms as without them.
  for (int64_t groups : {1, 7, 513, 1500}) {
    SCOPED_TRACE("groups " + std::to_string(groups));
    torch::manual_seed(groups);
    // Logits within ±12: the range of FastUnitKernelMatchesDoubleFormula's 5e-6 tolerance.
    auto logit = (torch::randn({groups}) * 4).clamp(-12, 12);
    auto slope = torch::empty_like(logit), slope2 = torch::empty_like(logit);
    auto unit = torch::empty_like(logit), dunit = torch::empty_like(logit);
    const float* l = logit.data_ptr<float>();
    const auto stats =
        diffq::detail::bits_terms_cpu(l, groups, 2, 15, slope.data_ptr<float>(), nullptr, nullptr);
    const auto stats2 =
        diffq::detail::bits_terms_cpu(l, groups, 2, 15, slope2.data_ptr<float>(),
                                      unit.data_ptr<float>(), dunit.data_ptr<float>());
    EXPECT_EQ(stats.sum, stats2.sum);
    EXPECT_EQ(stats.max, stats2.max);
    EXPECT_TRUE(BitEqual(slope, slope2));
    double sum = 0, max_b = 0;
    for (int64_t g = 0; g < groups; ++g) {
      const double t = 1 / (1 + std::exp(-static_cast<double>(l[g])));
      const double b = 2 + 13 * t;
      sum += b;
      max_b = std::max(max_b, b);
      EXPECT_NEAR(slope[g].item<double>(), 13 * t * (1 - t), 2e-6 * 13 * t * (1 - t) + 1e-30) << g;
      const auto ref = diffq::unit_from_logit(static_cast<double>(l[g]), 2, 15, Param::kBits);
      EXPECT_NEAR(unit[g].item<double>(), ref.unit, 5e-6 * ref.unit) << g;
      EXPECT_NEAR(dunit[g].item<double>(), ref.dunit_dlogit, 5e-6 * std::abs(ref.dunit_dlogit))
          << g;
    }
    EXPECT_NEAR(stats.sum, sum, 1e-6 * sum);
    EXPECT_NEAR(stats.max, max_b, 1e-6 * max_b);
  }
}

TEST(Bits, FastUnitKernelMatchesDoubleFormula) {
  for (auto param : {Param::kBits, Param::kNoise}) {
    auto logit = torch::linspace(-20, 20, 1001, torch::kFloat);
    auto unit = torch::empty_like(logit), dunit = torch::empty_like(logit);
    diffq::detail::units_cpu(logit.data_ptr<float>(), unit.data_ptr<float>(),
                             dunit.data_ptr<float>(), logit.numel(), 2, 15, param);
    // Float evaluation: the arguments of 2^x (up to 29 in magnitude for |logit| <= 20) carry a
    // rounding of 2^-24 relative, i.e. up to 1.8e-6 relative in 2^x, which adds 2e-7 of its own;
    // the derivative combines three such factors. Logits within ±12 (bits within 1e-4 of the
    // bounds beyond) keep to 5e-6, the whole range to 2e-5.
    for (int64_t i = 0; i < logit.numel(); ++i) {
      const double l = logit[i].item<double>();
      const double tol = std::abs(l) <= 12 ? 5e-6 : 2e-5;
      const auto ref = diffq::unit_from_logit(l, 2, 15, param);
      EXPECT_NEAR(unit[i].item<double>(), ref.unit, tol * ref.unit) << i;
      EXPECT_NEAR(dunit[i].item<double>(), ref.dunit_dlogit,
                  tol * std::abs(ref.dunit_dlogit) + 1e-30)
          << i;
    }
  }
  // 2^x approximation over its whole range.
  for (float x = -126; x <= 126; x += 0.37f) {
    EXPECT_NEAR(diffq::detail::exp2_approx(x), std::exp2(static_cast<double>(x)),
                3e-7 * std::exp2(static_cast<double>(x)));
  }
}

TEST(Bits, QuantizeLevelsByHand) {
  // 2 bits: 4 levels over [0, 1]; 0.5·3 = 1.5 rounds half to even.
  auto w = torch::tensor({0.0f, 0.25f, 0.5f, 1.0f, 0.9f});
  auto bits = torch::tensor({2, 3}, torch::kByte);  // group size 4: last group partial
  auto levels = diffq::quantize_levels(w, bits, 4, 0.0, 1.0);
  EXPECT_TRUE(torch::equal(levels, torch::tensor({0, 1, 2, 3, 6}, torch::kShort)));  // 0.9·7 = 6.3
  auto back = diffq::dequantize_levels(levels, bits, 4, 0.0, 1.0, torch::kFloat);
  std::vector<float> expected = {0, 1.0f / 3, 2.0f / 3, 1, 6.0f / 7};
  for (int i = 0; i < 5; ++i) EXPECT_NEAR(back[i].item<float>(), expected[i], 1e-7);
  // Every width 1..15 keeps levels within [0, 2^b − 1], and the error within half a step.
  torch::manual_seed(0);
  auto x = torch::randn({1000});
  const double lo = x.min().item<double>(), hi = x.max().item<double>();
  for (int b = 1; b <= 15; ++b) {
    auto bb = torch::full({diffq::num_groups(1000, 0)}, b, torch::kByte);
    auto lv = diffq::quantize_levels(x, bb, 0, lo, hi);
    EXPECT_EQ(lv.min().item<int>(), 0);
    EXPECT_EQ(lv.max().item<int>(), (1 << b) - 1);
    auto y = diffq::dequantize_levels(lv, bb, 0, lo, hi, torch::kFloat);
    EXPECT_LE((y - x).abs().max().item<double>(), 0.5 * (hi - lo) / ((1 << b) - 1) * (1 + 1e-5));
  }
}

TEST(Bits, FusedLevelKernelEqualsTheExplicitExpression) {
  // The CPU kernel behind quantize_levels (float/double, uint8 bits) against the formula written
  // out with ATen ops, element for element, for every width, several group sizes (partial last
  // groups, one group, more than one kernel block) and both dtypes.
  torch::manual_seed(3);
  for (auto dtype : {torch::kFloat, torch::kDouble}) {
    for (int64_t gs : {0, 1, 7, 16, 3000}) {
      const int64_t n = 5003;
      auto w = (torch::randn({n}, dtype) * 0.02).contiguous();
      const double lo = w.min().item<double>(), hi = w.max().item<double>();
      const int64_t groups = diffq::num_groups(n, gs);
      for (int b = 0; b <= 15; ++b) {
        // b = 0: random widths in [1, 15] per group; else all groups at b.
        auto bits = b == 0 ? torch::randint(1, 16, {groups}, torch::kLong).to(torch::kByte)
                           : torch::full({groups}, b, torch::kByte);
        const int64_t egs = gs == 0 ? n : gs;
        auto lm = (torch::pow(2.0, bits.to(dtype)) - 1).repeat_interleave(egs).narrow(0, 0, n);
        auto expected = ((w - lo) / (hi - lo) * lm).round().to(torch::kShort);
        auto got = diffq::quantize_levels(w, bits, gs, lo, hi);
        ASSERT_TRUE(torch::equal(got, expected))
            << "dtype " << dtype << " group size " << gs << " bits " << b;
      }
    }
  }
  // A non-contiguous input gives the same levels as its contiguous copy.
  auto m = torch::randn({64, 32});
  auto t = m.t();
  auto bits = torch::full({diffq::num_groups(t.numel(), 8)}, 5, torch::kByte);
  const double lo = m.min().item<double>(), hi = m.max().item<double>();
  EXPECT_TRUE(torch::equal(diffq::quantize_levels(t, bits, 8, lo, hi),
                           diffq::quantize_levels(t.contiguous(), bits, 8, lo, hi)));
  // Widths outside [1, 15] are refused, not turned into out-of-range levels.
  ExpectError(
      [] {
        diffq::quantize_levels(torch::randn({10}), torch::tensor({3, 16}, torch::kByte), 8, -3.0,
                               3.0);
      },
      "diffq::quantize_levels: bit widths must be in [1, 15], got 16 for group 1");
  ExpectError(
      [] {
        diffq::quantize_levels(torch::randn({10}), torch::tensor({0, 4}, torch::kByte), 8, -3.0,
                               3.0);
      },
      "got 0 for group 0");
}

TEST(Bits, CpuNoiseKernelsMatchTheirScalarDefinitions) {
  // The vector paths of the pseudo-quantization-noise kernels against their element-by-element
  // definitions, bit for bit: noisy = w + (scale·unit_g)·u, and per group the eight-lane sum of
  // grad·u (lane k sums elements k and k + 8, lanes reduced as (l0+l4)+(l1+l5), (l2+l6)+(l3+l7)).
  torch::manual_seed(21);
  const int64_t n = 1000;
  auto w = torch::randn({n});
  auto u = torch::randn({n});
  for (int64_t gs : {1, 7, 8, 16, 24}) {
    const int64_t groups = (n + gs - 1) / gs;
    auto unit = torch::rand({groups}) * 0.1;
    const float scale = 0.37f;
    for (auto range :
         {std::make_pair<int64_t, int64_t>(0, 1000), std::make_pair<int64_t, int64_t>(5, 997),
          std::make_pair<int64_t, int64_t>(3, 9)}) {
      auto noisy = torch::zeros({n});
      auto expected = torch::zeros({n});
      const float* wp = w.data_ptr<float>();
      const float* up = u.data_ptr<float>();
      const float* unp = unit.data_ptr<float>();
      float* e = expected.data_ptr<float>();
      for (int64_t i = range.first; i < range.second; ++i) {
        e[i] = wp[i] + (scale * unp[i / gs]) * up[i];
      }
      diffq::detail::apply_range_base(wp, noisy.data_ptr<float>(), up, unp, scale, gs, range.first,
                                      range.second);
      EXPECT_TRUE(BitEqual(noisy, expected)) << "base, group size " << gs;
#if DIFFQ_NOISE_AVX2_DISPATCH
      if (diffq::detail::noise_cpu_has_avx2()) {
        noisy.zero_();
        diffq::detail::apply_range_avx2(wp, noisy.data_ptr<float>(), up, unp, scale, gs,
                                        range.first, range.second);
        EXPECT_TRUE(BitEqual(noisy, expected)) << "AVX2, group size " << gs;
      }
#endif
    }
    // Backward: logit_grad_g += (G_g·scale)·dunit_g and the sum of G_g·unit_g.
    auto dunit = torch::rand({groups});
    auto lg = torch::zeros({groups});
    auto partial = torch::zeros({groups}, torch::kDouble);
    const double total = diffq::detail::noise_backward_cpu(
        w.data_ptr<float>(), u.data_ptr<float>(), n, gs, unit.data_ptr<float>(),
        dunit.data_ptr<float>(), 0.5, lg.data_ptr<float>(), partial.data_ptr<double>());
    double expected_total = 0;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t s = g * gs, m = std::min(n, s + gs) - s;
      const float* a = w.data_ptr<float>() + s;
      const float* b = u.data_ptr<float>() + s;
      double acc;
      if (m == 8 || m == 16) {
        float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t i = 0; i < m; ++i) lane[i % 8] += a[i] * b[i];
        acc = static_cast<double>((lane[0] + lane[4]) + (lane[1] + lane[5])) +
              static_cast<double>((lane[2] + lane[6]) + (lane[3] + lane[7]));
      } else {
        acc = diffq::detail::dot_blocks(a, b, m);
      }
      EXPECT_EQ(lg[g].item<float>(), static_cast<float>(acc * 0.5 * dunit[g].item<float>()))
          << "group size " << gs << " group " << g;
      expected_total += acc * unit[g].item<float>();
    }
    EXPECT_DOUBLE_EQ(total, expected_total) << "group size " << gs;
  }
}

TEST(Bits, CpuMinMaxFindsExtremesAndNaNAnywhere) {
  // Sizes below, at and above the vector paths' thresholds, and across noise chunks.
  for (int64_t n : {int64_t{1}, int64_t{5}, int64_t{31}, int64_t{32}, int64_t{33}, int64_t{1000},
                    diffq::kNoiseChunk + 77}) {
    torch::manual_seed(22);
    auto w = torch::randn({n});
    const int64_t chunks = (n + diffq::kNoiseChunk - 1) / diffq::kNoiseChunk;
    std::vector<float> lo(static_cast<size_t>(chunks)), hi(static_cast<size_t>(chunks));
    auto mm = diffq::detail::minmax_cpu(w.data_ptr<float>(), n, lo.data(), hi.data());
    EXPECT_EQ(mm.lo, w.min().item<float>()) << n;
    EXPECT_EQ(mm.hi, w.max().item<float>()) << n;
    EXPECT_FALSE(mm.nan);
    for (int64_t c = 0; c < chunks; ++c) {
      auto part = w.narrow(0, c * diffq::kNoiseChunk,
                           std::min(diffq::kNoiseChunk, n - c * diffq::kNoiseChunk));
      EXPECT_EQ(lo[static_cast<size_t>(c)], part.min().item<float>());
      EXPECT_EQ(hi[static_cast<size_t>(c)], part.max().item<float>());
    }
    for (int64_t at : {int64_t{0}, n / 2, n - 1}) {
      auto v = w.clone();
      v[at] = std::nanf("");
      EXPECT_TRUE(diffq::detail::minmax_cpu(v.data_ptr<float>(), n, lo.data(), hi.data()).nan)
          << "NaN at " << at << " of " << n;
    }
  }
}

TEST(Bits, ConstantTensorGivesItsValueNeverNaN) {
  auto w = torch::full({5}, 0.3f);
  auto bits = torch::full({1}, 4, torch::kByte);
  auto q = diffq::quantize_dequantize(w, bits, 0);
  EXPECT_TRUE(torch::equal(q, w));
}

TEST(Bits, RoundedBitsClampToStoredRange) {
  auto b = torch::tensor({0.2, 1.6, 7.5, 8.5, 14.4, 16.7}, torch::kDouble);
  auto r = diffq::rounded_bits(b, 0.0);
  EXPECT_TRUE(torch::equal(r, torch::tensor({1, 2, 8, 8, 14, 15}, torch::kByte)));  // half to even
  EXPECT_TRUE(torch::equal(diffq::rounded_bits(b, 1.0),
                           torch::tensor({1, 3, 8, 10, 15, 15}, torch::kByte)));
  b[4] = std::nan("");
  ExpectError([&] { diffq::rounded_bits(b, 0.0); },
              "diffq::rounded_bits: the bit width of group 4 is NaN (a NaN logit: did the "
              "training diverge?)");
  ExpectError([&] { diffq::rounded_bits(b, 0.0, "fc.weight"); },
              "diffq::rounded_bits: the bit width of group 4 of 'fc.weight' is NaN");
}

TEST(Bits, AnyNanFindsNaNAnywhere) {
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{8}, int64_t{9}, int64_t{1000}}) {
    auto x = torch::randn({n});
    EXPECT_FALSE(diffq::detail::any_nan(x.data_ptr<float>(), n)) << n;
    for (int64_t at : {int64_t{0}, n / 2, n - 1}) {
      auto v = x.clone();
      v[at] = std::nanf("");
      EXPECT_TRUE(diffq::detail::any_nan(v.data_ptr<float>(), n)) << "NaN at " << at << " of " << n;
    }
  }
}

TEST(Bits, SizeFormulaByHand) {
  // 10 elements, group size 4: groups of 4, 4, 2 elements.
  auto b = torch::tensor({3.0, 5.0, 7.4}, torch::kDouble);
  const double bits_bits = std::ceil(std::log2(1 + 7 - 2));  // round(max b) = 7
  const double expected = 4 * 3 + 4 * 5 + 2 * 7.4 + 64 + 8 + bits_bits * 3;
  EXPECT_NEAR(diffq::quantized_size_bits(b, 10, 4, 2).item<double>(), expected, 1e-9);
  EXPECT_NEAR(diffq::bits_bits(b, 2).item<double>(), 3.0, 0);
  EXPECT_NEAR(diffq::bits_bits(torch::tensor({2.2}, torch::kDouble), 2).item<double>(), 0.0, 0);
  // Whole-tensor group.
  EXPECT_NEAR(
      diffq::quantized_size_bits(torch::tensor({6.0}, torch::kDouble), 10, 0, 2).item<double>(),
      60 + 72 + 3, 1e-9);
}

TEST(Bits, FiniteMinMaxRejectsNaNInfAndEmpty) {
  EXPECT_EQ(diffq::finite_min_max(torch::tensor({1.0f, -2.0f, 3.0f}), "w"),
            std::make_pair(-2.0, 3.0));
  ExpectError(
      [] {
        diffq::finite_min_max(torch::tensor({1.0f, std::nanf("")}), "fc.weight");
      },
      "diffq: tensor 'fc.weight' holds non-finite values");
  ExpectError(
      [] {
        diffq::finite_min_max(torch::tensor({1.0f, std::numeric_limits<float>::infinity()}), "w");
      },
      "cannot quantize NaN or Inf weights");
  ExpectError([] { diffq::finite_min_max(torch::empty({0}), "e"); }, "diffq: tensor 'e' is empty");
  // Finite values whose range max − min overflows the dtype (dequantization computes it there).
  const float big = 3e38f;
  ExpectError(
      [&] {
        diffq::finite_min_max(torch::tensor({-big, big}), "w");
      },
      "diffq: tensor 'w' spans [-3e+38, 3e+38]: max - min overflows Float; cannot "
      "quantize it");
  ExpectError(
      [] {
        diffq::finite_min_max(torch::tensor({-1e308, 1e308}, at::kDouble), "d");
      },
      "diffq: tensor 'd' spans [-1e+308, 1e+308]: max - min overflows Double");
  EXPECT_EQ(diffq::finite_min_max(torch::tensor({0.0f, big}), "w"),
            std::make_pair(0.0, static_cast<double>(big)));
}

TEST(Bits, QuantizeShapeChecks) {
  ExpectError(
      [] { diffq::quantize_levels(torch::zeros({10}), torch::ones({2}, torch::kByte), 4, 0, 1); },
      "diffq::quantize_levels: expected bits of shape [3], got [2]");
  ExpectError(
      [] {
        diffq::dequantize_levels(torch::zeros({10}, torch::kShort), torch::ones({1}, torch::kByte),
                                 4, 0, 1, torch::kFloat);
      },
      "diffq::dequantize_levels: expected bits of shape [3], got [1]");
}

TEST(Glob, EndsWith) {
  using diffq::detail::ends_with;
  EXPECT_TRUE(ends_with("fc1.weight_diffq", "_diffq"));
  EXPECT_TRUE(ends_with("_diffq", "_diffq"));
  EXPECT_FALSE(ends_with("diffq", "_diffq"));
  EXPECT_FALSE(ends_with("fc1.weight_diffq.x", "_diffq"));
  EXPECT_TRUE(ends_with("anything", ""));
}

TEST(Glob, MatchesLikeTheShell) {
  using diffq::detail::glob_match;
  EXPECT_TRUE(glob_match("*bias", "fc1.bias"));
  EXPECT_TRUE(glob_match("bias", "bias"));
  EXPECT_FALSE(glob_match("bias", "fc1.bias"));
  EXPECT_TRUE(glob_match("fc?.weight", "fc2.weight"));
  EXPECT_FALSE(glob_match("fc?.weight", "fc12.weight"));
  EXPECT_TRUE(glob_match("layer[0-2].*", "layer1.conv.weight"));
  EXPECT_FALSE(glob_match("layer[!0-2].*", "layer1.conv.weight"));
  EXPECT_TRUE(glob_match("*.*.*", "a.b.c"));
  EXPECT_TRUE(glob_match("*", ""));
  EXPECT_FALSE(glob_match("?", ""));
  EXPECT_TRUE(glob_match("a[", "a["));  // unterminated set: literal
}

TEST(Bits, QuantizeLevelsOnTheDeviceEqualTheCpuKernel_CUDA) {
  // The ATen expression on the device divides by a device tensor (true division), so it gives the
  // levels of the CPU kernel, which the checkpoint export uses; CUDA's division by a CPU scalar is
  // a product with its reciprocal and moved ~200 of 2^20 levels at 15 bits.
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(8);
  auto w = torch::randn({1 << 20});
  auto mm = diffq::finite_min_max(w, "w");
  for (int64_t b : {4, 8, 15}) {
    auto bits = torch::full({(1 << 20) / 16}, b, torch::kByte);
    auto cpu = diffq::quantize_levels(w, bits, 16, mm.first, mm.second);
    auto gpu = diffq::quantize_levels(w.cuda(), bits.cuda(), 16, mm.first, mm.second);
    EXPECT_TRUE(BitEqual(gpu.cpu(), cpu)) << b;
  }
}

// lowest_rounded_bits and bits_interval_of_rounded against a brute-force scan of the learnt bit
// widths b in (min_bits, max_bits): the rounded value round(b + extra) clamped to [1, 15].
TEST(BitsTest, LowestRoundedBitsAndIntervalsMatchAScanOfTheBitWidths) {
  struct Case {
    double min_bits, max_bits, extra;
  };
  for (const Case c : {Case{2, 15, 0}, Case{2, 15, 1}, Case{1, 8, 0}, Case{2.3, 9, 0},
                       Case{2, 15, -1.2}, Case{0.2, 16, 0.4}}) {
    int64_t lowest = 99;
    std::vector<double> lo(16, 1e9), hi(16, -1e9);
    const int n = 200000;
    for (int i = 1; i < n; ++i) {
      const double b = c.min_bits + (c.max_bits - c.min_bits) * i / n;
      const auto r =
          static_cast<int64_t>(std::min(15.0, std::max(1.0, std::nearbyint(b + c.extra))));
      lowest = std::min(lowest, r);
      lo[r] = std::min(lo[r], b);
      hi[r] = std::max(hi[r], b);
    }
    EXPECT_EQ(diffq::lowest_rounded_bits(c.min_bits, c.extra), lowest)
        << c.min_bits << " " << c.extra;
    const double step = (c.max_bits - c.min_bits) / n;
    for (int64_t r = 1; r <= 15; ++r) {
      const auto interval = diffq::bits_interval_of_rounded(r, c.min_bits, c.max_bits, c.extra);
      if (lo[r] > hi[r]) {  // no b rounds to r
        EXPECT_GE(interval.first, interval.second) << r;
        continue;
      }
      EXPECT_NEAR(interval.first, lo[r], 1.5 * step) << r;
      EXPECT_NEAR(interval.second, hi[r], 1.5 * step) << r;
      const double mid = 0.5 * (interval.first + interval.second);
      EXPECT_EQ(std::min(15.0, std::max(1.0, std::nearbyint(mid + c.extra))), r) << r;
    }
  }
}

}  // namespace
