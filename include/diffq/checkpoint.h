#pragma once
/// \file diffq/checkpoint.h
/// Compressed, bit-exact checkpoints of quantized models, and a loader for inference that needs no
/// quantizer.
///
/// Format summary (full specification: `docs/checkpoint_format.md`). Everything little-endian.
/// - File header: magic `"DIFFQCKP"`, format version (readers refuse any other than 1), header
///   size, total file size, record counts by kind, segment size, optionally the
///   `DiffQOptions`, and a CRC-32 of the header.
/// - One record per tensor, each framed by its size and closed by its own CRC-32: name, dtype,
///   shape, then
///   - quantized tensors: group size, min, max (float64), the per-group bit widths (4 bits each,
///     deflated when smaller) and the integer levels: the tensor is cut into segments of 2^18
///     elements (coded in parallel); within a segment the levels are bucketed by the bit width
///     `b` of their group, one chunk per width, each stored as the smaller of plain bit-packing
///     at `b` bits (`bitpack`) and Huffman coding (four literal-only deflate streams, each
///     readable by zlib's inflate) of the levels as bytes (`zlib-bytes`, `b <= 8`) or of their 8
///     high bits, the `b − 8` low bits bit-packed (`zlib-planes`, `b >= 9`);
///   - non-quantized parameters (fp32, or fp16 with `DiffQOptions::float16`), buffers (own
///     dtype) and optional logits: raw little-endian elements, or a deflate stream of their byte
///     planes when smaller;
///   - tied names: an alias record naming the record that holds the tensor.
///
/// Loading rebuilds each quantized tensor as `w = min + level·(max − min)/(2^b − 1)` per group,
/// bit for bit equal to `diffq::dequantize_levels` (the quantizer's eval-mode weights).
///
/// Readers trust no size: truncations, flipped bytes, wrong magic or version, inconsistent
/// counts or sizes, shapes that do not match the model each throw a `c10::Error` naming the
/// source (the file name, `"<stream>"` or `"<bytes>"`), the record and the byte offset, e.g.
/// `"diffq::load_quantized: model.ckpt: record 3 at byte 1234: record CRC mismatch (stored ...,
/// computed ...)"` (a record that fails its CRC is not named: its name bytes are not trusted);
/// nothing is allocated beyond what the bytes present can justify, and a model is left untouched
/// when loading fails.

#include <diffq/bits.h>
#include <diffq/detail/format.h>
#include <diffq/detail/glob.h>
#include <diffq/options.h>
#include <diffq/packing.h>
#include <diffq/state.h>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <istream>
#include <map>
#include <memory>
#include <ostream>
#include <sstream>
#include <string>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>
#ifdef _WIN32
#include <filesystem>
#else
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

namespace diffq {

/// What `read_checkpoint_info` tells about one stored tensor (one record).
struct TensorInfo {
  std::string name;
  /// `"quantized"`, `"float"` (a non-quantized parameter), `"buffer"`, `"alias"` or `"logit"`.
  std::string kind;
  std::vector<int64_t> shape;  ///< empty for aliases
  /// Dtype of the tensor (`Undefined` for aliases).
  at::ScalarType dtype = at::ScalarType::Undefined;
  int64_t group_size = 0;   ///< quantized tensors only
  double min = 0, max = 0;  ///< quantized tensors only
  /// Quantized tensors: `bits_histogram[b]` = number of groups of `b` bits (b in 1..15).
  std::array<int64_t, 16> bits_histogram{};
  /// Bytes of the whole record in the file (framing, header and payload).
  int64_t stored_bytes = 0;
  /// How the data is stored: for quantized tensors the chunk encodings used (`"bitpack"`,
  /// `"zlib-bytes"`, `"zlib-planes"`, several joined by `'+'`); for the others the stored dtype
  /// (`"float32"`, `"float16"`, `"int64"`, ...), prefixed by `"zlib-"` when deflated; `"alias"`.
  std::string encoding;
  std::string target;  ///< aliases: the name the tensor is stored under
};

/// What `read_checkpoint_info` tells about a checkpoint.
struct CheckpointInfo {
  uint32_t version = 0;
  int64_t file_bytes = 0;
  c10::optional<DiffQOptions> options;  ///< when the writer stored them
  std::vector<TensorInfo> tensors;      ///< in file order
};

namespace detail {

inline uint8_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kDtFloat32;
    case at::kDouble:
      return kDtFloat64;
    case at::kHalf:
      return kDtFloat16;
    case at::kBFloat16:
      return kDtBFloat16;
    case at::kLong:
      return kDtInt64;
    case at::kInt:
      return kDtInt32;
    case at::kShort:
      return kDtInt16;
    case at::kChar:
      return kDtInt8;
    case at::kByte:
      return kDtUInt8;
    case at::kBool:
      return kDtBool;
    default:
      return kDtNone;
  }
}

inline at::ScalarType scalar_type_of(uint8_t code) {
  switch (code) {
    case kDtFloat32:
      return at::kFloat;
    case kDtFloat64:
      return at::kDouble;
    case kDtFloat16:
      return at::kHalf;
    case kDtBFloat16:
      return at::kBFloat16;
    case kDtInt64:
      return at::kLong;
    case kDtInt32:
      return at::kInt;
    case kDtInt16:
      return at::kShort;
    case kDtInt8:
      return at::kChar;
    case kDtUInt8:
      return at::kByte;
    case kDtBool:
      return at::kBool;
    default:
      return at::ScalarType::Undefined;
  }
}

/// `at::parallel_for` over tasks, one task at a time (chunks are coarse).
inline ParallelFor aten_parallel_for() {
  return [](int64_t n, const std::function<void(int64_t, int64_t)>& body) {
    if (n <= 0) return;
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) { body(b, e); });
  };
}

