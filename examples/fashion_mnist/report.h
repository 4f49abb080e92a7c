#pragma once
/// \file examples/fashion_mnist/report.h
/// The final report of the Fashion-MNIST example: a markdown table of the runs, the bits per layer,
/// and a hand-written SVG figure (bits per layer as bars; accuracy against checkpoint size when
/// several penalties were run).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace fmnist {

/// A parameter of the model, in registration order.
struct ParamInfo {
  std::string name;
  std::vector<int64_t> shape;
  int64_t numel = 0;
};

/// One training run (fp32 baseline or DiffQ with one penalty).
struct RunResult {
  std::string method;  ///< "fp32" or "DiffQ λ=1"
  bool diffq = false;
  /// A baseline quantizer run (uniform PTQ, QAT, LSQ): reported with its bits like DiffQ, but not
  /// on the DiffQ trade-off curve of the figure.
  bool quantized = false;
  double lambda = 0;     ///< the penalty weight; a budget run: its final `penalty_weight()`
  double target_mb = 0;  ///< size budget (MB) of a budget run; 0: a λ run
  double size_before_fit_mb = 0;  ///< a budget run's true model size before `finalize()`
  int64_t lowered_groups = 0;     ///< groups `finalize()` lowered by a bit or more
  int64_t correct = 0;            ///< test images right, evaluated in the training process
  int64_t total = 0;
  int64_t reload_correct = -1;  ///< the same, by a new process from the checkpoint (-1: not run)
  int64_t reload_total = 0;
  std::string checkpoint;  ///< path
  uint64_t file_bytes = 0;
  /// Element-weighted mean of the rounded (stored) bit widths of the quantized weights; 32 for
  /// fp32.
  double mean_bits = 32;
  /// The same with the learnt, unrounded bit widths.
  double learnt_bits = 32;
  double model_size_mb = 0;  ///< DiffQ's bit-packed model size (MB); fp32: 4 bytes per parameter
  double train_seconds = 0;
  /// Rounded mean bits of each quantized parameter; parameters not listed are stored as floats.
  std::vector<std::pair<std::string, double>> bits_per_layer;

  double accuracy() const { return total > 0 ? 100.0 * correct / total : 0.0; }
  double reload_accuracy() const {
    return reload_total > 0 ? 100.0 * reload_correct / reload_total : 0.0;
  }
  bool reload_equal() const { return reload_correct == correct && reload_total == total; }
};

constexpr double kMB = 1048576.0;

inline std::string fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), format, v);
  return buf;
}

/// `1234567` → `1,234,567`.
inline std::string with_commas(uint64_t v) {
  std::string s = std::to_string(v);
  for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3) s.insert(static_cast<size_t>(i), ",");
  return s;
}

inline std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s;
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "×" : "") + std::to_string(shape[i]);
  return s.empty() ? "scalar" : s;
}

/// `λ` written as short as possible: `1`, `0.5`, `1e-05`.
inline std::string lambda_string(double lambda) {
  return fmt("%g", lambda);
}

/// A size budget (MB) as the report and the checkpoint names write it.
inline std::string budget_string(double target_mb) {
  return fmt("%g", target_mb);
}

