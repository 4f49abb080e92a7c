#pragma once
/// \file examples/fashion_mnist/idx.h
/// Reader of the IDX files of (Fashion-)MNIST, gzip-compressed or not, with zlib.
///
/// The format (http://yann.lecun.com/exdb/mnist/): a big-endian header, then the items as bytes.
/// - images (`*-images-idx3-ubyte`): magic 2051 (0x00000803: unsigned bytes, 3 dimensions), item
///   count, rows, columns, then `count·rows·cols` pixels in 0..255;
/// - labels (`*-labels-idx1-ubyte`): magic 2049 (0x00000801: unsigned bytes, 1 dimension), item
///   count, then `count` labels in 0..9.
/// Fashion-MNIST (Xiao, Rasul, Vollgraf, arXiv 1708.07747) has 60000 training and 10000 test items
/// of 28×28 pixels. Debian's `dataset-fashion-mnist` installs the gzip files in
/// `/usr/share/datasets/fashion-mnist`.
///
/// Every error is a `std::runtime_error` naming the file, what was expected and what was found.

#include <sys/stat.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace fmnist {

constexpr uint32_t kImagesMagic = 2051;
constexpr uint32_t kLabelsMagic = 2049;
constexpr int64_t kTrainCount = 60000;
constexpr int64_t kTestCount = 10000;
constexpr int64_t kRows = 28;
constexpr int64_t kCols = 28;
constexpr int kNumClasses = 10;
/// Where Debian's `dataset-fashion-mnist` package installs the files.
constexpr const char* kDefaultDataDir = "/usr/share/datasets/fashion-mnist";

/// Images of an IDX3 file: `count` images of `rows × cols` pixels, row-major, one byte each.
struct IdxImages {
  int64_t count = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<uint8_t> pixels;  ///< `count · rows · cols` bytes
};

/// Images and labels of one split.
struct Split {
  IdxImages images;
  std::vector<uint8_t> labels;  ///< `images.count` labels in 0..9
};

