#include "child_process.hpp"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <exception>

namespace pap::test {

pid_t fork_child(const std::function<int()>& body, const ChildOptions& options) {
  std::fflush(
      nullptr);  // or the child's _exit would drop, and a parent's exit repeat, buffered output
  const pid_t pid = ::fork();
  if (pid != 0) return pid;
  if (options.die_with_parent) ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  ::alarm(options.alarm_seconds);
  int rc = 97;
  try {
    rc = body();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "  %s %d: exception: %s\n", options.label, static_cast<int>(::getpid()),
                 e.what());
    rc = 98;
  } catch (...) {
    rc = 99;
  }
  ::_exit(rc);
}

int wait_child(pid_t pid) {
  int st = 0;
  while (::waitpid(pid, &st, 0) < 0)
    if (errno != EINTR) return -1;
  if (WIFEXITED(st)) return WEXITSTATUS(st);
  if (WIFSIGNALED(st)) return 128 + WTERMSIG(st);
  return -1;
}

}  // namespace pap::test
