#pragma once
/// \file examples/fashion_mnist/cli.h
/// The command line of the Fashion-MNIST example (`parse_args`: flags, their values and how they
/// combine; a `UsageError` names the flag, what was expected and what was found), the `--out`
/// directory's check, the checkpoint names, and the parse of the `eval` child's output. Kept apart
/// from main.cpp so that tests/fashion_mnist_test.cpp can test them.

#include "idx.h"
#include "report.h"

#include <diffq/diffq.h>

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace fmnist {

struct Config {
  std::string command;
  // Data and output.
  std::string data = kDefaultDataDir;
  std::string out = "out";
  int64_t train_limit = -1;
  int64_t test_limit = -1;
  // Training.
  int64_t epochs = 3;
  double lr = 1e-3;
  int64_t batch_size = 128;
  uint64_t seed = 42;
  int threads = 2;
  bool threads_given = false;  ///< --threads on the command line
  // Data parallelism (--world-size): ranks > 0 or a given --rank train as one process of many.
  int world_size = 1;
  int rank = -1;  ///< -1: launch the --world-size ranks here (when world_size > 1)
  std::string master_addr = "127.0.0.1";
  int master_port = 0;  ///< 0: a free port (local launch), 29500 with --rank
  bool fp32 = true;
  // Methods (--method): fp32, diffq, uniform (PTQ of the fp32 model), qat, lsq.
  bool diffq = true;
  bool uniform = true;
  bool qat = false;
  bool lsq = false;
  std::vector<int64_t> uniform_bits = {8, 4};
  int64_t qat_bits = 4;
  int64_t lsq_bits = 4;
  // DiffQ.
  std::vector<double> penalties = {1.0};
  std::vector<std::string> penalty_texts = {"1"};  ///< as written on the command line
  /// Size budgets (MB): one DiffQ run each, λ adjusted by diffq::SizeBudget (--target-size-mb).
  std::vector<double> target_sizes_mb;
  double budget_lr = diffq::SizeBudgetOptions().lr();
  int64_t budget_measure_every = diffq::SizeBudgetOptions().measure_every();
  int64_t group_size = 16;
  double min_size_mb = 0.01;
  double min_bits = 2;
  double max_bits = 15;
  double init_bits = 8;
  std::string noise = "gaussian";
  std::string param = "bits";
  double bits_lr = 1e-2;
  // eval.
  std::string checkpoint;
  std::string format = "auto";
};

constexpr int kExitUsage = 2;
constexpr int kExitMismatch = 3;
constexpr int kMaxThreads = 1024;
constexpr int kMaxWorldSize = 64;

inline constexpr const char* kUsage = R"(usage:
  fashion_mnist train [options]        train fp32 and DiffQ models, check, report
  fashion_mnist eval --checkpoint FILE evaluate a checkpoint on the test set
  fashion_mnist help

train options (defaults in brackets):
  --method M1,M2,...    among fp32, diffq, uniform, qat, lsq [fp32,diffq,uniform]
                        uniform: post-training quantization of the trained fp32 model (no
                        training; trains fp32 first); qat: uniform QAT with the straight-through
                        estimator; lsq: Learned Step Size Quantization (qat and lsq train for
                        --epochs like fp32, so they are not in the default list)
                        only the selected methods' options are checked
  --uniform-bits B1,... bit widths of the uniform PTQ runs, distinct [8,4]
  --qat-bits B [4]      --lsq-bits B [4]
  --penalty L1,L2,...   DiffQ model-size penalties λ, one run each; distinct in their first
                        6 significant digits (they name the checkpoints) [1]; `none`: no λ run
  --target-size-mb X,.. DiffQ size budgets in MB (2^20 bytes), one run each: λ is adjusted
                        during training (diffq::SizeBudget) and the model made to fit after it;
                        a budget below the model's floor (every group at --min-bits) is refused
  --budget-lr X         rate of λ's update per measurement [0.5]
  --budget-measure-every K   steps between measurements of the true model size [10]
  --no-fp32             skip the fp32 baseline run (same as leaving fp32 out of --method); an
                        error with uniform (the default methods include it), which quantizes
                        the trained fp32 model: pass --method without uniform instead
  --epochs N            [3]          --lr X            Adam learning rate [1e-3]
  --batch-size N        [128]        --seed N          [42]
  --threads N           intra-op threads per process, 1 to 1024 [2; 2/N with --world-size N]
  --world-size N        data-parallel processes, 1 to 64 [1]: N local processes (ranks)
                        train on their shards of every batch (batch/N each) and average their
                        gradients (diffq::DataParallel, Gloo); rank 0 writes checkpoints and
                        report
  --rank R              with --world-size: run as rank R only, for a run across machines (start
                        one per machine, rank 0's machine first; see --master-addr)
  --master-addr A       rank 0's address [127.0.0.1]   --master-port P   [a free port; 29500
                        with --rank]
  --group-size N        weights sharing one bit width [16]
  --min-size-mb X       tensors at or below this fp32 size stay fp32 [0.01]
  --min-bits X [2]  --max-bits X [15]  --init-bits X [8]
  --noise gaussian|uniform   pseudo quantization noise [gaussian]
  --param bits|noise         what the learnt logits parametrise [bits]
  --bits-lr X           learning rate of the bit logits [1e-2]
  --data DIR            IDX files [/usr/share/datasets/fashion-mnist]
  --out DIR             checkpoints, report.md, fashion_mnist.svg [out]; must be writable
  --train-limit N / --test-limit N   use the first N images only (smoke runs)

eval options:
  --checkpoint FILE     written by `train` (fp32: torch::save; DiffQ: diffq::save_quantized)
  --format auto|fp32|diffq   [auto: from the file's first bytes]
  --data DIR, --test-limit N, --threads N   as for train
eval prints `checkpoint=FILE format=F` on one line, then `correct=N total=M accuracy=A%` on
the last line of stdout.
)";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline double parse_double(const std::string& flag, const std::string& v) {
  size_t pos = 0;
  double d = 0;
  try {
    d = std::stod(v, &pos);
  } catch (const std::exception&) {
    pos = std::string::npos;
  }
  if (pos != v.size() || !std::isfinite(d)) {
    throw UsageError(flag + " expects a number, got '" + v + "'");
  }
  return d;
}