namespace detail {

struct GzCloser {
  void operator()(gzFile_s* f) const {
    if (f != nullptr) gzclose(f);
  }
};
using GzHandle = std::unique_ptr<gzFile_s, GzCloser>;

/// zlib's description of the stream's current error, or "" when there is none. zlib prefixes its
/// message with the path, which the callers already name: that prefix is removed.
inline std::string gz_error(gzFile f, const std::string& path = "") {
  int code = Z_OK;
  const char* msg = gzerror(f, &code);
  if (code == Z_OK || msg == nullptr) return "";
  std::string m = msg;
  if (!path.empty() && m.rfind(path + ": ", 0) == 0) m = m.substr(path.size() + 2);
  return m;
}

/// The error for a gzip stream that zlib refuses (`gzread` < 0). zlib decodes ahead of what was
/// asked (a whole buffer of output at a time), so the damage can lie anywhere after the `done`
/// bytes already read, not necessarily in the part being read: the message names zlib's reason and
/// where decompression stopped in the compressed file, never the part being read.
inline std::runtime_error corrupt_stream(gzFile f, const std::string& path, uint64_t done) {
  const long long at = static_cast<long long>(gzoffset(f));
  std::string reason = gz_error(f, path);
  if (reason.empty()) reason = "no reason given by zlib";
  return std::runtime_error(
      "fashion_mnist: cannot read '" + path + "': the gzip stream is corrupt (" + reason +
      "); decompression stopped " +
      (at >= 0 ? "at byte " + std::to_string(at) + " of the compressed file, " : "") + "after " +
      std::to_string(done) + " bytes of IDX data had been read");
}

/// Reads exactly `n` bytes into `dst` or throws, naming `path` and `what` is being read. `offset`:
/// the IDX bytes read before (for the error messages).
inline void read_exact(gzFile f, const std::string& path, void* dst, size_t n, const char* what,
                       uint64_t offset = 0) {
  auto* out = static_cast<unsigned char*>(dst);
  size_t done = 0;
  while (done < n) {
    const unsigned chunk = static_cast<unsigned>(std::min<size_t>(n - done, size_t{1} << 24));
    const int got = gzread(f, out + done, chunk);
    if (got < 0) throw corrupt_stream(f, path, offset + done);
    if (got == 0) {
      const std::string err = gz_error(f, path);
      throw std::runtime_error("fashion_mnist: '" + path + "' is truncated: expected " +
                               std::to_string(n) + " bytes of " + what + ", found only " +
                               std::to_string(done) + (err.empty() ? "" : " (" + err + ")"));
    }
    done += static_cast<size_t>(got);
  }
}

/// Reads exactly `n` bytes into a new vector, growing it chunk by chunk so that a corrupt header
/// announcing a huge count fails on the missing data rather than on a huge allocation. `offset`:
/// the IDX bytes read before (for the error messages).
inline std::vector<uint8_t> read_vector(gzFile f, const std::string& path, uint64_t n,
                                        const char* what, uint64_t offset = 0) {
  constexpr uint64_t kChunk = uint64_t{1} << 24;
  std::vector<uint8_t> out;
  out.reserve(static_cast<size_t>(std::min(n, kChunk)));
  while (static_cast<uint64_t>(out.size()) < n) {
    const size_t done = out.size();
    const size_t step = static_cast<size_t>(std::min<uint64_t>(n - done, kChunk));
    out.resize(done + step);
    const int got = gzread(f, out.data() + done, static_cast<unsigned>(step));
    if (got < 0) throw corrupt_stream(f, path, offset + done);
    out.resize(done + static_cast<size_t>(got));
    if (got == 0) {
      const std::string err = gz_error(f, path);
      throw std::runtime_error("fashion_mnist: '" + path + "' is truncated: expected " +
                               std::to_string(n) + " bytes of " + what + ", found only " +
                               std::to_string(done) + (err.empty() ? "" : " (" + err + ")"));
    }
  }
  return out;
}

/// Checks that the stream ends right here (no trailing bytes, gzip trailer and CRC valid).
/// `offset`: the IDX bytes read before.
inline void expect_end(gzFile f, const std::string& path, const std::string& after,
                       uint64_t offset) {
  unsigned char extra[64];
  const int got = gzread(f, extra, sizeof(extra));
  if (got < 0) throw corrupt_stream(f, path, offset);
  if (got > 0) {
    throw std::runtime_error("fashion_mnist: '" + path + "' has trailing bytes after the " + after +
                             ": the file is larger than its header says");
  }
  const std::string err = gz_error(f, path);
  if (!err.empty()) {
    throw std::runtime_error("fashion_mnist: '" + path + "' is truncated: the gzip stream ends (" +
                             err + ") after the " + after + ", before its trailer");
  }
}

inline uint32_t big_endian(const unsigned char* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

/// Whether `path` names a regular file (following symbolic links).
inline bool is_regular_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

/// Opens `path` (gzip or plain: zlib reads a file without a gzip header as is), which must be a
/// regular file.
inline GzHandle open(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) {
    throw std::runtime_error("fashion_mnist: cannot read '" + path +
                             "': expected a regular file (an IDX file, gzip-compressed or not), "
                             "found " +
                             (S_ISDIR(st.st_mode) ? "a directory" : "a special file") +
                             " (pass --data DIR holding the IDX files)");
  }
  errno = 0;
  GzHandle f(gzopen(path.c_str(), "rb"));
  if (!f) {
    const int e = errno;
    throw std::runtime_error("fashion_mnist: cannot open '" + path +
                             "': " + (e != 0 ? std::strerror(e) : "gzopen failed") +
                             " (install the Debian package dataset-fashion-mnist or pass --data "
                             "DIR holding the IDX files)");
  }
  gzbuffer(f.get(), 1 << 17);
  return f;
}

/// Reads the magic number and the `ndims` dimensions; checks the magic.
inline std::vector<uint32_t> read_header(gzFile f, const std::string& path, uint32_t magic,
                                         int ndims, const char* kind) {
  std::vector<unsigned char> raw(4 * static_cast<size_t>(1 + ndims));
  read_exact(f, path, raw.data(), raw.size(), "IDX header");
  const uint32_t found = big_endian(raw.data());
  if (found != magic) {
    throw std::runtime_error("fashion_mnist: '" + path + "' is not an IDX " + kind +
                             " file: expected magic number " + std::to_string(magic) + ", found " +
                             std::to_string(found));
  }
  std::vector<uint32_t> dims;
  for (int i = 0; i < ndims; ++i) dims.push_back(big_endian(raw.data() + 4 * (1 + i)));
  return dims;
}

inline void check_count(const std::string& path, const char* kind, int64_t found,
                        int64_t expected) {
  if (expected >= 0 && found != expected) {
    throw std::runtime_error("fashion_mnist: '" + path + "': expected " + std::to_string(expected) +
                             " " + kind + ", the header says " + std::to_string(found));
  }
}

}  // namespace detail