/// Markdown: the results table and the bits per layer. `setup`: lines describing the run, put
/// before the tables as a bullet list. `figure`: file name of the SVG ("" for none).
inline std::string markdown_report(const std::vector<RunResult>& runs,
                                   const std::vector<ParamInfo>& params,
                                   const std::vector<std::string>& setup,
                                   const std::string& figure) {
  std::ostringstream md;
  md << "## Fashion-MNIST: DiffQ against fp32\n\n";
  for (const auto& line : setup) md << "- " << line << "\n";
  if (!setup.empty()) md << "\n";

  const RunResult* fp32 = nullptr;
  for (const auto& r : runs) {
    if (!r.diffq && !r.quantized) fp32 = &r;
  }
  md << "| method | test accuracy | file size | compression vs fp32 file | mean bits per weight | "
        "train time |\n";
  md << "|---|---:|---:|---:|---:|---:|\n";
  for (const auto& r : runs) {
    md << "| " << r.method << " | " << fmt("%.2f %%", r.accuracy()) << " | "
       << with_commas(r.file_bytes) << " B (" << fmt("%.3f", r.file_bytes / kMB) << " MB) | "
       << (fp32 && r.file_bytes > 0 ? fmt("%.2f×", double(fp32->file_bytes) / r.file_bytes) : "–")
       << " | " << fmt(r.diffq || r.quantized ? "%.2f" : "%.0f", r.mean_bits) << " | "
       << fmt("%.1f s", r.train_seconds);
    if (fp32 && (r.diffq || r.quantized) && fp32->train_seconds > 0 && r.train_seconds > 0) {
      md << fmt(" (%.2f× fp32)", r.train_seconds / fp32->train_seconds);
    }
    md << " |\n";
  }
  md << "\n";
  if (fp32 != nullptr && runs.size() > 1) {
    md << "Compression: fp32 file size / file size. Mean bits per weight: over the quantized "
          "weights, with the rounded bit widths the checkpoint stores (the other parameters stay "
          "fp32). Train time: the training batches only, on this machine.\n\n";
  }

  bool any_budget = false;
  for (const auto& r : runs) any_budget = any_budget || (r.diffq && r.target_mb > 0);
  if (any_budget) {
    md << "### Size budgets\n\n";
    md << "Budget runs (`--target-size-mb`) beside the λ runs: λ is the penalty weight, given by "
          "the user for a λ run, and for a budget run the final weight its controller reached "
          "(`SizeBudget::penalty_weight()`, the weight of `penalty()` in MB in the loss). "
          "Model size: `true_model_size()`, the bit-packed size before zlib; a budget run's size "
          "before `finalize()` and the groups it lowered to fit show how close training came.\n\n";
    md << "| method | budget | model size | before finalize() | groups lowered | file size | "
          "test accuracy | λ |\n";
    md << "|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for (const auto& r : runs) {
      if (!r.diffq) continue;
      const bool b = r.target_mb > 0;
      md << "| " << r.method << " | " << (b ? fmt("%.4f MB", r.target_mb) : std::string("–"))
         << " | " << fmt("%.4f MB", r.model_size_mb) << " | "
         << (b ? fmt("%.4f MB", r.size_before_fit_mb) : std::string("–")) << " | "
         << (b ? std::to_string(r.lowered_groups) : std::string("–")) << " | "
         << with_commas(r.file_bytes) << " B | " << fmt("%.2f %%", r.accuracy()) << " | "
         << fmt("%.3g", r.lambda) << " |\n";
    }
    md << "\n";
  }

  bool all_equal = true;
  for (const auto& r : runs) all_equal = all_equal && r.reload_correct >= 0 && r.reload_equal();
  md << "Reloading each checkpoint into a fresh model (no quantizer) in a new process and "
        "evaluating it again gives "
     << (all_equal ? "exactly the same test accuracy:" : "**a different** test accuracy:")
     << "\n\n";
  md << "| method | checkpoint | in-process | reloaded (new process) | equal |\n";
  md << "|---|---|---:|---:|:-:|\n";
  for (const auto& r : runs) {
    std::string file = r.checkpoint;
    const auto slash = file.find_last_of('/');
    if (slash != std::string::npos) file = file.substr(slash + 1);
    md << "| " << r.method << " | `" << file << "` | " << r.correct << "/" << r.total << " | ";
    if (r.reload_correct >= 0) {
      md << r.reload_correct << "/" << r.reload_total << " | "
         << (r.reload_equal() ? "yes" : "**NO**");
    } else {
      md << "not run | –";
    }
    md << " |\n";
  }
  md << "\n";

  std::vector<const RunResult*> dq;
  for (const auto& r : runs) {
    if (r.diffq || r.quantized) dq.push_back(&r);
  }
  if (!dq.empty()) {
    md << "### Bits per layer\n\n";
    md << "Mean rounded bit width of each parameter (weighted by elements); `fp32`: not quantized "
          "(at or below `--min-size-mb`), stored as 32-bit floats.\n\n";
    md << "| parameter | shape | elements |";
    for (const auto* r : dq) md << " " << r->method << " |";
    md << "\n|---|---|---:|";
    for (size_t i = 0; i < dq.size(); ++i) md << "---:|";
    md << "\n";
    for (const auto& p : params) {
      md << "| `" << p.name << "` | " << shape_string(p.shape) << " | " << with_commas(p.numel)
         << " |";
      for (const auto* r : dq) {
        auto it = std::find_if(r->bits_per_layer.begin(), r->bits_per_layer.end(),
                               [&](const auto& kv) { return kv.first == p.name; });
        md << " " << (it == r->bits_per_layer.end() ? std::string("fp32") : fmt("%.2f", it->second))
           << " |";
      }
      md << "\n";
    }
    md << "\n";
  }
  if (!figure.empty()) md << "![bits per layer and accuracy against size](" << figure << ")\n";
  return md.str();
}

