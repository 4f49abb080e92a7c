#pragma once
/// \file diffq/distributed.h
/// Data-parallel training on PyTorch's own collectives (c10d): `diffq::DataParallel` averages the
/// gradients of a model, its DiffQ logits and LSQ step sizes included, across the processes of a
/// c10d process group, and the `*_group_from_*` helpers form such a group (Gloo for CPU tensors;
/// NCCL for CUDA tensors where the LibTorch build has it).
///
/// LibTorch's C++ frontend has no DistributedDataParallel. This header gives its synchronous core:
/// the same parameters on every rank at construction (checked, then broadcast from rank 0), and
/// after every `backward()` the gradients averaged in flat buckets, one allreduce per bucket:
///
/// ```cpp
/// auto group = diffq::gloo_group_from_env();       // RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
/// Net model;
/// torch::optim::Adam optimizer(model->parameters(), 1e-3);
/// diffq::DiffQuantizer<Net> quantizer(model, diffq::DiffQOptions().group_size(16));
/// quantizer.setup_optimizer(optimizer, 1e-2);
/// diffq::DataParallel parallel(group, quantizer);  // after the quantizer: logits included
/// for (auto& batch : loader) {                      // each rank reads its own shard
///   auto out = quantizer.forward(batch.data);
///   auto loss = loss_fn(out, batch.target) + lambda * quantizer.penalty();
///   optimizer.zero_grad();
///   loss.backward();
///   parallel.sync_gradients();                      // average across ranks
///   optimizer.step();
/// }
/// ```
///
/// Pseudo quantization noise: built from a `DiffQuantizer`, the wrapper gives it the rank
/// (`DiffQuantizer::set_noise_rank`), so every rank draws its own noise sample, from the seed the
/// quantizer draws (LibTorch's default CPU generator) mixed with the rank
/// (`diffq::rank_noise_seed`; rank 0 uses the seed as it is, so one process trains as without the
/// wrapper). The averaged logit gradient is then an estimate over `world_size` noise draws.
///
/// Failures: every collective waits at most the process group's timeout (Gloo; NCCL only with
/// blocking wait, which the NCCL helpers turn on); a peer that died, hangs or never joined gives a
/// `c10::Error` on the others that says which collective failed, never a hang. Models that differ
/// across ranks are refused at construction on every rank, naming the first differing parameter;
/// a sync refused on one rank (see `sync_gradients`) stops every rank at that sync.
///
/// Needs c10d's Gloo backend: LibTorch's `torch/csrc/distributed/c10d/` headers, the gloo headers
/// (Debian: `libgloo-dev`) and `-DUSE_C10D_GLOO` (the CMake target `DiffQ::diffq` defines it when
/// `DIFFQ_WITH_DISTRIBUTED` is ON). `diffq/diffq.h` includes this header only where it can.
/// NCCL helpers are compiled where `USE_C10D_NCCL` is defined (LibTorch's CUDA builds).

#ifndef USE_C10D_GLOO
#error \
    "diffq/distributed.h needs c10d's Gloo backend: compile with -DUSE_C10D_GLOO and the gloo headers (Debian: libgloo-dev); DiffQ::diffq does this when DIFFQ_WITH_DISTRIBUTED is ON"
#endif

/// Defined where this header is included (`diffq/diffq.h` includes it only where it can).
#define DIFFQ_HAS_DISTRIBUTED 1

#include <diffq/noise.h>

#include <c10/util/Exception.h>
#include <torch/arg.h>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <functional>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace diffq {

/// Options of the process-group helpers (`gloo_group_from_env`, `gloo_group_from_file`, ...).
struct ProcessGroupOptions {
  /// How long a collective, and the rendezvous of all ranks, may wait for a peer before it fails
  /// (c10d's default: 30 min). A dead or hung peer is reported within this time.
  TORCH_ARG(std::chrono::milliseconds, timeout) = std::chrono::minutes(30);
  /// Address or host name of this machine's interface for Gloo's connections. Empty: the
  /// loopback address when the master is on loopback (or with a FileStore), else the address
  /// this machine's host name resolves to (c10d's default device); `GLOO_SOCKET_IFNAME`, as in
  /// PyTorch, names an interface instead.
  TORCH_ARG(std::string, hostname) = "";
};

/// Options of `diffq::DataParallel`, chainable.
struct DataParallelOptions {
  /// Size of one flat gradient bucket, MB (2^20 bytes); one allreduce per bucket. DDP's default
  /// is 25. Must be > 0.
  TORCH_ARG(double, bucket_size_mb) = 25;
  /// Broadcast the buffers (BatchNorm running statistics) from rank 0 at every
  /// `sync_gradients()`, as DDP does before every forward.
  TORCH_ARG(bool, broadcast_buffers) = true;
};