/// An integer in [`min`, `max`]; the message names `flag`, the range and the text given.
inline int64_t parse_int(const std::string& flag, const std::string& v, int64_t min,
                         int64_t max = std::numeric_limits<int64_t>::max()) {
  size_t pos = 0;
  long long i = 0;
  bool out_of_range = false;
  try {
    i = std::stoll(v, &pos);
  } catch (const std::out_of_range&) {
    out_of_range = true;
  } catch (const std::exception&) {
    pos = std::string::npos;
  }
  const std::string range = max == std::numeric_limits<int64_t>::max()
                                ? ">= " + std::to_string(min)
                                : "in [" + std::to_string(min) + ", " + std::to_string(max) + "]";
  if (!out_of_range && pos != v.size()) {
    throw UsageError(flag + " expects an integer, got '" + v + "'");
  }
  if (out_of_range || i < min || i > max) {
    throw UsageError(flag + " expects an integer " + range + ", got " + v);
  }
  return i;
}

/// Splits a comma-separated list; throws naming `flag` on an empty list or an empty item.
inline std::vector<std::string> parse_list(const std::string& flag, const std::string& v,
                                           const std::string& what) {
  std::vector<std::string> items;
  std::stringstream ss(v);
  std::string item;
  while (std::getline(ss, item, ',')) items.push_back(item);
  const bool empty_item =
      std::find(items.begin(), items.end(), std::string()) != items.end() || v.empty();
  if (empty_item || v.back() == ',') {
    throw UsageError(flag + " expects a comma-separated list of " + what + ", got '" + v + "'");
  }
  return items;
}

inline diffq::DiffQOptions diffq_options(const Config& c) {
  return diffq::DiffQOptions()
      .group_size(c.group_size)
      .min_size_mb(c.min_size_mb)
      .min_bits(c.min_bits)
      .max_bits(c.max_bits)
      .init_bits(c.init_bits)
      .noise(c.noise == "uniform" ? diffq::Noise::kUniform : diffq::Noise::kGaussian)
      .param(c.param == "noise" ? diffq::Param::kNoise : diffq::Param::kBits);
}

inline diffq::UniformOptions uniform_options(const Config& c, int64_t bits, bool qat) {
  return diffq::UniformOptions().bits(bits).min_size_mb(c.min_size_mb).qat(qat);
}

inline diffq::LSQOptions lsq_options(const Config& c) {
  return diffq::LSQOptions().bits(c.lsq_bits).min_size_mb(c.min_size_mb);
}

