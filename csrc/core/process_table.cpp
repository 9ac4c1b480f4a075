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

uint64_t boot_ticks() {
  timespec ts;
  clock_gettime(CLOCK_BOOTTIME, &ts);
  static const uint64_t hz = static_cast<uint64_t>(sysconf(_SC_CLK_TCK));
  return static_cast<uint64_t>(ts.tv_sec) * hz +
         static_cast<uint64_t>(ts.tv_nsec) * hz / 1'000'000'000ull;
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

namespace {

// Parent pid of `pid` from /proc, or -1.
pid_t parent_of(pid_t pid) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
  int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  char buf[512];
  ssize_t n = ::read(fd, buf, sizeof buf - 1);
  ::close(fd);
  if (n <= 0) return -1;
  buf[n] = '\0';
  char* p = std::strrchr(buf, ')');
  if (!p || p[1] != ' ') return -1;
  p = std::strchr(p + 3, ' ');  // past the state field
  return p ? static_cast<pid_t>(std::strtol(p + 1, nullptr, 10)) : -1;
}

}  // namespace

bool has_unregistered_child(const ProcessTable& table, pid_t parent, uint64_t since_ticks) {
  DIR* d = ::opendir("/proc");
  if (!d) return true;  // cannot tell: assume it exists
  bool found = false;
  while (dirent* e = ::readdir(d)) {
    char* end;
    long pid = std::strtol(e->d_name, &end, 10);
    if (*end != '\0' || pid <= 0 || parent_of(static_cast<pid_t>(pid)) != parent) continue;
    bool zombie = false;
    uint64_t started = process_start_time(static_cast<pid_t>(pid), &zombie);
    // A tick of slack: the reservation's tick count is rounded down.
    if (zombie || started + 1 < since_ticks) continue;
    bool registered = false;
    for (const ProcessSlot& s : table.slots)
      registered |= s.id.load(std::memory_order_relaxed) ==
                    slot_id(static_cast<pid_t>(pid), SlotKind::kActive);
    if (!registered) {
      found = true;
      break;
    }
  }
  ::closedir(d);
  return found;
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

int ProcessTable::claim(uint64_t id, const SlotFields& fields) {
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    if (slots[i].id.load(std::memory_order_relaxed) == 0 && take(i, 0, id, fields))
      return static_cast<int>(i);
  }
  return -1;
}

bool ProcessTable::take(uint32_t slot, uint64_t from_id, uint64_t id, const SlotFields& fields) {
  ProcessSlot& s = slots[slot];
  // Park the slot on the sentinel (judged alive, claimable by nobody) while
  // its fields change, so no reader ever pairs the new id with old fields.
  uint64_t expected = from_id;
  if (!s.id.compare_exchange_strong(expected, kReleasingId, std::memory_order_seq_cst))
    return false;
  s.start_time.store(fields.start_time, std::memory_order_relaxed);
  s.reserved_at_ns.store(fields.reserved_at_ns, std::memory_order_relaxed);
  s.reserved_ticks.store(fields.reserved_ticks, std::memory_order_relaxed);
  s.id.store(id, std::memory_order_seq_cst);
  return true;
}

void ProcessTable::release(uint32_t slot) {
  slots[slot].start_time.store(0, std::memory_order_relaxed);
  slots[slot].reserved_at_ns.store(0, std::memory_order_relaxed);
  slots[slot].reserved_ticks.store(0, std::memory_order_relaxed);
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
  s.reserved_ticks.store(0, std::memory_order_relaxed);
  s.id.store(0, std::memory_order_seq_cst);
  return true;
}

bool ProcessTable::alive(uint32_t slot, uint64_t now_ns) const {
  const ProcessSlot& s = slots[slot];
  uint64_t id = s.id.load(std::memory_order_acquire);
  if (id == 0) return false;
  if (id == kReleasingId) return true;  // being freed right now by a live process
  pid_t pid = slot_pid(id);
  if (slot_kind(id) == SlotKind::kReserved) {
    // Reserved by `pid` for a child it is forking. Until fork() returns in
    // the parent, give it time; after that, the reservation lives exactly
    // as long as a child that has not adopted it yet.
    bool young = now_ns - s.reserved_at_ns.load(std::memory_order_relaxed) < kReservationGraceNs;
    uint64_t ticks = s.reserved_ticks.load(std::memory_order_acquire);
    if (!(ticks & kForkReturned)) return young;
    bool parent_zombie = false;
    if (process_start_time(pid, &parent_zombie) == 0 || parent_zombie) return young;
    // A child that adopts the slot during the scan counts as registered
    // there; then the slot no longer holds the reservation we judged.
    return has_unregistered_child(*this, pid, ticks & ~kForkReturned) ||
           s.id.load(std::memory_order_acquire) != id;
  }
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