/// Bytes of a checkpoint, owned or borrowed, with the name used in errors.
struct ByteSource {
  std::vector<uint8_t> owned;
  const uint8_t* data = nullptr;
  size_t size = 0;
  std::string name;
};

/// The system's message for errno value `err`.
inline std::string errno_message(int err) {
  return err != 0 ? std::generic_category().message(err) : std::string("unknown error");
}

inline ByteSource source_from_file(const std::string& path, const std::string& where) {
  ByteSource s;
  s.name = path;
  // Only regular files: a directory would report a huge size, a pipe none.
#ifdef _WIN32
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  TORCH_CHECK(ec || !std::filesystem::exists(status) || std::filesystem::is_regular_file(status),
              where, ": ", path,
              ": not a regular file; expected a checkpoint file (read other sources through the "
              "std::istream overload)");
#else
  struct stat st;
  if (::stat(path.c_str(), &st) == 0) {
    TORCH_CHECK(S_ISREG(st.st_mode), where, ": ", path, ": not a regular file (",
                S_ISDIR(st.st_mode) ? "a directory" : "a device, pipe or socket",
                "); expected a checkpoint file (read other sources through the std::istream "
                "overload)");
  }
#endif
  errno = 0;
  std::ifstream f(path, std::ios::binary);
  if (!f.is_open()) {
    const int err = errno;
    TORCH_CHECK(false, where, ": ", path,
                ": cannot open the file for reading: ", errno_message(err));
  }
  f.seekg(0, std::ios::end);
  const std::streamoff end = f.tellg();
  TORCH_CHECK(end >= 0, where, ": ", path, ": cannot determine the file size");
  f.seekg(0, std::ios::beg);
  s.owned.resize(static_cast<size_t>(end));
  if (end > 0) f.read(reinterpret_cast<char*>(s.owned.data()), end);
  TORCH_CHECK(f.gcount() == end, where, ": ", path, ": read ", f.gcount(), " of ", end, " bytes");
  s.data = s.owned.data();
  s.size = s.owned.size();
  return s;
}

inline ByteSource source_from_stream(std::istream& in, const std::string& where) {
  ByteSource s;
  s.name = "<stream>";
  TORCH_CHECK(in.good(), where, ": <stream>: the stream is not readable");
  char buf[1 << 16];
  while (in) {
    in.read(buf, sizeof(buf));
    const std::streamsize got = in.gcount();
    s.owned.insert(s.owned.end(), buf, buf + got);
  }
  TORCH_CHECK(in.eof() && !in.bad(), where, ": <stream>: read error");
  s.data = s.owned.data();
  s.size = s.owned.size();
  return s;
}

inline ByteSource source_from_bytes(const uint8_t* data, size_t size) {
  ByteSource s;
  s.name = "<bytes>";
  s.data = data;
  s.size = size;
  return s;
}

/// The source of a path, a stream or a byte vector (the three `load_quantized` overloads).
inline ByteSource byte_source(const std::string& path, const std::string& where) {
  return source_from_file(path, where);
}
inline ByteSource byte_source(std::istream& in, const std::string& where) {
  return source_from_stream(in, where);
}
inline ByteSource byte_source(const std::vector<uint8_t>& bytes, const std::string&) {
  return source_from_bytes(bytes.data(), bytes.size());
}

/// The state as writer input; `keep` holds the converted tensors the input points into.
inline WriterInput state_to_input(const QuantizedState& state, std::vector<at::Tensor>& keep,
                                  const std::string& where) {
  WriterInput in;
  for (const auto& q : state.quantized) {
    QuantizedInput qi;
    qi.name = q.name;
    qi.shape = q.shape;
    qi.dtype = dtype_code(q.dtype);
    qi.group_size = q.group_size;
    qi.min = q.min;
    qi.max = q.max;
    const uint64_t numel = checked_numel(q.shape, where, q.name);
    TORCH_CHECK(q.group_size >= 0, where, ": tensor '", q.name, "': group_size must be >= 0, got ",
                q.group_size);
    const uint64_t groups = groups_of(numel, static_cast<uint64_t>(q.group_size));
    TORCH_CHECK(q.bits.defined() && q.bits.scalar_type() == at::kByte && q.bits.dim() == 1 &&
                    static_cast<uint64_t>(q.bits.size(0)) == groups,
                where, ": tensor '", q.name, "': expected bits as uint8 [", groups, "], got ",
                q.bits.defined() ? c10::toString(q.bits.scalar_type()) : "undefined", " ",
                q.bits.defined() ? q.bits.sizes() : at::IntArrayRef{});
    TORCH_CHECK(q.levels.defined() && q.levels.scalar_type() == at::kShort &&
                    static_cast<uint64_t>(q.levels.numel()) == numel,
                where, ": tensor '", q.name, "': expected levels as int16 with ", numel,
                " elements, got ",
                q.levels.defined() ? c10::toString(q.levels.scalar_type()) : "undefined", " with ",
                q.levels.defined() ? q.levels.numel() : 0, " elements");
    keep.push_back(q.bits.cpu().contiguous());
    qi.bits = keep.back().data_ptr<uint8_t>();
    keep.push_back(q.levels.cpu().contiguous());
    qi.levels = keep.back().data_ptr<int16_t>();
    in.quantized.push_back(std::move(qi));
  }
  auto add_float = [&](const FloatTensor& f, uint8_t kind) {
    TORCH_CHECK(f.value.defined(), where, ": tensor '", f.name, "' is undefined");
    FloatInput fi;
    fi.name = f.name;
    fi.shape = f.value.sizes().vec();
    fi.kind = kind;
    fi.dtype = dtype_code(f.value.scalar_type());
    TORCH_CHECK(fi.dtype != kDtNone, where, ": tensor '", f.name, "': unsupported dtype ",
                f.value.scalar_type());
    at::Tensor v = f.value.detach().cpu().contiguous();
    if (f.float16) {
      TORCH_CHECK(at::isFloatingType(f.value.scalar_type()), where, ": tensor '", f.name,
                  "': float16 storage needs a floating point tensor, got ", f.value.scalar_type());
      v = v.to(at::kHalf).contiguous();
    }
    fi.stored_dtype = dtype_code(v.scalar_type());
    keep.push_back(v);
    fi.data = static_cast<const uint8_t*>(keep.back().data_ptr());
    in.floats.push_back(std::move(fi));
  };
  for (const auto& f : state.floats) add_float(f, f.is_buffer ? kKindBuffer : kKindFloat);
  for (const auto& f : state.logits) add_float(f, kKindLogit);
  for (const auto& t : state.tied) in.aliases.push_back({t.name, t.target});
  return in;
}

