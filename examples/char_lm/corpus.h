#pragma once
/// \file examples/char_lm/corpus.h
/// The text corpora of the character-level language model example, read as bytes (vocabulary
/// 256: any file works, nothing is decoded or normalised), and their deterministic split by
/// position into train / validation / test.
///
/// - `fortunes` (Debian package `fortunes`, /usr/share/games/fortunes): every fortune file of the
///   directory (names sorted; the `.dat` indexes and the `.u8` links skipped). A line that holds
///   only `%` ends an entry; the entries are kept byte for byte and joined by the record separator
///   byte 0x1E, the corpus's one added byte (`kEntrySeparator`).
/// - `gcide` (Debian package `dict-gcide`, /usr/share/dictd/gcide.dict.dz): the dictionary's text,
///   a dictzip file read as gzip.
/// - `--data FILE...`: the files' bytes concatenated in the order given; a `.gz` or `.dz` file is
///   decompressed.
/// A missing, unreadable or empty corpus is a `CorpusError` naming the path and, for the Debian
/// corpora, the package to install.

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace char_lm {

inline constexpr const char* kFortunesDir = "/usr/share/games/fortunes";
inline constexpr const char* kGcideFile = "/usr/share/dictd/gcide.dict.dz";
/// Joins two fortune entries (ASCII record separator).
inline constexpr char kEntrySeparator = '\x1e';

struct CorpusError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// The bytes of `path`, decompressed when its name ends in `.gz` or `.dz` (gzip, dictzip).
/// Throws `CorpusError` when it is missing or cannot be read; `hint` is appended (e.g. the package
/// to install).
inline std::string read_file_bytes(const std::string& path, const std::string& hint = "") {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) {
    throw CorpusError("char_lm: corpus file '" + path + "' " +
                      (fs::exists(path, ec) ? "is not a regular file" : "does not exist") + hint);
  }
  const bool gz = path.size() > 3 && (path.compare(path.size() - 3, 3, ".gz") == 0 ||
                                      path.compare(path.size() - 3, 3, ".dz") == 0);
  std::string out;
  if (gz) {
    gzFile f = gzopen(path.c_str(), "rb");
    if (f == nullptr) {
      throw CorpusError("char_lm: cannot open '" + path + "': " + std::strerror(errno) + hint);
    }
    char buf[1 << 16];
    for (;;) {
      const int got = gzread(f, buf, sizeof(buf));
      if (got < 0) {
        int err = 0;
        const std::string msg = gzerror(f, &err);
        gzclose(f);
        throw CorpusError("char_lm: cannot decompress '" + path + "': " + msg);
      }
      if (got == 0) break;
      out.append(buf, static_cast<size_t>(got));
    }
    gzclose(f);
    return out;
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw CorpusError("char_lm: cannot open '" + path + "': " + std::strerror(errno) + hint);
  out.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  if (in.bad()) throw CorpusError("char_lm: cannot read '" + path + "'");
  return out;
}

/// The entries of one fortune file's text: split at lines that hold only `%` (a final entry
/// without a closing `%` line counts too; empty entries are dropped). Each entry keeps its bytes
/// exactly, its last newline included.
inline std::vector<std::string> fortune_entries(const std::string& text) {
  std::vector<std::string> entries;
  std::string entry;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    const size_t next = end == std::string::npos ? text.size() : end + 1;
    const size_t len = (end == std::string::npos ? text.size() : end) - pos;
    const bool separator =
        (len == 1 && text[pos] == '%') || (len == 2 && text[pos] == '%' && text[pos + 1] == '\r');
    if (separator) {
      if (!entry.empty()) entries.push_back(std::move(entry));
      entry.clear();
    } else {
      entry.append(text, pos, next - pos);
    }
    pos = next;
  }
  if (!entry.empty()) entries.push_back(std::move(entry));
  return entries;
}

