// Internals shared by the pool's source files: the layout of the control
// segment, small helpers, and the lock guard. Not part of the core's
// interface; only pool*.cpp include it.
//
//   pool.cpp              attach, leave, fork (a process's membership)
//   pool_segments.cpp     data segments: mapping, growth, retirement
//   pool_blocks.cpp       allocate, release, pickles in flight, load a handle
//   pool_maintenance.cpp  reclaim and expiry, stats, snapshot, verify
//   pool_clean.cpp        removing dead programs' pools
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/errors.hpp"
#include "core/futex_lock.hpp"
#include "core/hold_list.hpp"
#include "core/pool.hpp"
#include "core/process_table.hpp"

namespace pap {

constexpr uint64_t kMagic = 0x31304C4F4F505041ull;  // "APPOOL01"
// 2: instance_id, 3: root, 4: root_left, 5: check_key, and segment numbers
// reused (a process of version 4 would read a reused number through its
// mapping of the retired segment), 6: kernel-held liveness, hold lists, 4096
// process slots, 7: each slot's program (ProcessSlot::program), 8: pages
// reserved lazily and given back (FreeState in free headers, decay settings
// and counters).
constexpr uint32_t kLayoutVersion = 8;
constexpr uint32_t kStateRunning = 0;
constexpr uint32_t kStateDead = 1;  // being removed by its last process or a cleaner
constexpr uint32_t kUnknownLockOwner = kMaxSlots + 1;  // see ControlHeader::needs_repair

struct Counters {
  uint64_t capacity_bytes;
  uint64_t used_bytes;
  uint64_t live_blocks;
  uint64_t pending_transfers;
  uint64_t pending_blocks;
  uint64_t next_generation;
  // used_bytes includes the blocks that hold processes' hold lists (once a
  // list outgrows its slot's page); live_blocks counts only arrays.
  // No pending count expires before this time: maintenance skips its walk
  // until then unless a process died. Only ever moved earlier between walks.
  uint64_t next_expiry_ns;
  // Bytes given back to the kernel since the pool was made (pages punched,
  // segments removed).
  uint64_t returned_bytes;
  // The most used_bytes has been since peak_window_ms (coarse monotonic
  // ms): what the footprint bound counts as live (keep_footprint_locked).
  // Only a policy input: a damaged value bends the bound for one decay time.
  uint64_t peak_used_bytes;
  uint64_t peak_window_ms;
};

// The settings as the control segment keeps them (decay_ns is kept apart,
// at the end of the header).
struct StoredConfig {
  uint64_t max_bytes;
  uint64_t segment_bytes;
  uint64_t transfer_timeout_ns;
};

// The control segment. Fields above `lock` are written once by the creator
// before `magic` is published; `state`, the process table and the segment
// table are read without the lock and are atomics; everything from `alloc`
// down is read and written only under the lock.
struct ControlHeader {
  std::atomic<uint64_t> magic;
  uint32_t layout_version;
  uint32_t control_bytes;
  PoolId pool_id;
  uint64_t created_realtime_ns;
  // Random, drawn by the creator: tells apart two pools that share a token
  // (the same name in two /dev/shm mounts, or one recreated after its
  // program ended), which the token alone cannot.
  unsigned char instance_id[16];
  ProgramRoot root;
  // Set by the root when it leaves: from then on it will not load anything,
  // and nobody keeps the pool for it (it may still run for a while, in its
  // own exit handlers).
  std::atomic<uint32_t> root_left;
  StoredConfig config;
  std::atomic<uint32_t> state;
  // Set by a waiter that took the lock from a dead owner, cleared once the
  // repair is complete: a repair cut short (an error, another death) is
  // redone by the next owner. The dead owner's slot + 1 (kUnknownLockOwner
  // if the lock word named no slot): its reclaim is a warning even in its
  // own program, since it died inside an operation on the pool.
  std::atomic<uint32_t> needs_repair;
  // Random, drawn by the creator: keys every block's `check` (header_check).
  // Secret because the file is mode 0600 and its owner is checked.
  uint64_t check_key;
  alignas(64) LockWord lock;
  alignas(64) ProcessTable table;
  std::atomic<uint32_t> segment_count;
  // Size of each data segment; 0 once retired (see retire_free_segments_locked),
  // until grow_locked reuses the number for a new segment.
  std::atomic<uint64_t> segment_sizes[BlockRef::kMaxSegments];
  // The random part of each data segment's name (see data_name). Stored
  // before the segment is created and before its size: a grower killed in
  // between leaves a name the next reuse of the number unlinks.
  std::atomic<uint64_t> segment_nonces[BlockRef::kMaxSegments];
  // Bumped at each retirement and at each reuse of a retired number, so
  // processes notice they must unmap, or map the new segment of that number.
  std::atomic<uint64_t> retired_epoch;
  alignas(64) AllocState alloc;
  Counters counters;
  // PoolConfig::decay_ns, written once by the creator.
  uint64_t decay_ns;
  // When free memory is next due to go back (coarse monotonic ms; 0: none
  // known). Written under the lock, read without it by the keeper, which
  // calls return_idle_memory once it has passed.
  std::atomic<uint64_t> decay_due_ms;
};

static_assert(std::atomic<uint64_t>::is_always_lock_free);

// The layout is shared by every process of a pool, whatever build it runs:
// a change must bump kLayoutVersion, and redraw docs/images/segment_layout.png
// (docs/diagrams/make_diagrams.py draws these offsets).
static_assert(offsetof(ControlHeader, check_key) == 120);
static_assert(offsetof(ControlHeader, lock) == 128);
static_assert(offsetof(ControlHeader, table) == 192);
static_assert(offsetof(ControlHeader, segment_count) == 262336);
static_assert(offsetof(ControlHeader, alloc) == 327936);
static_assert(offsetof(ControlHeader, counters) == 338344);
static_assert(sizeof(ControlHeader) == 338496);

inline constexpr uint64_t kPage = 4096;
// The control segment: the header, then one page per process slot that
// holds the slot's first kInlineHolds hold entries (hold_list.hpp). The
// header's pages and the first kReservedSlotPages slots' pages are reserved
// when the pool is made (slots are claimed lowest first, so a program of up
// to that many processes needs no more, even once /dev/shm is full); a
// later slot's page is reserved when a process first claims that slot, so a
// pool costs memory for the slots that were ever used, not for all 4096.
inline constexpr uint64_t kControlHeaderBytes = (sizeof(ControlHeader) + kPage - 1) & ~(kPage - 1);
inline constexpr uint64_t kSlotPageBytes = kPage;
inline constexpr uint32_t kReservedSlotPages = 16;
inline constexpr uint32_t kInlineHolds = kSlotPageBytes / sizeof(HoldEntry);
inline constexpr uint64_t kControlBytes =
    kControlHeaderBytes + uint64_t{kMaxSlots} * kSlotPageBytes;
inline constexpr uint64_t slot_page_offset(uint32_t slot) {
  return kControlHeaderBytes + uint64_t{slot} * kSlotPageBytes;
}
inline constexpr uint64_t kLargeRound = 2u << 20;

inline uint64_t round_up(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

// The program's root process (see ProgramRoot) is this process / is still
// running: same pid, same start time, not a zombie.
bool is_me(const ProgramRoot& root);
// The inode of this process's /proc/self/ns/pid (0 if unreadable).
uint64_t my_pid_namespace();
bool root_alive(const ProgramRoot& root);

uint64_t realtime_ns();
// The size of /dev/shm and the bytes free in it (for an unprivileged user).
struct ShmSpace {
  bool known = false;  // statvfs worked
  uint64_t free_bytes = 0;
  uint64_t total_bytes = 0;
};
ShmSpace shm_usage();
// "/dev/shm has 12.0 MiB (12582912 bytes) free of 64.0 MiB"
std::string shm_space();
void sleep_ms(int ms);
// Waits for a creator to publish the header; false if it never does.
bool wait_initialized(const ControlHeader* h, int ms);

// The lock word names its owner by slot + 1; the kernel says whether that
// slot's owner lives.
class TableProbe : public OwnerProbe {
 public:
  explicit TableProbe(const Pool& p) : p_(p) {}
  bool owner_alive(uint32_t owner) override {
    if (owner == 0 || (owner <= kMaxSlots && p_.slot_alive(owner - 1))) return true;
    dead_owner_ = owner <= kMaxSlots ? owner : kUnknownLockOwner;
    return false;
  }
  // The owner last found dead (the one a takeover took the lock from), for
  // ControlHeader::needs_repair.
  uint32_t dead_owner() const { return dead_owner_ ? dead_owner_ : kUnknownLockOwner; }

 private:
  const Pool& p_;
  uint32_t dead_owner_ = 0;
};

// Everything of the pool in /dev/shm: data segments, orphans of a process
// killed while growing, the control segment last (it stays the pool's index
// until the end, so that a remover killed halfway leaves a pool that the
// next attacher or cleaner finds and finishes removing). Best effort: this runs at
// exit and must not fail halfway over a file that is not ours.
void unlink_data_files(const std::string& token);
void unlink_pool_files(const std::string& token);

// Reserves the pages an allocation hands out (pool_memory.cpp); in kFast it
// declines (a system call), and the allocation is retried in kSlow.
class Pool::Reserver final : public PageReserver {
 public:
  // `populated` (if not null) gets the pages reserved: an array's block,
  // which its allocator maps at once (Pool::populate_reserved).
  Reserver(Pool& p, Mode mode, uint64_t requested, Reserved* populated = nullptr)
      : p_(p), mode_(mode), requested_(requested), populated_(populated) {}
  bool reserve(BlockRef block, uint64_t lo, uint64_t hi) override;

 private:
  Pool& p_;
  Mode mode_;
  uint64_t requested_;  // for the error message
  Reserved* populated_;
};

// On every allocate and release: inline, not a call.
inline AllocState& Pool::alloc_state() { return hdr_->alloc; }
inline ProcessTable& Pool::table() { return hdr_->table; }

// Holds the pool lock for a scope. In kFast it only tries once and also
// gives up if this process has not mapped every published segment (mapping
// is a system call); check held() before using the pool.
class Pool::Guard {
 public:
  // Only the lock, taken over from a dead owner if need be: no mapping and
  // no repair, for a pool that may be half removed (settle_stuck_dead).
  struct LockOnly {};
  Guard(Pool& p, LockOnly) : p_(p) {
    TableProbe probe(p);
    if (futex_lock::lock(p.hdr_->lock, p.slot_ + 1, probe) == Acquired::kFromDeadOwner)
      p.hdr_->needs_repair.store(probe.dead_owner(),
                                 std::memory_order_relaxed);  // by the next full Guard
    held_ = true;
  }
  Guard(Pool& p, Mode mode) : p_(p) {
    if (p.left_)
      throw CoreError(ErrorKind::kPool, "this process is no longer attached to the pool");
    const uint32_t me = p.slot_ + 1;
    if (mode == Mode::kFast) {
      if (!p.all_mapped() || !futex_lock::try_lock(p.hdr_->lock, me)) return;
      held_ = true;
      // A segment was published or retired meanwhile: (un)mapping is a
      // system call, for kSlow.
      if (!p.all_mapped() || !p.retirements_seen() || p.holds_stale_ ||
          p.hdr_->needs_repair.load(std::memory_order_relaxed))
        release();
      return;
    }
    p.ensure_mapped();
    TableProbe probe(p);
    Acquired how = futex_lock::lock(p.hdr_->lock, me, probe);
    held_ = true;
    if (how == Acquired::kFromDeadOwner)
      p.hdr_->needs_repair.store(probe.dead_owner(), std::memory_order_relaxed);
    try {
      p.ensure_mapped();
      p.remap_changed_segments();
      if (p.hdr_->needs_repair.load(std::memory_order_relaxed)) {
        // The owner may have died in leave() between marking the pool dead
        // and finding us alive: we are, so the pool runs on.
        p.hdr_->state.store(kStateRunning, std::memory_order_seq_cst);
        p.maintain_locked(true);
        p.hdr_->needs_repair.store(0, std::memory_order_relaxed);
      }
      if (p.holds_stale_) p.rebuild_hold_index_locked();
    } catch (...) {
      release();
      throw;
    }
  }
  ~Guard() { release(); }
  Guard(const Guard&) = delete;
  Guard& operator=(const Guard&) = delete;
  bool held() const { return held_; }
  void release() {
    if (held_) futex_lock::unlock(p_.hdr_->lock);
    held_ = false;
  }

 private:
  Pool& p_;
  bool held_ = false;
};

}  // namespace pap