inline EncodedCheckpoint encode_state(const QuantizedState& state,
                                      const c10::optional<DiffQOptions>& options,
                                      const std::string& where) {
  std::vector<at::Tensor> keep;
  WriterInput in = state_to_input(state, keep, where);
  if (options) in.options = &*options;
  return encode_checkpoint(in, aten_parallel_for(), where);
}

#ifndef _WIN32
/// Writes all `size` bytes of `data` to `fd`, retrying after EINTR and short writes; returns 0 or
/// the errno value of the failure.
inline int write_all(int fd, const uint8_t* data, size_t size) {
  while (size > 0) {
    const size_t chunk = std::min<size_t>(size, size_t{1} << 30);
    const ssize_t n = ::write(fd, data, chunk);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return EIO;
    data += n;
    size -= static_cast<size_t>(n);
  }
  return 0;
}

#endif

#ifndef _WIN32
/// `fsync(fd)`, retried on EINTR: 0, or the errno of the failure; EINVAL (a file system that
/// cannot flush, e.g. some special ones) counts as success.
inline int fsync_or_unsupported(int fd) {
  int r;
  do {
    r = ::fsync(fd);
  } while (r != 0 && errno == EINTR);
  return r == 0 || errno == EINVAL ? 0 : errno;
}

/// Flushes the folder holding `file` (its entry, e.g. after a rename): 0, or the errno of the
/// failure. A folder that cannot be opened for reading (no read permission) is not flushed and
/// counts as success, as does a file system that cannot flush folders.
inline int fsync_parent_dir(const std::string& file) {
  const size_t slash = file.find_last_of('/');
  const std::string dir =
      slash == std::string::npos ? std::string(".") : (slash == 0 ? "/" : file.substr(0, slash));
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return 0;
  const int err = fsync_or_unsupported(fd);
  (void)::close(fd);
  return err;
}
#endif