// ---------------------------------------------------------------------------------------------
// SVG

namespace svg {

inline std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

/// A coordinate or length; a non-finite value (which callers skip) is written as 0, never as
/// "nan" or "inf", so that the SVG stays valid.
inline std::string num(double v) {
  return fmt("%.1f", std::isfinite(v) ? v : 0.0);
}

inline std::string text(double x, double y, const std::string& s, const char* anchor = "middle",
                        int size = 12, const std::string& extra = "") {
  return "<text x=\"" + num(x) + "\" y=\"" + num(y) + "\" text-anchor=\"" + anchor +
         "\" font-size=\"" + std::to_string(size) + "\"" + (extra.empty() ? "" : " " + extra) +
         ">" + escape(s) + "</text>\n";
}

inline std::string line(double x1, double y1, double x2, double y2, const char* stroke,
                        double width = 1, const std::string& extra = "") {
  return "<line x1=\"" + num(x1) + "\" y1=\"" + num(y1) + "\" x2=\"" + num(x2) + "\" y2=\"" +
         num(y2) + "\" stroke=\"" + stroke + "\" stroke-width=\"" + num(width) + "\"" +
         (extra.empty() ? "" : " " + extra) + "/>\n";
}

inline std::string rect(double x, double y, double w, double h, const std::string& fill,
                        const std::string& extra = "") {
  return "<rect x=\"" + num(x) + "\" y=\"" + num(y) + "\" width=\"" + num(w) + "\" height=\"" +
         num(h) + "\" fill=\"" + fill + "\"" + (extra.empty() ? "" : " " + extra) + "/>\n";
}

/// "Nice" tick values from at or below `lo` to at or above `hi`, about `n` intervals of 1, 2, 2.5
/// or 5 × 10^k. Empty when `lo` or `hi` is not finite, when `n` < 1, or when the range cannot be
/// ticked (over 1000 ticks, or a range tiny against its distance from 0): callers must handle no
/// ticks.
inline std::vector<double> nice_ticks(double lo, double hi, int n = 5) {
  if (!std::isfinite(lo) || !std::isfinite(hi) || n < 1) return {};
  if (!(hi > lo)) hi = lo + 1;
  const double raw = (hi - lo) / n;
  if (!std::isfinite(raw) || !(raw > 0)) return {};
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0}) {
    step = m * mag;
    if (step >= raw) break;
  }
  std::vector<double> ticks;
  const double first = std::floor(lo / step + 1e-9), last = std::ceil(hi / step - 1e-9);
  // Over 1000 ticks, or tick indices where k + 1 == k in double: none.
  if (!(std::abs(first) < 1e15) || !(std::abs(last) < 1e15) || last - first > 1000) return {};
  for (double k = first; k <= last + 0.5; k += 1) {
    ticks.push_back(std::abs(k) < 0.5 ? 0.0 : k * step);
  }
  return ticks;
}

inline std::string tick_label(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

/// Colours of the runs: the bars of the bits panel (one per run), and in the trade-off panel
/// palette(0) for every DiffQ point and the next ones for the baseline methods (fp32 is grey).
inline const char* palette(size_t i) {
  static const char* kColors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                  "#8c564b", "#e377c2", "#17becf", "#bcbd22"};
  return kColors[i % (sizeof(kColors) / sizeof(kColors[0]))];
}
constexpr const char* kFp32Color = "#555555";