namespace detail {

/// The collectives `DataParallel` needs, over any c10d process group type: `c10d::ProcessGroup`
/// (LibTorch 1.13 and 2.x) or `c10d::Backend` (2.x, what `ProcessGroupGloo` and
/// `ProcessGroupNCCL` derive from there). Each call waits for its work; a failure becomes a
/// `c10::Error` naming `what`.
struct Collectives {
  int rank = 0, size = 1;
  bool nccl = false;  ///< the group takes CUDA tensors only
  /// Where the small control tensors of the model check live (CPU, or a GPU with NCCL).
  at::Device device = at::kCPU;
  std::function<void(std::vector<at::Tensor>&, c10d::ReduceOp::RedOpType)> allreduce;
  std::function<void(std::vector<at::Tensor>&, int root)> broadcast;
};

/// Runs `fn`; an exception from it (a peer that died, timed out or never joined) becomes a
/// `c10::Error` that names the collective and this rank.
template <typename Fn>
void run_collective(const Collectives& c, const std::string& what, Fn&& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "diffq::DataParallel: ", what, " failed on rank ", c.rank, " of ", c.size,
                " (a peer died, stopped responding within the process group's timeout, or "
                "called another collective): ",
                e.what());
  }
}

template <typename Group>
Collectives collectives_of(const c10::intrusive_ptr<Group>& group) {
  TORCH_CHECK(group, "diffq::DataParallel: the process group is null");
  Collectives c;
  c.rank = group->getRank();
  c.size = group->getSize();
  c.nccl = group->getBackendName() == "nccl";
  TORCH_CHECK(c.size >= 1 && c.rank >= 0 && c.rank < c.size,
              "diffq::DataParallel: the process group has rank ", c.rank, " of size ", c.size);
  c.allreduce = [group](std::vector<at::Tensor>& t, c10d::ReduceOp::RedOpType op) {
    c10d::AllreduceOptions o;
    o.reduceOp = op;
    group->allreduce(t, o)->wait();
  };
  c.broadcast = [group](std::vector<at::Tensor>& t, int root) {
    c10d::BroadcastOptions o;
    o.rootRank = root;
    group->broadcast(t, o)->wait();
  };
  return c;
}

/// Consecutive runs of `tensors` of one dtype and device, each at most `cap_bytes` (a tensor
/// larger than that is a run of its own): the buckets. Returns index ranges `[first, last)`.
inline std::vector<std::pair<size_t, size_t>> bucket_ranges(const std::vector<at::Tensor>& tensors,
                                                            double cap_bytes) {
  std::vector<std::pair<size_t, size_t>> out;
  size_t first = 0;
  double bytes = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    const double b = static_cast<double>(t.numel()) * static_cast<double>(t.element_size());
    const bool same = i > first && t.scalar_type() == tensors[first].scalar_type() &&
                      t.device() == tensors[first].device();
    if (i > first && (!same || bytes + b > cap_bytes)) {
      out.emplace_back(first, i);
      first = i;
      bytes = 0;
    }
    bytes += b;
  }
  if (first < tensors.size()) out.emplace_back(first, tensors.size());
  return out;
}

/// Broadcasts `tensors` from rank 0 in place, one flat broadcast per bucket.
inline void broadcast_flat(const Collectives& c, const std::vector<at::Tensor>& tensors,
                           double cap_bytes, const std::string& what) {
  if (c.size == 1) return;
  at::NoGradGuard no_grad;
  for (const auto& r : bucket_ranges(tensors, cap_bytes)) {
    std::vector<at::Tensor> parts;
    for (size_t i = r.first; i < r.second; ++i) parts.push_back(tensors[i].detach().reshape(-1));
    std::vector<at::Tensor> flat{at::cat(parts)};
    run_collective(c, "the broadcast of the " + what, [&] { c.broadcast(flat, 0); });
    int64_t offset = 0;
    for (size_t i = r.first; i < r.second; ++i) {
      auto t = tensors[i].detach();
      t.copy_(flat[0].narrow(0, offset, t.numel()).view(t.sizes()));
      offset += t.numel();
    }
  }
}

/// Whether `Q` has `set_noise_rank(int64_t)` (`DiffQuantizer`).
template <typename Q, typename = void>
struct HasNoiseRank : std::false_type {};
template <typename Q>
struct HasNoiseRank<Q, std::void_t<decltype(std::declval<Q&>().set_noise_rank(int64_t{}))>>
    : std::true_type {};

