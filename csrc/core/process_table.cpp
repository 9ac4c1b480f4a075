#include "core/process_table.hpp"

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

int ProcessTable::claim(uint64_t id) {
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    uint64_t expected = 0;
    if (slots[i].id.load(std::memory_order_relaxed) == 0 &&
        slots[i].id.compare_exchange_strong(expected, id, std::memory_order_seq_cst))
      return static_cast<int>(i);
  }
  return -1;
}

void ProcessTable::release(uint32_t slot) {
  slots[slot].start_time.store(0, std::memory_order_relaxed);
  slots[slot].reserved_at_ns.store(0, std::memory_order_relaxed);
  slots[slot].id.store(0, std::memory_order_seq_cst);
}

bool ProcessTable::release_if(uint32_t slot, uint64_t expected_id) {
  ProcessSlot& s = slots[slot];
  // Park the slot on a sentinel while clearing it, so that nobody claims it
  // (claims need id == 0) before its fields are clean.
  uint64_t expected = expected_id;
  if (!s.id.compare_exchange_strong(expected, kReleasingId, std::memory_order_seq_cst))
    return false;
  s.start_time.store(0, std::memory_order_relaxed);
  s.reserved_at_ns.store(0, std::memory_order_relaxed);
  s.id.store(0, std::memory_order_seq_cst);
  return true;
}

bool ProcessTable::alive(uint32_t slot, uint64_t now_ns) const {
  const ProcessSlot& s = slots[slot];
  uint64_t id = s.id.load(std::memory_order_acquire);
  if (id == 0) return false;
  if (id == kReleasingId) return true;  // being freed right now by a live process
  if (slot_kind(id) == SlotKind::kReserved)
    return now_ns - s.reserved_at_ns.load(std::memory_order_relaxed) < kReservationGraceNs;
  pid_t pid = slot_pid(id);
  bool zombie = false;
  uint64_t started = process_start_time(pid, &zombie);
  if (started == 0) {
    // /proc/PID/stat could not be read. Only kill() can say "certainly
    // gone" (ESRCH): the open may have failed for reasons of ours (EMFILE,
    // ENFILE, ENOMEM) while the owner lives, and calling it dead would free
    // blocks it is using.
    return ::kill(pid, 0) == 0 || errno == EPERM;
  }
  if (zombie) return false;
  uint64_t recorded = s.start_time.load(std::memory_order_acquire);
  // 0: the owner claimed the slot but has not written its start time yet.
  return recorded == 0 || recorded == started;
}

}  // namespace pap
