#pragma once
/// \file diffq/detail/metadata.h
/// The metadata block of a version-2 checkpoint header (`docs/checkpoint_format.md`): text
/// entries `key = value` recording the method (`method`), its options (`option.<name>`), the
/// library version (`library_version`) and the user's own entries (`user.<key>`), and the text
/// form of the options (`visit_options`, `options.h`). Torch-free apart from `c10::Error`.

#include <diffq/options.h>

#include <c10/util/Exception.h>

#include <cctype>
#include <cstddef>
#include <cstdint>
#include <locale>
#include <map>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace diffq {
namespace detail {

/// Entries of a metadata block, in file order.
using MetadataEntries = std::vector<std::pair<std::string, std::string>>;

constexpr size_t kMaxMetadataKeyBytes = 255;
constexpr size_t kMaxMetadataValueBytes = 65535;
/// Key prefixes of the method's options and of the user's entries.
constexpr const char* kOptionPrefix = "option.";
constexpr const char* kUserPrefix = "user.";

/// Why `key` cannot be a metadata key (1 to 255 bytes of printable ASCII, no space); empty when
/// it can.
inline std::string metadata_key_problem(const std::string& key) {
  if (key.empty() || key.size() > kMaxMetadataKeyBytes) {
    return "a metadata key must have 1 to " + std::to_string(kMaxMetadataKeyBytes) +
           " bytes, got " + std::to_string(key.size());
  }
  for (size_t i = 0; i < key.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(key[i]);
    if (c < 0x21 || c > 0x7e) {
      return "a metadata key must be printable ASCII without spaces, got byte " +
             std::to_string(c) + " at position " + std::to_string(i);
    }
  }
  return {};
}

/// Why `value` cannot be a metadata value (at most 65535 bytes, no NUL); empty when it can.
inline std::string metadata_value_problem(const std::string& value) {
  if (value.size() > kMaxMetadataValueBytes) {
    return "a metadata value must have at most " + std::to_string(kMaxMetadataValueBytes) +
           " bytes, got " + std::to_string(value.size());
  }
  const size_t nul = value.find('\0');
  if (nul != std::string::npos) {
    return "a metadata value contains a NUL byte at position " + std::to_string(nul);
  }
  return {};
}

inline bool starts_with(const std::string& s, const char* prefix) {
  return s.compare(0, std::char_traits<char>::length(prefix), prefix) == 0;
}

/// The value of entry `key`, or null.
inline const std::string* find_metadata(const MetadataEntries& entries, const std::string& key) {
  for (const auto& e : entries) {
    if (e.first == key) return &e.second;
  }
  return nullptr;
}

// -------------------------------------------------------------------------------------------------
// Text form of option values (C locale): integers in decimal, doubles in the shortest form that
// reads back to the same value, `true`/`false`, enums by name, strings as they are.

inline std::string option_text(double v) {
  for (int precision = 1;; ++precision) {
    std::ostringstream os;
    os.imbue(std::locale::classic());
    os.precision(precision);
    os << v;
    std::istringstream is(os.str());
    is.imbue(std::locale::classic());
    double back = 0;
    is >> back;
    if (back == v || precision >= 17) return os.str();
  }
}
inline std::string option_text(int64_t v) {
  return std::to_string(v);
}
inline std::string option_text(bool v) {
  return v ? "true" : "false";
}
inline std::string option_text(const std::string& v) {
  return v;
}
inline std::string option_text(Noise v) {
  return v == Noise::kGaussian ? "gaussian" : "uniform";
}
inline std::string option_text(Param v) {
  return v == Param::kBits ? "bits" : "noise";
}

/// Reads `text` wholly as a number of type T (C locale); false if it is not one.
template <class T>
bool read_number(const std::string& text, T& out) {
  std::istringstream is(text);
  is.imbue(std::locale::classic());
  T v{};
  is >> v;
  if (is.fail() || !is.eof() || text.empty() || std::isspace(static_cast<unsigned char>(text[0]))) {
    return false;
  }
  out = v;
  return true;
}
inline bool read_option(const std::string& t, double& out) {
  return read_number(t, out);
}
inline bool read_option(const std::string& t, int64_t& out) {
  return read_number(t, out);
}
inline bool read_option(const std::string& t, std::string& out) {
  out = t;
  return true;
}
inline bool read_option(const std::string& t, bool& out) {
  if (t != "true" && t != "false") return false;
  out = t == "true";
  return true;
}
inline bool read_option(const std::string& t, Noise& out) {
  if (t != "gaussian" && t != "uniform") return false;
  out = t == "gaussian" ? Noise::kGaussian : Noise::kUniform;
  return true;
}
inline bool read_option(const std::string& t, Param& out) {
  if (t != "bits" && t != "noise") return false;
  out = t == "bits" ? Param::kBits : Param::kNoise;
  return true;
}

/// The options of `o` as entries `(name, text)`; a list option `name` becomes `name.0`,
/// `name.1`, ... (none when empty).
template <class O>
MetadataEntries option_entries(const O& o) {
  MetadataEntries out;
  visit_options(o, [&](const char* name, const auto& value) {
    using T = std::decay_t<decltype(value)>;
    if constexpr (std::is_same<T, std::vector<std::string>>::value) {
      for (size_t i = 0; i < value.size(); ++i) {
        out.emplace_back(std::string(name) + "." + std::to_string(i), value[i]);
      }
    } else {
      out.emplace_back(name, option_text(value));
    }
  });
  return out;
}

/// Reads options of type `O` from entries `(name, text)` as `option_entries` writes them (names
/// absent keep their default) and checks them as the quantizer does. Returns why they cannot be
/// read (an unknown name, a value that does not parse, a value the quantizer refuses), or empty.
template <class O>
std::string options_from_entries(const MetadataEntries& entries, O& out) {
  std::map<std::string, std::string> left(entries.begin(), entries.end());
  if (left.size() != entries.size()) return "an option is given twice";
  O o;
  std::string problem;
  visit_options(o, [&](const char* name, auto& value) {
    using T = std::decay_t<decltype(value)>;
    if constexpr (std::is_same<T, std::vector<std::string>>::value) {
      std::vector<std::string> list;
      for (size_t i = 0;; ++i) {
        auto it = left.find(std::string(name) + "." + std::to_string(i));
        if (it == left.end()) break;
        list.push_back(it->second);
        left.erase(it);
      }
      value = std::move(list);
    } else {
      auto it = left.find(name);
      if (it == left.end()) return;
      if (!read_option(it->second, value) && problem.empty()) {
        problem = std::string("option ") + name + ": cannot read '" + it->second + "'";
      }
      left.erase(it);
    }
  });
  if (!problem.empty()) return problem;
  if (!left.empty()) return "unknown option '" + left.begin()->first + "'";
  try {
    check_options(o, "option");
  } catch (const c10::Error& e) {
    return e.msg();
  }
  out = std::move(o);
  return {};
}

// -------------------------------------------------------------------------------------------------
// The entries a writer records.

/// What a checkpoint records about how it was made: the method and its options (empty for a
/// bare `QuantizedState`), and the user's entries.
struct CheckpointMetadata {
  std::string method;
  MetadataEntries options;
  std::map<std::string, std::string> user;
};

/// `CheckpointMetadata` of a quantizer's options `o` (checked as the quantizer checks them; the
/// messages start with `where + ": options"`) and the user's entries.
template <class O>
CheckpointMetadata checkpoint_metadata(const O& o, std::map<std::string, std::string> user,
                                       const std::string& where) {
  check_options(o, where + ": options");
  return {method_name(o), option_entries(o), std::move(user)};
}

/// The entries of the metadata block: `method`, `library_version` (`version`), `option.<name>`
/// and `user.<key>`, in this order. Throws `c10::Error` (prefix `where`) on a user key or value
/// the format cannot hold.
inline MetadataEntries metadata_entries(const CheckpointMetadata& m, const std::string& version,
                                        const std::string& where) {
  MetadataEntries out;
  if (!m.method.empty()) out.emplace_back("method", m.method);
  out.emplace_back("library_version", version);
  for (const auto& e : m.options) out.emplace_back(kOptionPrefix + e.first, e.second);
  for (const auto& e : m.user) {
    TORCH_CHECK(!e.first.empty(), where, ": user metadata: a key must not be empty");
    std::string problem = metadata_key_problem(kUserPrefix + e.first);
    TORCH_CHECK(problem.empty(), where, ": user metadata '", e.first, "': ", problem);
    problem = metadata_value_problem(e.second);
    TORCH_CHECK(problem.empty(), where, ": user metadata '", e.first, "': ", problem);
    out.emplace_back(kUserPrefix + e.first, e.second);
  }
  for (const auto& e : out) {
    const std::string problem = metadata_key_problem(e.first).empty()
                                    ? metadata_value_problem(e.second)
                                    : metadata_key_problem(e.first);
    TORCH_CHECK(problem.empty(), where, ": metadata '", e.first, "': ", problem);
  }
  return out;
}

}  // namespace detail
}  // namespace diffq
