// The checkpoint reader core (diffq/detail/format.h, torch-free) under AddressSanitizer and
// UndefinedBehaviorSanitizer: seed checkpoints decode to exactly their inputs; truncation at every
// offset and every single-bit flip give a clean c10::Error; every byte replaced (xor 0xFF, 0, a
// random value) with the CRC checks off gives a clean c10::Error or a result, never a crash.
// Prints "N passed, M failed"; exits non-zero on any failure.
#include "seeds.h"

#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

int passed = 0, failed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

/// Runs the reader; returns "" on success, the error message on c10::Error.
std::string run(const std::vector<uint8_t>& b, bool verify_crc) {
  try {
    diffq_fuzz::decode_all(b.data(), b.size(), verify_crc);
  } catch (const c10::Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

int main() {
  const auto seeds = diffq_fuzz::make_seeds();
  std::mt19937 rng(7);
  for (size_t si = 0; si < seeds.size(); ++si) {
    const auto& s = seeds[si];
    const std::string tag = "seed " + std::to_string(si);
    // Exact round trip of levels and float bytes.
    const auto d = diffq_fuzz::decode_all(s.bytes.data(), s.bytes.size(), true);
    bool same = d.levels.size() == s.levels.size();
    for (size_t i = 0; same && i < d.levels.size(); ++i) same = d.levels[i] == s.levels[i];
    check(same, tag + ": levels round trip");
    bool fsame = d.floats.size() == s.floats.size();
    for (size_t i = 0; fsame && i < d.floats.size(); ++i) fsame = d.floats[i] == s.floats[i];
    check(fsame, tag + ": float bytes round trip");
    // Truncation at every offset.
    int trunc_ok = 0;
    for (size_t n = 0; n < s.bytes.size(); ++n) {
      std::vector<uint8_t> cut(s.bytes.begin(), s.bytes.begin() + static_cast<std::ptrdiff_t>(n));
      const std::string e = run(cut, true);
      if (e.find("fuzz: <bytes>: ") != std::string::npos &&
          e.find(" at byte ") != std::string::npos) {
        ++trunc_ok;
      } else {
        check(false, tag + ": truncation at " + std::to_string(n) + " gave: " + e);
      }
    }
    check(trunc_ok == static_cast<int>(s.bytes.size()), tag + ": every truncation rejected");
    // Every single-bit flip, CRCs on: always rejected.
    int flips_ok = 0;
    for (size_t i = 0; i < s.bytes.size(); ++i) {
      for (int bit = 0; bit < 8; ++bit) {
        auto bad = s.bytes;
        bad[i] = static_cast<uint8_t>(bad[i] ^ (1 << bit));
        if (!run(bad, true).empty()) {
          ++flips_ok;
        } else {
          check(false, tag + ": flip of byte " + std::to_string(i) + " bit " + std::to_string(bit) +
                           " accepted");
        }
      }
    }
    check(flips_ok == static_cast<int>(8 * s.bytes.size()), tag + ": every bit flip rejected");
    // Every byte replaced, CRCs off: a clean error or a result (the sanitizers watch).
    for (size_t i = 0; i < s.bytes.size(); ++i) {
      for (int variant = 0; variant < 3; ++variant) {
        auto bad = s.bytes;
        bad[i] = variant == 0   ? static_cast<uint8_t>(bad[i] ^ 0xFF)
                 : variant == 1 ? uint8_t{0}
                                : static_cast<uint8_t>(rng());
        const std::string e = run(bad, false);
        if (!e.empty() && e.find("fuzz: <bytes>: ") == std::string::npos) {
          check(false, tag + ": unexpected error text: " + e);
        }
      }
    }
    check(true, tag + ": corruption behind the CRCs handled");
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
