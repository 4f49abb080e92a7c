// libFuzzer target of the checkpoint reader core (diffq/detail/format.h): parses and fully decodes
// arbitrary bytes twice, with and without the CRC checks (so that mutations reach the checks
// behind them). Every input must give a clean c10::Error or a result; ASan/UBSan catch the rest.
//
// Built with clang: -fsanitize=fuzzer,address,undefined (tests/fuzz/CMakeLists.txt). Run:
//   DIFFQ_FUZZ_SEED_DIR=corpus checkpoint_fuzz -runs=20000 corpus
// LLVMFuzzerInitialize writes the seed checkpoints (tests/fuzz/seeds.h) into DIFFQ_FUZZ_SEED_DIR.
#include "seeds.h"

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  const char* dir = std::getenv("DIFFQ_FUZZ_SEED_DIR");
  if (dir == nullptr) return 0;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const auto seeds = diffq_fuzz::make_seeds();
  for (size_t i = 0; i < seeds.size(); ++i) {
    std::ofstream f(std::string(dir) + "/seed" + std::to_string(i) + ".ckpt", std::ios::binary);
    f.write(reinterpret_cast<const char*>(seeds[i].bytes.data()),
            static_cast<std::streamsize>(seeds[i].bytes.size()));
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  for (bool verify_crc : {true, false}) {
    try {
      diffq_fuzz::decode_all(data, size, verify_crc);
    } catch (const c10::Error&) {
      // A clean rejection.
    }
  }
  return 0;
}