/// File name (in `--out`) of the DiffQ checkpoint of penalty `lambda`.
inline std::string diffq_checkpoint_name(double lambda) {
  return "fashion_mnist_diffq_l" + lambda_string(lambda) + ".dq";
}

/// File name (in `--out`) of the DiffQ checkpoint of size budget `target_mb`.
inline std::string diffq_budget_checkpoint_name(double target_mb) {
  return "fashion_mnist_diffq_budget" + budget_string(target_mb) + ".dq";
}

namespace detail {

/// Runs `check()` (a `diffq::check_options`, called with `where` = `method`) and turns its
/// `c10::Error` into a `UsageError` that names the flags behind the options the message mentions
/// (`flags`: option name → flag; every flag of the list when none is mentioned).
template <typename Check>
void check_method_options(const std::string& method,
                          const std::vector<std::pair<std::string, std::string>>& flags,
                          Check check) {
  try {
    check(method);
  } catch (const c10::Error& e) {
    std::string msg = e.what_without_backtrace();
    if (msg.rfind(method + ": ", 0) == 0) msg = msg.substr(method.size() + 2);
    // The options named before the values (", got ..."), as whole words (so that "bits" does not
    // match "min_bits"), in the order the message names them.
    const std::string head = msg.substr(0, msg.find(", got"));
    auto is_word = [](char ch) {
      return std::isalnum(static_cast<unsigned char>(ch)) != 0 || ch == '_';
    };
    std::vector<std::pair<size_t, std::string>> found;
    std::string all;
    for (const auto& [option, flag] : flags) {
      all += (all.empty() ? "" : ", ") + flag;
      for (size_t at = head.find(option); at != std::string::npos; at = head.find(option, at + 1)) {
        const size_t end = at + option.size();
        if ((at == 0 || !is_word(head[at - 1])) && (end >= head.size() || !is_word(head[end]))) {
          found.emplace_back(at, flag);
          break;
        }
      }
    }
    std::sort(found.begin(), found.end());
    std::string named;
    for (const auto& f : found) {
      if (named.find(f.second) == std::string::npos) {
        named += (named.empty() ? "" : ", ") + f.second;
      }
    }
    throw UsageError((named.empty() ? all : named) + " (method " + method + "): " + msg);
  }
}

}  // namespace detail

/// The checks of `train`'s options that depend on the methods: only the selected methods' options
/// are checked (by the library's `check_options`, messages prefixed with the flags), and the
/// checkpoint names of the runs must be distinct.
inline void check_train_options(const Config& c) {
  if (c.diffq) {
    detail::check_method_options(
        "diffq",
        {{"group_size", "--group-size"},
         {"min_bits", "--min-bits"},
         {"max_bits", "--max-bits"},
         {"init_bits", "--init-bits"},
         {"min_size_mb", "--min-size-mb"}},
        [&](const std::string& where) { diffq::check_options(diffq_options(c), where); });
    if (!(c.bits_lr > 0)) {
      throw UsageError("--bits-lr (method diffq) must be > 0, got " + fmt("%g", c.bits_lr));
    }
    // λ names the checkpoint (and the report's rows) with %g: two values written the same would
    // write one file twice.
    for (size_t i = 0; i < c.penalties.size(); ++i) {
      for (size_t j = 0; j < i; ++j) {
        if (diffq_checkpoint_name(c.penalties[i]) == diffq_checkpoint_name(c.penalties[j])) {
          throw UsageError("--penalty values " + c.penalty_texts[j] + " and " + c.penalty_texts[i] +
                           " give the same checkpoint name '" +
                           diffq_checkpoint_name(c.penalties[i]) +
                           "' (λ is written with 6 significant digits); expected distinct values");
        }
      }
    }
  }
  if (c.diffq && c.penalties.empty() && c.target_sizes_mb.empty()) {
    throw UsageError(
        "--penalty none without --target-size-mb leaves DiffQ nothing to run; expected a λ or a "
        "budget (or --method without diffq)");
  }
  if (c.diffq) {
    for (size_t i = 0; i < c.target_sizes_mb.size(); ++i) {
      for (size_t j = 0; j < i; ++j) {
        const std::string name = diffq_budget_checkpoint_name(c.target_sizes_mb[i]);
        if (name == diffq_budget_checkpoint_name(c.target_sizes_mb[j])) {
          throw UsageError("--target-size-mb lists " + budget_string(c.target_sizes_mb[i]) +
                           " twice (as written with 6 significant digits, the checkpoint '" + name +
                           "'); expected distinct budgets");
        }
      }
    }
  }
  if (c.uniform) {
    for (size_t i = 0; i < c.uniform_bits.size(); ++i) {
      const int64_t b = c.uniform_bits[i];
      detail::check_method_options(
          "uniform", {{"bits", "--uniform-bits"}, {"min_size_mb", "--min-size-mb"}},
          [&](const std::string& where) {
            diffq::check_options(uniform_options(c, b, /*qat=*/false), where);
          });
      for (size_t j = 0; j < i; ++j) {
        if (c.uniform_bits[j] == b) {
          throw UsageError("--uniform-bits lists " + std::to_string(b) +
                           " twice; expected distinct bit widths (each names a checkpoint)");
        }
      }
    }
  }
  if (c.qat) {
    detail::check_method_options("qat", {{"bits", "--qat-bits"}, {"min_size_mb", "--min-size-mb"}},
                                 [&](const std::string& where) {
                                   diffq::check_options(uniform_options(c, c.qat_bits, true),
                                                        where);
                                 });
  }
  if (c.lsq) {
    detail::check_method_options(
        "lsq", {{"bits", "--lsq-bits"}, {"min_size_mb", "--min-size-mb"}},
        [&](const std::string& where) { diffq::check_options(lsq_options(c), where); });
  }
}

