#pragma once
/// \file diffq/detail/glob.h
/// Shell-style glob matching (`*`, `?`, `[abc]`, `[a-z]`, `[!abc]`) for the `exclude` option, and
/// the suffix test of the auxiliary tensors' names.

#include <cstddef>
#include <string>

namespace diffq {
namespace detail {

/// True when `text` ends with `suffix` (an empty suffix: always).
inline bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/// True when `text` matches the glob `pattern` entirely. `*` matches any run of characters
/// (dots included), `?` one character, `[...]` one character of a set (`[!...]` or `[^...]`
/// negates). An unterminated `[` matches a literal `[`.
inline bool glob_match(const std::string& pattern, const std::string& text) {
  std::size_t p = 0, t = 0, star_p = std::string::npos, star_t = 0;
  while (t < text.size()) {
    bool advanced = false;
    if (p < pattern.size()) {
      const char c = pattern[p];
      if (c == '*') {
        star_p = p++;
        star_t = t;
        continue;
      }
      if (c == '?') {
        ++p;
        ++t;
        advanced = true;
      } else if (c == '[') {
        std::size_t q = p + 1;
        bool negate = false;
        if (q < pattern.size() && (pattern[q] == '!' || pattern[q] == '^')) {
          negate = true;
          ++q;
        }
        bool matched = false;
        const std::size_t set_begin = q;
        while (q < pattern.size() && (pattern[q] != ']' || q == set_begin)) {
          if (q + 2 < pattern.size() && pattern[q + 1] == '-' && pattern[q + 2] != ']') {
            if (pattern[q] <= text[t] && text[t] <= pattern[q + 2]) matched = true;
            q += 3;
          } else {
            if (pattern[q] == text[t]) matched = true;
            ++q;
          }
        }
        if (q < pattern.size()) {  // a closed set
          if (matched != negate) {
            p = q + 1;
            ++t;
            advanced = true;
          }
        } else if (text[t] == '[') {  // unterminated: literal '['
          ++p;
          ++t;
          advanced = true;
        }
      } else if (c == text[t]) {
        ++p;
        ++t;
        advanced = true;
      }
    }
    if (advanced) continue;
    if (star_p == std::string::npos) return false;
    p = star_p + 1;
    t = ++star_t;
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

}  // namespace detail
}  // namespace diffq