/// `s` as a uint8 CPU tensor, and back.
inline at::Tensor bytes_tensor(const std::string& s) {
  auto t = at::empty({static_cast<int64_t>(s.size())}, at::kByte);
  std::copy(s.begin(), s.end(), t.data_ptr<uint8_t>());
  return t;
}
inline std::string tensor_string(const at::Tensor& t) {
  const auto* p = reinterpret_cast<const char*>(t.data_ptr<uint8_t>());
  return std::string(p, p + t.numel());
}

/// Broadcasts `s` from rank `root` (a length, then the bytes).
inline std::string broadcast_string(const Collectives& c, const std::string& s, int root,
                                    const std::string& what) {
  std::vector<at::Tensor> len{
      at::full({1}, static_cast<int64_t>(s.size()), at::TensorOptions(at::kLong).device(c.device))};
  run_collective(c, "the broadcast of " + what, [&] { c.broadcast(len, root); });
  const int64_t n = len[0].item<int64_t>();
  std::vector<at::Tensor> bytes{
      (c.rank == root ? bytes_tensor(s) : at::empty({n}, at::kByte)).to(c.device)};
  if (n > 0) run_collective(c, "the broadcast of " + what, [&] { c.broadcast(bytes, root); });
  return tensor_string(bytes[0].cpu());
}

/// `'name' [6, 10] Float` for the model check.
inline std::string describe_tensor(const std::string& kind, const std::string& name,
                                   const at::Tensor& t) {
  std::ostringstream s;
  s << kind << " '" << name << "' " << t.sizes() << " " << t.scalar_type()
    << (t.requires_grad() ? "" : " (requires_grad false)");
  return s.str();
}

}  // namespace detail

/// Data-parallel training over a c10d process group: one model replica per process (rank), each
/// trained on its own shard of the data, with the gradients averaged across ranks before each
/// optimizer step. Synchronous, like PyTorch's DistributedDataParallel without its overlap of
/// communication and backward.
///
/// Build it after the quantizer has wrapped the model, so that the logits (DiffQ) or step sizes
/// (LSQ) are parameters of the model and are averaged like the weights (the Python DiffQ has the
/// same rule: quantizer first, then DDP). `sync_gradients()` refuses a model that gained
/// parameters after construction.
///
/// Not thread-safe; every rank must call the same methods in the same order (they are
/// collectives).
class DataParallel {
 public:
  /// Wraps `model` (its parameters and buffers, recursively, in `named_parameters()` order).
  /// `group`: a `c10::intrusive_ptr` to a c10d process group (`c10d::ProcessGroupGloo`,
  /// `c10d::ProcessGroupNCCL`, `c10d::ProcessGroup`, or 2.x's `c10d::Backend`), e.g. from
  /// `gloo_group_from_env()`.
  ///
  /// A collective over all ranks: checks that every rank holds the same parameter and buffer
  /// names, shapes and dtypes (throws `c10::Error` on every rank, naming the first that differs),
  /// then broadcasts the parameters and buffers from rank 0. Throws on bad options, and if a
  /// collective fails (see the file comment).
  template <typename Group>
  DataParallel(const c10::intrusive_ptr<Group>& group, std::shared_ptr<torch::nn::Module> model,
               DataParallelOptions options = {})
      : comm_(detail::collectives_of(group)), model_(std::move(model)), options_(options) {
    init();
  }

  /// Wraps the module of a `ModuleHolder` (e.g. `torch::nn::Linear`).
  template <typename Group, typename Contained>
  DataParallel(const c10::intrusive_ptr<Group>& group,
               const torch::nn::ModuleHolder<Contained>& model, DataParallelOptions options = {})
      : DataParallel(group, std::static_pointer_cast<torch::nn::Module>(model.ptr()), options) {}

  /// Wraps the model of `quantizer` (a `DiffQuantizer`, `UniformQuantizer` or `LSQQuantizer`),
  /// its logits or step sizes included, and gives a `DiffQuantizer` this process's rank, so that
  /// each rank draws its own pseudo quantization noise (`DiffQuantizer::set_noise_rank`).
  template <typename Group, typename Quantizer,
            typename = decltype(std::declval<Quantizer&>().quantized_names()),
            typename = decltype(std::declval<Quantizer&>().model())>
  DataParallel(const c10::intrusive_ptr<Group>& group, Quantizer& quantizer,
               DataParallelOptions options = {})
      : DataParallel(group, std::static_pointer_cast<torch::nn::Module>(quantizer.model()),
                     options) {
    if constexpr (detail::HasNoiseRank<Quantizer>::value) quantizer.set_noise_rank(rank());
  }

