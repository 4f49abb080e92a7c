#pragma once
/// \file diffq/detail/noise_kernel.h
/// Implementation of `diffq::fill_noise` (see diffq/noise.h): a multi-lane xoshiro128+ generator
/// and branch-free float Box-Muller written so that GCC and Clang auto-vectorize the inner loops
/// with plain SSE2 (4 lanes per instruction) and, through a runtime-dispatched clone, AVX2 (8).
/// Needs only the C++ standard library; everything here may change without notice.
///
/// Sources: xoshiro128+ and splitmix64, D. Blackman and S. Vigna, "Scrambled linear pseudorandom
/// number generators", ACM TOMS 47(4), 2021 (prng.di.unimi.it); Box-Muller, G. E. P. Box and
/// M. E. Muller, Ann. Math. Statist. 29(2), 1958; sine/cosine coefficients from Cephes
/// (S. L. Moshier, `sinf.c`); inverse square root seed and first correction from J. Kadlec,
/// "Improving the fast inverse square root" (2010), analysed in C. J. Walczyk et al.,
/// "Improving the accuracy of the fast inverse square root by modifying Newton-Raphson
/// corrections", Entropy 23(1), 2021.

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) || defined(__clang__)
#define DIFFQ_NOISE_INLINE inline __attribute__((always_inline))
#define DIFFQ_NOISE_RESTRICT __restrict__
#elif defined(_MSC_VER)
#define DIFFQ_NOISE_INLINE __forceinline
#define DIFFQ_NOISE_RESTRICT __restrict
#else
#define DIFFQ_NOISE_INLINE inline
#define DIFFQ_NOISE_RESTRICT
#endif

#if defined(__GNUC__) && !defined(__clang__)
#define DIFFQ_NOISE_IVDEP _Pragma("GCC ivdep")
#define DIFFQ_NOISE_UNROLL _Pragma("GCC unroll 8")
#elif defined(__clang__)
#define DIFFQ_NOISE_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#define DIFFQ_NOISE_UNROLL _Pragma("unroll")
#else
#define DIFFQ_NOISE_IVDEP
#define DIFFQ_NOISE_UNROLL
#endif