/// Parses `fashion_mnist <command> [options]`; throws `UsageError`.
inline Config parse_args(int argc, const char* const* argv) {
  Config c;
  if (argc < 2) throw UsageError("missing command");
  c.command = argv[1];
  if (c.command == "help" || c.command == "--help" || c.command == "-h") return c;
  if (c.command != "train" && c.command != "eval") {
    throw UsageError("unknown command '" + c.command + "'");
  }
  const bool train = c.command == "train";
  bool no_fp32 = false, method_given = false;
  for (int i = 2; i < argc; ++i) {
    std::string flag = argv[i];
    std::string value;
    bool has_value = false;
    const auto eq = flag.find('=');
    if (flag.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = flag.substr(eq + 1);
      flag = flag.substr(0, eq);
      has_value = true;
    }
    auto next = [&]() -> std::string {
      if (has_value) return value;
      if (i + 1 >= argc) throw UsageError(flag + " expects a value");
      return argv[++i];
    };
    auto train_only = [&]() {
      if (!train) throw UsageError(flag + " is a train option");
    };
    // Bit widths are checked by the selected methods (check_train_options), not here.
    constexpr int64_t kAnyInt = std::numeric_limits<int64_t>::min();
    if (flag == "--data") {
      c.data = next();
    } else if (flag == "--test-limit") {
      c.test_limit = parse_int(flag, next(), 1);
    } else if (flag == "--threads") {
      c.threads = static_cast<int>(parse_int(flag, next(), 1, kMaxThreads));
      c.threads_given = true;
    } else if (flag == "--world-size") {
      train_only();
      c.world_size = static_cast<int>(parse_int(flag, next(), 1, kMaxWorldSize));
    } else if (flag == "--rank") {
      train_only();
      c.rank = static_cast<int>(parse_int(flag, next(), 0, kMaxWorldSize - 1));
    } else if (flag == "--master-addr") {
      train_only();
      c.master_addr = next();
      if (c.master_addr.empty()) throw UsageError("--master-addr expects an address, got ''");
    } else if (flag == "--master-port") {
      train_only();
      c.master_port = static_cast<int>(parse_int(flag, next(), 1, 65535));
    } else if (flag == "--checkpoint" && !train) {
      c.checkpoint = next();
    } else if (flag == "--format" && !train) {
      c.format = next();
      if (c.format != "auto" && c.format != "fp32" && c.format != "diffq") {
        throw UsageError("--format expects auto, fp32 or diffq, got '" + c.format + "'");
      }
    } else if (flag == "--out") {
      train_only();
      c.out = next();
      if (c.out.empty()) throw UsageError("--out expects a directory, got ''");
    } else if (flag == "--train-limit") {
      train_only();
      c.train_limit = parse_int(flag, next(), 1);
    } else if (flag == "--epochs") {
      train_only();
      c.epochs = parse_int(flag, next(), 1);
    } else if (flag == "--lr") {
      train_only();
      c.lr = parse_double(flag, next());
    } else if (flag == "--batch-size") {
      train_only();
      c.batch_size = parse_int(flag, next(), 1);
    } else if (flag == "--seed") {
      train_only();
      c.seed = static_cast<uint64_t>(parse_int(flag, next(), 0));
    } else if (flag == "--no-fp32") {
      train_only();
      if (has_value) throw UsageError(flag + " takes no value");
      no_fp32 = true;
    } else if (flag == "--method") {
      train_only();
      method_given = true;
      c.fp32 = c.diffq = c.uniform = c.qat = c.lsq = false;
      for (const auto& item : parse_list(flag, next(), "methods")) {
        if (item == "fp32") {
          c.fp32 = true;
        } else if (item == "diffq") {
          c.diffq = true;
        } else if (item == "uniform") {
          c.uniform = true;
        } else if (item == "qat") {
          c.qat = true;
        } else if (item == "lsq") {
          c.lsq = true;
        } else {
          throw UsageError(
              "--method expects a comma-separated list of fp32, diffq, uniform, qat, "
              "lsq, got '" +
              item + "'");
        }
      }
    } else if (flag == "--uniform-bits") {
      train_only();
      c.uniform_bits.clear();
      for (const auto& item : parse_list(flag, next(), "integers")) {
        c.uniform_bits.push_back(parse_int(flag, item, kAnyInt));
      }
    } else if (flag == "--qat-bits") {
      train_only();
      c.qat_bits = parse_int(flag, next(), kAnyInt);
    } else if (flag == "--lsq-bits") {
      train_only();
      c.lsq_bits = parse_int(flag, next(), kAnyInt);
    } else if (flag == "--penalty") {
      train_only();
      c.penalties.clear();
      c.penalty_texts.clear();
      const std::string list = next();
      for (const auto& item :
           list == "none" ? std::vector<std::string>{} : parse_list(flag, list, "numbers")) {
        const double l = parse_double(flag, item);
        if (l < 0) throw UsageError("--penalty values must be >= 0, got " + item);
        c.penalties.push_back(l + 0.0);  // -0 → 0
        c.penalty_texts.push_back(item);
      }
    } else if (flag == "--target-size-mb") {
      train_only();
      c.target_sizes_mb.clear();
      for (const auto& item : parse_list(flag, next(), "numbers")) {
        const double t = parse_double(flag, item);
        if (!(t > 0) || !std::isfinite(t)) {
          throw UsageError("--target-size-mb values must be finite and > 0, got " + item);
        }
        c.target_sizes_mb.push_back(t);
      }
    } else if (flag == "--budget-lr") {
      train_only();
      c.budget_lr = parse_double(flag, next());
      if (!(c.budget_lr > 0) || !std::isfinite(c.budget_lr)) {
        throw UsageError("--budget-lr must be finite and > 0, got " + fmt("%g", c.budget_lr));
      }
    } else if (flag == "--budget-measure-every") {
      train_only();
      c.budget_measure_every = parse_int(flag, next(), 1);
    } else if (flag == "--group-size") {
      train_only();
      c.group_size = parse_int(flag, next(), 0);
    } else if (flag == "--min-size-mb") {
      train_only();
      c.min_size_mb = parse_double(flag, next());
    } else if (flag == "--min-bits") {
      train_only();
      c.min_bits = parse_double(flag, next());
    } else if (flag == "--max-bits") {
      train_only();
      c.max_bits = parse_double(flag, next());
    } else if (flag == "--init-bits") {
      train_only();
      c.init_bits = parse_double(flag, next());
    } else if (flag == "--noise") {
      train_only();
      c.noise = next();
      if (c.noise != "gaussian" && c.noise != "uniform") {
        throw UsageError("--noise expects gaussian or uniform, got '" + c.noise + "'");
      }
    } else if (flag == "--param") {
      train_only();
      c.param = next();
      if (c.param != "bits" && c.param != "noise") {
        throw UsageError("--param expects bits or noise, got '" + c.param + "'");
      }
    } else if (flag == "--bits-lr") {
      train_only();
      c.bits_lr = parse_double(flag, next());
    } else {
      throw UsageError("unknown option '" + flag + "' for " + c.command);
    }
  }
  if (!train) {
    if (c.checkpoint.empty()) throw UsageError("eval needs --checkpoint FILE");
    return c;
  }
  if (no_fp32) {
    if (c.uniform) {
      throw UsageError(
          std::string("--no-fp32 cannot be used with the uniform method") +
          (method_given ? " (listed in --method)" : " (one of the default methods)") +
          ": uniform PTQ quantizes the trained fp32 model, so it needs the fp32 run; pass "
          "--method without uniform (e.g. --method diffq) to skip fp32, or drop --no-fp32");
    }
    if (method_given && c.fp32) {
      throw UsageError("--no-fp32 contradicts --method, which lists fp32; drop one of them");
    }
    c.fp32 = false;
  }
  if (!(c.lr > 0)) throw UsageError("--lr must be > 0, got " + fmt("%g", c.lr));
  if (c.rank >= c.world_size) {
    throw UsageError("--rank must be < --world-size (" + std::to_string(c.world_size) + "), got " +
                     std::to_string(c.rank));
  }
  if (c.rank >= 0 && c.master_port == 0) c.master_port = 29500;
  if (!c.threads_given && c.world_size > 1) c.threads = std::max(1, c.threads / c.world_size);
  check_train_options(c);
  return c;
}

