// Forked children for the core tests and the core benchmark: both run a
// pool user in another process and read back only its exit status.
#pragma once

#include <sys/types.h>

#include <functional>

namespace pap::test {

struct ChildOptions {
  unsigned alarm_seconds;  // SIGALRM ends a child that outlives a hung parent
  bool die_with_parent;    // PR_SET_PDEATHSIG: SIGKILL when the parent dies
  const char* label;       // names the child in its message about an exception
};

// Forks a child that runs `body` and _exit()s with its return value (no
// destructors, no atexit, no leave()): 98 if it threw a std::exception, 99
// if it threw anything else. Returns the child's pid, or -1 (errno set) if
// fork() failed.
pid_t fork_child(const std::function<int()>& body, const ChildOptions& options);

// The child's exit status, or 128 + the signal that killed it.
int wait_child(pid_t pid);

}  // namespace pap::test
