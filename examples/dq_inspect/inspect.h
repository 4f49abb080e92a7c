#pragma once
// dq_inspect: prints what a diffq checkpoint holds, without decoding its payloads — the format
// version, the method and its options, the library version, the user's entries, and per tensor
// its name, kind, shape, dtype, bit-width histogram, stored bytes and encoding — as text or, with
// --json, as one JSON object. What gguf-dump is for GGUF files, for diffq's format
// (docs/checkpoint_format.md). The program is `run`; main.cpp calls it.
#include <diffq/checkpoint.h>

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdio>
#include <iomanip>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

namespace dq_inspect {

constexpr const char* kUsage =
    "usage: dq_inspect [--json] <checkpoint>\n"
    "Prints a diffq checkpoint's format version, method, options, library version, user\n"
    "entries and, per tensor, name, kind, shape, dtype, bit-width histogram, stored bytes and\n"
    "encoding (as one JSON object with --json). Exit status: 0, 1 for an unreadable or corrupt\n"
    "file, 2 for bad arguments.\n";

/// `text` as a JSON string literal (quotes, backslashes and control characters escaped).
inline std::string json_string(const std::string& text) {
  std::string out = "\"";
  for (const char c : text) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (u < 0x20 || u == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", u);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

/// `text` with control characters written as `\xNN`, for the terminal.
inline std::string printable(const std::string& text) {
  return diffq::detail::escape_control(text);
}

inline std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

inline std::string dtype_text(const diffq::TensorInfo& t) {
  return t.kind == "alias" ? "-" : std::string(c10::toString(t.dtype));
}

/// `"3:12 4:40"`: groups of each bit width present; `-` when none.
inline std::string histogram_text(const diffq::TensorInfo& t) {
  std::string s;
  for (int b = 1; b < 16; ++b) {
    if (t.bits_histogram[static_cast<size_t>(b)] == 0) continue;
    s += (s.empty() ? "" : " ") + std::to_string(b) + ":" +
         std::to_string(t.bits_histogram[static_cast<size_t>(b)]);
  }
  return s.empty() ? "-" : s;
}

/// Mean bit width over the groups of a quantized tensor (0 when it has none).
inline double mean_bits(const diffq::TensorInfo& t) {
  int64_t groups = 0, sum = 0;
  for (int b = 1; b < 16; ++b) {
    groups += t.bits_histogram[static_cast<size_t>(b)];
    sum += b * t.bits_histogram[static_cast<size_t>(b)];
  }
  return groups ? static_cast<double>(sum) / static_cast<double>(groups) : 0.0;
}

inline void print_text(const std::string& path, const diffq::CheckpointInfo& info,
                       std::ostream& out) {
  out << "file: " << printable(path) << " (" << info.file_bytes << " bytes, format version "
      << info.version << ")\n";
  out << "method: " << (info.method.empty() ? "(not recorded)" : printable(info.method)) << "\n";
  out << "library version: "
      << (info.library_version.empty() ? "(not recorded)" : printable(info.library_version))
      << "\n";
  out << "options:" << (info.method_options.empty() ? " (none)" : "") << "\n";
  for (const auto& o : info.method_options) {
    out << "  " << printable(o.first) << " = " << printable(o.second) << "\n";
  }
  out << "user metadata:" << (info.user_metadata.empty() ? " (none)" : "") << "\n";
  for (const auto& u : info.user_metadata) {
    out << "  " << printable(u.first) << " = " << printable(u.second) << "\n";
  }
  out << "tensors: " << info.tensors.size() << "\n";
  out << "  name | kind | shape | dtype | bit widths (width:groups) | mean bits | stored bytes | "
         "encoding\n";
  int64_t stored = 0;
  for (const auto& t : info.tensors) {
    std::ostringstream mean;
    if (t.kind == "quantized") {
      mean << std::fixed << std::setprecision(2) << mean_bits(t);
    } else {
      mean << "-";
    }
    out << "  " << printable(t.name) << " | " << t.kind << " | "
        << (t.kind == "alias" ? "-> " + printable(t.target) : shape_text(t.shape)) << " | "
        << dtype_text(t) << " | " << histogram_text(t) << " | " << mean.str() << " | "
        << t.stored_bytes << " | " << t.encoding << "\n";
    stored += t.stored_bytes;
  }
  out << "records: " << stored << " bytes; header: " << info.file_bytes - stored << " bytes\n";
}

inline void print_json(const std::string& path, const diffq::CheckpointInfo& info,
                       std::ostream& out) {
  out << "{\"file\": " << json_string(path) << ", \"file_bytes\": " << info.file_bytes
      << ", \"version\": " << info.version << ", \"method\": " << json_string(info.method)
      << ", \"library_version\": " << json_string(info.library_version) << ", \"options\": {";
  for (size_t i = 0; i < info.method_options.size(); ++i) {
    out << (i ? ", " : "") << json_string(info.method_options[i].first) << ": "
        << json_string(info.method_options[i].second);
  }
  out << "}, \"user_metadata\": {";
  size_t i = 0;
  for (const auto& u : info.user_metadata) {
    out << (i++ ? ", " : "") << json_string(u.first) << ": " << json_string(u.second);
  }
  out << "}, \"tensors\": [";
  for (size_t k = 0; k < info.tensors.size(); ++k) {
    const auto& t = info.tensors[k];
    out << (k ? ", " : "") << "{\"name\": " << json_string(t.name)
        << ", \"kind\": " << json_string(t.kind) << ", \"shape\": " << shape_text(t.shape)
        << ", \"dtype\": " << json_string(t.kind == "alias" ? "" : dtype_text(t))
        << ", \"stored_bytes\": " << t.stored_bytes
        << ", \"encoding\": " << json_string(t.encoding);
    if (t.kind == "quantized") {
      std::ostringstream mm;
      mm << std::setprecision(17) << "\"min\": " << t.min << ", \"max\": " << t.max;
      out << ", \"group_size\": " << t.group_size << ", " << mm.str() << ", \"bits_histogram\": {";
      bool first = true;
      for (int b = 1; b < 16; ++b) {
        if (t.bits_histogram[static_cast<size_t>(b)] == 0) continue;
        out << (first ? "" : ", ") << "\"" << b
            << "\": " << t.bits_histogram[static_cast<size_t>(b)];
        first = false;
      }
      out << "}";
    }
    if (t.kind == "alias") out << ", \"target\": " << json_string(t.target);
    out << "}";
  }
  out << "]}\n";
}

/// The program: `args` without the program name. Returns the exit status.
inline int run(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  bool json = false;
  std::string path;
  for (const auto& a : args) {
    if (a == "--json") {
      json = true;
    } else if (a == "-h" || a == "--help") {
      out << kUsage;
      return 0;
    } else if (!a.empty() && a[0] == '-') {
      err << "dq_inspect: unknown option '" << printable(a) << "'\n" << kUsage;
      return 2;
    } else if (path.empty()) {
      path = a;
    } else {
      err << "dq_inspect: expected one checkpoint, got a second: '" << printable(a) << "'\n"
          << kUsage;
      return 2;
    }
  }
  if (path.empty()) {
    err << "dq_inspect: expected a checkpoint file\n" << kUsage;
    return 2;
  }
  diffq::CheckpointInfo info;
  try {
    info = diffq::read_checkpoint_info(path);
  } catch (const c10::Error& e) {
    err << "dq_inspect: " << e.msg() << "\n";
    return 1;
  }
  if (json) {
    print_json(path, info, out);
  } else {
    print_text(path, info, out);
  }
  return 0;
}

}  // namespace dq_inspect