/// Legend entries laid out left to right from `x`, wrapping to a new row (15 px lower) before
/// `x_end`: the (x, row) of each entry. `width(i)`: the width of entry `i`.
template <typename Width>
std::vector<std::pair<double, int>> legend_layout(size_t n, double x, double x_end, Width width) {
  std::vector<std::pair<double, int>> out;
  double lx = x;
  int row = 0;
  for (size_t i = 0; i < n; ++i) {
    const double wi = width(i);
    if (lx > x && lx + wi > x_end) {
      lx = x;
      ++row;
    }
    out.emplace_back(lx, row);
    lx += wi;
  }
  return out;
}

/// Rough width of a legend entry at 11 px: swatch, gap and text (one UTF-8 character ≈ 6.5 px).
inline double legend_width(const std::string& label) {
  double chars = 0;
  for (unsigned char ch : label) chars += (ch & 0xC0) == 0x80 ? 0 : 1;
  return 24 + 6.5 * chars;
}

constexpr double kLegendRow = 15;

/// Panel at (`x0`, `y0`) of `w × h`: grouped bars, one group per quantized parameter, one bar per
/// run of `qruns` (every run with quantized parameters: DiffQ and the baseline quantizers). The
/// y-axis reaches the largest bit width of these runs, rounded up, but not above
/// max(`max_bits`, that width). Non-finite bit widths are not drawn.
inline std::string bits_panel(double x0, double y0, double w, double h,
                              const std::vector<const RunResult*>& qruns,
                              const std::vector<ParamInfo>& params, double max_bits) {
  std::ostringstream s;
  // Quantized parameters in model order (those quantized by at least one run).
  std::vector<std::string> names;
  double top = 1;
  for (const auto& p : params) {
    bool quantized = false;
    for (const auto* r : qruns) {
      for (const auto& kv : r->bits_per_layer) {
        if (kv.first == p.name) {
          quantized = true;
          if (std::isfinite(kv.second)) top = std::max(top, kv.second);
        }
      }
    }
    if (quantized) names.push_back(p.name);
  }
  std::vector<std::string> kept;  // stored as floats
  for (const auto& p : params) {
    if (std::find(names.begin(), names.end(), p.name) == names.end()) kept.push_back(p.name);
  }
  const double ml = 52, mr = 12, mt = 34;
  const double pw = w - ml - mr;
  const double px = x0 + ml, py = y0 + mt;
  const auto legend = legend_layout(qruns.size(), px, px + pw,
                                    [&](size_t k) { return legend_width(qruns[k]->method); });
  const int rows = legend.empty() ? 1 : legend.back().second + 1;
  const double mb = 64 + kLegendRow * (rows - 1);
  const double ph = h - mt - mb;
  s << text(x0 + w / 2, y0 + 18, "Bits per layer (rounded mean per parameter)", "middle", 14,
            "font-weight=\"bold\"");
  const double cap = std::isfinite(max_bits) ? std::max(max_bits, top) : top;
  const double ymax = std::max(std::min(cap, std::ceil(top + 0.5)), 2.0);
  const auto ticks = nice_ticks(0, ymax, 5);
  const double yhi = ticks.empty() ? ymax : std::max(ymax, ticks.back());
  auto Y = [&](double v) { return py + ph - v / yhi * ph; };
  for (double t : ticks) {
    s << line(px, Y(t), px + pw, Y(t), "#e6e6e6");
    s << line(px - 4, Y(t), px, Y(t), "#333");
    s << text(px - 7, Y(t) + 4, tick_label(t), "end", 11);
  }
  s << line(px, py, px, py + ph, "#333") << line(px, py + ph, px + pw, py + ph, "#333");
  s << text(x0 + 14, py + ph / 2, "bits", "middle", 12,
            "transform=\"rotate(-90 " + num(x0 + 14) + " " + num(py + ph / 2) + ")\"");
  if (names.empty()) {
    s << text(px + pw / 2, py + ph / 2, "no parameter quantized", "middle", 12);
  }
  const double gw = names.empty() ? pw : pw / names.size();
  const double bw = std::min(48.0, gw * 0.8 / std::max<size_t>(qruns.size(), 1));
  for (size_t g = 0; g < names.size(); ++g) {
    const double cx = px + gw * (g + 0.5);
    const double start = cx - bw * qruns.size() / 2;
    for (size_t k = 0; k < qruns.size(); ++k) {
      for (const auto& kv : qruns[k]->bits_per_layer) {
        if (kv.first != names[g] || !std::isfinite(kv.second)) continue;
        const double bx = start + bw * k;
        s << rect(bx + 1, Y(kv.second), bw - 2, Y(0) - Y(kv.second), palette(k));
        s << text(bx + bw / 2, Y(kv.second) - 4, fmt("%.2f", kv.second), "middle", 10);
      }
    }
    s << line(cx, py + ph, cx, py + ph + 4, "#333");
    s << text(cx, py + ph + 17, names[g], "middle", 11, "font-family=\"monospace\"");
  }
  // Legend: one entry per run, then the parameters left in floating point.
  const double ly = py + ph + 36;
  for (size_t k = 0; k < qruns.size(); ++k) {
    const double lx = legend[k].first, lyk = ly + kLegendRow * legend[k].second;
    s << rect(lx, lyk - 9, 11, 11, palette(k));
    s << text(lx + 15, lyk, qruns[k]->method, "start", 11);
  }
  if (!kept.empty()) {
    std::string k = "fp32: ";
    for (size_t i = 0; i < kept.size(); ++i) k += (i ? ", " : "") + kept[i];
    s << text(px, ly + kLegendRow * (rows - 1) + 17, k, "start", 10, "fill=\"#555\"");
  }
  return s.str();
}