  /// This process's rank, in `[0, world_size())`.
  int64_t rank() const { return comm_.rank; }
  /// Number of processes in the group.
  int64_t world_size() const { return comm_.size; }
  /// The synchronised parameters' names, in bucket order.
  const std::vector<std::string>& parameter_names() const { return names_; }
  /// Number of gradient buckets (one allreduce each per `sync_gradients()`).
  int64_t num_buckets() const { return static_cast<int64_t>(buckets_.size()); }

  /// Averages every parameter's gradient across the ranks: call it on every rank between
  /// `backward()` and `optimizer.step()`. One allreduce (sum) per bucket, then a division by
  /// `world_size()`. A gradient that is undefined on a rank (a parameter its forward did not use)
  /// counts there as zero; the average is set on every rank where any rank had one, and a
  /// parameter with no gradient on any rank keeps none (so the optimizer skips it everywhere).
  /// With `broadcast_buffers` (the default) the buffers are then broadcast from rank 0.
  /// With one process the gradients come out bit for bit as they went in.
  ///
  /// Throws `c10::Error` if the model gained or lost parameters since construction, on a sparse
  /// gradient, on a gradient of another dtype or device than its parameter, and when a
  /// collective fails (a dead or hung peer: within the process group's timeout).
  void sync_gradients() {
    at::NoGradGuard no_grad;
    // A refusal travels in the first allreduce, so that every rank stops at the same sync (one
    // rank throwing alone would leave the others waiting, or pair later collectives wrongly).
    const std::string error = local_error();
    if (buckets_.empty()) {
      TORCH_CHECK(error.empty(), error);
      if (options_.broadcast_buffers()) sync_buffers();
      return;
    }
    for (size_t b = 0; b < buckets_.size(); ++b) {
      auto& bucket = buckets_[b];
      const int64_t count = static_cast<int64_t>(bucket.last - bucket.first);
      auto flags = bucket.flat.narrow(0, bucket.numel, count);
      if (!error.empty()) {
        bucket.flat.zero_();
      } else {
        int64_t offset = 0;
        for (size_t i = bucket.first; i < bucket.last; ++i) {
          const auto& p = params_[i];
          const auto& g = p.grad();
          auto slot = bucket.flat.narrow(0, offset, p.numel());
          if (g.defined()) {
            slot.copy_(g.reshape(-1));
          } else {
            slot.zero_();
          }
          flags[i - bucket.first].fill_(g.defined() ? 1 : 0);
          offset += p.numel();
        }
      }
      if (b == 0) bucket.flat[bucket.numel + count].fill_(error.empty() ? 0 : 1);
      std::vector<at::Tensor> t{bucket.flat};
      run_collective("the allreduce of gradient bucket " + std::to_string(b),
                     [&] { comm_.allreduce(t, c10d::ReduceOp::SUM); });
      if (b == 0) {
        const int64_t refused = bucket.flat[bucket.numel + count].item<int64_t>();
        TORCH_CHECK(refused == 0,
                    error.empty()
                        ? "diffq::DataParallel: sync_gradients() was refused on " +
                              std::to_string(refused) + " of " + std::to_string(comm_.size) +
                              " ranks (their error says why); seen on rank " +
                              std::to_string(comm_.rank) + ", no gradient changed"
                        : error + " (rank " + std::to_string(comm_.rank) + " of " +
                              std::to_string(comm_.size) + "; every rank stops at this sync)");
      }
      bucket.flat.narrow(0, 0, bucket.numel).div_(static_cast<double>(comm_.size));
      const auto had = flags.to(at::kCPU, at::kDouble);
      const double* had_p = had.data_ptr<double>();
      int64_t offset = 0;
      for (size_t i = bucket.first; i < bucket.last; ++i) {
        auto& p = params_[i];
        auto slot = bucket.flat.narrow(0, offset, p.numel()).view(p.sizes());
        offset += p.numel();
        if (had_p[i - bucket.first] == 0) continue;  // no rank had a gradient
        if (p.grad().defined()) {
          p.mutable_grad().copy_(slot);
        } else {
          p.mutable_grad() = slot.clone();
        }
      }
    }
    if (options_.broadcast_buffers()) sync_buffers();
  }

  /// Broadcasts the buffers (BatchNorm running statistics) from rank 0, on every rank.
  void sync_buffers() { detail::broadcast_flat(comm_, buffers_, cap_bytes(), "buffers"); }

