#pragma once
/// \file diffq/detail/checkpoint_io.h
/// Where checkpoint bytes come from and go to: a file (read whole; written atomically and
/// durably), a stream or a byte vector, with the name errors use for each.

#include <diffq/detail/format_writer.h>

#include <c10/util/Exception.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <istream>
#include <ostream>
#include <string>
#include <system_error>
#include <thread>
#include <vector>
#ifdef _WIN32
#include <filesystem>
#else
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

namespace diffq {
namespace detail {

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

/// `write_file_atomic(enc, path, where)` writes `enc` to `path` atomically: to a new temporary file
/// in the same folder, written and flushed to the disk (POSIX: `fsync`), closed, every step
/// checked, then renamed over `path` (POSIX rename(2) replaces it in one step), and the folder
/// flushed too (`fsync` of the directory), so that once it returns the new file survives a crash or
/// power loss. On POSIX systems a symbolic link at `path` is followed (the file it points to is
/// replaced or, for a dangling link, created; the link stays), and a replaced file's permission
/// bits are kept where the file system allows (not its owner). On any failure the temporary file is
/// removed and a previous file at `path` is left as it was; the message names the step and the
/// system's reason (e.g. "No space left on device"). A crash of the process never leaves a partial
/// file at `path`. A file system that cannot flush (`fsync` fails with EINVAL, as on some special
/// file systems) is written without it; a flush of the folder that fails after the rename throws,
/// the new file then in place but maybe not durable. On POSIX systems it uses
/// `open`/`write`/`rename`, not `std::filesystem`: PyTorch 2.11's pip wheel for Linux exports its
/// own copy of the `std::filesystem` functions from libtorch, which binds ahead of libstdc++'s in
/// programs built by a newer GCC, and some of those copies crash there (remove_all). On Windows,
/// where `std::rename` does not replace an existing file, it writes with `std::ofstream` and
/// renames with `std::filesystem::rename`.
#ifndef _WIN32
/// The file `path` names: a symbolic link is followed (the file it points to is replaced, the
/// link stays); a dangling link's target is created (relative to the link's folder), as a shell
/// redirection would; a link that cannot be read is replaced.
inline std::string resolve_save_target(const std::string& path) {
  struct stat lst;
  if (::lstat(path.c_str(), &lst) != 0 || !S_ISLNK(lst.st_mode)) return path;
  if (char* resolved = ::realpath(path.c_str(), nullptr)) {
    std::string target = resolved;
    std::free(resolved);
    return target;
  }
  std::vector<char> buf(static_cast<size_t>(lst.st_size > 0 ? lst.st_size : 4095) + 1);
  const ssize_t n = ::readlink(path.c_str(), buf.data(), buf.size());
  if (n <= 0 || static_cast<size_t>(n) >= buf.size()) return path;
  const std::string link_target(buf.data(), static_cast<size_t>(n));
  const size_t dir_end = path.find_last_of('/');
  return link_target[0] == '/' || dir_end == std::string::npos
             ? link_target
             : path.substr(0, dir_end + 1) + link_target;
}
#endif

/// A fresh name for the temporary file beside `target`, keeping at most 200 bytes of the target's
/// name (file names are limited to 255 bytes), never cut inside a UTF-8 sequence.
inline std::string temporary_name(const std::string& target) {
  static std::atomic<uint64_t> counter{0};
  const uint64_t stamp =
      static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  const size_t tid = std::hash<std::thread::id>()(std::this_thread::get_id());
#ifdef _WIN32
  const size_t slash = target.find_last_of("/\\");
#else
  const size_t slash = target.find_last_of('/');
#endif
  const size_t base_begin = slash == std::string::npos ? 0 : slash + 1;
  size_t cut = base_begin + std::min<size_t>(200, target.size() - base_begin);
  while (cut > base_begin && cut < target.size() &&
         (static_cast<unsigned char>(target[cut]) & 0xC0) == 0x80) {
    --cut;
  }
  return target.substr(0, cut) + ".tmp-" + std::to_string(stamp % 1000000007u) + "-" +
         std::to_string(tid % 1000003u) + "-" + std::to_string(counter++);
}

#ifdef _WIN32
inline void write_file_atomic(const EncodedCheckpoint& enc, const std::string& path,
                              const std::string& where) {
  const std::string tmp = temporary_name(path);
  bool created = false;
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
}
#else
/// Writes `enc` into the new file `fd` (named `tmp`), flushes it to the disk and closes it
/// (`fd` is -1 once closed).
inline void write_and_close(int& fd, const EncodedCheckpoint& enc, const std::string& path,
                            const std::string& tmp, const std::string& where) {
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
}

inline void write_file_atomic(const EncodedCheckpoint& enc, const std::string& path,
                              const std::string& where) {
  const std::string target = resolve_save_target(path);
  // A file replaced keeps its permission bits (a private checkpoint stays private).
  struct stat old_st;
  const bool keep_mode = ::stat(target.c_str(), &old_st) == 0 && S_ISREG(old_st.st_mode);
  const std::string tmp = temporary_name(target);
  bool created = false;
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
    write_and_close(fd, enc, path, tmp, where);
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
}
#endif

/// Writes `enc` to a path (`write_file_atomic`), a stream or a byte vector (its content
/// replaced); returns the bytes written. `where` prefixes errors.
inline size_t write_encoded(const EncodedCheckpoint& enc, const std::string& path,
                            const std::string& where) {
  write_file_atomic(enc, path, where);
  return static_cast<size_t>(enc.total_bytes);
}
inline size_t write_encoded(const EncodedCheckpoint& enc, std::ostream& out,
                            const std::string& where) {
  for (const auto& p : enc.pieces) {
    out.write(reinterpret_cast<const char*>(p.data()), static_cast<std::streamsize>(p.size()));
  }
  TORCH_CHECK(out.good(), where, ": <stream>: writing failed");
  return static_cast<size_t>(enc.total_bytes);
}
inline size_t write_encoded(const EncodedCheckpoint& enc, std::vector<uint8_t>& out,
                            const std::string&) {
  out = enc.concat();
  return out.size();
}

}  // namespace detail
}  // namespace diffq