/// Writes `enc` to `path` atomically: to a new temporary file in the same folder, written and
/// flushed to the disk (POSIX: `fsync`), closed, every step checked, then renamed over `path`
/// (POSIX rename(2) replaces it in one step), and the folder flushed too (`fsync` of the
/// directory), so that once it returns the new file survives a crash or power loss.
/// On POSIX systems a symbolic link at `path` is followed (the file it points to is replaced or,
/// for a dangling link, created; the link stays), and a replaced file's permission bits are kept
/// where the file system allows (not its owner).
/// On any failure the temporary file is removed and a previous file at `path` is left as it was;
/// the message names the step and the system's reason (e.g. "No space left on device"). A crash of
/// the process never leaves a partial file at `path`. A file system that cannot flush (`fsync`
/// fails with EINVAL, as on some special file systems) is written without it; a flush of the
/// folder that fails after the rename throws, the new file then in place but maybe not durable.
/// On POSIX systems it uses `open`/`write`/`rename`, not `std::filesystem`: PyTorch 2.11's pip
/// wheel for Linux exports its own copy of the `std::filesystem` functions from libtorch, which
/// binds ahead of libstdc++'s in programs built by a newer GCC, and some of those copies crash
/// there (remove_all). On Windows, where `std::rename` does not replace an existing file, it
/// writes with `std::ofstream` and renames with `std::filesystem::rename`.
inline void write_file_atomic(const EncodedCheckpoint& enc, const std::string& path,
                              const std::string& where) {
  static std::atomic<uint64_t> counter{0};
  const uint64_t stamp =
      static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  const size_t tid = std::hash<std::thread::id>()(std::this_thread::get_id());
  std::string target = path;
#ifndef _WIN32
  // A symbolic link is followed: the file it points to is replaced, the link stays.
  struct stat lst;
  if (::lstat(path.c_str(), &lst) == 0 && S_ISLNK(lst.st_mode)) {
    if (char* resolved = ::realpath(path.c_str(), nullptr)) {
      target = resolved;
      std::free(resolved);
    } else {
      // A dangling link: its target is created (relative to the link's folder), as a shell
      // redirection would; a link that cannot be read is replaced.
      std::vector<char> buf(static_cast<size_t>(lst.st_size > 0 ? lst.st_size : 4095) + 1);
      const ssize_t n = ::readlink(path.c_str(), buf.data(), buf.size());
      if (n > 0 && static_cast<size_t>(n) < buf.size()) {
        const std::string link_target(buf.data(), static_cast<size_t>(n));
        const size_t dir_end = path.find_last_of('/');
        target = link_target[0] == '/' || dir_end == std::string::npos
                     ? link_target
                     : path.substr(0, dir_end + 1) + link_target;
      }
    }
  }
  // A file replaced keeps its permission bits (a private checkpoint stays private).
  struct stat old_st;
  const bool keep_mode = ::stat(target.c_str(), &old_st) == 0 && S_ISREG(old_st.st_mode);
#endif
  // The temporary file sits beside the target; its name keeps at most 200 bytes of the target's
  // (file names are limited to 255 bytes).
#ifdef _WIN32
  const size_t slash = target.find_last_of("/\\");
#else
  const size_t slash = target.find_last_of('/');
#endif
  const size_t base_begin = slash == std::string::npos ? 0 : slash + 1;
  size_t cut = base_begin + std::min<size_t>(200, target.size() - base_begin);
  // Not inside a UTF-8 sequence: back to the byte that starts one.
  while (cut > base_begin && cut < target.size() &&
         (static_cast<unsigned char>(target[cut]) & 0xC0) == 0x80) {
    --cut;
  }
  const std::string tmp = target.substr(0, cut) + ".tmp-" + std::to_string(stamp % 1000000007u) +
                          "-" + std::to_string(tid % 1000003u) + "-" + std::to_string(counter++);
  bool created = false;
#ifdef _WIN32
  try {
    {
      std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
      TORCH_CHECK(f.is_open(), where, ": ", path, ": cannot create the temporary file '", tmp, "'");
      created = true;
      for (const auto& p : enc.pieces) {
        f.write(reinterpret_cast<const char*>(p.data()), static_cast<std::streamsize>(p.size()));
      }
      f.flush();
      TORCH_CHECK(f.good(), where, ": ", path, ": writing the temporary file '", tmp, "' failed");
      f.close();
      TORCH_CHECK(!f.fail(), where, ": ", path, ": closing the temporary file '", tmp, "' failed");
    }
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    TORCH_CHECK(!ec, where, ": ", path,
                ": cannot rename the temporary file into place: ", ec.message());
  } catch (...) {
    if (created) std::remove(tmp.c_str());
    throw;
  }
#else
  int fd = -1;
  try {
    // O_EXCL: never write into a file that someone else created under this name.
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0) {
      const int err = errno;
      TORCH_CHECK(false, where, ": ", path, ": cannot create the temporary file '", tmp,
                  "': ", errno_message(err));
    }
    created = true;
    // Best effort: some file systems (vfat, CIFS) refuse chmod; the save goes on.
    if (keep_mode) (void)::fchmod(fd, old_st.st_mode & 0777);
    for (const auto& p : enc.pieces) {
      const int err = write_all(fd, p.data(), p.size());
      TORCH_CHECK(err == 0, where, ": ", path, ": writing the temporary file '", tmp,
                  "' failed: ", errno_message(err));
    }
    const int sync_err = fsync_or_unsupported(fd);
    TORCH_CHECK(sync_err == 0, where, ": ", path, ": flushing the temporary file '", tmp,
                "' to the disk failed: ", errno_message(sync_err));
    const int closed = ::close(fd);
    const int close_err = errno;
    fd = -1;
    TORCH_CHECK(closed == 0, where, ": ", path, ": closing the temporary file '", tmp,
                "' failed: ", errno_message(close_err));
    if (std::rename(tmp.c_str(), target.c_str()) != 0) {
      const int err = errno;
      TORCH_CHECK(false, where, ": ", path,
                  ": cannot rename the temporary file into place: ", errno_message(err));
    }
    created = false;  // in place now: never removed
    const int dir_err = fsync_parent_dir(target);
    TORCH_CHECK(dir_err == 0, where, ": ", path,
                ": the file is written, but flushing its folder to the disk failed (the file may "
                "not survive a power loss): ",
                errno_message(dir_err));
  } catch (...) {
    if (fd >= 0) (void)::close(fd);
    if (created) std::remove(tmp.c_str());
    throw;
  }
#endif
}

inline at::Tensor bits_tensor(const RecordView& rv) {
  if (rv.bits.empty()) return at::empty({0}, at::kByte);
  return at::from_blob(const_cast<uint8_t*>(rv.bits.data()), {static_cast<int64_t>(rv.bits.size())},
                       at::kByte)
      .clone();
}

/// Steps of `diffq::dequantize_levels` by bit width, by the very same ATen expression evaluated on
/// the widths 0..15: `(max − min) / (2^b − 1)` in `dtype`, `[16]` (entry 0 unused).
inline at::Tensor steps_by_width(double min, double max, at::ScalarType dtype) {
  std::array<uint8_t, 16> widths{};
  for (int b = 0; b < 16; ++b) widths[static_cast<size_t>(b)] = static_cast<uint8_t>(b);
  const at::Tensor w = at::from_blob(widths.data(), {16}, at::kByte).clone();
  return ((max - min) / (at::pow(2.0, w.to(dtype)) - 1)).contiguous();
}

/// Writes the dequantized weights of quantized record `rv` from its decoded `levels` (`[numel]`
/// int16) into `out` (`numel` elements of `T`, the record's dtype), in parallel over blocks; equal
/// bit for bit to `dequantize_levels(levels, bits, group_size, min, max, dtype)`, a constant
/// tensor (max == min) included (all `min`, sign of -0.0 kept). `steps`: `steps_by_width(min, max,
/// dtype)` (unused, and may be undefined, when max == min). Allocates nothing; cannot fail.
template <class T>
inline void dequantize_record_into(const RecordView& rv, const int16_t* levels,
                                   const at::Tensor& steps, T* out) {
  const int64_t numel = static_cast<int64_t>(rv.numel);
  if (rv.max == rv.min) {
    std::fill(out, out + numel, static_cast<T>(rv.min));
    return;
  }
  const T* step = steps.data_ptr<T>();
  at::parallel_for(0, numel, 1 << 16, [&](int64_t b, int64_t e) {
    dequantize_range(rv, levels, step, out, static_cast<uint64_t>(b), static_cast<uint64_t>(e));
  });
}