  /// Broadcasts the parameters from rank 0, on every rank (done at construction).
  void sync_parameters() { detail::broadcast_flat(comm_, params_, cap_bytes(), "parameters"); }

 private:
  struct Bucket {
    size_t first = 0, last = 0;  ///< parameter indices [first, last)
    int64_t numel = 0;           ///< gradient elements; the flags follow them in `flat`
    /// `[numel + last − first (+ 1 in bucket 0)]`: gradients, one flag each (any rank had a
    /// gradient), and in bucket 0 the count of ranks that refused this sync.
    at::Tensor flat;
  };

  /// Why this rank cannot sync now, or "" (checked before any collective of the sync).
  std::string local_error() const {
    const size_t now = model_->parameters().size();
    if (now != params_.size()) {
      return c10::str("diffq::DataParallel: the model has ", now, " parameters, ", params_.size(),
                      " when the DataParallel was built; build it after anything that registers "
                      "parameters (the quantizer: its logits or step sizes must be synchronised "
                      "too)");
    }
    for (const auto& bucket : buckets_) {
      for (size_t i = bucket.first; i < bucket.last; ++i) {
        const auto& p = params_[i];
        if (p.scalar_type() != bucket.flat.scalar_type() || p.device() != bucket.flat.device()) {
          return c10::str("diffq::DataParallel: parameter '", names_[i], "' is now ",
                          p.scalar_type(), " on ", p.device(), ", it was ",
                          bucket.flat.scalar_type(), " on ", bucket.flat.device(),
                          " when the DataParallel was built; build it after moving the model");
        }
        const auto& g = p.grad();
        if (!g.defined()) continue;
        if (g.is_sparse()) {
          return c10::str("diffq::DataParallel: parameter '", names_[i],
                          "' has a sparse gradient; only dense gradients are averaged");
        }
        if (g.scalar_type() != p.scalar_type() || g.device() != p.device() ||
            g.numel() != p.numel()) {
          return c10::str("diffq::DataParallel: the gradient of parameter '", names_[i], "' is ",
                          g.scalar_type(), " on ", g.device(), " with ", g.numel(),
                          " elements, expected ", p.scalar_type(), " on ", p.device(), " with ",
                          p.numel());
        }
      }
    }
    return "";
  }

  double cap_bytes() const { return options_.bucket_size_mb() * 1048576.0; }

  template <typename Fn>
  void run_collective(const std::string& what, Fn&& fn) const {
    detail::run_collective(comm_, what, std::forward<Fn>(fn));
  }

  void init() {
    TORCH_CHECK(model_, "diffq::DataParallel: the model is null");
    TORCH_CHECK(std::isfinite(options_.bucket_size_mb()) && options_.bucket_size_mb() > 0,
                "diffq::DataParallel: bucket_size_mb must be > 0, got ", options_.bucket_size_mb());
    std::vector<std::string> described;
    for (const auto& kv : model_->named_parameters(/*recurse=*/true)) {
      names_.push_back(kv.key());
      params_.push_back(kv.value());
      described.push_back(detail::describe_tensor("parameter", kv.key(), kv.value()));
    }
    for (const auto& kv : model_->named_buffers(/*recurse=*/true)) {
      buffers_.push_back(kv.value());
      described.push_back(detail::describe_tensor("buffer", kv.key(), kv.value()));
    }
    if (comm_.nccl && !params_.empty()) comm_.device = params_.front().device();
    check_same_model(described);
    sync_parameters();
    sync_buffers();
    for (const auto& r : detail::bucket_ranges(params_, cap_bytes())) {
      Bucket b;
      b.first = r.first;
      b.last = r.second;
      for (size_t i = r.first; i < r.second; ++i) b.numel += params_[i].numel();
      const int64_t error_slot = buckets_.empty() ? 1 : 0;  // bucket 0 carries refusals
      b.flat = at::empty({b.numel + static_cast<int64_t>(r.second - r.first) + error_slot},
                         params_[r.first].options().requires_grad(false));
      buckets_.push_back(std::move(b));
    }
  }

