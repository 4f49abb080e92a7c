// Tests of diffq/options.h: the documented defaults, chaining and the options check.
#include <diffq/options.h>

#include "test_util.h"

#include <gtest/gtest.h>

#include <cmath>

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

}  // namespace