/// Runs `body(record, segment)` over the segments of the quantized records of `pc`, in parallel.
template <class F>
inline void for_each_segment(const ParsedCheckpoint& pc, F&& body) {
  std::vector<std::pair<size_t, size_t>> tasks;
  for (size_t r = 0; r < pc.records.size(); ++r) {
    const RecordView& rv = pc.records[r];
    if (rv.kind != kKindQuantized) continue;
    for (size_t s = 0; s + 1 < rv.segment_first.size(); ++s) tasks.emplace_back(r, s);
  }
  aten_parallel_for()(static_cast<int64_t>(tasks.size()), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      body(tasks[static_cast<size_t>(t)].first, tasks[static_cast<size_t>(t)].second);
  });
}

/// Decoded levels of every quantized record of `pc` (`[numel]` int16 each, by record index;
/// undefined for other kinds), segments decoded in parallel.
inline std::vector<at::Tensor> decode_all_levels(const ParsedCheckpoint& pc) {
  std::vector<at::Tensor> levels(pc.records.size());
  for (size_t r = 0; r < pc.records.size(); ++r) {
    if (pc.records[r].kind == kKindQuantized) {
      levels[r] = at::empty({static_cast<int64_t>(pc.records[r].numel)}, at::kShort);
    }
  }
  for_each_segment(pc, [&](size_t r, size_t s) {
    decode_segment(pc.records[r], s, pc.segment_elems, levels[r].data_ptr<int16_t>(), pc.ctx,
                   static_cast<int64_t>(r));
  });
  return levels;
}

/// Dequantized weights of the quantized record `rv` from its decoded `levels`, `[shape]` of the
/// record's dtype.
inline at::Tensor dequantize_record(const RecordView& rv, const at::Tensor& levels) {
  const at::ScalarType dt = scalar_type_of(rv.dtype);
  at::Tensor out = at::empty(rv.shape, at::TensorOptions().dtype(dt));
  const at::Tensor steps = steps_by_width(rv.min, rv.max, dt);
  if (rv.dtype == kDtFloat32) {
    dequantize_record_into(rv, levels.data_ptr<int16_t>(), steps, out.data_ptr<float>());
  } else {
    dequantize_record_into(rv, levels.data_ptr<int16_t>(), steps, out.data_ptr<double>());
  }
  return out;
}

/// Dequantized weights of every quantized record of `pc` (`[shape]` of the record's dtype, by
/// record index; undefined for other kinds), equal bit for bit to
/// `dequantize_levels(levels, bits, group_size, min, max, dtype).view(shape)`.
/// `tests/checkpoint_test.cpp` checks the equality with `dequantize_levels` for every width.
inline std::vector<at::Tensor> decode_all_weights(const ParsedCheckpoint& pc) {
  std::vector<at::Tensor> values = decode_all_levels(pc);
  for (size_t r = 0; r < pc.records.size(); ++r) {
    if (values[r].defined()) values[r] = dequantize_record(pc.records[r], values[r]);
  }
  return values;
}

/// A float record's value in its stored dtype, `[shape]`.
inline at::Tensor decode_float_tensor(const ParsedCheckpoint& pc, size_t r) {
  const RecordView& rv = pc.records[r];
  at::Tensor t = at::empty(rv.shape, at::TensorOptions().dtype(scalar_type_of(rv.stored_dtype)));
  decode_float(rv, static_cast<uint8_t*>(t.data_ptr()), pc.ctx, static_cast<int64_t>(r));
  return t;
}

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

