// A shared-memory pool as seen from one process.
//
// The pool is a control segment (header, lock, process table, segment table,
// allocator index, counters) plus data segments that hold the blocks. Every
// process of one program attaches to the same pool, named by a token; the
// first one to attach creates it. All mutation happens under the pool lock,
// and every lock hold is short and free of system calls in the common case.
//
// Lifetime protocol (the invariant every operation keeps):
//   a used block stays used while  holders > 0 || pending > 0
// where `holders` counts the process slots holding the block (a process
// holds a block once, however many Python objects it has on it, and names
// it in its hold list, hold_list.hpp) and `pending` counts pickles made with
// transfer_required that have not been loaded. The last operation that
// makes the condition false frees the block in the same critical section.
// A process is alive while the kernel holds its lock on its slot's byte of
// the control file (liveness.hpp); a dead process's holds are dropped by
// the survivor that notices, from its hold list; expired pending counts are
// dropped after `transfer_timeout`.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "core/allocator.hpp"
#include "core/block_header.hpp"
#include "core/futex_lock.hpp"
#include "core/handle.hpp"
#include "core/hold_list.hpp"
#include "core/liveness.hpp"
#include "core/local_cache.hpp"
#include "core/pool_events.hpp"
#include "core/process_table.hpp"
#include "core/shm_segment.hpp"

namespace pap {

// How long free memory stays reserved before it goes back to the kernel,
// by default (see Pool::return_idle_memory).
inline constexpr uint64_t kDefaultDecayNs = 2'000'000'000ull;

struct PoolConfig {
  uint64_t max_bytes;
  uint64_t segment_bytes;
  uint64_t transfer_timeout_ns;
  uint64_t decay_ns = kDefaultDecayNs;
  bool operator==(const PoolConfig& o) const {
    return max_bytes == o.max_bytes && segment_bytes == o.segment_bytes &&
           transfer_timeout_ns == o.transfer_timeout_ns && decay_ns == o.decay_ns;
  }
};

struct PoolStats {
  std::string token;
  uint64_t capacity_bytes = 0;
  uint64_t used_bytes = 0;
  uint64_t live_blocks = 0;
  uint64_t pending_transfers = 0;
  uint64_t pending_blocks = 0;
  uint64_t free_bytes = 0;
  uint64_t largest_free_block = 0;
  // What /dev/shm holds for the pool (its files' allocated pages, control
  // segment included), and the bytes given back to the kernel so far
  // (pages punched out of idle free blocks, segments removed).
  uint64_t reserved_bytes = 0;
  uint64_t returned_bytes = 0;
  uint32_t processes = 0;
  uint32_t segments = 0;
  PoolConfig config{};
  std::vector<int> pids;  // live attached processes
};

// kFast: try the lock once and make no system call; an operation that would
// have to wait or call the kernel returns "not done" (nullopt / false) and
// changes nothing, so that the caller can release the GIL and retry in
// kSlow, which waits, maps segments, grows the pool and repairs after dead
// processes.
enum class Mode { kFast, kSlow };

// The process that started the program: the one whose first import picked
// the pool's token (PYARRAYPOOL_ROOT). It may not be attached yet, since a
// process attaches on first use, and still be about to load pickles its
// workers sent before they exited; while it lives, the last process to
// leave keeps a pool that has pickles in flight, and no cleaner removes it.
// Its liveness is read from /proc (it may never hold a slot), so only a
// process in the root's own pid namespace can judge it; from another one
// (a container sharing /dev/shm) the root counts as alive: a pool kept too
// long is removed by the root's exit or by `clean`, while one removed too
// early loses the pickles in flight.
struct ProgramRoot {
  int pid = 0;              // 0: unknown, no such protection
  uint64_t start_time = 0;  // process_start_time(pid), against pid reuse
  uint64_t pid_ns = 0;      // inode of the root's /proc/self/ns/pid; 0: unknown
};

// A 64-bit name of the program whose root is `root` (a hash of its pid,
// start time and pid namespace, which every process of the program got
// alike), recorded in each process slot (ProcessSlot::program); 0 for no
// root (unknown, or a pool shared by independent programs).
uint64_t program_id(const ProgramRoot& root);

struct ControlHeader;
struct PoolSnapshot;

class Pool {
 public:
  // Attaches this process to the pool `token`, creating it with `config` if
  // it does not exist yet. Throws CoreError.
  // `root` is the root of this process's program: recorded by the process
  // that creates the pool, and the program of this process's slot.
  static std::unique_ptr<Pool> attach(const std::string& token, const PoolConfig& config,
                                      ProgramRoot root = {});
  // Attaches only if the pool exists; nullptr otherwise.
  static std::unique_ptr<Pool> attach_existing(const std::string& token,
                                               const ProgramRoot& root = {});
  // Attaches to an existing pool only to look at it (stats, snapshot):
  // the process is not counted among the pool's processes, keeps no pool
  // alive, and changes nothing but what repairing after a dead lock owner
  // requires: no reclaim or expiry of its own, so that those, and their
  // warnings, happen in the pool's own processes. nullptr if no such pool.
  static std::unique_ptr<Pool> attach_observer(const std::string& token);
  ~Pool();
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  const std::string& token() const { return token_; }
  const PoolId& id() const { return id_; }
  PoolConfig config() const;
  // 32 hex digits drawn when the pool was created; differs between two
  // pools even if they have the same token.
  std::string instance_id() const;
  // The same 16 bytes, as handles carry them.
  PoolId instance() const;
  uint32_t slot() const { return slot_; }

