#pragma once
/// \file diffq/detail/byte_io.h
/// Explicitly little-endian serialization of integers and floats into byte vectors, and a bounded
/// reader that never reads past its end and reports errors with their byte offset. Torch-free
/// (only `c10/util/Exception.h`), so that the checkpoint reader core can be fuzzed and sanitized
/// without LibTorch's tensors.

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "diffq checkpoints: only little-endian hosts are supported (bulk payloads are copied as is)"
#endif

namespace diffq {
namespace detail {

/// Appends `v` to `out` as `sizeof(T)` little-endian bytes. `T`: an unsigned integer type.
template <class T>
inline void put_le(std::vector<uint8_t>& out, T v) {
  static_assert(std::is_unsigned<T>::value, "put_le: unsigned integers only");
  for (size_t i = 0; i < sizeof(T); ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
inline void put_u8(std::vector<uint8_t>& out, uint8_t v) {
  out.push_back(v);
}
inline void put_u16(std::vector<uint8_t>& out, uint16_t v) {
  put_le(out, v);
}
inline void put_u32(std::vector<uint8_t>& out, uint32_t v) {
  put_le(out, v);
}
inline void put_u64(std::vector<uint8_t>& out, uint64_t v) {
  put_le(out, v);
}
inline void put_i64(std::vector<uint8_t>& out, int64_t v) {
  put_le(out, static_cast<uint64_t>(v));
}
/// IEEE-754 binary64, little-endian.
inline void put_f64(std::vector<uint8_t>& out, double v) {
  uint64_t u;
  std::memcpy(&u, &v, sizeof(u));
  put_le(out, u);
}
inline void put_bytes(std::vector<uint8_t>& out, const void* data, size_t n_bytes) {
  const auto* p = static_cast<const uint8_t*>(data);
  out.insert(out.end(), p, p + n_bytes);
}
/// Overwrites 4 (8) bytes at `pos` with `v`, little-endian (for sizes patched after the fact).
inline void patch_u32(std::vector<uint8_t>& out, size_t pos, uint32_t v) {
  for (size_t i = 0; i < 4; ++i) out[pos + i] = static_cast<uint8_t>(v >> (8 * i));
}
inline void patch_u64(std::vector<uint8_t>& out, size_t pos, uint64_t v) {
  for (size_t i = 0; i < 8; ++i) out[pos + i] = static_cast<uint8_t>(v >> (8 * i));
}

/// Little-endian load of `sizeof(T)` bytes at `p` (no bounds check: callers check first).
template <class T>
inline T load_le(const uint8_t* p) {
  static_assert(std::is_unsigned<T>::value, "load_le: unsigned integers only");
  T v = 0;
  for (size_t i = 0; i < sizeof(T); ++i) v = static_cast<T>(v | (static_cast<T>(p[i]) << (8 * i)));
  return v;
}

/// Where an error happened, to build messages such as
/// `"diffq::load_quantized: model.ckpt: record 3 ('fc1.weight') at byte 1234: expected ..."`.
struct ErrorContext {
  std::string where;    ///< the public entry point, e.g. `"diffq::load_quantized"`
  std::string source;   ///< the file name, `"<bytes>"` or `"<stream>"`
  int64_t record = -1;  ///< record index, -1 outside records (the file header)
  std::string name;     ///< the record's tensor name, once known

  /// `"<where>: <source>: record <i> ('<name>') at byte <offset>: "`.
  std::string prefix(uint64_t offset) const {
    std::string s = where + ": " + source + ": ";
    if (record >= 0) {
      s += "record " + std::to_string(record);
      if (!name.empty()) s += " ('" + name + "')";
      s += " ";
    } else {
      s += "header ";
    }
    s += "at byte " + std::to_string(offset) + ": ";
    return s;
  }
};

/// `text` with its control characters (bytes below 0x20, and 0x7f) written as `\xNN`, so that
/// names read from a file cannot garble a terminal or a log line.
inline std::string escape_control(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (const char c : text) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) {
      static const char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[u >> 4];
      out += kHex[u & 15];
    } else {
      out += c;
    }
  }
  return out;
}

/// Throws `c10::Error` with the context's prefix at byte `offset`, then `msg` (control characters
/// escaped: the message may quote names read from the file).
[[noreturn]] inline void fail_at(const ErrorContext& ctx, uint64_t offset, const std::string& msg) {
  TORCH_CHECK(false, escape_control(ctx.prefix(offset) + msg));
}

/// A bounded little-endian reader over `[data, data + size)`, whose positions are reported as
/// absolute file offsets (`base + pos`). Every read checks the bytes remaining first and throws a
/// `c10::Error` naming what was being read.
class ByteReader {
 public:
  ByteReader(const uint8_t* data, size_t size, uint64_t base, const ErrorContext* ctx)
      : data_(data), size_(size), pos_(0), base_(base), ctx_(ctx) {}

  size_t remaining() const { return size_ - pos_; }
  size_t pos() const { return pos_; }
  /// Absolute file offset of the next byte.
  uint64_t offset() const { return base_ + pos_; }
  const uint8_t* here() const { return data_ + pos_; }
  const ErrorContext& ctx() const { return *ctx_; }

  /// Throws unless `n_bytes` bytes remain; `what` names the field.
  void need(uint64_t n_bytes, const char* what) const {
    if (n_bytes > remaining()) {
      fail_at(*ctx_, offset(),
              std::string("truncated ") + what + ": needs " + std::to_string(n_bytes) +
                  " bytes, only " + std::to_string(remaining()) + " remain");
    }
  }
  template <class T>
  T get(const char* what) {
    need(sizeof(T), what);
    T v = load_le<T>(data_ + pos_);
    pos_ += sizeof(T);
    return v;
  }
  uint8_t u8(const char* what) { return get<uint8_t>(what); }
  uint16_t u16(const char* what) { return get<uint16_t>(what); }
  uint32_t u32(const char* what) { return get<uint32_t>(what); }
  uint64_t u64(const char* what) { return get<uint64_t>(what); }
  int64_t i64(const char* what) { return static_cast<int64_t>(get<uint64_t>(what)); }
  double f64(const char* what) {
    uint64_t u = get<uint64_t>(what);
    double d;
    std::memcpy(&d, &u, sizeof(d));
    return d;
  }
  /// Returns a pointer to the next `n_bytes` bytes and skips them.
  const uint8_t* take(uint64_t n_bytes, const char* what) {
    need(n_bytes, what);
    const uint8_t* p = data_ + pos_;
    pos_ += static_cast<size_t>(n_bytes);
    return p;
  }
  std::string str(uint64_t n_bytes, const char* what) {
    const uint8_t* p = take(n_bytes, what);
    return std::string(reinterpret_cast<const char*>(p), static_cast<size_t>(n_bytes));
  }
  [[noreturn]] void fail(const std::string& msg) const { fail_at(*ctx_, offset(), msg); }
  [[noreturn]] void fail(uint64_t at_offset, const std::string& msg) const {
    fail_at(*ctx_, at_offset, msg);
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_;
  uint64_t base_;
  const ErrorContext* ctx_;
};

}  // namespace detail
}  // namespace diffq