/// Reads an IDX3 image file (magic 2051). `expected_count` (or -1 for any) and the image size
/// `rows × cols` (or -1 for any) are checked against the header; the file must hold exactly the
/// pixels its header announces.
inline IdxImages read_idx_images(const std::string& path, int64_t expected_count = -1,
                                 int64_t rows = kRows, int64_t cols = kCols) {
  auto f = detail::open(path);
  const auto dims = detail::read_header(f.get(), path, kImagesMagic, 3, "image");
  IdxImages out;
  out.count = dims[0];
  out.rows = dims[1];
  out.cols = dims[2];
  detail::check_count(path, "images", out.count, expected_count);
  if ((rows >= 0 && out.rows != rows) || (cols >= 0 && out.cols != cols)) {
    throw std::runtime_error("fashion_mnist: '" + path + "': expected images of " +
                             std::to_string(rows) + "x" + std::to_string(cols) +
                             " pixels, the header says " + std::to_string(out.rows) + "x" +
                             std::to_string(out.cols));
  }
  if (static_cast<double>(dims[0]) * dims[1] * dims[2] > 1e12) {
    throw std::runtime_error("fashion_mnist: '" + path + "': implausible header (" +
                             std::to_string(dims[0]) + " images of " + std::to_string(dims[1]) +
                             "x" + std::to_string(dims[2]) + " pixels)");
  }
  const uint64_t n = uint64_t{dims[0]} * dims[1] * dims[2];
  const std::string what = "pixel data (" + std::to_string(out.count) + " images of " +
                           std::to_string(out.rows) + "x" + std::to_string(out.cols) + ")";
  constexpr uint64_t kHeaderBytes = 16;  // magic and 3 dimensions
  out.pixels = detail::read_vector(f.get(), path, n, what.c_str(), kHeaderBytes);
  detail::expect_end(f.get(), path, what, kHeaderBytes + n);
  return out;
}

/// Reads an IDX1 label file (magic 2049) whose labels must lie in 0..`num_classes`−1.
inline std::vector<uint8_t> read_idx_labels(const std::string& path, int64_t expected_count = -1,
                                            int num_classes = kNumClasses) {
  auto f = detail::open(path);
  const auto dims = detail::read_header(f.get(), path, kLabelsMagic, 1, "label");
  const int64_t count = dims[0];
  detail::check_count(path, "labels", count, expected_count);
  const std::string what = "label data (" + std::to_string(count) + " labels)";
  constexpr uint64_t kHeaderBytes = 8;  // magic and 1 dimension
  std::vector<uint8_t> labels =
      detail::read_vector(f.get(), path, count, what.c_str(), kHeaderBytes);
  detail::expect_end(f.get(), path, what, kHeaderBytes + count);
  for (size_t i = 0; i < labels.size(); ++i) {
    if (labels[i] >= num_classes) {
      throw std::runtime_error("fashion_mnist: '" + path + "': label " + std::to_string(i) +
                               " is " + std::to_string(labels[i]) + ", expected a class in 0.." +
                               std::to_string(num_classes - 1));
    }
  }
  return labels;
}

/// Reads a pair of image and label files; `expected_count` (or -1) applies to both, and the label
/// count must equal the image count.
inline Split read_split(const std::string& images_path, const std::string& labels_path,
                        int64_t expected_count = -1) {
  Split s;
  s.images = read_idx_images(images_path, expected_count);
  s.labels = read_idx_labels(labels_path, expected_count);
  if (static_cast<int64_t>(s.labels.size()) != s.images.count) {
    throw std::runtime_error("fashion_mnist: '" + labels_path + "' holds " +
                             std::to_string(s.labels.size()) +
                             " labels, expected one per image of '" + images_path + "' (" +
                             std::to_string(s.images.count) + ")");
  }
  return s;
}

/// Path of one of the four files in `dir`: `<dir>/<prefix>-<kind>-ubyte.gz`, or the uncompressed
/// `<dir>/<prefix>-<kind>-ubyte` when only that one is a regular file.
inline std::string idx_path(const std::string& dir, const std::string& prefix,
                            const std::string& kind) {
  const std::string base =
      (dir.empty() ? std::string(".") : dir) + "/" + prefix + "-" + kind + "-ubyte";
  if (!detail::is_regular_file(base + ".gz") && detail::is_regular_file(base)) return base;
  return base + ".gz";  // missing or not a file: reading it reports the error
}

/// Fashion-MNIST's training (`train = true`, 60000 items) or test split (10000 items) from `dir`,
/// with every fact of the format checked.
inline Split load_fashion_mnist(const std::string& dir, bool train) {
  const std::string prefix = train ? "train" : "t10k";
  return read_split(idx_path(dir, prefix, "images-idx3"), idx_path(dir, prefix, "labels-idx1"),
                    train ? kTrainCount : kTestCount);
}

}  // namespace fmnist
