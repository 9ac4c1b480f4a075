// The table of processes attached to a pool, in shared memory.
//
// A process claims a slot with a CAS and is then named by it: in the lock
// word (slot + 1) and in every block it holds (a bit of the block's holder
// mask). When a process dies without detaching (SIGKILL, os._exit in a
// forked worker), its slot stays claimed; any survivor can tell that it is
// dead and reclaim what it held. Pids are reused by the kernel, so a slot
// records the process start time as well, and a pid whose start time differs
// is a different, newer process: the slot's owner is dead.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "core/block_header.hpp"

namespace pap {

struct ProcessSlot {
  // 0 when free; otherwise (pid << 2) | kind.
  std::atomic<uint64_t> id;
  // The owner's start time (clock ticks since boot, /proc/PID/stat field
  // 22); 0 until the owner has written it.
  std::atomic<uint64_t> start_time;
  // For kReserved: CLOCK_MONOTONIC ns when the parent reserved it.
  std::atomic<uint64_t> reserved_at_ns;
  // For kReserved: boot time in clock ticks (the unit of /proc start times)
  // when the parent reserved it, with kForkReturned set once fork() has
  // returned in the parent. From then on the child exists or is dead.
  std::atomic<uint64_t> reserved_ticks;
};

constexpr uint64_t kForkReturned = uint64_t{1} << 63;

enum class SlotKind : uint64_t {
  kActive = 1,    // owned by the process `pid`
  kReserved = 2,  // reserved by the process `pid` for a child it is forking
  // Held by `pid` only to look at the pool (python -m pyarraypool stats):
  // it may take the lock, holds no block, is not one of the pool's
  // processes and keeps nobody's pool alive. (Kind 3 with pid 0 is
  // kReleasingId.)
  kObserver = 3,
};

// A slot's id while a live process frees it (pid 0 is never a process).
constexpr uint64_t kReleasingId = 3;

inline uint64_t slot_id(pid_t pid, SlotKind kind) {
  return (static_cast<uint64_t>(pid) << 2) | static_cast<uint64_t>(kind);
}
inline pid_t slot_pid(uint64_t id) { return static_cast<pid_t>(id >> 2); }
inline SlotKind slot_kind(uint64_t id) { return static_cast<SlotKind>(id & 3); }
inline bool is_observer(uint64_t id) {
  return id != kReleasingId && slot_kind(id) == SlotKind::kObserver;
}

// A fork child adopts its reserved slot at once; a reservation older than
// this belongs to a fork that failed or a child that died before adopting.
constexpr uint64_t kReservationGraceNs = 30'000'000'000ull;

struct ProcessTable {
  ProcessSlot slots[kMaxSlots];

  // What a slot records besides its id.
  struct SlotFields {
    uint64_t start_time = 0;
    uint64_t reserved_at_ns = 0;
    uint64_t reserved_ticks = 0;
  };
  // Claims a free slot for `id` and returns its index, or -1 if none is free.
  int claim(uint64_t id, const SlotFields& fields);
  // Moves `slot` from `from_id` to `id` with `fields`; false if the slot no
  // longer holds `from_id`. The new id appears only with its fields written.
  bool take(uint32_t slot, uint64_t from_id, uint64_t id, const SlotFields& fields);
  // Frees a slot (its holdings must already be reclaimed).
  void release(uint32_t slot);
  // Frees a slot only if it still holds `expected_id`: between judging an
  // owner dead and freeing its slot, another process may have taken the
  // slot over (see Pool::claim_slot_or_throw), and must keep it.
  bool release_if(uint32_t slot, uint64_t expected_id);
  // True unless the slot's owner is certainly gone. Reads /proc.
  bool alive(uint32_t slot, uint64_t now_ns) const;
};

// Start time of a process, or 0 if it cannot be read. Also reports whether
// the process is a zombie (dead but not yet reaped), which counts as dead.
uint64_t process_start_time(pid_t pid, bool* zombie = nullptr);
// Boot time now, in the clock ticks of /proc start times.
uint64_t boot_ticks();
// Whether `parent` has a live (non-zombie) child started at or after
// `since_ticks` that no slot of `table` names. Scans /proc.
bool has_unregistered_child(const struct ProcessTable& table, pid_t parent, uint64_t since_ticks);
uint64_t monotonic_ns();
// /proc/sys/kernel/random/boot_id without its newline ("" if unreadable):
// names this boot of this host (or container's kernel), so that two
// processes can tell whether they can share /dev/shm at all.
std::string boot_id();

}  // namespace pap