  /// Every rank compares its list with rank 0's; the lowest (index, rank) that differs is agreed
  /// by an allreduce(min), then that rank's entry is broadcast so every rank names both sides.
  void check_same_model(const std::vector<std::string>& described) {
    if (comm_.size == 1) return;
    std::string joined;
    for (const auto& d : described) joined += d + '\n';
    const std::string root = detail::broadcast_string(comm_, joined, 0, "the model description");
    std::vector<std::string> root_list;
    {
      std::istringstream in(root);
      std::string line;
      while (std::getline(in, line)) root_list.push_back(line);
    }
    const int64_t n = static_cast<int64_t>(std::max(root_list.size(), described.size()));
    int64_t first = n;
    for (int64_t i = 0; i < n; ++i) {
      const bool mine = i < static_cast<int64_t>(described.size());
      const bool theirs = i < static_cast<int64_t>(root_list.size());
      if (mine != theirs || (mine && described[i] != root_list[i])) {
        first = i;
        break;
      }
    }
    const int64_t none = std::numeric_limits<int64_t>::max();
    const int64_t key = first == n ? none : first * comm_.size + comm_.rank;
    // Every rank's count too, so that lists that agree up to the shorter length still differ.
    std::vector<at::Tensor> agreed{
        at::full({1}, key, at::TensorOptions(at::kLong).device(comm_.device))};
    run_collective("the model check", [&] { comm_.allreduce(agreed, c10d::ReduceOp::MIN); });
    const int64_t k = agreed[0].item<int64_t>();
    if (k == none) return;
    const int64_t index = k / comm_.size;
    const int other = static_cast<int>(k % comm_.size);
    const std::string mine =
        index < static_cast<int64_t>(described.size()) ? described[index] : "no such entry";
    const std::string theirs = detail::broadcast_string(comm_, mine, other, "the model check");
    const std::string at_root = index < static_cast<int64_t>(root_list.size())
                                    ? root_list[index]
                                    : std::string("no such entry");
    TORCH_CHECK(false, "diffq::DataParallel: the ranks' models differ at entry ", index,
                " (parameters, then buffers): rank 0 has ", at_root, ", rank ", other, " has ",
                theirs, " (seen on rank ", comm_.rank, " of ", comm_.size,
                "); every rank must build the same model, and wrap it in the same quantizer");
  }

  detail::Collectives comm_;
  std::shared_ptr<torch::nn::Module> model_;
  DataParallelOptions options_;
  std::vector<std::string> names_;
  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> buffers_;
  std::vector<Bucket> buckets_;
};

namespace detail {

/// The value of environment variable `name`, or an error that names it and what it is for.
inline std::string require_env(const char* name, const char* where) {
  const char* v = std::getenv(name);
  TORCH_CHECK(v != nullptr && *v != '\0', where, ": environment variable ", name,
              " is not set (expected RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, as torchrun "
              "sets them)");
  return v;
}

/// `text` as an integer in `[lo, hi]`, or an error naming `what`.
inline int64_t parse_int(const std::string& text, int64_t lo, int64_t hi, const std::string& what,
                         const char* where) {
  size_t used = 0;
  long long v = 0;
  bool ok = !text.empty() && (std::isdigit(static_cast<unsigned char>(text[0])) != 0);
  if (ok) {
    try {
      v = std::stoll(text, &used, 10);
    } catch (const std::exception&) {
      ok = false;
    }
  }
  ok = ok && used == text.size() && v >= lo && v <= hi;
  TORCH_CHECK(ok, where, ": ", what, " must be an integer in [", lo, ", ", hi, "], got '", text,
              "'");
  return v;
}

inline bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

/// Gloo's transport device: `GLOO_SOCKET_IFNAME`'s interface, else `options.hostname()`, else
/// loopback when `loopback`, else c10d's default device (this machine's host name).
inline std::shared_ptr<::gloo::transport::Device> gloo_device(const ProcessGroupOptions& options,
                                                              bool loopback) {
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname != nullptr && *ifname) {
    return c10d::ProcessGroupGloo::createDeviceForInterface(ifname);
  }
  if (!options.hostname().empty()) {
    return c10d::ProcessGroupGloo::createDeviceForHostname(options.hostname());
  }
  if (loopback) return c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1");
  return c10d::ProcessGroupGloo::createDefaultDevice();
}

/// Every rank sets its key in `store`, then waits (at most `timeout`) for all ranks' keys: a rank
/// that never joins is an error that names it, within the timeout.
inline void join_ranks(c10d::Store& store, int rank, int world_size,
                       std::chrono::milliseconds timeout, const char* where) {
  store.set("diffq/joined/" + std::to_string(rank), std::vector<uint8_t>{1});
  std::vector<std::string> keys;
  for (int r = 0; r < world_size; ++r) keys.push_back("diffq/joined/" + std::to_string(r));
  try {
    store.wait(keys, timeout);
  } catch (const std::exception& e) {
    std::string missing;
    for (int r = 0; r < world_size; ++r) {
      try {
        if (!store.check({keys[r]})) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      } catch (const std::exception&) {
      }
    }
    TORCH_CHECK(false, where, ": rank ", rank, " of ", world_size, " waited ", timeout.count(),
                " ms for the other ranks to join", missing.empty() ? "" : "; missing: rank ",
                missing, " (", e.what(), ")");
  }
}