  // A new block of at least `bytes` payload, held by this process. `flags`:
  // kFlagTransferRequired (what `true` converts to) and kFlagPrivate.
  std::optional<Block> allocate(uint64_t bytes, uint32_t flags, Mode mode);
  // Drops this process's hold on a block; frees it if nobody else needs it.
  bool release(BlockRef ref, uint64_t generation, Mode mode);
  // The same for a block this process allocated and never shared (no
  // handle made, no fork while held): in kFast it may keep the block in the
  // local cache (local_cache.hpp) instead.
  bool release_unshared(const Block& b, Mode mode);
  // Counts one more pickle in flight (a no-op for blocks that do not
  // require transfer tracking).
  bool add_pending(BlockRef ref, uint64_t generation, Mode mode);
  // Takes a hold on the block a handle names, after checking that it still
  // exists with that generation and that bytes [lo, hi) of its payload
  // exist; consumes one pending count if the handle required transfer.
  // Throws kStaleHandle / kInvalidHandle.
  std::optional<Block> attach_block(const Handle& h, uint64_t lo, uint64_t hi, Mode mode);

  // Reclaims what dead processes held and expired pending counts. Returns
  // the bytes freed. Also gives idle memory back (return_idle_memory).
  uint64_t collect();
  // Gives back to the kernel the pages of free blocks that have been free
  // for config().decay_ns or longer (a hole punched in the segment file,
  // which leaves every process's page tables at once), and removes data
  // segments that hold nothing and have no page left. Takes the lock in
  // short holds, one piece of at most kReturnChunk bytes each. Returns the
  // bytes given back.
  uint64_t return_idle_memory();
  static constexpr uint64_t kReturnChunk = uint64_t{2} << 20;
  // The keeper's half: if the pool `token` (of `instance`) has memory due
  // to go back, attaches as an observer and gives it back.
  static void return_idle_memory_of(const std::string& token, const std::string& instance);
  // Test hook for crash tests: return_idle_memory as if every free page were
  // due, SIGKILLed (holding the lock) after a block's record says its first
  // piece is returned and before the hole is punched.
  [[noreturn]] void die_while_returning();
  PoolStats stats();
  // stats() and, walking every block, memory by size class, what each
  // process holds and the pending pickles (pool_snapshot.hpp). Runs
  // maintenance first, as stats() does.
  PoolSnapshot snapshot();
  // Reclaims and expiries this process's maintenance has done since the
  // last call (see pool_events.hpp). `dropped`: events that did not fit.
  bool has_events() const { return !events_.empty(); }
  std::vector<PoolEvent> take_events(uint64_t* dropped, uint64_t* dropped_routine = nullptr) {
    return events_.drain(dropped, dropped_routine);
  }
  // In a fork child, at once (a pthread_atfork child handler: before any
  // other code of the child can record or drain an event): see
  // EventLog::reset_after_fork_child.
  void reset_events_after_fork() { events_.reset_after_fork_child(); }
  // Detaches this process: drops all its holds and its slot; the last
  // process of the pool unlinks every segment when `unlink_if_last`.
  void leave(bool unlink_if_last = true);
  // At process exit: drops no hold (other threads, daemon threads and
  // later exit handlers may still touch pool memory until the process is
  // gone; the kernel then drops its slot lock, and survivors reclaim what
  // it held without a warning). If no other process needs the pool, it
  // unlinks every segment now; mappings stay valid until the process ends.
  // Every later operation of this process raises.
  void exit_process();
  bool left() const { return left_; }
  // Test hook for crash tests: leave() as the last process would, but
  // SIGKILL this process at `at`, the steps where a SIGTERM (Pool.terminate()
  // on a worker already exiting) can cut a real leave() short.
  enum class LeaveStep { kNone, kMarkedDead, kUnlocked, kDataUnlinked };
  [[noreturn]] void die_while_leaving(LeaveStep at);