/// The fortune files of `dir`: regular files, not `.dat` indexes, not symbolic links (the `.u8`
/// names link to the plain ones), sorted by name.
inline std::vector<std::string> fortune_files(const std::string& dir) {
  namespace fs = std::filesystem;
  const std::string hint = " (install Debian's package `fortunes`: apt-get install fortunes)";
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    throw CorpusError("char_lm: the fortunes corpus directory '" + dir + "' does not exist" + hint);
  }
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (e.is_symlink(ec) || !e.is_regular_file(ec)) continue;
    if (name.size() > 4 && name.compare(name.size() - 4, 4, ".dat") == 0) continue;
    files.push_back(e.path().string());
  }
  if (ec) throw CorpusError("char_lm: cannot list '" + dir + "': " + ec.message());
  std::sort(files.begin(), files.end());
  if (files.empty()) {
    throw CorpusError("char_lm: no fortune files in '" + dir + "'" + hint);
  }
  return files;
}

/// The fortunes corpus of `dir`: every entry of every file, joined by `kEntrySeparator`.
inline std::string read_fortunes(const std::string& dir = kFortunesDir) {
  std::string corpus;
  for (const auto& file : fortune_files(dir)) {
    for (const auto& entry : fortune_entries(read_file_bytes(file))) {
      if (!corpus.empty()) corpus.push_back(kEntrySeparator);
      corpus += entry;
    }
  }
  if (corpus.empty()) {
    throw CorpusError("char_lm: the fortune files in '" + dir +
                      "' hold no text (reinstall Debian's package `fortunes`)");
  }
  return corpus;
}

/// The corpus `name` (`fortunes` or `gcide`), or the concatenation of `files` when not empty.
inline std::string read_corpus(const std::string& name, const std::vector<std::string>& files) {
  std::string corpus;
  if (!files.empty()) {
    for (const auto& f : files) corpus += read_file_bytes(f);
    if (corpus.empty()) {
      throw CorpusError("char_lm: the --data file(s) hold no bytes (first: '" + files.front() +
                        "')");
    }
    return corpus;
  }
  if (name == "fortunes") return read_fortunes();
  if (name == "gcide") {
    corpus = read_file_bytes(
        kGcideFile, " (install Debian's package `dict-gcide`: apt-get install dict-gcide)");
    if (corpus.empty()) {
      throw CorpusError(std::string("char_lm: '") + kGcideFile +
                        "' is empty (reinstall Debian's package `dict-gcide`)");
    }
    return corpus;
  }
  throw CorpusError("char_lm: unknown corpus '" + name + "' (expected fortunes or gcide)");
}

/// Byte ranges `[begin, end)` of the three parts of a corpus of `size` bytes, by position:
/// train the first `train_permille`/1000, validation the next `valid_permille`/1000, test the
/// rest. Each part holds at least `min_part` bytes, else `CorpusError`.
struct SplitBounds {
  int64_t train_end = 0;  ///< train: [0, train_end)
  int64_t valid_end = 0;  ///< validation: [train_end, valid_end); test: [valid_end, size)
  int64_t size = 0;
};

inline SplitBounds split_bounds(int64_t size, int64_t min_part, int64_t train_permille = 900,
                                int64_t valid_permille = 50) {
  SplitBounds s;
  s.size = size;
  // size·permille/1000 without overflow for any corpus below 2^53 bytes.
  s.train_end = static_cast<int64_t>(static_cast<long double>(size) * train_permille / 1000);
  s.valid_end = static_cast<int64_t>(static_cast<long double>(size) *
                                     (train_permille + valid_permille) / 1000);
  const int64_t parts[3] = {s.train_end, s.valid_end - s.train_end, size - s.valid_end};
  const char* names[3] = {"train", "validation", "test"};
  for (int i = 0; i < 3; ++i) {
    if (parts[i] < min_part) {
      throw CorpusError("char_lm: a corpus of " + std::to_string(size) + " bytes gives a " +
                        names[i] + " part of " + std::to_string(parts[i]) +
                        " bytes, fewer than the " + std::to_string(min_part) +
                        " it needs (context + 1): use a larger corpus or a smaller --context");
    }
  }
  return s;
}

}  // namespace char_lm