/// Creates the `--out` directory `out` if needed and checks that a file can be written in it (a
/// probe file, removed again), so that a bad `--out` fails before any training; throws a
/// `std::runtime_error` naming the path and the system's reason.
inline void prepare_out_dir(const std::string& out) {
  std::error_code ec;
  const auto st = std::filesystem::status(out, ec);
  if (std::filesystem::exists(st) && !std::filesystem::is_directory(st)) {
    throw std::runtime_error("fashion_mnist: --out '" + out +
                             "' exists but is not a directory; expected a directory");
  }
  std::filesystem::create_directories(out, ec);
  if (ec) {
    throw std::runtime_error("fashion_mnist: cannot create the --out directory '" + out +
                             "': " + ec.message());
  }
  const std::string probe =
      out + "/.fashion_mnist_write_probe_" + std::to_string(static_cast<long long>(::getpid()));
  errno = 0;
  FILE* f = std::fopen(probe.c_str(), "wb");
  if (f == nullptr) {
    const int e = errno;
    throw std::runtime_error("fashion_mnist: the --out directory '" + out +
                             "' is not writable: cannot create '" + probe +
                             "': " + std::strerror(e));
  }
  errno = 0;
  bool ok = std::fputc('x', f) != EOF;
  int e = errno;
  if (std::fclose(f) != 0 && ok) {
    ok = false;
    e = errno;
  }
  if (!ok) {
    std::remove(probe.c_str());
    throw std::runtime_error("fashion_mnist: the --out directory '" + out +
                             "' is not writable: cannot write '" + probe +
                             "': " + std::strerror(e != 0 ? e : EIO));
  }
  if (std::remove(probe.c_str()) != 0) {
    const int e2 = errno;
    throw std::runtime_error("fashion_mnist: cannot remove the probe file '" + probe +
                             "' from the --out directory: " + std::strerror(e2));
  }
}

