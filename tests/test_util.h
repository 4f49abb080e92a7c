#pragma once
// Assertions shared by the diffq tests.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <ftw.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

namespace diffq_test {

/// max |actual − expected| <= rtol · max |expected| (same shape, finite).
inline ::testing::AssertionResult Close(const torch::Tensor& actual, const torch::Tensor& expected,
                                        double rtol = 1e-5) {
  if (actual.sizes() != expected.sizes()) {
    return ::testing::AssertionFailure()
           << "shape " << actual.sizes() << " vs " << expected.sizes();
  }
  auto a = actual.detach().to(torch::kDouble);
  auto e = expected.detach().to(torch::kDouble);
  const double err = (a - e).abs().max().item<double>();
  const double ref = e.abs().max().item<double>();
  if (!std::isfinite(err) || err > rtol * ref) {
    return ::testing::AssertionFailure() << "max error " << err << " > " << rtol << " * " << ref;
  }
  return ::testing::AssertionSuccess();
}

/// Same shape, dtype and bytes.
inline bool BitEqual(const torch::Tensor& x, const torch::Tensor& y) {
  auto a = x.detach().cpu().contiguous(), b = y.detach().cpu().contiguous();
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
         std::memcmp(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()) == 0;
}

/// `fn()` throws a `c10::Error` whose message contains `substring`.
template <typename Fn>
void ExpectError(Fn fn, const std::string& substring) {
  try {
    fn();
    ADD_FAILURE() << "expected an error containing '" << substring << "'";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find(substring), std::string::npos) << e.what();
  }
}

/// Removes `path` and everything under it (POSIX nftw, then remove(3) depth first). True when
/// nothing is left: removed, or absent to begin with. POSIX only, as the tests are.
/// Not std::filesystem::remove_all: PyTorch 2.11's pip wheel exports its own copy of it from
/// libtorch, which crashes when called from a program built by a newer GCC.
inline bool RemoveTree(const std::string& path) {
  const int rc = ::nftw(
      path.c_str(),
      [](const char* p, const struct stat*, int, struct FTW*) { return std::remove(p); }, 16,
      FTW_DEPTH | FTW_PHYS);
  return rc == 0 || (rc == -1 && errno == ENOENT);
}

/// Turns TF32 off for cuDNN and cuBLAS while alive: TF32 products would differ from the float32
/// reference computations by more than the tests' tolerance.
class NoTF32 {
 public:
  NoTF32()
      : cudnn_(at::globalContext().allowTF32CuDNN()),
        cublas_(at::globalContext().allowTF32CuBLAS()) {
    at::globalContext().setAllowTF32CuDNN(false);
    at::globalContext().setAllowTF32CuBLAS(false);
  }
  ~NoTF32() {
    at::globalContext().setAllowTF32CuDNN(cudnn_);
    at::globalContext().setAllowTF32CuBLAS(cublas_);
  }

 private:
  bool cudnn_, cublas_;
};

}  // namespace diffq_test
