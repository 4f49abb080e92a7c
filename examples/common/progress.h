#pragma once
/// \file examples/common/progress.h
/// Shared by the examples (fashion_mnist, char_lm). A progress bar on stderr for one training epoch
/// (or any counted loop): on a terminal, one line redrawn with '\r' at most every `interval`
/// seconds; otherwise (stderr redirected to a file or a pipe) a plain line at each tenth of the
/// epoch, so that logs stay readable.

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>

namespace diffq_examples {

/// `12.3s`, `4m05s` or `1h02m`.
inline std::string format_duration(double seconds) {
  char buf[32];
  if (!(seconds >= 0)) seconds = 0;
  if (seconds < 60) {
    std::snprintf(buf, sizeof(buf), "%.1fs", seconds);
  } else if (seconds < 3600) {
    const int s = static_cast<int>(seconds + 0.5);
    std::snprintf(buf, sizeof(buf), "%dm%02ds", s / 60, s % 60);
  } else {
    const int m = static_cast<int>(seconds / 60 + 0.5);
    std::snprintf(buf, sizeof(buf), "%dh%02dm", m / 60, m % 60);
  }
  return buf;
}

class ProgressBar {
 public:
  using Clock = std::chrono::steady_clock;

  /// `label`: shown first, e.g. `"fp32 epoch 1/3"`; `total`: number of batches.
  ProgressBar(std::string label, int64_t total, double interval = 0.2, FILE* out = stderr)
      : label_(std::move(label)),
        total_(std::max<int64_t>(total, 1)),
        interval_(interval),
        out_(out),
        tty_(isatty(fileno(out)) == 1),
        start_(Clock::now()),
        last_(start_) {}

  bool is_tty() const { return tty_; }

  /// Whether `update(done, …)` would print now: callers compute costly status text only then.
  bool due(int64_t done) const {
    if (done >= total_) return true;
    if (tty_) return seconds_since(last_) >= interval_;
    return done * 10 / total_ > last_decile_;
  }

  /// Seconds since the bar was created.
  double elapsed() const { return seconds_since(start_); }

  /// Shows `done` of `total` batches with `status` (e.g. "loss 0.41 acc 85.1%"), if due.
  void update(int64_t done, const std::string& status) {
    if (!due(done)) return;
    last_ = Clock::now();
    last_decile_ = done * 10 / total_;
    const double el = elapsed();
    const double eta = done > 0 ? el / static_cast<double>(done) * (total_ - done) : 0.0;
    char counts[64];
    std::snprintf(counts, sizeof(counts), "%lld/%lld", static_cast<long long>(done),
                  static_cast<long long>(total_));
    const std::string times = format_duration(el) + " < " + format_duration(eta);
    if (!tty_) {
      std::fprintf(out_, "%s %s %s %s\n", label_.c_str(), counts, status.c_str(), times.c_str());
      std::fflush(out_);
      return;
    }
    const std::string tail = std::string(" ") + counts + " " + status + " " + times;
    const int cols = terminal_columns();
    // "<label> [#####.....]<tail>", fitted to the terminal width so that '\r' redraws one line.
    // The bar's width is set once per epoch (room left on the first line, at most 30) so that it
    // does not jitter as the numbers change.
    if (bar_ < 0) {
      bar_ = std::min<int>(30, cols - 4 - static_cast<int>(label_.size() + 3 + tail.size()));
    }
    const int bar = bar_;
    std::string line = label_;
    if (bar >= 8) {
      const int filled = static_cast<int>(static_cast<double>(done) / total_ * bar);
      line += " [" + std::string(filled, '#') + std::string(bar - filled, '.') + "]";
    }
    line += tail;
    if (static_cast<int>(line.size()) > cols - 1) line.resize(std::max(cols - 1, 0));
    std::fprintf(out_, "\r%s\033[K", line.c_str());
    if (done >= total_) std::fputc('\n', out_);
    std::fflush(out_);
  }

 private:
  static double seconds_since(Clock::time_point t) {
    return std::chrono::duration<double>(Clock::now() - t).count();
  }

  int terminal_columns() const {
    winsize ws{};
    if (ioctl(fileno(out_), TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
    return 100;
  }

  std::string label_;
  int64_t total_;
  double interval_;
  FILE* out_;
  bool tty_;
  Clock::time_point start_;
  Clock::time_point last_;
  int64_t last_decile_ = 0;
  int bar_ = -1;
};

}  // namespace diffq_examples