/// The method family of a baseline quantizer run, for the trade-off panel's legend: its name
/// without the bit width (`"uniform PTQ 4-bit"` → `"uniform PTQ"`).
inline std::string baseline_family(const std::string& method) {
  const auto sp = method.find_last_of(' ');
  if (sp != std::string::npos && method.size() > sp + 5 &&
      method.compare(method.size() - 4, 4, "-bit") == 0 &&
      std::all_of(method.begin() + sp + 1, method.end() - 4,
                  [](char ch) { return ch >= '0' && ch <= '9'; })) {
    return method.substr(0, sp);
  }
  return method;
}

/// Panel: test accuracy against checkpoint size (log scale), DiffQ λ runs (all in palette(0))
/// joined by a line in order of size, DiffQ size-budget runs as rings of the same colour, each
/// baseline quantizer method (family: `baseline_family`) in a colour of its own as diamonds, the
/// fp32 baseline as a grey square. The legend lists exactly the kinds of points drawn.
inline std::string tradeoff_panel(double x0, double y0, double w, double h,
                                  const std::vector<RunResult>& runs) {
  std::ostringstream s;
  const double ml = 58, mr = 16, mt = 34;
  const double pw = w - ml - mr;
  const double px = x0 + ml, py = y0 + mt;
  // Legend entries: DiffQ, then each baseline family in order of appearance, then fp32.
  struct Entry {
    std::string label;
    std::string color;
    char shape;  // 'c' circle, 'r' ring (hollow circle), 'd' diamond, 's' square
  };
  std::vector<Entry> entries;
  std::vector<std::string> families;
  bool has_diffq = false, has_budget = false, has_fp32 = false;
  for (const auto& r : runs) {
    if (r.diffq && r.target_mb > 0) {
      has_budget = true;
    } else if (r.diffq) {
      has_diffq = true;
    } else if (r.quantized) {
      const std::string f = baseline_family(r.method);
      if (std::find(families.begin(), families.end(), f) == families.end()) families.push_back(f);
    } else {
      has_fp32 = true;
    }
  }
  auto family_color = [&](const std::string& f) {
    const auto it = std::find(families.begin(), families.end(), f);
    return palette(1 + static_cast<size_t>(it - families.begin()));
  };
  if (has_diffq) entries.push_back({"DiffQ (one point per penalty λ)", palette(0), 'c'});
  if (has_budget) entries.push_back({"DiffQ size budget (one per budget)", palette(0), 'r'});
  for (const auto& f : families) entries.push_back({f, family_color(f), 'd'});
  if (has_fp32) entries.push_back({"fp32 baseline", kFp32Color, 's'});
  const auto legend = legend_layout(entries.size(), px, px + pw,
                                    [&](size_t i) { return legend_width(entries[i].label); });
  const int rows = legend.empty() ? 1 : legend.back().second + 1;
  const double mb = 64 + kLegendRow * (rows - 1);
  const double ph = h - mt - mb;
  auto marker = [](double x, double y, char shape, const std::string& color,
                   const std::string& extra) {
    if (shape == 'c') {
      return "<circle cx=\"" + num(x) + "\" cy=\"" + num(y) + "\" r=\"5\" fill=\"" + color + "\"" +
             (extra.empty() ? "" : " " + extra) + "/>\n";
    }
    if (shape == 'r') {
      return "<circle cx=\"" + num(x) + "\" cy=\"" + num(y) +
             "\" r=\"5\" fill=\"white\" stroke=\"" + color + "\" stroke-width=\"2\"/>\n";
    }
    if (shape == 'd') {
      return "<polygon points=\"" + num(x) + "," + num(y - 6) + " " + num(x + 6) + "," + num(y) +
             " " + num(x) + "," + num(y + 6) + " " + num(x - 6) + "," + num(y) + "\" fill=\"" +
             color + "\"" + (extra.empty() ? "" : " " + extra) + "/>\n";
    }
    return rect(x - 5, y - 5, 10, 10, color, extra);
  };
  s << text(x0 + w / 2, y0 + 18, "Test accuracy against checkpoint size", "middle", 14,
            "font-weight=\"bold\"");
  double smin = 1e300, smax = 0, amin = 100, amax = 0;
  for (const auto& r : runs) {
    const double mb_size = std::max(r.file_bytes / kMB, 1e-6);
    smin = std::min(smin, mb_size);
    smax = std::max(smax, mb_size);
    amin = std::min(amin, r.accuracy());
    amax = std::max(amax, r.accuracy());
  }
  // x: log10 of the size, padded; ticks at 1, 2, 5 × 10^k.
  double lx0 = std::log10(smin), lx1 = std::log10(smax);
  const double pad = std::max((lx1 - lx0) * 0.08, 0.05);
  lx0 -= pad;
  lx1 += pad;
  auto X = [&](double mb_size) { return px + (std::log10(mb_size) - lx0) / (lx1 - lx0) * pw; };
  std::vector<double> xt;
  for (int e = static_cast<int>(std::floor(lx0)); e <= static_cast<int>(std::ceil(lx1)); ++e) {
    for (double m : {1.0, 2.0, 5.0}) {
      const double v = m * std::pow(10.0, e);
      if (std::log10(v) >= lx0 && std::log10(v) <= lx1) xt.push_back(v);
    }
  }
  if (xt.size() < 2) {  // narrow range: linear-looking ticks on the log axis
    xt.clear();
    for (double t : nice_ticks(std::pow(10.0, lx0), std::pow(10.0, lx1), 4)) {
      if (t > 0 && std::log10(t) >= lx0 && std::log10(t) <= lx1) xt.push_back(t);
    }
  }
  const double span = std::max(amax - amin, 0.5);
  const auto yt = nice_ticks(amin - 0.15 * span, amax + 0.15 * span, 5);
  const double ylo = yt.empty() ? amin - 0.15 * span : std::min(yt.front(), amin - 0.15 * span);
  const double yhi = yt.empty() ? amax + 0.15 * span : std::max(yt.back(), amax + 0.15 * span);
  auto Y = [&](double a) { return py + ph - (a - ylo) / (yhi - ylo) * ph; };
  for (double t : yt) {
    if (Y(t) < py - 0.5 || Y(t) > py + ph + 0.5) continue;
    s << line(px, Y(t), px + pw, Y(t), "#e6e6e6");
    s << line(px - 4, Y(t), px, Y(t), "#333");
    s << text(px - 7, Y(t) + 4, tick_label(t), "end", 11);
  }
  for (double t : xt) {
    s << line(X(t), py, X(t), py + ph, "#e6e6e6");
    s << line(X(t), py + ph, X(t), py + ph + 4, "#333");
    s << text(X(t), py + ph + 17, tick_label(t), "middle", 11);
  }
  s << line(px, py, px, py + ph, "#333") << line(px, py + ph, px + pw, py + ph, "#333");
  s << text(px + pw / 2, py + ph + 36, "checkpoint file size (MB, log scale)", "middle", 12);
  s << text(x0 + 14, py + ph / 2, "test accuracy (%)", "middle", 12,
            "transform=\"rotate(-90 " + num(x0 + 14) + " " + num(py + ph / 2) + ")\"");
  std::vector<std::pair<double, const RunResult*>> dq;
  for (const auto& r : runs) {
    if (r.diffq && r.target_mb == 0) dq.emplace_back(r.file_bytes / kMB, &r);  // the λ curve
  }
  std::sort(dq.begin(), dq.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  if (dq.size() > 1) {
    std::string pts;
    for (const auto& d : dq) pts += num(X(d.first)) + "," + num(Y(d.second->accuracy())) + " ";
    s << "<polyline points=\"" << pts << "\" fill=\"none\" stroke=\"" << palette(0)
      << "\" stroke-width=\"1.5\"/>\n";
  }
  std::vector<std::pair<double, double>> placed;  // label anchors, to keep labels apart
  for (const auto& r : runs) {
    const double x = X(std::max(r.file_bytes / kMB, 1e-6)), y = Y(r.accuracy());
    if (!std::isfinite(x) || !std::isfinite(y)) continue;
    const std::string label = r.method + fmt(" (%.2f%%)", r.accuracy());
    const std::string outline = "stroke=\"white\" stroke-width=\"1\"";
    if (r.diffq) {
      s << marker(x, y, r.target_mb > 0 ? 'r' : 'c', palette(0), outline);
    } else if (r.quantized) {
      s << marker(x, y, 'd', family_color(baseline_family(r.method)), outline);
    } else {
      s << marker(x, y, 's', kFp32Color, outline);
    }
    // Labels left of points near the right edge, right of the others.
    const bool left = x > px + pw * 0.6;
    const double lx = left ? x - 9 : x + 9;
    double ly = y - 7;
    const double half_width = 6.5 * label.size();  // rough text width at 11 px
    for (bool moved = true; moved;) {
      moved = false;
      for (const auto& p : placed) {
        if (std::abs(p.first - lx) < half_width && std::abs(p.second - ly) < 13) {
          ly = p.second + 14;
          moved = true;
        }
      }
    }
    placed.emplace_back(lx, ly);
    s << text(lx, ly, label, left ? "end" : "start", 11);
  }
  // Legend: one entry per kind of point drawn.
  const double ly = py + ph + 54;
  for (size_t i = 0; i < entries.size(); ++i) {
    const double lx = legend[i].first, lyi = ly + kLegendRow * legend[i].second;
    s << marker(lx + 6, lyi - 4, entries[i].shape, entries[i].color, "");
    s << text(lx + 15, lyi, entries[i].label, "start", 11);
  }
  return s.str();
}

}  // namespace svg

/// The figure: bits per layer of every run with quantized parameters (DiffQ and baselines), and
/// accuracy against size when at least two DiffQ runs were made. `max_bits`: DiffQ's largest bit
/// width; the bits axis stops there unless a run has more bits.
inline std::string svg_figure(const std::vector<RunResult>& runs,
                              const std::vector<ParamInfo>& params, double max_bits) {
  std::vector<const RunResult*> qruns;
  size_t ndiffq = 0;
  for (const auto& r : runs) {
    if (r.diffq) ++ndiffq;
    if ((r.diffq || r.quantized) && !r.bits_per_layer.empty()) qruns.push_back(&r);
  }
  const bool tradeoff = ndiffq >= 2;
  const double pw = 480, h = 380;
  const double w = tradeoff ? 2 * pw : pw;
  std::ostringstream s;
  s << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << w << "\" height=\"" << h
    << "\" viewBox=\"0 0 " << w << " " << h << "\" "
    << "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\" fill=\"#222\">\n";
  s << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  s << svg::bits_panel(0, 0, pw, h, qruns, params, max_bits);
  if (tradeoff) s << svg::tradeoff_panel(pw, 0, pw, h, runs);
  s << "</svg>\n";
  return s.str();
}

}  // namespace fmnist