/// `aux_suffix`: the suffix of the wrapping quantizer's tensors when known (`restore_quantized`),
/// for the hint when they are missing from the checkpoint; else the one its options record.
inline void load_into_module(torch::nn::Module& model, const ByteSource& src,
                             const std::string& aux_suffix = std::string()) {
  const std::string where = "diffq::load_quantized";
  ParsedCheckpoint pc = parse_checkpoint(src.data, src.size, where, src.name);
  std::map<std::string, at::Tensor> targets;
  for (const auto& p : model.named_parameters(/*recurse=*/true)) {
    if (p.value().defined()) targets.emplace(p.key(), p.value());
  }
  for (const auto& b : model.named_buffers(/*recurse=*/true)) {
    if (b.value().defined()) targets.emplace(b.key(), b.value());
  }
  // Stored logits fill the model's parameters of the same name when it has them (a model wrapped
  // by a quantizer again, to resume training); a model without a quantizer ignores them.
  auto used_logit = [&](const RecordView& rv) {
    return rv.kind == kKindLogit && targets.count(rv.name) != 0;
  };
  std::unordered_map<std::string, size_t> record_of;
  for (size_t r = 0; r < pc.records.size(); ++r) {
    if (pc.records[r].kind != kKindLogit || used_logit(pc.records[r])) {
      record_of.emplace(pc.records[r].name, r);
    }
  }
  // Index of the record holding the values of record `r` (its target for a tied name).
  auto stored_index = [&](size_t r) {
    return pc.records[r].kind == kKindAlias ? record_of.at(pc.records[r].target) : r;
  };
  std::vector<std::string> missing, unexpected, mismatched;
  for (const auto& t : targets) {
    if (!record_of.count(t.first)) missing.push_back(t.first);
  }
  for (size_t r = 0; r < pc.records.size(); ++r) {
    const RecordView& rv = pc.records[r];
    if (rv.kind == kKindLogit && !used_logit(rv)) continue;
    auto it = targets.find(rv.name);
    if (it == targets.end()) {
      unexpected.push_back(rv.name);
      continue;
    }
    const RecordView& sv = pc.records[stored_index(r)];
    const at::ScalarType dt = scalar_type_of(sv.dtype);
    if (it->second.sizes() != at::IntArrayRef(sv.shape) || it->second.scalar_type() != dt) {
      mismatched.push_back("'" + rv.name + "' (record " + std::to_string(r) + " at byte " +
                           std::to_string(rv.offset) + "): checkpoint " + shape_str(sv.shape) +
                           " " + c10::toString(dt) + ", model " + shape_str(it->second.sizes()) +
                           " " + c10::toString(it->second.scalar_type()));
    }
  }
  if (!missing.empty() || !unexpected.empty() || !mismatched.empty()) {
    std::ostringstream os;
    os << where << ": " << src.name << ": the checkpoint does not match the model:";
    auto list = [&](const char* title, const std::vector<std::string>& v, bool quote) {
      if (v.empty()) return;
      os << " " << title << " (" << v.size() << "):";
      for (size_t i = 0; i < v.size(); ++i) {
        os << (i ? ", " : " ") << (quote ? "'" : "") << v[i] << (quote ? "'" : "");
      }
      os << ";";
    };
    list("missing from the checkpoint", missing, true);
    list("unexpected in the checkpoint", unexpected, true);
    list("mismatched shape or dtype", mismatched, false);
    // A model wrapped by a quantizer has its logits (LSQ: step sizes) as parameters, named with
    // the quantizer's suffix (`restore_quantized`) or the one the checkpoint's options record.
    const std::string suffix =
        !aux_suffix.empty() ? aux_suffix : (pc.has_options ? pc.options.suffix() : std::string());
    const bool logits_missing =
        !suffix.empty() && std::any_of(missing.begin(), missing.end(), [&](const std::string& n) {
          return n.size() > suffix.size() && detail::ends_with(n, suffix);
        });
    const bool has_logits = std::any_of(pc.records.begin(), pc.records.end(),
                                        [](const RecordView& rv) { return rv.kind == kKindLogit; });
    if (logits_missing && !has_logits) {
      os << " the model carries a quantizer's logits or step sizes ('*" << suffix
         << "'), which the checkpoint does not store: load into a model without a quantizer, or "
            "save with include_logits = true;";
    } else if (logits_missing) {
      os << " the checkpoint's logits or step sizes do not cover the model's ('*" << suffix
         << "'): wrap the model with the options the checkpoint was saved with;";
    }
    TORCH_CHECK(false, detail::escape_control(os.str()));
  }
  // Phase 1: everything that can fail (checks, decoding, allocations), with the model untouched:
  // every target must be fillable in place, every payload decodes and checks, and what phase 2
  // writes is ready (levels and step tables for the direct path, full tensors otherwise).
  for (const auto& t : targets) {
    const at::Tensor& dst = t.second;
    auto fail = [&](const std::string& what) {
      TORCH_CHECK(false, where, ": ", src.name, ": cannot fill '", t.first, "': ", what);
    };
    if (dst.layout() != at::kStrided) {
      fail("it is a " + c10::str(dst.layout()) + " tensor; only strided tensors can be filled");
    }
    if (dst.is_inference() && !c10::InferenceMode::is_enabled()) {
      fail("it is an inference tensor, which can only be written inside c10::InferenceMode");
    }
    if (at::has_internal_overlap(dst) == at::MemOverlap::Yes) {
      fail("its elements overlap in memory (an expanded tensor)");
    }
  }
  std::vector<at::Tensor> values = decode_all_levels(pc);
  for (size_t r = 0; r < pc.records.size(); ++r) {
    const RecordView& rv = pc.records[r];
    if (rv.kind == kKindFloat || rv.kind == kKindBuffer || used_logit(rv)) {
      values[r] = decode_float_tensor(pc, r).to(scalar_type_of(rv.dtype));
    }
  }
  // Quantized records are dequantized straight into CPU contiguous targets (no full-size
  // temporary, no copy); other targets (another device, non-contiguous) copy a full tensor.
  auto direct = [](const at::Tensor& dst) { return dst.device().is_cpu() && dst.is_contiguous(); };
  auto source_of = [&](const std::string& name) { return stored_index(record_of.at(name)); };
  std::vector<at::Tensor> steps(pc.records.size()), full(pc.records.size());
  for (const auto& t : targets) {
    const size_t s = source_of(t.first);
    const RecordView& sv = pc.records[s];
    if (sv.kind != kKindQuantized) continue;
    if (direct(t.second)) {
      if (!steps[s].defined()) steps[s] = steps_by_width(sv.min, sv.max, scalar_type_of(sv.dtype));
    } else if (!full[s].defined()) {
      full[s] = dequantize_record(sv, values[s]);
    }
  }
  // Phase 2: writes only.
  at::NoGradGuard no_grad;
  for (auto& t : targets) {
    const size_t s = source_of(t.first);
    const RecordView& sv = pc.records[s];
    at::Tensor& dst = t.second;
    if (sv.kind != kKindQuantized) {
      dst.copy_(values[s]);
    } else if (direct(dst)) {
      const int16_t* lv = values[s].data_ptr<int16_t>();
      if (sv.dtype == kDtFloat32) {
        dequantize_record_into(sv, lv, steps[s], dst.data_ptr<float>());
      } else {
        dequantize_record_into(sv, lv, steps[s], dst.data_ptr<double>());
      }
      dst.unsafeGetTensorImpl()->bump_version();  // as an in-place copy_ would
    } else {
      dst.copy_(full[s]);
    }
  }
}

