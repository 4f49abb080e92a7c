// Tests of diffq/state.h: a QuantizedState built by hand describes weights through
// diffq::dequantize_levels exactly as documented (w = min + level·(max − min)/(2^bits − 1)).
#include <diffq/bits.h>
#include <diffq/state.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

namespace {

TEST(QuantizedState, DefaultsAndDocumentedMeaning) {
  diffq::QuantizedTensor t;
  EXPECT_EQ(t.dtype, at::kFloat);
  EXPECT_EQ(t.group_size, 0);
  t.name = "w";
  t.shape = {2, 3};
  t.group_size = 4;  // groups: 4 + 2 elements
  t.bits = torch::tensor({1, 2}, torch::kByte);
  t.min = -1;
  t.max = 2;
  t.levels = torch::tensor({0, 1, 1, 0, 3, 2}, torch::kShort);
  auto w =
      diffq::dequantize_levels(t.levels, t.bits, t.group_size, t.min, t.max, t.dtype).view(t.shape);
  // Group 0 at 1 bit: step 3; group 1 at 2 bits: step 1.
  auto expected = torch::tensor({{-1.0f, 2.0f, 2.0f}, {-1.0f, 2.0f, 1.0f}});
  EXPECT_TRUE(torch::equal(w, expected));
  diffq::QuantizedState state;
  state.quantized.push_back(t);
  state.tied.push_back({"other", "w"});
  EXPECT_EQ(state.tied[0].target, "w");
  EXPECT_TRUE(state.floats.empty() && state.logits.empty());
}

}  // namespace
