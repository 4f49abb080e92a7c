#pragma once
/// \file examples/common/child_process.h
/// Shared by the examples (fashion_mnist, char_lm): the path of the running program, its
/// evaluation of a checkpoint in a new process (`self eval ...`, stdout captured), and the kind of
/// a checkpoint file from its first bytes.

#include <c10/util/Exception.h>

#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

extern char** environ;

namespace diffq_examples {

/// The running program's path (/proc/self/exe). `who` prefixes errors ("fashion_mnist").
inline std::string self_exe(const std::string& who) {
  std::vector<char> buf(4096);
  const ssize_t len = readlink("/proc/self/exe", buf.data(), buf.size() - 1);
  TORCH_CHECK(len > 0, who, ": cannot read /proc/self/exe: ", std::strerror(errno));
  return std::string(buf.data(), static_cast<size_t>(len));
}

/// Runs `args` (`args[0]`: the program's path) in a new process with this environment and returns
/// its stdout; its stderr is this process's. Throws `c10::Error` (prefixed by `who`) when it
/// cannot start, or when it exits non-zero or is killed (its output in the message).
inline std::string run_and_capture_stdout(std::vector<std::string> args, const std::string& who) {
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  int fds[2];
  TORCH_CHECK(pipe(fds) == 0, who, ": pipe failed: ", std::strerror(errno));
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addclose(&actions, fds[0]);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_addclose(&actions, fds[1]);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, args[0].c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  close(fds[1]);
  std::string command;
  for (const auto& a : args) command += (command.empty() ? "" : " ") + a;
  if (rc != 0) {
    close(fds[0]);
    TORCH_CHECK(false, who, ": cannot start '", command, "': ", std::strerror(rc));
  }
  std::string output;
  char buf[4096];
  for (;;) {
    const ssize_t got = read(fds[0], buf, sizeof(buf));
    if (got > 0) {
      output.append(buf, static_cast<size_t>(got));
    } else if (got == 0 || errno != EINTR) {
      break;
    }
  }
  close(fds[0]);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  TORCH_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, who, ": '", command, "' failed (",
              WIFEXITED(status) ? "exit status " + std::to_string(WEXITSTATUS(status))
                                : "killed by signal " + std::to_string(WTERMSIG(status)),
              "); its output: ", output);
  return output;
}

/// "fp32" for a zip archive (`torch::save`), "diffq" for a DiffQ checkpoint (magic "DIFFQCKP");
/// anything else is an error naming the file.
inline std::string detect_checkpoint_format(const std::string& path, const std::string& who) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, who, ": cannot open checkpoint '", path, "': ", std::strerror(errno));
  char magic[8] = {0};
  in.read(magic, sizeof(magic));
  if (in.gcount() >= 4 && std::memcmp(magic, "PK\x03\x04", 4) == 0) return "fp32";
  if (in.gcount() == 8 && std::memcmp(magic, "DIFFQCKP", 8) == 0) return "diffq";
  TORCH_CHECK(false, who, ": '", path, "' is neither a DiffQ checkpoint (magic DIFFQCKP) ",
              "nor a torch::save archive (a zip file); pass --format to force one");
  return "";
}

}  // namespace diffq_examples
