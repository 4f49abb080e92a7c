// Tests of diffq/options.h: the documented defaults, chaining and the options check.
#include <diffq/options.h>

#include "test_util.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using diffq_test::ExpectError;

TEST(DiffQOptions, DefaultsAreTheReferenceOnes) {
  diffq::DiffQOptions o;
  EXPECT_EQ(o.group_size(), 8);
  EXPECT_EQ(o.min_bits(), 2);
  EXPECT_EQ(o.max_bits(), 15);
  EXPECT_EQ(o.init_bits(), 8);
  EXPECT_EQ(o.extra_bits(), 0);
  EXPECT_DOUBLE_EQ(o.min_size_mb(), 0.01);
  EXPECT_FALSE(o.float16());
  EXPECT_EQ(o.noise(), diffq::Noise::kGaussian);
  EXPECT_EQ(o.param(), diffq::Param::kBits);
  EXPECT_TRUE(o.exclude().empty());
  EXPECT_TRUE(o.detect_bound());
  EXPECT_EQ(o.suffix(), "_diffq");
}

TEST(DiffQOptions, SettersChain) {
  auto o = diffq::DiffQOptions()
               .group_size(16)
               .min_bits(3)
               .max_bits(12)
               .init_bits(6)
               .extra_bits(0.5)
               .min_size_mb(0.1)
               .float16(true)
               .noise(diffq::Noise::kUniform)
               .param(diffq::Param::kNoise)
               .exclude({"*bias"})
               .detect_bound(false)
               .suffix("_q");
  EXPECT_EQ(o.group_size(), 16);
  EXPECT_EQ(o.min_bits(), 3);
  EXPECT_EQ(o.max_bits(), 12);
  EXPECT_EQ(o.init_bits(), 6);
  EXPECT_EQ(o.extra_bits(), 0.5);
  EXPECT_EQ(o.min_size_mb(), 0.1);
  EXPECT_TRUE(o.float16());
  EXPECT_EQ(o.noise(), diffq::Noise::kUniform);
  EXPECT_EQ(o.param(), diffq::Param::kNoise);
  EXPECT_EQ(o.exclude(), std::vector<std::string>{"*bias"});
  EXPECT_FALSE(o.detect_bound());
  EXPECT_EQ(o.suffix(), "_q");
}

TEST(DiffQOptions, CheckOptionsMessages) {
  using diffq::DiffQOptions;
  ExpectError([] { diffq::check_options(DiffQOptions().extra_bits(NAN)); },
              "extra_bits must be finite");
  ExpectError([] { diffq::check_options(DiffQOptions().suffix("")); }, "suffix must be non-empty");
  ExpectError([] { diffq::check_options(DiffQOptions().group_size(-1), "where"); },
              "where: group_size must be >= 0, got -1");
  diffq::check_options(DiffQOptions());  // defaults are valid
}

TEST(SharedOptions, DefaultsOfEveryQuantizer) {
  diffq::UniformOptions u;
  EXPECT_EQ(u.bits(), 8);
  EXPECT_FALSE(u.qat());
  EXPECT_DOUBLE_EQ(u.min_size_mb(), 0.01);
  EXPECT_FALSE(u.float16());
  EXPECT_TRUE(u.exclude().empty());
  EXPECT_TRUE(u.detect_bound());
  diffq::LSQOptions l;
  EXPECT_EQ(l.bits(), 4);
  EXPECT_DOUBLE_EQ(l.min_size_mb(), 0.01);
  EXPECT_FALSE(l.float16());
  EXPECT_TRUE(l.exclude().empty());
  EXPECT_TRUE(l.detect_bound());
  EXPECT_EQ(l.suffix(), "_lsq");
}

TEST(SharedOptions, SettersReturnTheQuantizersOwnStruct) {
  static_assert(
      std::is_same<decltype(diffq::UniformOptions().min_size_mb(0)), diffq::UniformOptions&>::value,
      "a shared setter returns the derived options");
  static_assert(std::is_same<decltype(diffq::LSQOptions().suffix("_s")), diffq::LSQOptions&>::value,
                "the suffix setter returns the derived options");
  static_assert(
      std::is_same<decltype(diffq::DiffQOptions().exclude({})), diffq::DiffQOptions&>::value,
      "a shared setter returns the derived options");
  // Shared and own options in any order.
  auto u =
      diffq::UniformOptions().min_size_mb(0.5).bits(3).float16(true).qat(true).exclude({"*bias"});
  EXPECT_EQ(u.bits(), 3);
  EXPECT_TRUE(u.qat());
  EXPECT_EQ(u.min_size_mb(), 0.5);
  EXPECT_TRUE(u.float16());
  EXPECT_EQ(u.exclude(), std::vector<std::string>{"*bias"});
  auto l = diffq::LSQOptions().detect_bound(false).bits(5).suffix("_s").min_size_mb(0);
  EXPECT_FALSE(l.detect_bound());
  EXPECT_EQ(l.bits(), 5);
  EXPECT_EQ(l.suffix(), "_s");
  EXPECT_EQ(l.min_size_mb(), 0);
  // The getters give references, as TORCH_ARG's do.
  l.exclude().push_back("fc.*");
  EXPECT_EQ(l.exclude(), std::vector<std::string>{"fc.*"});
}

TEST(SharedOptions, CheckedOnceWithTheQuantizersName) {
  ExpectError([] { diffq::check_options(diffq::UniformOptions().min_size_mb(-2)); },
              "diffq::UniformQuantizer: min_size_mb must be >= 0, got -2");
  ExpectError([] { diffq::check_options(diffq::LSQOptions().min_size_mb(NAN)); },
              "diffq::LSQQuantizer: min_size_mb must be >= 0, got nan");
  ExpectError([] { diffq::check_options(diffq::DiffQOptions().min_size_mb(-1)); },
              "diffq::DiffQuantizer: min_size_mb must be >= 0, got -1");
  ExpectError([] { diffq::check_options(diffq::LSQOptions().suffix("a.b")); },
              "diffq::LSQQuantizer: suffix must be non-empty and contain no '.', got 'a.b'");
  ExpectError([] { diffq::check_options(diffq::UniformOptions().bits(0)); },
              "diffq::UniformQuantizer: bits must be in [1, 15], got 0");
  diffq::check_options(diffq::UniformOptions());
  diffq::check_options(diffq::LSQOptions());
}

}  // namespace