  // fork(): before_fork reserves a slot for the child (locked through a
  // new open file description of the control file, which the child keeps)
  // and, under the pool lock, gives it a copy of this process's hold list;
  // blocks this process takes until the fork is over are copied too.
  // after_fork_child runs in a pthread_atfork child handler,
  // before any other code of the child: the child owns its slot before
  // anything can release an array in it. Without a reservation (the
  // reservation failed, or the fork did not go through before_fork) the
  // child claims a slot of its own and takes a hold on every block it
  // inherited that still exists; a child that cannot even do that is
  // detached and its inherited pool memory made inaccessible, never used
  // unprotected.
  void before_fork();
  // A pthread_atfork prepare handler: takes the local mutex (no thread may
  // be mid-way through mapping a segment at the fork).
  void lock_for_fork();
  void after_fork_parent();
  void after_fork_child();
  // Whether the owner of `slot` is alive (this process's own slot: true).
  bool slot_alive(uint32_t slot) const;

  // Checks every allocator and accounting invariant (tests, debug).
  void verify();
  // Test hook for crash tests: takes the pool lock and never releases it.
  void lock_forever();
  // Test hook for crash tests: holds the pool lock for `ns` nanoseconds.
  void hold_lock_for(uint64_t ns);

  // A block's header as the pool sees it (tests; read under the lock).
  struct BlockInfo {
    bool used;
    uint64_t size;  // whole block, header included
    uint64_t generation;
    uint32_t holders;                    // the count in the header
    std::vector<uint32_t> holder_slots;  // live slots whose hold list names it
    uint32_t pending;
    uint32_t flags;
    bool check_ok;
  };
  BlockInfo inspect_block(BlockRef ref);

  // Removes pools of this user whose processes are all dead (and orphaned
  // data segments). Returns the names removed (or that would be).
  static std::vector<std::string> clean_stale(bool dry_run, const std::string& keep_token);

  // The one decision, for one pool, of clean_stale and of the pool's keeper
  // (core/keeper.hpp): is the pool `token` abandoned (no live process, and
  // nothing kept for its program's root)? If so, removes its files (unless
  // `dry_run`) and appends their names to `removed` (if not null).
  // `instance` (32 hex digits, or empty for any): the pool instance the
  // caller watches; another one under that name counts as kGone.
  enum class Fate {
    kInUse,    // a process (or the root) may still use it: left alone
    kRemoved,  // abandoned: removed now (or would be, in a dry run)
    kGone,     // no such pool (or instance), or not ours to judge
  };
  // `decay_due` (if not null) is set when the pool is in use and has free
  // memory idle long enough to go back (return_idle_memory_of).
  static Fate remove_if_abandoned(const std::string& token, const std::string& instance,
                                  bool dry_run, std::vector<std::string>* removed,
                                  bool* decay_due = nullptr);

  // This process created the pool (attach() made it rather than found it).
  bool created() const { return created_; }

 private:
  class Guard;
  Pool(std::string token, Mapping control);

