// The table of processes attached to a pool, in shared memory.
//
// A process owns a slot while it holds the lock on the slot's byte of the
// control file (liveness.hpp); `id` only says what kind of owner it is and
// which pid it had (for people, never to judge liveness). When a process
// dies without detaching (SIGKILL, os._exit, exec), the kernel drops its
// lock, and any survivor can tell that the slot's owner is gone and reclaim
// what the slot's hold list (hold_list.hpp) says it held.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "core/block_header.hpp"

namespace pap {

struct alignas(64) ProcessSlot {
  // 0 when free; otherwise (pid << 2) | kind. The pid is the owner's as it
  // saw itself, possibly in another pid namespace: for diagnostics only.
  std::atomic<uint64_t> id;
  // The slot's hold list (hold_list.hpp): BlockRef bits of the block that
  // stores it, nil if none yet. One store switches a slot to a grown list,
  // so the slot names a whole list at every instant; the block itself
  // records its owner (BlockHeader::list_owner), so a stale reference is
  // recognised. Written under the pool lock.
  std::atomic<uint64_t> holds_ref;
  // Entries [0, length) of the list may be in use (a dropped hold leaves a
  // nil entry below `length`). Under the pool lock.
  std::atomic<uint32_t> holds_length;
  // Entries the slot's own page of the control segment has room for:
  // kInlineHolds, or 0 if /dev/shm had no room for that page when the slot
  // was claimed (the list then starts in a pool block).
  std::atomic<uint32_t> inline_capacity;
  // Set by the owner as it exits normally: reclaiming what it held once it
  // is gone is routine, not a loss worth a warning.
  std::atomic<uint32_t> exiting;
  // The program the owner belongs to (program_id of its PYARRAYPOOL_ROOT;
  // a reserved slot: the forking parent's, which the child keeps), 0 if it
  // has none (a pool shared by independent programs). A survivor of the same
  // program that reclaims what the owner held knows that its own program
  // stopped that process (Pool.terminate(), a killed worker): routine, not
  // a loss to warn about. Set as the slot is taken; diagnostics only.
  std::atomic<uint64_t> program;
};

static_assert(sizeof(ProcessSlot) == 64);

enum class SlotKind : uint64_t {
  kActive = 1,    // owned by the process `pid`
  kReserved = 2,  // reserved by the process `pid` for a child it is forking
  // Held by `pid` only to look at the pool (python -m pyarraypool stats):
  // it may take the lock, holds no block, is not one of the pool's
  // processes and keeps nobody's pool alive. (Kind 3 with pid 0 is
  // kReleasingId.)
  kObserver = 3,
};

// A slot's id while its fields change (pid 0 is never a process).
constexpr uint64_t kReleasingId = 3;

inline uint64_t slot_id(pid_t pid, SlotKind kind) {
  return (static_cast<uint64_t>(pid) << 2) | static_cast<uint64_t>(kind);
}
inline pid_t slot_pid(uint64_t id) { return static_cast<pid_t>(id >> 2); }
inline SlotKind slot_kind(uint64_t id) { return static_cast<SlotKind>(id & 3); }
inline bool is_observer(uint64_t id) {
  return id != kReleasingId && slot_kind(id) == SlotKind::kObserver;
}

struct ProcessTable {
  ProcessSlot slots[kMaxSlots];

  // Moves `slot` from `from_id` to `id` (of the program `program`) with an
  // empty hold list; false if the slot no longer holds `from_id`. The
  // caller holds the slot's byte lock (or, for from_id == 0, is about to
  // own a free slot it locked).
  bool take(uint32_t slot, uint64_t from_id, uint64_t id, uint64_t program = 0);
  // Frees a slot if it still holds `expected_id` (its holds must already
  // be dropped): between judging an owner dead and freeing its slot,
  // another process may have taken the slot over, and must keep it.
  bool release_if(uint32_t slot, uint64_t expected_id);
};

// Start time of a process, or 0 if it cannot be read. Also reports whether
// the process is a zombie (dead but not yet reaped), which counts as dead.
// Used only for the program's root (ProgramRoot), which may never attach.
uint64_t process_start_time(pid_t pid, bool* zombie = nullptr);
uint64_t monotonic_ns();
// /proc/sys/kernel/random/boot_id without its newline ("" if unreadable):
// names this boot of this host (or container's kernel), so that two
// processes can tell whether they can share /dev/shm at all.
std::string boot_id();

}  // namespace pap