/// A Gloo group over `store`, once every rank has joined.
inline c10::intrusive_ptr<c10d::ProcessGroupGloo> gloo_group(
    const c10::intrusive_ptr<c10d::Store>& store, int rank, int world_size,
    const ProcessGroupOptions& options, bool loopback, const char* where) {
  store->setTimeout(options.timeout());
  join_ranks(*store, rank, world_size, options.timeout(), where);
  try {
    auto opts = c10d::ProcessGroupGloo::Options::create(options.timeout());
    opts->devices.push_back(gloo_device(options, loopback));
    return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world_size, opts);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, where, ": could not connect rank ", rank, " of ", world_size,
                " to its peers: ", e.what());
  }
}

inline void check_timeout(const ProcessGroupOptions& options, const char* where) {
  TORCH_CHECK(options.timeout().count() > 0, where, ": timeout must be > 0 ms, got ",
              options.timeout().count());
}

/// A TCPStore at `master_addr:port`, served by rank 0, the others its clients.
inline c10::intrusive_ptr<c10d::Store> tcp_store(const std::string& master_addr, int port, int rank,
                                                 int world_size, const ProcessGroupOptions& options,
                                                 const char* where) {
  check_timeout(options, where);
  TORCH_CHECK(world_size >= 1, where, ": world_size must be >= 1, got ", world_size);
  TORCH_CHECK(rank >= 0 && rank < world_size, where, ": rank must be in [0, ", world_size,
              "), got ", rank);
  TORCH_CHECK(port >= 1 && port <= 65535, where, ": the master port must be in [1, 65535], got ",
              port);
  TORCH_CHECK(!master_addr.empty(), where, ": the master address is empty");
  c10d::TCPStoreOptions o;
  o.port = static_cast<uint16_t>(port);
  o.isServer = rank == 0;
  o.numWorkers = static_cast<size_t>(world_size);
  o.waitWorkers = false;  // join_ranks waits, and names a missing rank
  o.timeout = options.timeout();
  try {
    return c10::make_intrusive<c10d::TCPStore>(master_addr, o);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, where, ": rank ", rank, " of ", world_size,
                (rank == 0 ? " could not serve" : " could not reach"), " the store at ",
                master_addr, ":", port, " (rank 0 serves it: the port must be free there) within ",
                options.timeout().count(), " ms: ", e.what());
  }
}

/// RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, torchrun's variables.
struct EnvRendezvous {
  int rank = 0, world_size = 1, port = 0;
  std::string master_addr;
};

inline EnvRendezvous parse_env(const char* where) {
  EnvRendezvous r;
  r.world_size = static_cast<int>(
      parse_int(require_env("WORLD_SIZE", where), 1, 1 << 20, "WORLD_SIZE", where));
  r.rank = static_cast<int>(
      parse_int(require_env("RANK", where), 0, r.world_size - 1, "RANK (< WORLD_SIZE)", where));
  r.master_addr = require_env("MASTER_ADDR", where);
  r.port = static_cast<int>(
      parse_int(require_env("MASTER_PORT", where), 1, 65535, "MASTER_PORT", where));
  return r;
}

inline c10::intrusive_ptr<c10d::Store> file_store(const std::string& path, int rank, int world_size,
                                                  const char* where) {
  TORCH_CHECK(world_size >= 1, where, ": world_size must be >= 1, got ", world_size);
  TORCH_CHECK(rank >= 0 && rank < world_size, where, ": rank must be in [0, ", world_size,
              "), got ", rank);
  TORCH_CHECK(!path.empty(), where, ": the store path is empty");
  try {
    return c10::make_intrusive<c10d::FileStore>(path, world_size);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, where, ": cannot open the file store '", path, "': ", e.what());
  }
}

}  // namespace detail

/// A Gloo process group (CPU tensors) from torchrun's environment variables: `RANK`,
/// `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT`; rank 0 serves a `c10d::TCPStore` there, the
/// others connect to it. Returns once every rank has joined. Throws `c10::Error` on a missing or
/// malformed variable (naming it), and when a rank does not join within `options.timeout()`
/// (naming the missing ranks where the store can tell).
inline c10::intrusive_ptr<c10d::ProcessGroupGloo> gloo_group_from_env(
    ProcessGroupOptions options = {}) {
  constexpr const char* where = "diffq::gloo_group_from_env";
  detail::check_timeout(options, where);
  const auto r = detail::parse_env(where);
  auto store = detail::tcp_store(r.master_addr, r.port, r.rank, r.world_size, options, where);
  return detail::gloo_group(store, r.rank, r.world_size, options,
                            detail::is_loopback(r.master_addr), where);
}