  void ensure_mapped();
  // The published segment count, checked against the table's size (it is
  // shared memory): the one place it is read for use as a bound.
  uint32_t published_segments() const;
  std::string segment_name(uint32_t index) const;
  bool all_mapped() const;
  bool retirements_seen() const;
  // Under the pool lock: unmaps the segments retired since this process
  // last looked, and maps anew those whose number was reused meanwhile.
  void remap_changed_segments();
  // Maps published segment `i`; false if it is retired. Safe without the
  // pool lock (see pool_segments.cpp).
  bool map_segment(uint32_t i, Mapping* out, uint64_t* nonce);
  uint32_t next_segment_number_locked() const;
  uint64_t retire_free_segments_locked(uint64_t wanted);
  // Retires the segments that hold nothing and have given back every page.
  void retire_returned_segments_locked();
  Allocator allocator() {
    return Allocator(alloc_state(), spans_, BlockRef::kMaxSegments, check_key_);
  }
  AllocState& alloc_state();
  ProcessTable& table();
  void claim_slot_or_throw();
  // Claims a free slot for `id` through `fd`; -1 if none is free.
  int claim_free_slot(int fd, uint64_t id);
  // Reserves the page of hold entries of a slot just claimed (or notes that
  // /dev/shm had no room for it).
  void use_slot_page(int fd, uint32_t slot);
  // Takes over a slot whose owner died (its holds are dropped first); -1 if
  // there is none. Never the slot of the lock's (dead) owner.
  int take_dead_slot(uint64_t id);
  static std::unique_ptr<Pool> attach_existing_as(const std::string& token, bool observer,
                                                  uint64_t program);
  // A pool marked dead long after its marker should have removed it or
  // marked it running again: that process was killed in between. We finish
  // what it was doing, deciding again as leave() does.
  enum class StuckDead { kRevived, kRemoved, kRetry };  // kRetry: look again
  StuckDead settle_stuck_dead();
  // leave()'s decision, under the lock: no live process but (possibly) us,
  // and no pickles in flight to a root that may still load them.
  bool nobody_needs_pool_locked(bool leaver_is_root);
  void leave_impl(bool unlink_if_last, LeaveStep die_at);
  SlotKind my_kind() const { return observer_ ? SlotKind::kObserver : SlotKind::kActive; }
  // Pages an allocation reserved, in this process's mapping.
  struct Reserved {
    unsigned char* addr = nullptr;
    uint64_t len = 0;
  };
  // `requested`: the payload bytes asked for (for a full /dev/shm's message).
  std::optional<Block> allocate_locked(uint64_t block_size, uint32_t flags, Mode mode,
                                       uint64_t requested, Reserved* reserved);
  // Reserves pages of a data segment for an allocation (pool_memory.cpp).
  class Reserver;
  // allocate() under the lock; `reserved` gets the pages it reserved, which
  // allocate() maps once the lock is released (populate_reserved).
  std::optional<Block> allocate_guarded(uint64_t bytes, uint32_t flags, Mode mode,
                                        Reserved* reserved);
  static void populate_reserved(const Reserved& r) noexcept;
  // A descriptor of data segment `i`, opened by its name and checked to be
  // the file this process maps there (under the lock).
  UniqueFd segment_fd(uint32_t i);
  // Bytes of /dev/shm the pool's files hold (their st_blocks).
  uint64_t reserved_bytes_locked();
  // One piece of return_idle_memory: false once nothing is due.
  bool return_one_piece_locked(uint64_t now_ms, uint64_t* returned);
  // Before reserving `more` bytes for `block`: gives back free reserved
  // pages (of other blocks, idle or not) until the pool's reservation stays
  // within the footprint bound (pool_memory.cpp).
  void keep_footprint_locked(BlockRef block, uint64_t more);
  // Gives back up to `bytes` of free reserved pages of blocks other than
  // `skip`, whatever their age. Returns the bytes given back.
  uint64_t give_back_locked(BlockRef skip, uint64_t bytes);
  // Punches [lo, hi), just recorded as returned in a free block of `seg`.
  void punch_locked(uint32_t seg, uint64_t lo, uint64_t hi, uint64_t* returned);
  // Retires segment `i`, which holds nothing: its pages punched first, so
  // that processes that still map it do not keep them.
  void retire_segment_locked(uint32_t i);
  void grow_locked(uint64_t block_size, uint64_t requested);
  // Lowers ControlHeader::decay_due_ms to when memory just freed is due.
  void note_freed_locked();
  // used_bytes without this process's cache of freed small blocks (which
  // counts as used, but holds no array): what the footprint bound calls live.
  uint64_t live_bytes_locked() const;
  void free_if_unused(BlockRef ref, BlockHeader& h);
  BlockHeader* checked_header(BlockRef ref, uint64_t generation);
  // `also_dead` slots are treated as dead owners'; `also_dead_id`, if not 0,
  // is the id their dead owner had (for the reclaim event; 0: no event, as
  // when a process leaves).
  uint64_t maintain_locked(bool force_rebuild, int also_dead = -1, uint64_t also_dead_id = 0);
  // Hold lists (pool_holds.cpp). All under the lock.
  // Room for one more entry in this process's list (and in the child's
  // while a fork is under way); false if a list block cannot be had
  // without growing the pool (kFast) or at all (kSlow: after growing).
  bool reserve_hold_locked(Mode mode);
  // Names the block in this process's list (and the child's during a
  // fork) and counts the holds. Needs reserve_hold_locked() first.
  void add_hold_locked(BlockRef ref, uint64_t generation, BlockHeader& h, bool counted);
  // Drops this process's hold on the block; frees it if unused.
  void drop_hold_locked(BlockRef ref, BlockHeader& h);
  // The list of `slot` if it checks out (nullptr if it has none); throws
  // kPool if the slot names something that is not its list.
  HoldEntry* hold_list(uint32_t slot, uint32_t* length, uint32_t* capacity);
  // hold_list(slot_), remembered while the slot names the same list.
  HoldEntry* my_list(uint32_t* length, uint32_t* capacity);
  // The block an entry names, if it is still that used array block.
  BlockHeader* held_block(const HoldEntry& e);
  bool grow_hold_list_locked(uint32_t slot, uint32_t capacity, Mode mode);
  std::optional<BlockRef> allocate_list_locked(uint32_t owner, uint32_t capacity, Mode mode);
  void rebuild_hold_index_locked();
  void drop_all_holds_locked();
  void empty_hold_list_locked();
  bool copy_holds_to_child_locked(uint32_t child);
  UniqueFd open_control_fd() const;
  // A fork child that cannot hold what it inherited: detached, and its
  // mappings of pool memory made inaccessible. Says why on stderr.
  void detach_inherited(const char* why) noexcept;
  // The used block `ref` with this generation, checked like a handle's
  // (mapped segment, inside it, used, generation and check); else nullptr.
  BlockHeader* find_header(BlockRef ref, uint64_t generation);
  void stats_locked(PoolStats* s);
  void snapshot_locked(PoolSnapshot* s);
  // Whether a process other than this one still uses the pool (a live,
  // non-exiting, non-observer slot).
  bool another_process_alive_locked();
  // slot_alive(), without a system call for a slot that `hint`
  // (liveness::locked_bytes_hint, taken once per walk of the table) lists
  // as locked: a walk then costs one read of /proc/locks plus a question
  // per slot not listed, not a question per slot.
  bool slot_alive_hinted(uint32_t slot, const std::vector<bool>& hint) const;
  std::vector<bool> liveness_hint() const;
  uint32_t live_processes_locked(uint64_t now, std::vector<int>* pids, bool count_me = true);
  [[noreturn]] void throw_full(uint64_t bytes);
  // What uses the pool, for error messages (walks every block).
  std::string usage_locked();