struct Accuracy {
  int64_t correct = 0;
  int64_t total = 0;
};

/// The counts of the `eval` process from its stdout: its last line (a final newline ignored) must
/// be exactly `correct=N total=M accuracy=A%` with 0 <= N <= M and M > 0. Only the last line is
/// read, so that the checkpoint path printed before (which may hold anything, `correct=` or
/// newlines included) cannot be mistaken for it. Throws a `std::runtime_error` quoting the line.
inline Accuracy parse_eval_output(const std::string& output) {
  std::string body = output;
  while (!body.empty() && (body.back() == '\n' || body.back() == '\r')) body.pop_back();
  const auto nl = body.rfind('\n');
  const std::string last = nl == std::string::npos ? body : body.substr(nl + 1);
  long long correct = -1, total = -1;
  double accuracy = 0;
  int consumed = -1;
  const int n = std::sscanf(last.c_str(), "correct=%lld total=%lld accuracy=%lf%%%n", &correct,
                            &total, &accuracy, &consumed);
  if (n != 3 || consumed != static_cast<int>(last.size()) || total <= 0 || correct < 0 ||
      correct > total) {
    throw std::runtime_error(
        "fashion_mnist: expected the last line of the eval process's output to be 'correct=N "
        "total=M accuracy=A%' with 0 <= N <= M, M > 0; found '" +
        last + "' (its whole output: " + output + ")");
  }
  return {correct, total};
}

}  // namespace fmnist