inline QuantizedState state_from_source(const ByteSource& src, const std::string& where) {
  ParsedCheckpoint pc = parse_checkpoint(src.data, src.size, where, src.name);
  std::vector<at::Tensor> levels = decode_all_levels(pc);
  QuantizedState state;
  for (size_t r = 0; r < pc.records.size(); ++r) {
    const RecordView& rv = pc.records[r];
    if (rv.kind == kKindQuantized) {
      QuantizedTensor q;
      q.name = rv.name;
      q.shape = rv.shape;
      q.dtype = scalar_type_of(rv.dtype);
      q.group_size = rv.group_size;
      q.bits = bits_tensor(rv);
      q.min = rv.min;
      q.max = rv.max;
      q.levels = levels[r];
      state.quantized.push_back(std::move(q));
    } else if (rv.kind == kKindAlias) {
      state.tied.push_back({rv.name, rv.target});
    } else {
      FloatTensor f;
      f.name = rv.name;
      f.value = decode_float_tensor(pc, r).to(scalar_type_of(rv.dtype));
      f.float16 = rv.stored_dtype != rv.dtype;
      f.is_buffer = rv.kind == kKindBuffer;
      (rv.kind == kKindLogit ? state.logits : state.floats).push_back(std::move(f));
    }
  }
  return state;
}

inline CheckpointInfo info_from_source(const ByteSource& src) {
  ParsedCheckpoint pc =
      parse_checkpoint(src.data, src.size, "diffq::read_checkpoint_info", src.name);
  CheckpointInfo info;
  info.version = pc.version;
  info.file_bytes = static_cast<int64_t>(pc.file_bytes);
  if (pc.has_options) info.options = pc.options;
  if (!pc.options_problem.empty()) {
    TORCH_WARN(pc.options_problem, "; the options are not reported");
  }
  for (const RecordView& rv : pc.records) {
    TensorInfo t;
    t.name = rv.name;
    t.kind = kind_name(rv.kind);
    t.shape = rv.shape;
    t.dtype = scalar_type_of(rv.dtype);
    t.stored_bytes = static_cast<int64_t>(rv.record_bytes);
    if (rv.kind == kKindQuantized) {
      t.group_size = rv.group_size;
      t.min = rv.min;
      t.max = rv.max;
      for (uint8_t b : rv.bits) ++t.bits_histogram[b];
      bool used[3] = {false, false, false};
      for (const ChunkView& c : rv.chunks) used[c.encoding] = true;
      for (int e = 0; e < 3; ++e) {
        if (!used[e]) continue;
        if (!t.encoding.empty()) t.encoding += "+";
        t.encoding += chunk_encoding_name(static_cast<uint8_t>(e));
      }
      if (t.encoding.empty()) t.encoding = "bitpack";  // no element
    } else if (rv.kind == kKindAlias) {
      t.encoding = "alias";
      t.target = rv.target;
      t.shape.clear();
    } else {
      t.encoding =
          std::string(rv.float_encoding == kFloatZlib ? "zlib-" : "") + dtype_name(rv.stored_dtype);
    }
    info.tensors.push_back(std::move(t));
  }
  return info;
}

}  // namespace detail

// -------------------------------------------------------------------------------------------------
// Writing.

/// Writes `state` as a checkpoint to `path`, atomically (temporary file in the same folder, flushed
/// to the disk, then renamed; on failure a previous file is left intact).
/// `options`, when given, are stored in the header (informational). Returns the exact size of the
/// file in bytes. Throws `c10::Error` (`"diffq::save_quantized: ..."`) on invalid state (duplicate
/// names, bit widths outside [1, 15], levels out of range, non-finite min/max, ...) or I/O failure.
inline size_t save_quantized_state(const QuantizedState& state, const std::string& path,
                                   const c10::optional<DiffQOptions>& options = c10::nullopt) {
  const std::string where = "diffq::save_quantized";
  detail::EncodedCheckpoint enc = detail::encode_state(state, options, where);
  detail::write_file_atomic(enc, path, where);
  return static_cast<size_t>(enc.total_bytes);
}

/// Writes `state` as a checkpoint to `out`; returns the bytes written. Throws if the stream fails.
inline size_t save_quantized_state(const QuantizedState& state, std::ostream& out,
                                   const c10::optional<DiffQOptions>& options = c10::nullopt) {
  const std::string where = "diffq::save_quantized";
  detail::EncodedCheckpoint enc = detail::encode_state(state, options, where);
  for (const auto& p : enc.pieces) {
    out.write(reinterpret_cast<const char*>(p.data()), static_cast<std::streamsize>(p.size()));
  }
  TORCH_CHECK(out.good(), where, ": <stream>: writing failed");
  return static_cast<size_t>(enc.total_bytes);
}

/// Encodes `state` into `out` (replacing its content); returns `out.size()`.
inline size_t save_quantized_state(const QuantizedState& state, std::vector<uint8_t>& out,
                                   const c10::optional<DiffQOptions>& options = c10::nullopt) {
  out = detail::encode_state(state, options, "diffq::save_quantized").concat();
  return out.size();
}

namespace detail {
/// The options a checkpoint stores for a quantizer: its `DiffQOptions`, or none for quantizers
/// with other options (uniform, LSQ), whose checkpoints load the same way.
inline c10::optional<DiffQOptions> checkpoint_options(const DiffQOptions& o) {
  return o;
}
template <class Options>
c10::optional<DiffQOptions> checkpoint_options(const Options&) {
  return c10::nullopt;
}
}  // namespace detail

/// Saves a quantizer's model (`q.quantized_state(include_logits)`, and `q.options()` when they are
/// `DiffQOptions`) to a file (atomically), a `std::ostream&` or a `std::vector<uint8_t>&`. Works
/// for every quantizer (`DiffQuantizer`, `UniformQuantizer`, `LSQQuantizer`). Returns the bytes
/// written.
template <class Quantizer>
size_t save_quantized(const Quantizer& q, const std::string& path, bool include_logits = false) {
  return save_quantized_state(q.quantized_state(include_logits), path,
                              detail::checkpoint_options(q.options()));
}
template <class Quantizer>
size_t save_quantized(const Quantizer& q, std::ostream& out, bool include_logits = false) {
  return save_quantized_state(q.quantized_state(include_logits), out,
                              detail::checkpoint_options(q.options()));
}
template <class Quantizer>
size_t save_quantized(const Quantizer& q, std::vector<uint8_t>& out, bool include_logits = false) {
  return save_quantized_state(q.quantized_state(include_logits), out,
                              detail::checkpoint_options(q.options()));
}