// Runtime dispatch to an AVX2 clone of the kernels on x86 when the translation unit itself is not
// already compiled for AVX2. The clone enables AVX2 only (not FMA), so no multiply-add gets
// contracted and both paths produce bit-identical samples. Define DIFFQ_NOISE_NO_DISPATCH to keep
// the baseline path only.
#if !defined(DIFFQ_NOISE_NO_DISPATCH) && !defined(__AVX2__) && \
    (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define DIFFQ_NOISE_AVX2_DISPATCH 1
#else
#define DIFFQ_NOISE_AVX2_DISPATCH 0
#endif

namespace diffq {
namespace detail {

/// Independent xoshiro128+ generators run side by side; lane `j` lives at index `j` of each
/// state word array, so one loop over the lanes is one vector loop.
constexpr int kNoiseLanes = 8;
/// Generator steps per lane in one block of uniform samples.
constexpr int kNoiseUniformSteps = 8;
/// Box-Muller pairs per lane in one block of Gaussian samples (interleaved for latency hiding).
constexpr int kNoiseGaussianSteps = 4;
/// Samples per block, for both kinds: a block is the unit of the sample layout.
constexpr int kNoiseBlock = 64;
static_assert(kNoiseLanes * kNoiseUniformSteps == kNoiseBlock, "uniform block layout");
static_assert(2 * kNoiseLanes * kNoiseGaussianSteps == kNoiseBlock, "gaussian block layout");

/// State of the `kNoiseLanes` xoshiro128+ generators, struct-of-arrays.
struct NoiseLanes {
  uint32_t s0[kNoiseLanes];
  uint32_t s1[kNoiseLanes];
  uint32_t s2[kNoiseLanes];
  uint32_t s3[kNoiseLanes];
};

/// splitmix64 (Vigna): advances `x` by the golden gamma and returns the mixed value. Every output
/// value occurs once per 2^64 consecutive states.
inline uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

/// Seeds the lanes of stream `stream` of seed `seed`. The splitmix64 state starts at
/// `mix(seed) + 64·γ·stream` and each stream draws 2 outputs per lane (16 < 64), so for one seed
/// the first 2^58 streams read disjoint stretches of the splitmix64 sequence: no two lanes of
/// these streams share a state. A lane's 128-bit state is two consecutive splitmix64 outputs,
/// which are never both zero (the all-zero state is the one xoshiro128+ must avoid).
inline void seed_noise_lanes(NoiseLanes& st, uint64_t seed, uint64_t stream) {
  uint64_t key = seed;
  uint64_t x = splitmix64(key) + stream * (64 * 0x9e3779b97f4a7c15ULL);
  for (int j = 0; j < kNoiseLanes; ++j) {
    const uint64_t a = splitmix64(x);
    const uint64_t b = splitmix64(x);
    st.s0[j] = static_cast<uint32_t>(a >> 32);
    st.s1[j] = static_cast<uint32_t>(a);
    st.s2[j] = static_cast<uint32_t>(b >> 32);
    st.s3[j] = static_cast<uint32_t>(b);
  }
}

/// One xoshiro128+ step on a lane held in registers; returns the 32-bit output, whose upper 24
/// bits are the ones used (the lowest bits of xoshiro128+ have low linear complexity).
DIFFQ_NOISE_INLINE uint32_t xoshiro128p(uint32_t& a, uint32_t& b, uint32_t& c, uint32_t& d) {
  const uint32_t result = a + d;
  const uint32_t t = b << 9;
  c ^= a;
  d ^= b;
  b ^= c;
  a ^= d;
  c ^= t;
  d = (d << 11) | (d >> 21);
  return result;
}

DIFFQ_NOISE_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

DIFFQ_NOISE_INLINE float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

/// Uniform sample of a generator output `r`: its upper 24 bits as a signed integer times 2^-24,
/// i.e. exactly one of the 2^24 values `k·2^-24`, `k` in [-2^23, 2^23). (`>>` on a negative
/// int32 is an arithmetic shift with GCC, Clang and MSVC, and in C++20.)
DIFFQ_NOISE_INLINE float uniform_sample(uint32_t r) {
  return static_cast<float>(static_cast<int32_t>(r) >> 8) * 0x1p-24f;
}

/// `h = -ln(u)/4` for `u = (k + 1)·2^-24`, `k = r >> 8` in [0, 2^24), so `u` in (0, 1] and
/// `h` in [0, 6 ln 2]. With `u = 2^(e-24)·m`, `m` in [1/√2, √2): `ln m = 2·atanh(s)`,
/// `s = (m-1)/(m+1)`, |s| <= 0.1716, by its Taylor series to s^7, whose last coefficient is
/// enlarged from -1/14 to -0.0729 (below) to absorb the truncated terms. Maximum relative error
/// over all 2^24 inputs: 2.1e-7 (NoiseKernel.LogTermAndRadiusAccuracy).
DIFFQ_NOISE_INLINE float neg_quarter_log_uniform(uint32_t r) {
  const float u = static_cast<float>(static_cast<int32_t>(r >> 8) + 1);  // 2^24·u, exact
  // ix - bits(1/√2) = (e << 23) + (bits of m) - bits(1/√2); 24 << 23 taken off gives e - 24.
  const uint32_t t = float_bits(u) - (0x3f3504f3u + (24u << 23));
  const int32_t e = static_cast<int32_t>(t) >> 23;  // e - 24 in [-24, 0], arithmetic shift
  const float m = bits_float((t & 0x007fffffu) + 0x3f3504f3u);
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  // -ln(m)/4 = -(s/2)·(1 + s²/3 + s⁴/5 + s⁶/7 + ...).
  float p = -0.0729f;
  p = p * s2 - 1.0f / 10.0f;
  p = p * s2 - 1.0f / 6.0f;
  p = p * s2 - 0.5f;
  return static_cast<float>(e) * -0.17328679513998632f + s * p;  // -(e-24)·ln(2)/4 - ln(m)/4
}

/// `√(h/2)` for `h >= 0`, i.e. `h·y` with `y ≈ 1/√(2h)`: bit-level seed and Kadlec's tuned
/// correction (max relative error 6.5e-4), then one Newton step folded into the product. For the
/// `h` of `neg_quarter_log_uniform`, maximum relative error 8.3e-7 against the exact `√(-ln(u)/8)`
/// (NoiseKernel.LogTermAndRadiusAccuracy). Returns exactly 0 for `h = 0`.
DIFFQ_NOISE_INLINE float half_root_half(float h) {
  // Seed on the bits of 2h = bits of h + 2^23: 0x5f1ffff9 - ((bits(h) + 2^23) >> 1).
  float y = bits_float(0x5f1ffff9u - 0x00400000u - (float_bits(h) >> 1));
  // y·0.703952253·(2.38924456 - 2h·y²).
  y = y * (1.68191409f - 1.407904506f * (h * y * y));
  // Newton: h·y·(3/2 - h·y²).
  const float w = h * y;
  return w * (1.5f - w * y);
}

/// `(2·cos θ, 2·sin θ)` for the angle of generator output `r` (upper 24 bits). Bits 29..8 give
/// `φ = (n + 1/2)·2π/2^24`, `n` in [-2^21, 2^21), so φ in (-π/4, π/4); bit 31 negates the cosine
/// and bit 30 swaps the two outputs, which maps the wedge (-π/4, π/4) onto the four wedges around
/// the axes. θ thus takes each of the 2^24 values `(m + 1/2)·2π/2^24` for exactly one value of the
/// upper 24 bits: a uniform angle on a grid offset by half a step (Box-Muller only needs θ
/// uniform). sin and cos of φ by the Cephes `sinf` polynomials for [-π/4, π/4], scaled by 2;
/// over all 2^24 inputs, `(c2, s2)/2` lies within 1.2e-7 of the exact `(cos θ, sin θ)`
/// (NoiseKernel.AngleIsABijectionOntoTheHalfStepGrid).
DIFFQ_NOISE_INLINE void twice_cos_sin(uint32_t r, float& c2, float& s2) {
  const int32_t k = (static_cast<int32_t>(r << 2) >> 9) | 1;  // 2·n + 1, n in [-2^21, 2^21)
  const float phi = static_cast<float>(k) * (0.78539816339744831f * 0x1p-22f);
  const float z = phi * phi;
  float s = -3.9030591782e-4f;  // 2·(-1.9515295891e-4)
  s = s * z + 1.66643217472e-2f;
  s = s * z - 3.3333309222e-1f;
  s = s * z + 2.0f;
  s = s * phi;
  float c = 4.886631423619896e-5f;  // 2·2.443315711809948e-5
  c = c * z - 2.77746325098753e-3f;
  c = c * z + 8.333329136597654e-2f;
  c = c * z - 1.0f;
  c = c * z + 2.0f;
  uint32_t ci = float_bits(c) ^ (r & 0x80000000u);
  uint32_t si = float_bits(s);
  const uint32_t swap = static_cast<uint32_t>(static_cast<int32_t>(r << 1) >> 31);
  const uint32_t d = (ci ^ si) & swap;
  c2 = bits_float(ci ^ d);
  s2 = bits_float(si ^ d);
}

/// Writes the next block of `kNoiseBlock` uniform samples: `out[k·kNoiseLanes + j]` is step `k`
/// of lane `j`.
DIFFQ_NOISE_INLINE void uniform_block(NoiseLanes& st, float* DIFFQ_NOISE_RESTRICT out) {
  DIFFQ_NOISE_IVDEP
  for (int j = 0; j < kNoiseLanes; ++j) {
    uint32_t a = st.s0[j], b = st.s1[j], c = st.s2[j], d = st.s3[j];
    DIFFQ_NOISE_UNROLL
    for (int k = 0; k < kNoiseUniformSteps; ++k) {
      out[k * kNoiseLanes + j] = uniform_sample(xoshiro128p(a, b, c, d));
    }
    st.s0[j] = a;
    st.s1[j] = b;
    st.s2[j] = c;
    st.s3[j] = d;
  }
}

/// Writes one block of `kNoiseBlock` Gaussian samples `z/2`: pair `k` of lane `j` (outputs
/// `r1`, `r2` of steps 2k and 2k+1) goes to `out[2k·kNoiseLanes + j]` (cosine) and
/// `out[(2k+1)·kNoiseLanes + j]` (sine).
DIFFQ_NOISE_INLINE void gaussian_block(NoiseLanes& st, float* DIFFQ_NOISE_RESTRICT out) {
  DIFFQ_NOISE_IVDEP
  for (int j = 0; j < kNoiseLanes; ++j) {
    uint32_t a = st.s0[j], b = st.s1[j], c = st.s2[j], d = st.s3[j];
    // The pairs of one lane are independent once their generator outputs are drawn: computing
    // them stage by stage interleaves their dependency chains (the log and the inverse square
    // root are long ones) so that the out-of-order core overlaps them.
    constexpr int G = kNoiseGaussianSteps;
    uint32_t r1[G], r2[G];
    float h[G], c2[G], s2[G];
    DIFFQ_NOISE_UNROLL
    for (int k = 0; k < G; ++k) {
      r1[k] = xoshiro128p(a, b, c, d);
      r2[k] = xoshiro128p(a, b, c, d);
    }
    DIFFQ_NOISE_UNROLL
    for (int k = 0; k < G; ++k) h[k] = neg_quarter_log_uniform(r1[k]);
    DIFFQ_NOISE_UNROLL
    for (int k = 0; k < G; ++k) twice_cos_sin(r2[k], c2[k], s2[k]);
    DIFFQ_NOISE_UNROLL
    for (int k = 0; k < G; ++k) {
      const float radius = half_root_half(h[k]);  // √(-ln(u)/8) = √(-2 ln u)/4
      out[2 * k * kNoiseLanes + j] = radius * c2[k];
      out[(2 * k + 1) * kNoiseLanes + j] = radius * s2[k];
    }
    st.s0[j] = a;
    st.s1[j] = b;
    st.s2[j] = c;
    st.s3[j] = d;
  }
}

/// Fills `out[0..n)`: whole blocks in place, then the first `n mod kNoiseBlock` samples of one
/// more block through a stack buffer, so that every sample comes from the same block code.
template <bool kGaussian>
DIFFQ_NOISE_INLINE void fill_noise_impl(float* DIFFQ_NOISE_RESTRICT out, int64_t n, uint64_t seed,
                                        uint64_t stream) {
  NoiseLanes st;
  seed_noise_lanes(st, seed, stream);
  const int64_t full = n / kNoiseBlock;
  for (int64_t i = 0; i < full; ++i) {
    if (kGaussian) {
      gaussian_block(st, out + i * kNoiseBlock);
    } else {
      uniform_block(st, out + i * kNoiseBlock);
    }
  }
  const int64_t rest = n - full * kNoiseBlock;
  if (rest > 0) {
    float buf[kNoiseBlock];
    if (kGaussian) {
      gaussian_block(st, buf);
    } else {
      uniform_block(st, buf);
    }
    std::memcpy(out + full * kNoiseBlock, buf, static_cast<size_t>(rest) * sizeof(float));
  }
}

/// Baseline path (whatever the translation unit is compiled for).
inline void fill_noise_baseline(float* out, int64_t n, uint64_t seed, uint64_t stream,
                                bool gaussian) {
  if (gaussian) {
    fill_noise_impl<true>(out, n, seed, stream);
  } else {
    fill_noise_impl<false>(out, n, seed, stream);
  }
}

#if DIFFQ_NOISE_AVX2_DISPATCH
/// AVX2 clone (no FMA: bit-identical to the baseline path). Call only if the CPU has AVX2.
__attribute__((target("avx2"))) inline void fill_noise_avx2(float* out, int64_t n, uint64_t seed,
                                                            uint64_t stream, bool gaussian) {
  if (gaussian) {
    fill_noise_impl<true>(out, n, seed, stream);
  } else {
    fill_noise_impl<false>(out, n, seed, stream);
  }
}

/// Whether the AVX2 clone may run on this CPU (and OS). `__builtin_cpu_init` makes this safe even
/// before static constructors have run; it returns at once once the CPU model is known.
inline bool noise_cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
}
#endif

/// Fills `out[0..n)` with the fastest path this CPU supports. No argument checks.
inline void fill_noise_unchecked(float* out, int64_t n, uint64_t seed, uint64_t stream,
                                 bool gaussian) {
#if DIFFQ_NOISE_AVX2_DISPATCH
  if (noise_cpu_has_avx2()) {
    fill_noise_avx2(out, n, seed, stream, gaussian);
    return;
  }
#endif
  fill_noise_baseline(out, n, seed, stream, gaussian);
}

}  // namespace detail
}  // namespace diffq
