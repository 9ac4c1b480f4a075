#include "core/process_table.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace pap {

uint64_t monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(ts.tv_nsec);
}

std::string boot_id() {
  int fd = ::open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::string();
  char buf[128];
  ssize_t n;
  do {
    n = ::read(fd, buf, sizeof buf);
  } while (n < 0 && errno == EINTR);
  ::close(fd);
  std::string s(buf, n > 0 ? static_cast<size_t>(n) : 0);
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

uint64_t process_start_time(pid_t pid, bool* zombie) {
  if (zombie) *zombie = false;
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
  int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  char buf[1024];
  ssize_t n;
  do {
    n = ::read(fd, buf, sizeof buf - 1);
  } while (n < 0 && errno == EINTR);
  ::close(fd);
  if (n <= 0) return 0;
  buf[n] = '\0';
  // The command name (field 2) may hold spaces and parentheses: fields are
  // counted from the last ')'.
  char* p = std::strrchr(buf, ')');
  if (!p || p[1] != ' ') return 0;
  p += 2;  // field 3: state
  if (zombie) *zombie = (*p == 'Z' || *p == 'X' || *p == 'x');
  for (int field = 3; field < 22; ++field) {
    p = std::strchr(p, ' ');
    if (!p) return 0;
    ++p;
  }
  return std::strtoull(p, nullptr, 10);
}

bool ProcessTable::take(uint32_t slot, uint64_t from_id, uint64_t id, uint64_t program) {
  ProcessSlot& s = slots[slot];
  // Park the slot on the sentinel while its fields change, so that no
  // reader pairs the new id with the old hold list.
  uint64_t expected = from_id;
  if (!s.id.compare_exchange_strong(expected, kReleasingId, std::memory_order_seq_cst))
    return false;
  s.holds_ref.store(BlockRef::kNilBits, std::memory_order_relaxed);
  s.holds_length.store(0, std::memory_order_relaxed);
  s.inline_capacity.store(0, std::memory_order_relaxed);
  s.exiting.store(0, std::memory_order_relaxed);
  s.program.store(program, std::memory_order_relaxed);
  s.id.store(id, std::memory_order_seq_cst);
  return true;
}

bool ProcessTable::release_if(uint32_t slot, uint64_t expected_id) {
  return take(slot, expected_id, 0);
}

}  // namespace pap