// -------------------------------------------------------------------------------------------------
// Reading.

/// Fills `model` (a freshly built model of the same architecture, no quantizer needed) from a
/// checkpoint, by the full dotted names of its parameters and buffers (`named_parameters()` and
/// `named_buffers()`, recursive). Quantized tensors get exactly the quantizer's eval-mode weights;
/// tied names get their target's value. Stored logits (`save_quantized(q, path, true)`) fill the
/// model's parameters of the same name when it has them, i.e. when the model is wrapped by a
/// quantizer again (e.g. to resume training from the quantized weights), and are ignored
/// otherwise; for a wrapped model use `restore_quantized(q, ...)`, which first ends any weight
/// substitution of the quantizer (else the loaded weights could land in its noisy or quantized
/// copy and be lost). Every parameter and buffer of the model must be in the checkpoint and vice
/// versa, with the same shape and dtype: all the missing, unexpected and mismatched names are
/// listed in one `c10::Error`. Corrupt input throws (see the file comment). On any error the
/// model is left untouched.
inline void load_quantized(torch::nn::Module& model, const std::string& path) {
  detail::load_into_module(model, detail::source_from_file(path, "diffq::load_quantized"));
}
inline void load_quantized(torch::nn::Module& model, std::istream& in) {
  detail::load_into_module(model, detail::source_from_stream(in, "diffq::load_quantized"));
}
inline void load_quantized(torch::nn::Module& model, const std::vector<uint8_t>& bytes) {
  detail::load_into_module(model, detail::source_from_bytes(bytes.data(), bytes.size()));
}
/// `load_quantized` on a `std::shared_ptr` to a module.
template <class M, class Source>
void load_quantized(const std::shared_ptr<M>& model, Source&& source) {
  TORCH_CHECK(model != nullptr, "diffq::load_quantized: null model");
  load_quantized(static_cast<torch::nn::Module&>(*model), std::forward<Source>(source));
}
/// `load_quantized` on a module holder (`torch::nn::Linear`, `TORCH_MODULE` types).
template <class M, class Source>
void load_quantized(const torch::nn::ModuleHolder<M>& model, Source&& source) {
  load_quantized(model.ptr(), std::forward<Source>(source));
}

/// Loads a checkpoint into the model wrapped by quantizer `q` (`DiffQuantizer`, `UniformQuantizer`,
/// `LSQQuantizer`): `load_quantized(*q.model(), source)` after `q.restore_clean_weights()`, so that
/// nothing is written into a copy the quantizer substituted. The model's logits (LSQ: step sizes)
/// are parameters that must be in the checkpoint like the others, so it must be saved with them
/// (`save_quantized(q, path, /*include_logits=*/true)`); they replace the quantizer's: e.g. to
/// resume training from the quantized weights (an optimizer's state is not restored). `source`: a
/// path, a `std::istream&` or a `std::vector<uint8_t>`. Throws under `quantize()` or a
/// `QuantizedGuard`, and like `load_quantized`; on failure the clean weights and the logits are
/// untouched (a substitution, if any, has ended all the same).
template <class Quantizer, class Source>
void restore_quantized(Quantizer& q, Source&& source) {
  TORCH_CHECK(q.model() != nullptr, "diffq::restore_quantized: null model");
  q.restore_clean_weights();
  detail::load_into_module(
      static_cast<torch::nn::Module&>(*q.model()),
      detail::byte_source(std::forward<Source>(source), "diffq::load_quantized"), q.aux_suffix());
}

/// Reads a checkpoint back into a `QuantizedState` (levels, bit widths, min/max, floats in their
/// dtype with `float16` set when stored as fp16, buffers, logits, tied names), e.g. to resume
/// training with a quantizer. Throws like `load_quantized` (prefix `diffq::read_quantized_state`).
inline QuantizedState read_quantized_state(const std::string& path) {
  const std::string where = "diffq::read_quantized_state";
  return detail::state_from_source(detail::source_from_file(path, where), where);
}
inline QuantizedState read_quantized_state(std::istream& in) {
  const std::string where = "diffq::read_quantized_state";
  return detail::state_from_source(detail::source_from_stream(in, where), where);
}
inline QuantizedState read_quantized_state(const std::vector<uint8_t>& bytes) {
  return detail::state_from_source(detail::source_from_bytes(bytes.data(), bytes.size()),
                                   "diffq::read_quantized_state");
}

/// Per-tensor description of a checkpoint (name, kind, shape, dtype, bit width histogram, stored
/// bytes, encoding) without decoding the payloads. Checks the whole file (CRCs included); throws
/// like `load_quantized` (prefix `diffq::read_checkpoint_info`).
inline CheckpointInfo read_checkpoint_info(const std::string& path) {
  return detail::info_from_source(detail::source_from_file(path, "diffq::read_checkpoint_info"));
}
inline CheckpointInfo read_checkpoint_info(std::istream& in) {
  return detail::info_from_source(detail::source_from_stream(in, "diffq::read_checkpoint_info"));
}
inline CheckpointInfo read_checkpoint_info(const std::vector<uint8_t>& bytes) {
  return detail::info_from_source(detail::source_from_bytes(bytes.data(), bytes.size()));
}

}  // namespace diffq