/// A Gloo process group of `world_size` processes meeting at `master_addr:master_port`, where
/// rank 0 serves a `c10d::TCPStore` (what `gloo_group_from_env` does with torchrun's variables).
/// Throws as `gloo_group_from_env`, and on a rank outside `[0, world_size)` or a port outside
/// `[1, 65535]`.
inline c10::intrusive_ptr<c10d::ProcessGroupGloo> gloo_group_from_tcp(
    const std::string& master_addr, int master_port, int rank, int world_size,
    ProcessGroupOptions options = {}) {
  constexpr const char* where = "diffq::gloo_group_from_tcp";
  auto store = detail::tcp_store(master_addr, master_port, rank, world_size, options, where);
  return detail::gloo_group(store, rank, world_size, options, detail::is_loopback(master_addr),
                            where);
}

/// A Gloo process group of `world_size` processes on one machine (or a shared file system),
/// meeting through a `c10d::FileStore` at `path`. The file must not be left from an earlier run
/// (remove it first). Loopback transport unless `options` or `GLOO_SOCKET_IFNAME` say otherwise.
/// Throws as `gloo_group_from_env`, and on a rank outside `[0, world_size)`.
inline c10::intrusive_ptr<c10d::ProcessGroupGloo> gloo_group_from_file(
    const std::string& path, int rank, int world_size, ProcessGroupOptions options = {}) {
  constexpr const char* where = "diffq::gloo_group_from_file";
  detail::check_timeout(options, where);
  auto store = detail::file_store(path, rank, world_size, where);
  return detail::gloo_group(store, rank, world_size, options, /*loopback=*/true, where);
}

#ifdef USE_C10D_NCCL
namespace detail {
/// An NCCL group over `store`, once every rank has joined.
inline c10::intrusive_ptr<c10d::ProcessGroupNCCL> nccl_group(
    const c10::intrusive_ptr<c10d::Store>& store, int rank, int world_size,
    const ProcessGroupOptions& options, const char* where) {
  store->setTimeout(options.timeout());
  join_ranks(*store, rank, world_size, options.timeout(), where);
  // Without blocking wait, NCCL work ignores the timeout (a dead peer would hang the others, or
  // 2.x's watchdog would abort the process): make wait() block and throw after the timeout.
  // LibTorch 1.13 reads NCCL_BLOCKING_WAIT, 2.x TORCH_NCCL_BLOCKING_WAIT, at construction.
  ::setenv("NCCL_BLOCKING_WAIT", "1", /*overwrite=*/0);
  ::setenv("TORCH_NCCL_BLOCKING_WAIT", "1", /*overwrite=*/0);
  auto opts = c10d::ProcessGroupNCCL::Options::create();
  opts->timeout = options.timeout();
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world_size, opts);
}
}  // namespace detail

/// An NCCL process group (CUDA tensors; LibTorch's CUDA builds) from torchrun's environment
/// variables, as `gloo_group_from_env`. Each rank must use its own GPU
/// (`torch::Device(torch::kCUDA, local_rank)`): NCCL cannot put two ranks on one GPU.
inline c10::intrusive_ptr<c10d::ProcessGroupNCCL> nccl_group_from_env(
    ProcessGroupOptions options = {}) {
  constexpr const char* where = "diffq::nccl_group_from_env";
  detail::check_timeout(options, where);
  const auto r = detail::parse_env(where);
  auto store = detail::tcp_store(r.master_addr, r.port, r.rank, r.world_size, options, where);
  return detail::nccl_group(store, r.rank, r.world_size, options, where);
}

/// An NCCL process group meeting through a `c10d::FileStore` at `path`, as
/// `gloo_group_from_file`.
inline c10::intrusive_ptr<c10d::ProcessGroupNCCL> nccl_group_from_file(
    const std::string& path, int rank, int world_size, ProcessGroupOptions options = {}) {
  constexpr const char* where = "diffq::nccl_group_from_file";
  detail::check_timeout(options, where);
  auto store = detail::file_store(path, rank, world_size, where);
  return detail::nccl_group(store, rank, world_size, options, where);
}
#endif

}  // namespace diffq