  std::string token_;
  PoolId id_;
  Mapping control_;
  ControlHeader* hdr_;
  uint64_t check_key_;  // ControlHeader::check_key, read once: it never changes
  uint32_t slot_ = 0;
  int pid_ = 0;           // getpid() is a system call: kept for add_pending's sender
  uint64_t program_ = 0;  // program_id() of this process's program, for its slots
  // This process's own open file description of the control file, whose
  // lock on byte slot_ says it is alive (liveness.hpp). O_CLOEXEC.
  UniqueFd ctl_fd_;
  // This process's holds: block -> entry of its hold list, the entries
  // below the list's length that are free, and whether the index must be
  // rebuilt from the shared list (a fork child, at its first locked call).
  HoldIndex holds_;
  HoldEntry* my_list_ = nullptr;  // see my_list()
  uint64_t my_list_bits_ = 0;
  uint32_t my_list_slot_ = 0;
  uint32_t my_list_capacity_ = 0;
  std::vector<uint32_t> free_holds_;
  bool holds_stale_ = false;
  // A fork child without a reservation: hold again what the index
  // (inherited from the parent) names, at the first locked call.
  bool rehold_inherited_ = false;
  // The slot reserved for a child between before_fork and after_fork_*;
  // blocks allocated or attached meanwhile go into its hold list too, at
  // the same position as in ours. Its lock is held through child_fd_.
  std::atomic<int> child_slot_{-1};
  UniqueFd child_fd_;
  bool fork_prepared_ = false;
  bool left_ = false;
  bool observer_ = false;        // see attach_observer
  bool created_ = false;         // see created()
  bool kill_in_return_ = false;  // see die_while_returning()

  // Local view of the data segments. Entries [0, mapped_) are valid and
  // never change; appends are serialized by local_mutex_, and readers (under
  // the pool lock) see a prefix. Lock order: pool lock, then local_mutex_.
  std::mutex local_mutex_;
  std::unique_ptr<Mapping[]> mappings_;
  SegmentSpan spans_[BlockRef::kMaxSegments] = {};
  std::atomic<uint32_t> mapped_{0};
  // The nonce of the segment mapped at each number (0: none): a number is
  // reused once its segment is retired, and this tells the two apart.
  uint64_t span_nonces_[BlockRef::kMaxSegments] = {};
  uint64_t seen_retired_epoch_ = 0;
  LocalCache cache_;
  EventLog events_;
  void drain_cache_locked();  // retired_epoch when this process last unmapped
};

}  // namespace pap
